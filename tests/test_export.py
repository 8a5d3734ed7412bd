"""--tocsv, --summarize and --combine, run as ``python -m aepsych_store`` in real subprocesses.

Expected values come from the documented trials of the real AEPsych files
(trial_fixtures.py) and from plain
sqlite3 reads of the files, never from the module's own output.
"""

import configparser
import csv
import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

import aepsych_store
from conftest import LEGACY_DIR, LEGACY_FILES, ROOT, run_cli
from trial_fixtures import (
    MULTI_STIMULUS,
    ORIGINAL_2021,
    KNOWN_TRIALS,
    SINGLE_STIMULUS,
    experiment_columns,
    many_trials,
    open_read_write,
    row_counts,
    tell_timestamps,
)

FIXED = ["experiment_id", "experiment_name", "experiment_description", "participant_id", "timestamp", "model_data"]


def listing(folder):
    return sorted(os.listdir(str(folder)))


def read_csv(path):
    with open(str(path), newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def assert_one_error_line(result, *words, code=1):
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert str(word) in lines[0]


def new_store(path, experiments):
    """Write a new store; experiments is a list of (experiment_id, [(x1, outcome), ...])."""
    conn = aepsych_store.connect(path)
    try:
        for experiment_id, tells in experiments:
            master_id = aepsych_store.record_setup(
                conn,
                {"type": "setup", "message": {"config_str": "[common]\nparnames = [x1]\n"}},
                experiment_id=experiment_id,
                participant_id="p-" + experiment_id,
                extra_metadata={"lab": "Vision"},
            )
            for x1, outcome in tells:
                aepsych_store.record_message(
                    conn, master_id, "tell", {"type": "tell", "message": {"config": {"x1": [x1]}, "outcome": outcome}}
                )
    finally:
        conn.close()
    return path


# ---------------------------------------------------------------------------
# --tocsv


@pytest.mark.parametrize("name", LEGACY_FILES)
def test_tocsv_legacy_file(legacy_copy, tmp_path, name):
    path = legacy_copy(name)
    original = path.read_bytes()
    out = tmp_path / "out" / "trials.csv"
    out.parent.mkdir()
    columns, trials = KNOWN_TRIALS[name]
    extra = ["e1", "e2"] if trials else []

    result = run_cli("--tocsv", out, path)

    assert result.returncode == 0, result.stderr
    header, rows = read_csv(out)
    assert header == FIXED + list(columns) + extra
    assert len(rows) == len(trials)
    experiment = experiment_columns(path)[1] if trials else None
    for row, values, timestamp in zip(rows, trials, tell_timestamps(path)):
        assert {key: row[key] for key in FIXED[:4]} == experiment
        assert row["timestamp"] == timestamp
        assert row["model_data"] == "True"
        assert [float(row[column]) for column in columns] == [float(value) for value in values]
        assert (row["e1"], row["e2"]) == ("1", "2")
    assert path.read_bytes() == original
    assert listing(path.parent) == sorted([path.name, "out"])
    assert listing(out.parent) == ["trials.csv"]


def test_tocsv_multi_stimulus_cells(legacy_copy, tmp_path):
    path = legacy_copy(MULTI_STIMULUS)
    out = tmp_path / "trials.csv"

    run_cli("--tocsv", out, path)

    _, rows = read_csv(out)
    # Parameter values are written as stored, so the 4 of the first tell stays "4".
    assert [row["par2_stimuli0"] for row in rows] == ["4", "3", "2", "0.3", "2", "1", "0.3"]


def test_tocsv_experiment_option(tmp_path):
    path = new_store(
        tmp_path / "store.sqlite",
        [("exp-a", [(0.1, 1)]), ("exp-b", [(0.2, 0), (0.3, 1)]), ("exp-a", [(0.4, 0)])],
    )
    out = tmp_path / "trials.csv"

    by_experiment_id = run_cli("--tocsv", out, path, "--experiment", "exp-a")
    _, experiment_a = read_csv(out)
    by_unique_id = run_cli("--tocsv", out, path, "--experiment", "2")
    _, master_2 = read_csv(out)

    assert by_experiment_id.returncode == 0, by_experiment_id.stderr
    assert [(row["experiment_id"], row["x1"]) for row in experiment_a] == [("exp-a", "0.1"), ("exp-a", "0.4")]
    assert by_unique_id.returncode == 0, by_unique_id.stderr
    assert [(row["experiment_id"], row["x1"]) for row in master_2] == [("exp-b", "0.2"), ("exp-b", "0.3")]


def test_tocsv_every_experiment(tmp_path):
    path = new_store(tmp_path / "store.sqlite", [("exp-a", [(0.1, 1)]), ("exp-b", [(0.2, 0)])])
    out = tmp_path / "trials.csv"

    result = run_cli("--tocsv", out, path)

    assert result.returncode == 0, result.stderr
    header, rows = read_csv(out)
    assert header == FIXED + ["x1", "outcome", "lab"]
    assert [(row["experiment_id"], row["participant_id"], row["x1"], row["outcome"], row["lab"]) for row in rows] == [
        ("exp-a", "p-exp-a", "0.1", "1.0", "Vision"),
        ("exp-b", "p-exp-b", "0.2", "0.0", "Vision"),
    ]


def test_tocsv_unknown_experiment(tmp_path):
    path = new_store(tmp_path / "store.sqlite", [("exp-a", [(0.1, 1)])])
    out = tmp_path / "trials.csv"

    result = run_cli("--tocsv", out, path, "--experiment", "exp-z")

    assert_one_error_line(result, "exp-z", "--summarize")
    assert listing(tmp_path) == ["store.sqlite"]


def test_tocsv_json_cells(tmp_path):
    path = tmp_path / "store.sqlite"
    conn = aepsych_store.connect(path)
    master_id = aepsych_store.record_setup(conn)
    tell = {"type": "tell", "message": {"config": {"x1": 1}, "outcome": 1}, "extra_info": {"path": [1, 2], "none": None}}
    aepsych_store.record_message(conn, master_id, "tell", tell)
    conn.close()
    out = tmp_path / "trials.csv"

    run_cli("--tocsv", out, path)

    _, (row,) = read_csv(out)
    assert json.loads(row["path"]) == [1, 2]
    assert row["none"] == ""


def test_tocsv_missing_db(tmp_path):
    path = tmp_path / "missing.db"
    out = tmp_path / "trials.csv"

    result = run_cli("--tocsv", out, path)

    assert_one_error_line(result, path, "not found")
    assert listing(tmp_path) == []


def test_tocsv_out_in_missing_folder(legacy_copy, tmp_path):
    path = legacy_copy(SINGLE_STIMULUS)
    original = path.read_bytes()
    out = tmp_path / "no-such-folder" / "trials.csv"

    result = run_cli("--tocsv", out, path)

    assert_one_error_line(result, out, "does not exist")
    assert listing(tmp_path) == [SINGLE_STIMULUS]
    assert path.read_bytes() == original


def test_tocsv_out_is_db(legacy_copy):
    path = legacy_copy(SINGLE_STIMULUS)
    original = path.read_bytes()

    result = run_cli("--tocsv", path, path)

    assert_one_error_line(result, path, "is the database itself")
    assert path.read_bytes() == original
    assert listing(path.parent) == [SINGLE_STIMULUS]


def test_tocsv_failure_leaves_no_file(tmp_path):
    path = new_store(tmp_path / "store.sqlite", [("exp-a", [(0.1, 1), (0.2, 0)])])
    raw = open_read_write(path)
    with raw:
        raw.execute("UPDATE raw_data SET extra_data = '{broken' WHERE unique_id = 2")
    raw.close()
    out = tmp_path / "trials.csv"
    out.write_text("an older export\n")

    result = run_cli("--tocsv", out, path)

    assert_one_error_line(result, "raw_data row 2")
    assert out.read_text() == "an older export\n"
    assert listing(tmp_path) == ["store.sqlite", "trials.csv"]


@pytest.mark.skipif(sys.platform == "win32", reason="the resource module is Unix-only")
def test_tocsv_memory_constant(tmp_path):
    small = tmp_path / "small.sqlite"
    large = tmp_path / "large.sqlite"
    many_trials(small, 2000)
    many_trials(large, 200000)

    small_peak = peak_memory_of_export(small, tmp_path / "small.csv")
    large_peak = peak_memory_of_export(large, tmp_path / "large.csv")

    with open(str(tmp_path / "large.csv"), newline="") as handle:
        assert sum(1 for _ in handle) == 200001
    # Holding the 200,000 rows would take well over 100 MB.
    assert large_peak - small_peak < 16 * 1024 * 1024, (small_peak, large_peak)


def peak_memory_of_export(db, out):
    """Run --tocsv in a fresh interpreter and return its peak resident memory in bytes."""
    script = (
        "import resource, sys\n"
        "import aepsych_store\n"
        "status = aepsych_store.main(['--tocsv', sys.argv[1], sys.argv[2]])\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
        "print(peak if sys.platform == 'darwin' else peak * 1024, file=sys.stderr)\n"
        "sys.exit(status)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", script, str(out), str(db)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stderr.split()[-1])


# ---------------------------------------------------------------------------
# --summarize


def expected_summaries(path):
    """Compute what --summarize reports for a file at the current schema version, with plain sqlite3."""
    conn = open_read_write(path)
    try:
        summaries = []
        for unique_id, experiment_id, name, description, participant_id, metadata in conn.execute(
            "SELECT unique_id, experiment_id, experiment_name, experiment_description, participant_id,"
            " extra_metadata FROM master ORDER BY unique_id"
        ).fetchall():
            messages = conn.execute(
                "SELECT timestamp, message_type, message_contents FROM replay_data WHERE master_table_id = ?"
                " ORDER BY unique_id",
                (unique_id,),
            ).fetchall()
            stimuli = 1
            setups = [json.loads(contents) for _, kind, contents in messages if kind == "setup"]
            if setups:
                parser = configparser.ConfigParser(interpolation=None)
                parser.read_string(setups[-1]["message"]["config_str"])
                stimuli = parser.getint("common", "stimuli_per_trial", fallback=1)
            trials = conn.execute(
                "SELECT unique_id FROM raw_data WHERE master_table_id = ? ORDER BY unique_id", (unique_id,)
            ).fetchall()
            names = {}
            for table, column in (("param_data", "param_name"), ("outcome_data", "outcome_name")):
                found = []
                for (trial_id,) in trials:
                    for (found_name,) in conn.execute(
                        "SELECT {} FROM {} WHERE iteration_id = ? ORDER BY unique_id".format(column, table), (trial_id,)
                    ):
                        if found_name not in found:
                            found.append(found_name)
                names[table] = found
            summaries.append(
                {
                    "unique_id": unique_id,
                    "experiment_id": experiment_id,
                    "experiment_name": name,
                    "experiment_description": description,
                    "participant_id": participant_id,
                    "extra_metadata_keys": list(json.loads(metadata)) if metadata else [],
                    "message_count": len(messages),
                    "created": messages[0][0] if messages else None,
                    "last_modified": messages[-1][0] if messages else None,
                    "stimuli_per_trial": stimuli,
                    "parameters": names["param_data"],
                    "outcomes": names["outcome_data"],
                    "trial_count": len(trials),
                }
            )
        return summaries
    finally:
        conn.close()


SUMMARY_HEADER = [
    "id", "experiment_id", "name", "description", "participant", "metadata keys", "messages",
    "created", "last modified", "stimuli", "parameters", "outcomes", "trials",
]


def parse_summary_table(stdout):
    """Split --summarize's aligned table into cells, using where each header name starts."""
    lines = stdout.splitlines()
    header = lines[0]
    starts = []
    position = 0
    for name in SUMMARY_HEADER:
        position = header.index(name, position)
        starts.append(position)
        position += len(name)
    assert header.split("  ")[0] == "id"
    ends = starts[1:] + [None]
    return [[line[start:end].strip() for start, end in zip(starts, ends)] for line in lines[1:]]


def summary_cells(summary):
    description = summary["experiment_description"] or ""
    if len(description) > 40:
        description = description[:37] + "..."
    return [
        str(summary["unique_id"]),
        summary["experiment_id"] or "",
        summary["experiment_name"] or "",
        description,
        summary["participant_id"] or "",
        ", ".join(summary["extra_metadata_keys"]),
        str(summary["message_count"]),
        summary["created"] or "",
        summary["last_modified"] or "",
        str(summary["stimuli_per_trial"]),
        ", ".join(summary["parameters"]),
        ", ".join(summary["outcomes"]),
        str(summary["trial_count"]),
    ]


def upgraded_twin(legacy_copy, tmp_path, name):
    """Return an upgraded copy of a legacy file in its own folder, to compute expected values from."""
    twin = tmp_path / "twin"
    twin.mkdir(exist_ok=True)
    target = twin / name
    shutil.copyfile(str(legacy_copy(name)), str(target))
    aepsych_store.upgrade_file(target, backup=False)
    return target


@pytest.mark.parametrize("name", [SINGLE_STIMULUS, MULTI_STIMULUS])
def test_summarize_table_legacy(legacy_copy, tmp_path, name):
    expected = expected_summaries(upgraded_twin(legacy_copy, tmp_path, name))
    path = legacy_copy(name)
    original = path.read_bytes()

    result = run_cli("--summarize", path)

    assert result.returncode == 0, result.stderr
    assert parse_summary_table(result.stdout) == [summary_cells(summary) for summary in expected]
    assert path.read_bytes() == original


@pytest.mark.parametrize("name", [SINGLE_STIMULUS, MULTI_STIMULUS])
def test_summarize_json_legacy(legacy_copy, tmp_path, name):
    expected = expected_summaries(upgraded_twin(legacy_copy, tmp_path, name))
    path = legacy_copy(name)

    result = run_cli("--summarize", "--json", path)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == expected


def test_summarize_multi_stimulus_values(legacy_copy):
    path = legacy_copy(MULTI_STIMULUS)

    (summary,) = json.loads(run_cli("--summarize", "--json", path).stdout)

    # The file's documented contents: two stimuli per trial, parameters par1 and par2, 7 trials in 15 messages.
    assert summary["stimuli_per_trial"] == 2
    assert summary["parameters"] == ["par1_stimuli0", "par1_stimuli1", "par2_stimuli0", "par2_stimuli1"]
    assert summary["outcomes"] == ["outcome_0", "outcome_1"]
    assert summary["trial_count"] == 7
    assert summary["message_count"] == 15


def test_summarize_new_store_metadata(tmp_path):
    path = new_store(tmp_path / "store.sqlite", [("exp-a", [(0.1, 1)]), ("exp-b", [])])
    conn = aepsych_store.connect(path)
    aepsych_store.record_setup(conn, experiment_description="a description longer than forty characters, cut")
    conn.close()
    expected = expected_summaries(path)

    table = run_cli("--summarize", path)
    as_json = run_cli("--summarize", "--json", path)

    assert parse_summary_table(table.stdout) == [summary_cells(summary) for summary in expected]
    assert json.loads(as_json.stdout) == expected
    assert expected[0]["extra_metadata_keys"] == ["lab"]
    assert parse_summary_table(table.stdout)[2][3] == "a description longer than forty chara..."


def test_summarize_empty_file_json(legacy_copy):
    path = legacy_copy(ORIGINAL_2021)

    result = run_cli("--summarize", "--json", path)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_json_needs_summarize(legacy_copy, tmp_path):
    path = legacy_copy(SINGLE_STIMULUS)

    result = run_cli("--tocsv", tmp_path / "out.csv", path, "--json")

    assert result.returncode == 2
    assert "--json" in result.stderr
    assert listing(tmp_path) == [SINGLE_STIMULUS]


# ---------------------------------------------------------------------------
# --combine


@pytest.fixture
def inputs(tmp_path):
    """Copy the three shared AEPsych files into tmp_path/inputs and return that folder."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in LEGACY_FILES:
        shutil.copyfile(str(LEGACY_DIR / name), str(folder / name))
    return folder


def master_ids_by_experiment(path):
    return {columns["experiment_id"]: unique_id for unique_id, columns in experiment_columns(path).items()}


def test_combine_shared_files(inputs, tmp_path):
    out = tmp_path / "all.sqlite"
    files = [inputs / name for name in LEGACY_FILES]

    result = run_cli("--combine", out, *files)

    assert result.returncode == 0, result.stderr
    summaries = json.loads(run_cli("--summarize", "--json", out).stdout)
    # The inputs in command-line order; the 2021 file has no experiment.
    expected_ids = [experiment_columns(inputs / name)[1]["experiment_id"] for name in (SINGLE_STIMULUS, MULTI_STIMULUS)]
    assert [summary["experiment_id"] for summary in summaries] == expected_ids
    assert [summary["trial_count"] for summary in summaries] == [7, 7]
    for name in LEGACY_FILES:
        assert (inputs / name).read_bytes() == (LEGACY_DIR / name).read_bytes()
    assert listing(inputs) == sorted(LEGACY_FILES)


def test_combine_records_origin(inputs, tmp_path):
    out = tmp_path / "all.sqlite"

    run_cli("--combine", out, inputs)

    raw = open_read_write(out)
    try:
        metadata = [json.loads(row[0]) for row in raw.execute("SELECT extra_metadata FROM master ORDER BY unique_id")]
    finally:
        raw.close()
    assert metadata == [
        {"origin_db": os.path.realpath(str(inputs / MULTI_STIMULUS)), "origin_master_id": 1},
        {"origin_db": os.path.realpath(str(inputs / SINGLE_STIMULUS)), "origin_master_id": 1},
    ]


def test_combine_rerun_adds_nothing(inputs, tmp_path):
    out = tmp_path / "all.sqlite"
    run_cli("--combine", out, inputs)
    counts = row_counts(out)

    result = run_cli("--combine", out, inputs)

    assert result.returncode == 0, result.stderr
    assert row_counts(out) == counts
    assert counts["master"] == 2
    for name in LEGACY_FILES:
        assert (inputs / name).read_bytes() == (LEGACY_DIR / name).read_bytes()


def table_rows(path, sql, master_id):
    raw = open_read_write(path)
    try:
        return raw.execute(sql, (master_id,)).fetchall()
    finally:
        raw.close()


LINKED_ROWS = {
    "replay_data": (
        "SELECT timestamp, message_type, message_contents, extra_info FROM replay_data"
        " WHERE master_table_id = ? ORDER BY unique_id"
    ),
    "strat_data": "SELECT timestamp, strat, strat_format FROM strat_data WHERE master_table_id = ? ORDER BY unique_id",
    "config_data": "SELECT timestamp, config FROM config_data WHERE master_table_id = ? ORDER BY unique_id",
    "raw_data": "SELECT timestamp, model_data, extra_data FROM raw_data WHERE master_table_id = ? ORDER BY unique_id",
    "param_data": (
        "SELECT r.timestamp, p.param_name, p.param_value FROM raw_data r JOIN param_data p ON p.iteration_id = r.unique_id"
        " WHERE r.master_table_id = ? ORDER BY r.unique_id, p.unique_id"
    ),
    "outcome_data": (
        "SELECT r.timestamp, o.outcome_name, o.outcome_value FROM raw_data r"
        " JOIN outcome_data o ON o.iteration_id = r.unique_id WHERE r.master_table_id = ? ORDER BY r.unique_id, o.unique_id"
    ),
}


@pytest.mark.parametrize("table", sorted(LINKED_ROWS))
def test_combine_keeps_links(inputs, tmp_path, legacy_copy, table):
    out = tmp_path / "all.sqlite"
    run_cli("--combine", out, inputs)
    output_ids = master_ids_by_experiment(out)

    for name in (MULTI_STIMULUS, SINGLE_STIMULUS):
        source = upgraded_twin(legacy_copy, tmp_path, name)
        experiment_id = experiment_columns(source)[1]["experiment_id"]
        expected = table_rows(source, LINKED_ROWS[table], 1)
        copied = table_rows(out, LINKED_ROWS[table], output_ids[experiment_id])
        assert copied == expected, name
        assert expected, name


def test_combine_output_consistent(inputs, tmp_path):
    out = tmp_path / "all.sqlite"

    run_cli("--combine", out, inputs)

    raw = open_read_write(out)
    try:
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        raw.close()


def test_combine_skips_unreadable_input(inputs, tmp_path):
    bad = inputs / "x.db"
    bad.write_text("this is a text file, not a database\n")
    out = tmp_path / "all.sqlite"

    result = run_cli("--combine", out, inputs)

    assert result.returncode == 3
    skipped = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 1
    assert str(bad) in skipped[0]
    assert "not a SQLite database" in skipped[0]
    assert row_counts(out)["master"] == 2
    assert bad.read_text() == "this is a text file, not a database\n"


def test_combine_missing_input(inputs, tmp_path):
    out = tmp_path / "all.sqlite"
    missing = tmp_path / "missing.db"

    result = run_cli("--combine", out, inputs / SINGLE_STIMULUS, missing)

    assert result.returncode == 3
    assert str(missing) in result.stderr
    assert row_counts(out)["master"] == 1


def test_combine_exclude(inputs, tmp_path):
    out = tmp_path / "all.sqlite"

    result = run_cli("--combine", out, inputs, "--exclude", inputs / SINGLE_STIMULUS)

    assert result.returncode == 0, result.stderr
    assert list(master_ids_by_experiment(out)) == [experiment_columns(inputs / MULTI_STIMULUS)[1]["experiment_id"]]


def test_combine_folder_holding_output(inputs):
    out = inputs / "all.sqlite"
    run_cli("--combine", out, inputs)

    result = run_cli("--combine", out, inputs)

    assert result.returncode == 0, result.stderr
    assert row_counts(out)["master"] == 2


def test_combine_output_as_input(inputs, tmp_path):
    out = tmp_path / "all.sqlite"

    result = run_cli("--combine", out, inputs / SINGLE_STIMULUS, out)

    assert result.returncode == 2
    assert "cannot be one of its inputs" in result.stderr
    assert not out.exists()


def test_combine_combined_file_again(inputs, tmp_path):
    first = tmp_path / "first.sqlite"
    run_cli("--combine", first, inputs)
    second = tmp_path / "second.sqlite"

    result = run_cli("--combine", second, first, inputs / MULTI_STIMULUS)

    # The copies in first.sqlite keep their origin, so the multi-stimulus experiment is not copied twice.
    assert result.returncode == 0, result.stderr
    assert row_counts(second)["master"] == 2


def test_combine_into_existing_store(inputs, tmp_path):
    out = new_store(tmp_path / "store.sqlite", [("exp-a", [(0.1, 1), (0.2, 0)])])
    before = table_rows(out, LINKED_ROWS["param_data"], 1)

    result = run_cli("--combine", out, inputs / SINGLE_STIMULUS)

    assert result.returncode == 0, result.stderr
    assert table_rows(out, LINKED_ROWS["param_data"], 1) == before
    ids = master_ids_by_experiment(out)
    assert sorted(ids.values()) == [1, 2]
    trials = table_rows(out, "SELECT count(*) FROM raw_data WHERE master_table_id = ?", 2)
    assert trials == [(7,)]


def test_combine_no_database_found(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "all.sqlite"

    result = run_cli("--combine", out, empty)

    assert_one_error_line(result, "no *.db or *.sqlite file found")
    assert not out.exists()


# ---------------------------------------------------------------------------
# Help


def test_help_lists_new_options():
    result = run_cli("--help")

    assert result.returncode == 0
    for option in ("--tocsv", "--summarize", "--json", "--experiment", "--combine", "--exclude"):
        assert option in result.stdout, option
    for status in ("0  success", "1  a file could not be used", "2  a wrong command line", "3  --update finished"):
        assert status in result.stdout, status


def test_combine_copies_of_one_file_once(tmp_path, legacy_copy):
    original = legacy_copy("aepsych-2022-multi-stimulus.db")
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in ("a.db", "b.db", "c.sqlite"):
        shutil.copyfile(str(original), str(folder / name))
    out = tmp_path / "combined.sqlite"

    result = run_cli("--combine", out, folder)

    assert result.returncode == 0, result.stderr
    conn = sqlite3.connect(str(out))
    experiments = conn.execute("SELECT count(*) FROM master").fetchone()[0]
    messages = conn.execute("SELECT count(*) FROM replay_data").fetchone()[0]
    conn.close()
    assert experiments == 1
    assert messages == 15


def test_tocsv_columns_grouped_across_experiments(tmp_path):
    path = tmp_path / "store.sqlite"
    conn = aepsych_store.connect(path)
    first = aepsych_store.record_setup(
        conn, {"type": "setup", "message": {"config_str": "[common]\nparnames = [x1]\n"}}, extra_metadata={"lab": "A"}
    )
    aepsych_store.record_message(
        conn, first, "tell", {"type": "tell", "message": {"config": {"x1": 1}, "outcome": 1}, "extra_info": {"rt": 2}}
    )
    second = aepsych_store.record_setup(conn, {"type": "setup", "message": {"config_str": "[common]\nparnames = [x3]\n"}})
    aepsych_store.record_message(
        conn, second, "tell", {"type": "tell", "message": {"config": {"x3": 5}, "outcome": {"a": 1, "b": 0}}}
    )
    conn.close()
    out = tmp_path / "trials.csv"

    result = run_cli("--tocsv", out, path)

    assert result.returncode == 0, result.stderr
    header = out.read_text().splitlines()[0].split(",")
    tail = header[header.index("x1"):]
    assert tail == ["x1", "x3", "outcome", "a", "b", "lab", "rt"]
