"""The command line, run as ``python -m aepsych_store`` in real subprocesses.

Expected values come from the input files, read with plain sqlite3, and from
schema.sql, never from the module's own output.
"""

import os
import re
import sqlite3
import subprocess
import sys

import pytest

import aepsych_store
from conftest import GENERATIONS, LEGACY_FILES, ROOT, build_legacy_file, run_cli

def listing(folder):
    return sorted(os.listdir(str(folder)))


# The helpers below open files read-write on purpose: a mode=ro connection
# to a WAL-mode file leaves PATH-wal and PATH-shm behind.


def read_version(path):
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def table_columns(conn, table):
    return [row[1] for row in conn.execute("PRAGMA table_info({})".format(table))]


def expected_changes(path):
    """Return the columns an upgrade adds and the UNIQUE columns it drops, per table.

    The version 1 columns come from schema.sql, the old ones from the file.
    """
    fresh = sqlite3.connect(":memory:")
    fresh.executescript((ROOT / "schema.sql").read_text(encoding="utf-8"))
    old = sqlite3.connect(str(path))
    added = []
    dropped_unique = []
    try:
        for table in ("master", "replay_data", "strat_data", "config_data"):
            old_columns = table_columns(old, table)
            added.extend((table, column) for column in table_columns(fresh, table) if column not in old_columns)
            for index in old.execute("PRAGMA index_list({})".format(table)).fetchall():
                if index[3] == "u":
                    for info in old.execute("PRAGMA index_info('{}')".format(index[1])):
                        dropped_unique.append((table, info[2]))
    finally:
        fresh.close()
        old.close()
    return added, dropped_unique


def replay_rows(path):
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute(
            "SELECT unique_id, timestamp, message_type, message_contents FROM replay_data ORDER BY unique_id"
        ).fetchall()
    finally:
        conn.close()


def experiment_rows(path):
    """Read every experiment's id, name, participant, message count, first and last time."""
    conn = sqlite3.connect(str(path))
    try:
        has_participant = "participant_id" in table_columns(conn, "master")
        participant = "participant_id" if has_participant else "NULL"
        rows = []
        for unique_id, name, participant_id in conn.execute(
            "SELECT unique_id, experiment_name, {} FROM master ORDER BY unique_id".format(participant)
        ).fetchall():
            times = [
                row[0]
                for row in conn.execute(
                    "SELECT timestamp FROM replay_data WHERE master_table_id = ? ORDER BY unique_id",
                    (unique_id,),
                )
            ]
            first, last = (times[0], times[-1]) if times else (None, None)
            rows.append((unique_id, name, participant_id, len(times), first, last))
        return rows
    finally:
        conn.close()


def assert_one_error_line(result, path, *reason_words):
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert str(path) in lines[0]
    for word in reason_words:
        assert word in lines[0]


def assert_update_rejected(path, *reason_words, extra_args=()):
    """Run --update on path, expect one error line, and check that nothing changed."""
    before = path.read_bytes()
    folder_before = listing(path.parent)

    result = run_cli("--update", path, *extra_args)

    assert_one_error_line(result, path, *reason_words)
    assert path.read_bytes() == before
    assert listing(path.parent) == folder_before


def copy_of(legacy_copy, name):
    path = legacy_copy(name)
    return path, path.read_bytes()


# ---------------------------------------------------------------------------
# --update on the real AEPsych files


@pytest.mark.parametrize("name", LEGACY_FILES)
@pytest.mark.parametrize("spelling", ["positional", "db_option"])
def test_update_legacy(legacy_copy, name, spelling):
    path = legacy_copy(name)
    added, dropped_unique = expected_changes(path)
    rows_before = replay_rows(path)
    folder_before = listing(path.parent)
    args = ["--update", path] if spelling == "positional" else ["--update", "--db", path]

    result = run_cli(*args)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert read_version(path) == aepsych_store.SCHEMA_VERSION
    # The upgrade rewrites pickled contents as JSON; ids, times and types stay.
    assert [row[:3] for row in replay_rows(path)] == [row[:3] for row in rows_before]

    new_files = sorted(set(listing(path.parent)) - set(folder_before))
    assert len(new_files) == 1
    backup = path.parent / new_files[0]
    assert str(backup) in result.stdout
    assert read_version(backup) == 0
    assert replay_rows(backup) == rows_before

    version_lines = [line.replace(str(path), "") for line in result.stdout.splitlines() if "version" in line]
    new_version = r"\b{}\b".format(aepsych_store.SCHEMA_VERSION)
    assert any(re.search(r"\b0\b", line) and re.search(new_version, line) for line in version_lines)
    lines = result.stdout.splitlines()
    for table, column in added:
        assert any(table in line and column in line for line in lines), (table, column)
    for table, column in dropped_unique:
        assert any(table in line and "UNIQUE" in line and column in line for line in lines), (table, column)


@pytest.mark.parametrize("name", LEGACY_FILES)
def test_update_backup_identical(legacy_copy, name):
    path, original = copy_of(legacy_copy, name)
    folder_before = listing(path.parent)

    result = run_cli("--update", path)

    assert result.returncode == 0, result.stderr
    new_files = sorted(set(listing(path.parent)) - set(folder_before))
    assert len(new_files) == 1
    assert (path.parent / new_files[0]).read_bytes() == original


@pytest.mark.parametrize("generation", GENERATIONS)
def test_update_built(tmp_path, generation):
    path = build_legacy_file(tmp_path / "legacy-{}.db".format(generation), generation)
    rows_before = replay_rows(path)

    result = run_cli("--update", path)

    assert result.returncode == 0, result.stderr
    assert read_version(path) == aepsych_store.SCHEMA_VERSION
    assert [row[:3] for row in replay_rows(path)] == [row[:3] for row in rows_before]


@pytest.mark.parametrize("name", LEGACY_FILES)
def test_update_no_backup(legacy_copy, name):
    path = legacy_copy(name)
    folder_before = listing(path.parent)

    result = run_cli("--update", "--no-backup", path)

    assert result.returncode == 0, result.stderr
    assert read_version(path) == aepsych_store.SCHEMA_VERSION
    assert listing(path.parent) == folder_before


@pytest.mark.parametrize("name", LEGACY_FILES)
def test_update_rerun(legacy_copy, name):
    path = legacy_copy(name)
    first = run_cli("--update", path)
    assert first.returncode == 0, first.stderr
    upgraded = path.read_bytes()
    folder_after_first = listing(path.parent)

    second = run_cli("--update", path)

    assert second.returncode == 0, second.stderr
    assert "already" in second.stdout
    assert str(path) in second.stdout
    assert path.read_bytes() == upgraded
    assert listing(path.parent) == folder_after_first


# ---------------------------------------------------------------------------
# --update on files it must reject


def test_update_missing_file(tmp_path):
    path = tmp_path / "missing.db"

    result = run_cli("--update", path)

    assert_one_error_line(result, path, "not found")
    assert listing(tmp_path) == []


def test_update_db_option_missing(tmp_path):
    path = tmp_path / "missing.db"

    result = run_cli("--update", "--db", path)

    assert_one_error_line(result, path, "not found")
    assert listing(tmp_path) == []


def test_update_not_sqlite(tmp_path):
    path = tmp_path / "trials.db"
    path.write_bytes(b"participant,trial,outcome\n" * 400)

    assert_update_rejected(path, "not a SQLite database")


def test_update_zero_byte(tmp_path):
    path = tmp_path / "empty.db"
    path.write_bytes(b"")

    assert_update_rejected(path, "empty")


@pytest.mark.parametrize("name", LEGACY_FILES)
def test_update_truncated_legacy(legacy_copy, name):
    path = legacy_copy(name)
    with open(str(path), "r+b") as handle:
        handle.truncate(5000)

    assert_update_rejected(path, "damaged")


def test_update_truncated_new(tmp_path):
    path = tmp_path / "many.db"
    conn = aepsych_store.connect(path)
    master_id = aepsych_store.record_setup(conn, experiment_name="many rows")
    conn.close()
    conn = sqlite3.connect(str(path))
    with conn:
        conn.executemany(
            "INSERT INTO replay_data (timestamp, message_type, message_contents, master_table_id)"
            " VALUES ('2024-05-01 09:00:00.000001', 'tell', ?, ?)",
            [('{"trial": %d, "padding": "%s"}' % (i, "x" * 100), master_id) for i in range(3000)],
        )
    conn.close()
    size = path.stat().st_size
    assert size > 100000
    with open(str(path), "r+b") as handle:
        handle.truncate(size // 2)

    assert_update_rejected(path, "damaged")


@pytest.mark.parametrize("version", [aepsych_store.SCHEMA_VERSION + 1, 2**31 - 1])
def test_update_newer_version(legacy_copy, version):
    path = legacy_copy("aepsych-2022-single-stimulus.db")
    conn = sqlite3.connect(str(path))
    conn.execute("PRAGMA user_version = {:d}".format(version))
    conn.commit()
    conn.close()

    assert_update_rejected(path, "newer", str(version))


def test_update_not_aepsych(tmp_path):
    path = tmp_path / "notebook.db"
    conn = sqlite3.connect(str(path))
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.execute("INSERT INTO notes VALUES ('a lab notebook')")
    conn.commit()
    conn.close()

    assert_update_rejected(path, "not an AEPsych database")


def test_update_unknown_column(tmp_path):
    path = build_legacy_file(tmp_path / "legacy.db", "2022")
    conn = sqlite3.connect(str(path))
    conn.execute("ALTER TABLE replay_data ADD COLUMN reaction_ms INTEGER")
    conn.commit()
    conn.close()

    assert_update_rejected(path, "reaction_ms")


LOCK_HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(60)
"""


def test_update_locked(legacy_copy):
    path = legacy_copy("aepsych-2022-single-stimulus.db")
    before = path.read_bytes()
    folder_before = listing(path.parent)
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(path)], stdout=subprocess.PIPE, universal_newlines=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"

        result = run_cli("--update", "--timeout", "0.2", path)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()

    assert_one_error_line(result, path, "locked")
    assert path.read_bytes() == before
    assert listing(path.parent) == folder_before


# ---------------------------------------------------------------------------
# --summarize


def assert_summary(stdout, experiments):
    """Check one line per experiment: id first, then name, participant, count, first and last time."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    experiment_lines = [line for line in lines if line.split()[0].isdigit()]
    assert len(experiment_lines) == len(experiments)
    for line, (unique_id, name, participant_id, count, first, last) in zip(experiment_lines, experiments):
        assert line.split()[0] == str(unique_id)
        position = 0
        for value in (name, participant_id, count, first, last):
            if value is None:
                continue
            found = line.find(" {}".format(value), position)
            assert found >= 0, (value, line)
            position = found + len(str(value)) + 1


@pytest.mark.parametrize("name", LEGACY_FILES)
def test_summarize_legacy(legacy_copy, name):
    path, original = copy_of(legacy_copy, name)
    experiments = experiment_rows(path)
    folder_before = listing(path.parent)

    result = run_cli("--summarize", path)

    assert result.returncode == 0, result.stderr
    assert_summary(result.stdout, experiments)
    assert path.read_bytes() == original
    assert listing(path.parent) == folder_before


@pytest.mark.parametrize("name", LEGACY_FILES)
def test_summarize_upgraded(legacy_copy, name):
    path = legacy_copy(name)
    experiments = experiment_rows(path)
    assert run_cli("--update", "--no-backup", path).returncode == 0
    upgraded = path.read_bytes()

    result = run_cli("--summarize", path)

    assert result.returncode == 0, result.stderr
    assert_summary(result.stdout, experiments)
    assert path.read_bytes() == upgraded


@pytest.mark.parametrize("generation", GENERATIONS)
def test_summarize_built(tmp_path, generation):
    path = build_legacy_file(tmp_path / "legacy-{}.db".format(generation), generation)
    experiments = experiment_rows(path)
    assert len(experiments) == 2
    before = path.read_bytes()

    result = run_cli("--summarize", path)

    assert result.returncode == 0, result.stderr
    assert_summary(result.stdout, experiments)
    assert path.read_bytes() == before
    assert listing(tmp_path) == [path.name]


def test_summarize_new_database(tmp_path):
    path = tmp_path / "store.db"
    conn = aepsych_store.connect(path)
    master_id = aepsych_store.record_setup(conn, experiment_name="pilot", participant_id="p7")
    for index in range(3):
        aepsych_store.record_message(conn, master_id, "ask", {"type": "ask", "message": index})
    conn.close()
    experiments = experiment_rows(path)
    before = path.read_bytes()

    result = run_cli("--summarize", path)

    assert result.returncode == 0, result.stderr
    assert_summary(result.stdout, experiments)
    assert path.read_bytes() == before
    # SQLite's reader may add its WAL index files in a writable folder.
    assert set(listing(tmp_path)) <= {"store.db", "store.db-wal", "store.db-shm"}


def test_summarize_missing_file(tmp_path):
    path = tmp_path / "missing.db"

    result = run_cli("--summarize", path)

    assert_one_error_line(result, path, "not found")
    assert listing(tmp_path) == []


# ---------------------------------------------------------------------------
# Command-line syntax


def test_help_lists_options():
    result = run_cli("--help")

    assert result.returncode == 0
    for option in ("--update", "--summarize", "--db", "--no-backup", "--timeout", "--verbose", "--version"):
        assert option in result.stdout, option


def test_cli_no_action(legacy_copy):
    path, original = copy_of(legacy_copy, "aepsych-2021-original.db")

    result = run_cli(path)

    assert result.returncode == 2
    assert "--update" in result.stderr
    assert path.read_bytes() == original


def test_cli_two_actions(legacy_copy):
    path, original = copy_of(legacy_copy, "aepsych-2021-original.db")

    result = run_cli("--update", "--summarize", path)

    assert result.returncode == 2
    assert path.read_bytes() == original
    assert listing(path.parent) == [path.name]


def test_cli_no_file():
    result = run_cli("--update")

    assert result.returncode == 2
    assert "database" in result.stderr
