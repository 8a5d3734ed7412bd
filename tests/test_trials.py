"""Trial rows: how tells become raw_data, param_data and outcome_data rows, and iter_trials reading them.

Expected rows are the documented trials of the real AEPsych files, written
out, or follow from the tell each test records; experiment columns and timestamps come from plain
sqlite3 reads of the file.
"""

import json
import pickle
import sqlite3
import tracemalloc

import pytest

import aepsych_store
from conftest import build_legacy_file
from trial_fixtures import (
    MULTI_STIMULUS,
    SINGLE_STIMULUS,
    SINGLE_STIMULUS_EXTRA_INFO,
    experiment_columns,
    many_trials,
    known_rows,
    row_counts,
    tell_extra_info,
    tell_timestamps,
)

FIXED = ("experiment_id", "experiment_name", "experiment_description", "participant_id", "timestamp", "model_data")


def upgraded_copy(legacy_copy, name):
    path = legacy_copy(name)
    aepsych_store.upgrade_file(path, backup=False)
    return path


def read_trials(path, master_id=None):
    conn = aepsych_store.connect(path, read_only=True)
    try:
        return list(aepsych_store.iter_trials(conn, master_id))
    finally:
        conn.close()


def without_fixed(rows):
    return [{key: value for key, value in row.items() if key not in FIXED} for row in rows]


def setup_request(parnames, stimuli_per_trial=1):
    config_str = "[common]\nparnames = [{}]\nstimuli_per_trial = {}\n".format(", ".join(parnames), stimuli_per_trial)
    return {"type": "setup", "message": {"config_str": config_str}}


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "store.sqlite"
    conn = aepsych_store.connect(path)
    yield path, conn
    conn.close()


# ---------------------------------------------------------------------------
# The real AEPsych files


def test_iter_trials_multi_stimulus_known(legacy_copy):
    path = upgraded_copy(legacy_copy, MULTI_STIMULUS)
    experiment = experiment_columns(path)[1]
    timestamps = tell_timestamps(path)
    extra_info = tell_extra_info(path)
    known = [
        # par1_stimuli0, par1_stimuli1, par2_stimuli0, par2_stimuli1, outcome_0, outcome_1
        (0.1, 0.2, 4, 0.1, 1, 0),
        (0.3, 1, 3, 0.2, -1, 0),
        (2, 3, 2, 1, 0.1, 0),
        (4, 0.1, 0.3, 0.2, 0, 0),
        (0.2, 2, 2, 0.3, -0.1, 0),
        (1, 0.3, 1, 0.1, 0, 0),
        (0.3, 0.1, 0.3, 4, 0, 0),
    ]
    expected = []
    for timestamp, extra, values in zip(timestamps, extra_info, known):
        row = dict(experiment, timestamp=timestamp, model_data=True)
        row.update(zip(("par1_stimuli0", "par1_stimuli1", "par2_stimuli0", "par2_stimuli1"), values[:4]))
        row.update(outcome_0=values[4], outcome_1=values[5])
        row.update(extra)
        expected.append(row)

    rows = read_trials(path)

    assert len(timestamps) == 7
    assert rows == expected


def test_iter_trials_multi_stimulus_key_order(legacy_copy):
    path = upgraded_copy(legacy_copy, MULTI_STIMULUS)

    rows = read_trials(path)

    expected_keys = list(FIXED) + [
        "par1_stimuli0", "par1_stimuli1", "par2_stimuli0", "par2_stimuli1", "outcome_0", "outcome_1", "e1", "e2"
    ]
    assert [list(row) for row in rows] == [expected_keys] * 7


def test_iter_trials_numeric_text_types(legacy_copy):
    path = upgraded_copy(legacy_copy, MULTI_STIMULUS)

    first = read_trials(path)[0]

    # The tell held par2 = [4, 0.1]: an int and a float.
    assert type(first["par2_stimuli0"]) is int
    assert type(first["par2_stimuli1"]) is float


def test_iter_trials_single_stimulus_known(legacy_copy):
    path = upgraded_copy(legacy_copy, SINGLE_STIMULUS)
    experiment = experiment_columns(path)[1]
    timestamps = tell_timestamps(path)
    known = [(0.1, 4, 1), (0.2, 0.1, -1), (0.3, 3, 0.1), (1, 0.2, 0), (2, 2, -0.1), (3, 1, 0), (4, 0.3, 0)]
    expected = [
        dict(experiment, timestamp=timestamp, model_data=True, x1=x1, x2=x2, outcome=outcome, e1=1, e2=2)
        for timestamp, (x1, x2, outcome) in zip(timestamps, known)
    ]

    rows = read_trials(path)

    assert len(rows) == 7
    assert rows == expected


def test_iter_trials_legacy_read_only_copy(legacy_copy):
    path = legacy_copy(SINGLE_STIMULUS)
    before = path.read_bytes()

    conn = aepsych_store.connect(path, read_only=True, upgrade=True)
    try:
        rows = list(aepsych_store.iter_trials(conn))
    finally:
        conn.close()

    assert without_fixed(rows) == [dict(row, **SINGLE_STIMULUS_EXTRA_INFO) for row in known_rows(SINGLE_STIMULUS)]
    assert path.read_bytes() == before


def test_iter_trials_one_experiment_of_many(tmp_path):
    path = tmp_path / "two.db"
    build_legacy_file(path, "2022")
    aepsych_store.upgrade_file(path, backup=False)

    first = read_trials(path, 1)
    second = read_trials(path, 2)
    every = read_trials(path)

    # Each built experiment has the tells x1 = 0.5 (outcome 1, extra_info rt) and x1 = 0.25 (outcome 0).
    expected = [{"x1": 0.5, "outcome": 1, "rt": 0.25}, {"x1": 0.25, "outcome": 0}]
    assert without_fixed(first) == expected
    assert without_fixed(second) == expected
    assert [row["experiment_id"] for row in first] == ["id-1", "id-1"]
    assert [row["experiment_id"] for row in second] == ["id-2", "id-2"]
    assert every == first + second


def test_iter_trials_unknown_experiment(store):
    path, conn = store

    with pytest.raises(aepsych_store.StoreError, match="experiment 7 not found"):
        list(aepsych_store.iter_trials(conn, 7))


def test_iter_trials_aepsych_08_pickled_extra_data(tmp_path):
    path = build_legacy_file(tmp_path / "aepsych-0.8.db", "2025")
    raw = sqlite3.connect(str(path))
    with raw:
        raw.execute("ALTER TABLE raw_data ADD COLUMN extra_data BLOB")
        # AEPsych 0.8 pickled the JSON text of extra_data.
        raw.execute(
            "UPDATE raw_data SET extra_data = ? WHERE unique_id = 1",
            (pickle.dumps(json.dumps({"rt": 0.4, "note": "first"})),),
        )
    raw.close()
    aepsych_store.upgrade_file(path, backup=False)

    rows = read_trials(path, 1)

    assert without_fixed(rows) == [{"x1": 0.5, "outcome": 1, "rt": 0.4, "note": "first"}]
    assert rows[0]["timestamp"] == "2023-01-01 10:00:02.000001"


# ---------------------------------------------------------------------------
# New tells of each shape


TELL_SHAPES = {
    "scalar": (1, {"config": {"x1": 0.5, "x2": 2}, "outcome": 1}, [{"x1": 0.5, "x2": 2, "outcome": 1}]),
    "one-element list": (1, {"config": {"x1": [0.5], "x2": [2]}, "outcome": [0]}, [{"x1": 0.5, "x2": 2, "outcome": 0}]),
    "k values, k outcomes": (
        1,
        {"config": {"x1": [0.1, 0.2, 0.3], "x2": [1, 2, 3]}, "outcome": [1, 0, 1]},
        [{"x1": 0.1, "x2": 1, "outcome": 1}, {"x1": 0.2, "x2": 2, "outcome": 0}, {"x1": 0.3, "x2": 3, "outcome": 1}],
    ),
    "s stimuli": (
        2,
        {"config": {"x1": [0.1, 0.2], "x2": [1, 2]}, "outcome": 1},
        [{"x1_stimuli0": 0.1, "x1_stimuli1": 0.2, "x2_stimuli0": 1, "x2_stimuli1": 2, "outcome": 1}],
    ),
    "k lists of s": (
        2,
        {"config": {"x1": [[0.1, 0.2], [0.3, 0.4]], "x2": [[1, 2], [3, 4]]}, "outcome": [1, 0]},
        [
            {"x1_stimuli0": 0.1, "x1_stimuli1": 0.2, "x2_stimuli0": 1, "x2_stimuli1": 2, "outcome": 1},
            {"x1_stimuli0": 0.3, "x1_stimuli1": 0.4, "x2_stimuli0": 3, "x2_stimuli1": 4, "outcome": 0},
        ],
    ),
    "outcome dict": (
        1,
        {"config": {"x1": 0.5, "x2": 2}, "outcome": {"rating": 4, "rt": 0.8}},
        [{"x1": 0.5, "x2": 2, "rating": 4, "rt": 0.8}],
    ),
    "outcome dict, k trials": (
        1,
        {"config": {"x1": [0.1, 0.2], "x2": [1, 2]}, "outcome": {"rating": [4, 5], "rt": [0.8, 0.9]}},
        [{"x1": 0.1, "x2": 1, "rating": 4, "rt": 0.8}, {"x1": 0.2, "x2": 2, "rating": 5, "rt": 0.9}],
    ),
    "outcome list in a multi-stimulus trial": (
        2,
        {"config": {"x1": [0.1, 0.2], "x2": [1, 2]}, "outcome": [1, 0]},
        [{"x1_stimuli0": 0.1, "x1_stimuli1": 0.2, "x2_stimuli0": 1, "x2_stimuli1": 2, "outcome_0": 1, "outcome_1": 0}],
    ),
    "outcome lists in k multi-stimulus trials": (
        2,
        {"config": {"x1": [[0.1, 0.2], [0.3, 0.4]], "x2": [[1, 2], [3, 4]]}, "outcome": [[1, 0], [0, 1]]},
        [
            {"x1_stimuli0": 0.1, "x1_stimuli1": 0.2, "x2_stimuli0": 1, "x2_stimuli1": 2, "outcome_0": 1, "outcome_1": 0},
            {"x1_stimuli0": 0.3, "x1_stimuli1": 0.4, "x2_stimuli0": 3, "x2_stimuli1": 4, "outcome_0": 0, "outcome_1": 1},
        ],
    ),
    "text parameter": (1, {"config": {"x1": "red", "x2": 2}, "outcome": 1}, [{"x1": "red", "x2": 2, "outcome": 1}]),
}


@pytest.mark.parametrize("shape", sorted(TELL_SHAPES))
def test_tell_shape_trials(store, shape):
    path, conn = store
    stimuli, message, expected = TELL_SHAPES[shape]
    master_id = aepsych_store.record_setup(conn, setup_request(["x1", "x2"], stimuli))

    aepsych_store.record_message(conn, master_id, "tell", {"type": "tell", "message": message})

    rows = read_trials(path)
    assert without_fixed(rows) == expected
    assert [row["model_data"] for row in rows] == [True] * len(expected)


def test_tell_model_data_false(store):
    path, conn = store
    master_id = aepsych_store.record_setup(conn, setup_request(["x1"]))
    message = {"config": {"x1": [0.5]}, "outcome": 1, "model_data": False}

    aepsych_store.record_message(conn, master_id, "tell", {"type": "tell", "message": message})

    assert [row["model_data"] for row in read_trials(path)] == [False]
    raw = sqlite3.connect(str(path))
    try:
        assert raw.execute("SELECT model_data FROM raw_data").fetchall() == [(0,)]
    finally:
        raw.close()


def test_tell_extra_keys(store):
    path, conn = store
    master_id = aepsych_store.record_setup(conn, setup_request(["x1"]))
    tell = {
        "type": "tell",
        "message": {"config": {"x1": [0.5]}, "outcome": 1, "trial_note": "slow"},
        "extra_info": {"rt": 0.31},
    }

    aepsych_store.record_message(conn, master_id, "tell", tell)

    assert without_fixed(read_trials(path)) == [{"x1": 0.5, "outcome": 1, "rt": 0.31, "trial_note": "slow"}]
    raw = sqlite3.connect(str(path))
    try:
        (extra_data,) = raw.execute("SELECT extra_data FROM raw_data").fetchone()
    finally:
        raw.close()
    assert json.loads(extra_data) == {"rt": 0.31, "trial_note": "slow"}


def test_tell_extra_metadata_columns(store):
    path, conn = store
    master_id = aepsych_store.record_setup(
        conn, setup_request(["x1"]), experiment_id="exp-9", extra_metadata={"lab": "Vision", "room": "2B"}
    )

    aepsych_store.record_message(conn, master_id, "tell", {"type": "tell", "message": {"config": {"x1": 1}, "outcome": 0}})

    (row,) = read_trials(path)
    assert row["experiment_id"] == "exp-9"
    assert list(row)[len(FIXED):] == ["x1", "outcome", "lab", "room"]
    assert (row["lab"], row["room"]) == ("Vision", "2B")


def test_tell_key_collision_prefixed(store):
    path, conn = store
    master_id = aepsych_store.record_setup(conn, setup_request(["x1"]))
    tell = {
        "type": "tell",
        "message": {"config": {"x1": 0.5}, "outcome": 1},
        "extra_info": {"timestamp": "client clock", "x1": 9},
    }

    aepsych_store.record_message(conn, master_id, "tell", tell)

    (row,) = read_trials(path)
    assert row["x1"] == 0.5
    assert row["extra_data.x1"] == 9
    assert row["extra_data.timestamp"] == "client clock"
    assert row["timestamp"] != "client clock"
    assert aepsych_store.trial_columns(conn) == list(FIXED) + ["x1", "outcome", "extra_data.timestamp", "extra_data.x1"]


BAD_TELLS = {
    "parameters of different lengths": (
        1,
        {"config": {"x1": [0.1, 0.2], "x2": [1]}, "outcome": [1, 0]},
        ["different numbers of trials", "x1 is a list of 2", "x2 is a list of 1"],
    ),
    "one outcome for two trials": (
        1,
        {"config": {"x1": [0.1, 0.2], "x2": [1, 2]}, "outcome": 1},
        ["2 trials", "outcome is a number"],
    ),
    "three values for two stimuli": (
        2,
        {"config": {"x1": [0.1, 0.2, 0.3], "x2": [1, 2, 3]}, "outcome": 1},
        ["x1 is a list of 3", "2 stimuli per trial"],
    ),
    "nested list for one stimulus": (
        1,
        {"config": {"x1": [[0.1]], "x2": [1]}, "outcome": 1},
        ["x1 is a list of 1 lists of 1 numbers"],
    ),
    "text outcome": (1, {"config": {"x1": 0.1, "x2": 1}, "outcome": "yes"}, ["the outcome is a str"]),
}


@pytest.mark.parametrize("case", sorted(BAD_TELLS))
def test_tell_bad_shape_writes_nothing(store, case):
    path, conn = store
    stimuli, message, shown = BAD_TELLS[case]
    master_id = aepsych_store.record_setup(conn, setup_request(["x1", "x2"], stimuli))
    before = row_counts(path)

    with pytest.raises(aepsych_store.StoreError) as raised:
        aepsych_store.record_message(conn, master_id, "tell", {"type": "tell", "message": message})

    for words in shown:
        assert words in str(raised.value)
    assert str(path) in str(raised.value)
    assert row_counts(path) == before


# ---------------------------------------------------------------------------
# Unusual rows


def test_iter_trials_orphan_trial(store):
    path, conn = store
    master_id = aepsych_store.record_setup(conn, setup_request(["x1"]))
    aepsych_store.record_message(conn, master_id, "tell", {"type": "tell", "message": {"config": {"x1": 1}, "outcome": 0}})
    raw = sqlite3.connect(str(path))  # foreign keys are off in a plain connection
    with raw:
        raw.execute("INSERT INTO raw_data VALUES (50, '2024-01-01 00:00:00.000000', 1, NULL, 99)")
        raw.execute("INSERT INTO param_data VALUES (50, 'x1', '7', 50)")
    raw.close()

    every = read_trials(path)
    one = read_trials(path, master_id)

    assert len(one) == 1
    assert every[:1] == one
    orphan = every[1]
    assert [orphan[column] for column in FIXED[:4]] == [None, None, None, None]
    assert orphan["x1"] == 7


def test_iter_trials_unreadable_extra_data(store):
    path, conn = store
    master_id = aepsych_store.record_setup(conn, setup_request(["x1"]))
    aepsych_store.record_message(conn, master_id, "tell", {"type": "tell", "message": {"config": {"x1": 1}, "outcome": 0}})
    raw = sqlite3.connect(str(path))
    with raw:
        raw.execute("UPDATE raw_data SET extra_data = '{not json'")
    raw.close()

    with pytest.raises(aepsych_store.UnreadableRowError, match="raw_data row 1"):
        read_trials(path)


# ---------------------------------------------------------------------------
# Streaming


def test_iter_trials_memory_flat(tmp_path):
    path = tmp_path / "many.sqlite"
    many_trials(path, 50000)
    conn = aepsych_store.connect(path, read_only=True)
    try:
        tracemalloc.start()
        count = 0
        for row in aepsych_store.iter_trials(conn):
            count += 1
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        conn.close()

    assert count == 50000
    # A list of 50,000 such dicts would take about 30 MB.
    assert peak < 2 * 1024 * 1024, peak


def query_plan(conn, sql, parameters):
    return [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, parameters)]


STREAMING_QUERIES = {
    "every trial": ("_SELECT_TRIALS", (), ["SCAN raw_data"]),
    "every parameter": ("_SELECT_TRIAL_PARAMS", (), ["SCAN param_data USING INDEX param_data_iteration_id"]),
    "every outcome": ("_SELECT_TRIAL_OUTCOMES", (), ["SCAN outcome_data USING INDEX outcome_data_iteration_id"]),
    "one experiment's trials": (
        "_SELECT_EXPERIMENT_TRIALS",
        (1,),
        ["SEARCH raw_data USING INDEX raw_data_master_table_id (master_table_id=?)"],
    ),
    "one experiment's parameters": (
        "_SELECT_EXPERIMENT_PARAMS",
        (1,),
        [
            "SEARCH r USING COVERING INDEX raw_data_master_table_id (master_table_id=?)",
            "SEARCH p USING INDEX param_data_iteration_id (iteration_id=?)",
        ],
    ),
    "one experiment's outcomes": (
        "_SELECT_EXPERIMENT_OUTCOMES",
        (1,),
        [
            "SEARCH r USING COVERING INDEX raw_data_master_table_id (master_table_id=?)",
            "SEARCH o USING INDEX outcome_data_iteration_id (iteration_id=?)",
        ],
    ),
}


@pytest.mark.parametrize("query", sorted(STREAMING_QUERIES))
def test_trial_queries_use_indexes(tmp_path, query):
    path = tmp_path / "some.sqlite"
    many_trials(path, 100)
    name, parameters, expected = STREAMING_QUERIES[query]
    conn = sqlite3.connect(str(path))
    try:
        plan = query_plan(conn, getattr(aepsych_store, name), parameters)
    finally:
        conn.close()

    # No "USE TEMP B-TREE FOR ORDER BY": the rows come in index order, unsorted.
    assert plan == expected


@pytest.mark.parametrize("field", ["params", "outcomes", "extra_keys", "extra_other"])
def test_trial_name_queries_use_index(tmp_path, field):
    path = tmp_path / "some.sqlite"
    many_trials(path, 100)
    conn = sqlite3.connect(str(path))
    try:
        plan = query_plan(conn, getattr(aepsych_store._EXPERIMENT_NAME_QUERIES, field), (1,))
    finally:
        conn.close()

    assert any("INDEX raw_data_master_table_id (master_table_id=?)" in step for step in plan), plan
    assert not any(step.startswith("SCAN r") or step.startswith("SCAN raw_data") for step in plan), plan


@pytest.mark.parametrize(
    "config, shown",
    [
        ({"x1": [0.1]}, "has the parameters x1 but the setup's [common] parnames is [x1, x2]"),
        ({"x1": [0.1], "x2": [4], "x3": [1]}, "has the parameters x1, x2, x3"),
    ],
    ids=["missing parameter", "unknown parameter"],
)
def test_tell_parameters_must_match_parnames(tmp_path, config, shown):
    conn = aepsych_store.connect(tmp_path / "store.sqlite")
    setup = {"type": "setup", "message": {"config_str": "[common]\nparnames = [x1, x2]\n"}}
    master_id = aepsych_store.record_setup(conn, setup)
    with pytest.raises(aepsych_store.StoreError) as raised:
        aepsych_store.record_message(
            conn, master_id, "tell", {"type": "tell", "message": {"config": config, "outcome": 1}}
        )
    counts = [conn.execute("SELECT count(*) FROM {}".format(t)).fetchone()[0] for t in ("replay_data", "raw_data")]
    conn.close()
    assert shown in str(raised.value)
    assert "nothing was written" in str(raised.value)
    assert counts == [1, 0]
