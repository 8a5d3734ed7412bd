"""Upgrades in worker processes: same file as in one process, no worker left behind."""

import multiprocessing
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time
import types

import pytest

import aepsych_store
from conftest import ROOT, build_legacy_file

START_METHODS = [method for method in ("fork", "spawn") if method in multiprocessing.get_all_start_methods()]

MULTI_STIMULUS_SETUP = {
    "type": "setup",
    "message": {"config_str": "[common]\nparnames = [a, b]\nstimuli_per_trial = 2\n"},
}


def tell(number, extra_info=None):
    message = {
        "type": "tell",
        "message": {"config": {"x1": [number * 0.5], "x2": [number % 3]}, "outcome": number % 2},
    }
    if extra_info is not None:
        message["extra_info"] = extra_info
    return message


def add_messages(path, rows):
    """Append (message_type, message_contents, extra_info, master_id) rows to a legacy file's replay_data."""
    conn = sqlite3.connect(str(path))
    with conn:
        conn.executemany(
            "INSERT INTO replay_data (timestamp, message_type, message_contents, extra_info, master_table_id)"
            " VALUES ('2023-02-01 10:00:00.000001', ?, ?, ?, ?)",
            rows,
        )
    conn.close()


def varied_legacy_file(path):
    """Write a 2022-layout file whose messages take every path of the conversion and the trial split."""
    build_legacy_file(path, "2022", protocol=5)
    shared = {"rt": 0.5}
    rows = []
    for number in range(300):
        extra = {"trial": number}
        rows.append(("tell", pickle.dumps(tell(number, extra), protocol=5), pickle.dumps(extra, protocol=5), 1))
    rows += [
        # extra_info differs from the message's copy, so it is decoded on its own.
        ("tell", pickle.dumps(tell(1, {"trial": 1}), protocol=5), pickle.dumps({"trial": 2}, protocol=5), 1),
        # The same value at another protocol.
        ("tell", pickle.dumps(tell(2, {"trial": 2}), protocol=5), pickle.dumps({"trial": 2}, protocol=2), 1),
        # A message that refers to one dict twice decodes as shared values.
        ("tell", pickle.dumps(dict(tell(3, shared), again=shared), protocol=5), pickle.dumps(shared, protocol=5), 1),
        # JSON cannot represent a tuple, a non-str key or NaN, so these stay pickles.
        ("tell", pickle.dumps(tell(4, {"pair": (1, 2)}), protocol=5), pickle.dumps({"pair": (1, 2)}, protocol=5), 1),
        ("tell", pickle.dumps(tell(5, {1: "a"}), protocol=5), pickle.dumps({1: "a"}, protocol=5), 1),
        ("tell", pickle.dumps(tell(6, {"x": float("nan")}), protocol=5), None, 1),
        # The message's extra_info contains a tuple, and the column's copy a list.
        ("tell", pickle.dumps(tell(7, {"p": (1,)}), protocol=5), pickle.dumps({"p": [1]}, protocol=5), 1),
        # Unreadable pickles are listed and kept.
        ("tell", b"\x80\x05not a pickle", pickle.dumps({"trial": 8}, protocol=5), 1),
        ("tell", pickle.dumps(tell(9, {"trial": 9}), protocol=5), b"\x80\x05\x95", 1),
        # Rows the store wrote as JSON already, one of them invalid.
        ("tell", '{"type":"tell","message":{"config":{"x1":[1.5]},"outcome":1}}', '{"rt":1}', 2),
        ("tell", '{"type":"tell","message":', None, 2),
        # A tell that cannot be split into trials, and a change of layout.
        ("tell", pickle.dumps({"type": "tell", "message": {"config": {}, "outcome": 1}}, protocol=5), None, 2),
        ("setup", pickle.dumps(MULTI_STIMULUS_SETUP, protocol=5), None, 2),
        (
            "tell",
            pickle.dumps(
                {"type": "tell", "message": {"config": {"a": [1, 2], "b": [3, 4]}, "outcome": [1, 0]}}, protocol=5
            ),
            None,
            2,
        ),
    ]
    add_messages(path, rows)
    conn = sqlite3.connect(str(path))
    with conn:
        # Text that is not UTF-8 in a tell.
        conn.execute(
            "INSERT INTO replay_data (timestamp, message_type, message_contents, extra_info, master_table_id)"
            " VALUES ('2023-02-01 10:00:00.000001', 'tell', CAST(x'7b22ff' AS TEXT), NULL, 2)"
        )
        conn.execute("UPDATE master SET extra_metadata = ? WHERE unique_id = 1", (pickle.dumps({"lab": "V1"}),))
    conn.close()
    return path


def file_rows(path):
    conn = sqlite3.connect(str(path))
    # One message contains text that is not UTF-8.
    conn.text_factory = bytes
    try:
        return {
            table: conn.execute("SELECT * FROM {} ORDER BY unique_id".format(table)).fetchall()
            for table in ("master", "replay_data", "raw_data", "param_data", "outcome_data")
        }
    finally:
        conn.close()


def report_lists(report):
    return (report.changes, report.unreadable, report.kept_as_pickle, report.skipped_tells)


def force_workers(monkeypatch, start_method):
    monkeypatch.setattr(aepsych_store, "_WORKER_START_METHOD", start_method)
    monkeypatch.setattr(aepsych_store, "_worker_count", lambda message_count: 2)
    # Small batches, so that each worker gets several of them.
    monkeypatch.setattr(aepsych_store, "_CONVERSION_BATCH", 7)


@pytest.mark.parametrize("start_method", START_METHODS)
def test_workers_match_one_process(tmp_path, monkeypatch, start_method):
    alone = varied_legacy_file(tmp_path / "alone.db")
    with_workers = varied_legacy_file(tmp_path / "workers.db")
    with monkeypatch.context() as patch:
        patch.setattr(aepsych_store, "_worker_count", lambda message_count: 0)
        patch.setattr(aepsych_store, "_CONVERSION_BATCH", 7)
        expected = aepsych_store.upgrade_file(alone, backup=False)

    force_workers(monkeypatch, start_method)
    report = aepsych_store.upgrade_file(with_workers, backup=False)

    assert report_lists(report) == report_lists(expected)
    assert file_rows(with_workers) == file_rows(alone)


def test_upgrade_converts_exact_values_only(tmp_path, monkeypatch):
    path = varied_legacy_file(tmp_path / "legacy.db")
    force_workers(monkeypatch, START_METHODS[0])
    report = aepsych_store.upgrade_file(path, backup=False)

    kept = {(column, row_id) for _, column, row_id, _ in report.kept_as_pickle}
    unreadable = {(column, row_id) for _, column, row_id, _ in report.unreadable}
    conn = sqlite3.connect(str(path))
    types = dict(
        ((row_id, "message_contents"), contents) for row_id, contents in conn.execute(
            "SELECT unique_id, typeof(message_contents) FROM replay_data"
        )
    )
    types.update(
        ((row_id, "extra_info"), extra) for row_id, extra in conn.execute(
            "SELECT unique_id, typeof(extra_info) FROM replay_data"
        )
    )
    extra_infos = dict(conn.execute("SELECT unique_id, extra_info FROM replay_data WHERE typeof(extra_info) = 'text'"))
    conn.close()
    first = 205  # the first row add_messages wrote, after build_legacy_file's rows 100 to 204
    mismatch, other_protocol, shared, pair, int_key, nan, tuple_in_message = range(first + 300, first + 307)

    assert extra_infos[mismatch] == '{"trial":2}'
    assert extra_infos[other_protocol] == '{"trial":2}'
    assert extra_infos[shared] == '{"rt":0.5}'
    assert extra_infos[tuple_in_message] == '{"p":[1]}'
    assert ("message_contents", pair) in kept
    assert ("extra_info", pair) in kept
    assert ("message_contents", int_key) in kept
    assert ("extra_info", int_key) in kept
    assert ("message_contents", nan) in kept
    assert ("message_contents", tuple_in_message) in kept
    assert ("message_contents", first + 307) in unreadable
    assert ("extra_info", first + 308) in unreadable
    for (row_id, column), storage in types.items():
        if (column, row_id) in kept or (column, row_id) in unreadable:
            assert storage == "blob", (row_id, column)
        else:
            assert storage in ("text", "null"), (row_id, column)


@pytest.mark.parametrize(
    "value",
    [
        {"a": [1, 2.5, "x", None, True, False]},
        {"a": (1, 2)},
        [[()]],
        {1: "a"},
        {"a": {None: 1}},
        {"a": {1.5: 1}},
        {"a": float("nan")},
        [float("-inf")],
        {"a": b"bytes"},
        {"a": {1, 2}},
        ["\ud800"],
        {"deep": [[[[{"k": "v"}]]]]},
        -0.0,
        10 ** 40,
        "text",
        None,
    ],
)
def test_plain_json_agrees_with_exact_json(value):
    assert aepsych_store._plain_json(value) == aepsych_store._exact_json(value)


def test_small_upgrade_starts_no_workers():
    assert aepsych_store._worker_count(aepsych_store._MIN_ROWS_FOR_WORKERS - 1) == 0


@pytest.mark.skipif("spawn" not in START_METHODS, reason="needs the spawn start method")
def test_spawn_skips_workers_for_script(tmp_path, monkeypatch):
    script = types.ModuleType("__main__")
    script.__file__ = str(tmp_path / "server.py")
    monkeypatch.setitem(sys.modules, "__main__", script)
    monkeypatch.setattr(aepsych_store, "_WORKER_START_METHOD", "spawn")

    assert not aepsych_store._main_module_reimport_is_safe()
    assert aepsych_store._worker_count(10 ** 6) == 0


@pytest.mark.skipif("spawn" not in START_METHODS, reason="needs the spawn start method")
def test_spawn_allows_workers_without_script(monkeypatch):
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    monkeypatch.setattr(aepsych_store, "_WORKER_START_METHOD", "spawn")

    assert aepsych_store._main_module_reimport_is_safe()


@pytest.mark.skipif("fork" not in START_METHODS, reason="needs the fork start method")
def test_fork_allows_workers_for_script(tmp_path, monkeypatch):
    script = types.ModuleType("__main__")
    script.__file__ = str(tmp_path / "server.py")
    monkeypatch.setitem(sys.modules, "__main__", script)
    monkeypatch.setattr(aepsych_store, "_WORKER_START_METHOD", "fork")

    assert aepsych_store._main_module_reimport_is_safe()


def exit_at_once(batch):
    """Stand in for a batch function in a worker, ending the worker as a crash would."""
    os._exit(3)


@pytest.mark.skipif("fork" not in START_METHODS, reason="replacing the batch function needs fork")
def test_worker_crash_fails_step(tmp_path, monkeypatch):
    path = varied_legacy_file(tmp_path / "legacy.db")
    force_workers(monkeypatch, "fork")
    with monkeypatch.context() as patch:
        patch.setattr(aepsych_store, "_convert_message_rows", exit_at_once)
        with pytest.raises(aepsych_store.StoreError) as raised:
            aepsych_store.upgrade_file(path, backup=False)

    assert "ended unexpectedly" in str(raised.value)
    assert "stays at version 1" in str(raised.value)
    assert multiprocessing.active_children() == []
    report = aepsych_store.upgrade_file(path, backup=False)
    assert report.new_version == aepsych_store.SCHEMA_VERSION


# Upgrades a file with workers forced on. It prints "started" once the first
# worker runs, and the test waits for that line before it kills the upgrade.
KILLED_UPDATE_SCRIPT = """
import sys

import aepsych_store

path, start_method = sys.argv[1], sys.argv[2]
aepsych_store._WORKER_START_METHOD = start_method
aepsych_store._worker_count = lambda message_count: 2
start_worker = aepsych_store._start_worker


def announced_start(*args):
    worker = start_worker(*args)
    print("started", worker.process.pid, flush=True)
    return worker


aepsych_store._start_worker = announced_start
aepsych_store.upgrade_file(path, backup=False)
"""


def group_members(group_id):
    """Return the ids of the live (not zombie) processes in a process group, from /proc."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/{}/stat".format(name)) as handle:
                stat = handle.read()
        except OSError:
            continue
        # The command name in brackets may contain spaces, so split after it.
        fields = stat.rsplit(")", 1)[1].split()
        state, process_group = fields[0], int(fields[2])
        if process_group == group_id and state != "Z":
            members.append(int(name))
    return members


@pytest.mark.skipif(not os.path.isdir("/proc") or not hasattr(signal, "SIGKILL"), reason="needs Linux /proc")
@pytest.mark.parametrize("start_method", START_METHODS)
def test_killed_update_leaves_no_workers(tmp_path, start_method):
    path = build_legacy_file(tmp_path / "legacy.db", "2022", protocol=5)
    add_messages(
        path,
        [("tell", pickle.dumps(tell(n, {"trial": n}), protocol=5), pickle.dumps({"trial": n}, protocol=5), 1)
         for n in range(20000)],
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_UPDATE_SCRIPT, str(path), start_method],
        stdout=subprocess.PIPE,
        env=env,
        start_new_session=True,
        universal_newlines=True,
    )
    try:
        assert process.stdout.readline().startswith("started"), "the upgrade ended before starting a worker"
        time.sleep(0.2)
        assert len(group_members(process.pid)) >= 2
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

        deadline = time.monotonic() + 10
        while group_members(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert group_members(process.pid) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for member in group_members(process.pid):
            os.kill(member, signal.SIGKILL)
        process.stdout.close()

    conn = sqlite3.connect(str(path))
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()
    report = aepsych_store.upgrade_file(path, backup=False)
    assert report.new_version == aepsych_store.SCHEMA_VERSION
