"""Every ```sql block of docs/queries.md, run against an upgraded AEPsych file and a new store.

The expected values are the documented trials of the multi-stimulus
AEPsych file, written out in trial_fixtures.py. The new store records the
same seven tells.
"""

import json
import re
import sqlite3

import pytest

import aepsych_store
from conftest import ROOT
from trial_fixtures import (
    MULTI_STIMULUS,
    MULTI_STIMULUS_COLUMNS,
    MULTI_STIMULUS_TRIALS,
    SINGLE_STIMULUS_TRIALS,
    experiment_columns,
)

QUERIES = ROOT / "docs" / "queries.md"
PARAMETERS = MULTI_STIMULUS_COLUMNS[:4]
OUTCOMES = MULTI_STIMULUS_COLUMNS[4:]
THRESHOLD = 0
# The trials with an outcome above THRESHOLD: trial 1 (1, 0) and trial 3 (0.1, 0).
ABOVE_THRESHOLD = [0, 2]


def sql_blocks():
    """Return (heading, SQL) for every ```sql block, with the ## heading above it."""
    blocks = []
    heading = None
    for match in re.finditer(r"^## ([^\n]+)$|^```sql\n(.*?)^```$", QUERIES.read_text(encoding="utf-8"), re.M | re.S):
        if match.group(1) is not None:
            heading = match.group(1).strip()
        else:
            blocks.append((heading, match.group(2)))
    return blocks


def blocks_under(heading):
    return [sql for found, sql in sql_blocks() if found == heading]


def tell_of_trial(values):
    """Return the tell message AEPsych's client sends for one documented trial of two stimuli."""
    par1 = list(values[0:2])
    par2 = list(values[2:4])
    return {
        "type": "tell",
        "message": {"config": {"par1": par1, "par2": par2}, "outcome": list(values[4:6])},
        "extra_info": {"e1": 1, "e2": 2},
    }


@pytest.fixture(params=["upgraded legacy file", "new store"])
def fixture_file(request, legacy_copy, tmp_path):
    """Return (path, experiment_id of the multi-stimulus experiment in it)."""
    if request.param == "upgraded legacy file":
        path = legacy_copy(MULTI_STIMULUS)
        aepsych_store.upgrade_file(path, backup=False)
        return path, experiment_columns(path)[1]["experiment_id"]

    path = tmp_path / "new.sqlite"
    conn = aepsych_store.connect(path)
    try:
        # A second experiment first, so the queries must select by experiment_id.
        other = aepsych_store.record_setup(
            conn, {"type": "setup", "message": {"config_str": "[common]\nparnames = [x1, x2]\n"}}, experiment_id="single"
        )
        for x1, x2, outcome in SINGLE_STIMULUS_TRIALS:
            tell = {"type": "tell", "message": {"config": {"x1": [x1], "x2": [x2]}, "outcome": outcome}}
            aepsych_store.record_message(conn, other, "tell", tell)
        setup = {
            "type": "setup",
            "message": {"config_str": "[common]\nparnames = [par1, par2]\nstimuli_per_trial = 2\n"},
        }
        master_id = aepsych_store.record_setup(conn, setup, experiment_id="multi")
        for values in MULTI_STIMULUS_TRIALS:
            aepsych_store.record_message(conn, master_id, "ask", {"type": "ask", "message": ""})
            aepsych_store.record_message(conn, master_id, "tell", tell_of_trial(values))
    finally:
        conn.close()
    return path, "multi"


def run(path, sql, experiment_id, message_type="tell"):
    conn = sqlite3.connect(str(path))
    try:
        parameters = {"experiment_id": experiment_id, "threshold": THRESHOLD, "message_type": message_type}
        return conn.execute(sql, parameters).fetchall()
    finally:
        conn.close()


def test_every_block_checked():
    headings = [heading for heading, _ in sql_blocks()]

    assert headings == [
        "List the experiments",
        "One experiment's trials, one row per trial",
        "One experiment's trials, one row per trial",
        "One experiment's trials, one row per trial",
        "Tells whose outcome is above a threshold",
        "Tells whose outcome is above a threshold",
        "Messages of one type in time order",
    ]


def test_list_experiments(fixture_file):
    path, experiment_id = fixture_file
    (sql,) = blocks_under("List the experiments")

    rows = run(path, sql, experiment_id)

    assert experiment_id in [row[1] for row in rows]


def test_parameter_and_outcome_names(fixture_file):
    path, experiment_id = fixture_file
    sql = blocks_under("One experiment's trials, one row per trial")[0]

    rows = run(path, sql, experiment_id)

    expected = {("parameter", name) for name in PARAMETERS} | {("outcome", name) for name in OUTCOMES}
    assert sorted(rows) == sorted(expected)


def test_trials_as_columns(fixture_file):
    path, experiment_id = fixture_file
    sql = blocks_under("One experiment's trials, one row per trial")[1]

    rows = run(path, sql, experiment_id)

    assert [tuple(row[3:]) for row in rows] == MULTI_STIMULUS_TRIALS
    assert [row[2] for row in rows] == [1] * 7


def test_trials_long_form(fixture_file):
    path, experiment_id = fixture_file
    sql = blocks_under("One experiment's trials, one row per trial")[2]

    rows = run(path, sql, experiment_id)

    trials = {}
    for trial, _, kind, name, value in rows:
        trials.setdefault(trial, {})[name] = float(value)
    assert len(rows) == 7 * 6
    assert list(trials.values()) == [dict(zip(MULTI_STIMULUS_COLUMNS, values)) for values in MULTI_STIMULUS_TRIALS]
    assert [row[2] for row in rows[:6]] == ["parameter"] * 4 + ["outcome"] * 2


def test_tells_above_threshold(fixture_file):
    path, experiment_id = fixture_file
    sql = blocks_under("Tells whose outcome is above a threshold")[0]

    rows = run(path, sql, experiment_id)

    expected = [MULTI_STIMULUS_TRIALS[index] for index in ABOVE_THRESHOLD]
    assert [json.loads(row[3]) for row in rows] == [list(values[4:]) for values in expected]
    assert [json.loads(row[2]) for row in rows] == [
        {"par1": list(values[0:2]), "par2": list(values[2:4])} for values in expected
    ]


def test_outcomes_above_threshold(fixture_file):
    path, experiment_id = fixture_file
    sql = blocks_under("Tells whose outcome is above a threshold")[1]

    rows = run(path, sql, experiment_id)

    assert [(row[2], row[3]) for row in rows] == [("outcome_0", 1), ("outcome_0", 0.1)]


def test_messages_of_one_type(fixture_file):
    path, experiment_id = fixture_file
    (sql,) = blocks_under("Messages of one type in time order")

    tells = run(path, sql, experiment_id, "tell")
    asks = run(path, sql, experiment_id, "ask")

    assert [json.loads(row[2])["config"] for row in tells] == [
        {"par1": list(values[0:2]), "par2": list(values[2:4])} for values in MULTI_STIMULUS_TRIALS
    ]
    timestamps = [row[1] for row in tells]
    assert timestamps == sorted(timestamps)
    # json_extract returns a JSON string as SQL text, and objects as JSON text.
    assert [row[2] for row in asks] == [""] * 7
