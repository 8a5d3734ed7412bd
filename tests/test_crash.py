"""Kill a writer or an upgrade with SIGKILL at random moments and check what survives.

Each test runs a real Python process on a real file and kills it without
warning, as happens to a crashed or killed server. A power cut is not
covered, because the kernel still writes out what the process handed it. The
moments come from a seeded random generator, so a failing run can be
repeated with the same delays.
"""

import hashlib
import io
import os
import pickle
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

import aepsych_store
from conftest import ROOT, build_legacy_file, run_cli

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")

SEED = 20240515

# The writer prints a message's row id only after record_message has
# returned, so every id the test reads was acknowledged as committed.
WRITER_SCRIPT = """
import sys

import aepsych_store

path, journal_mode = sys.argv[1], sys.argv[2]
if journal_mode == "default":
    conn = aepsych_store.connect(path)
else:
    conn = aepsych_store.connect(path, journal_mode=journal_mode)
setup = {"type": "setup", "message": {"config_str": "[common]\\nparnames = [x1]\\n"}}
master_id = aepsych_store.record_setup(conn, setup, experiment_name="crash test")
print("master", master_id, flush=True)
number = 0
while True:
    message = {"type": "tell", "message": {"config": {"x1": [number]}, "outcome": number % 2}}
    row_id = aepsych_store.record_message(conn, master_id, "tell", message)
    print("ack", row_id, number, flush=True)
    number += 1
"""

WRITER_ROUNDS = 16
# Seconds from start to SIGKILL. Most writers reach the write loop by then,
# and some die earlier, while connecting or creating the schema.
MAX_WRITER_LIFETIME = 0.5

UPDATE_MESSAGES = 10000
UPDATE_ROUNDS = 5


def python_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_python(args):
    return subprocess.Popen(
        [sys.executable] + [str(a) for a in args],
        env=python_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=True,
    )


def kill_after(process, delay):
    """Sleep delay seconds, SIGKILL the process (if it still runs) and return its output."""
    time.sleep(delay)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=30)
    return stdout, stderr


def integrity_check(path):
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


def tell(number):
    return {"type": "tell", "message": {"config": {"x1": [number]}, "outcome": number % 2}}


def parse_writer_output(stdout):
    """Return the writer's master id (or None) and its acknowledged (row id, number) pairs."""
    master_id = None
    acknowledged = []
    # A line cut off by the kill has no newline, so only whole lines count.
    for line in stdout.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        fields = line.split()
        if fields[0] == "master":
            master_id = int(fields[1])
        elif fields[0] == "ack":
            acknowledged.append((int(fields[1]), int(fields[2])))
    return master_id, acknowledged


def file_journal_mode(path):
    """Return "wal" or "delete" from the file header's read and write version bytes."""
    with open(str(path), "rb") as handle:
        header = handle.read(20)
    return {b"\x02\x02": "wal", b"\x01\x01": "delete"}.get(header[18:20], repr(header[18:20]))


@pytest.mark.parametrize("journal_mode", ["default", "delete"])
def test_killed_writer_keeps_acknowledged_messages(tmp_path, journal_mode):
    script = tmp_path / "writer.py"
    script.write_text(WRITER_SCRIPT)
    path = tmp_path / "crash.db"
    rng = random.Random(SEED)
    rounds = []

    for round_number in range(WRITER_ROUNDS):
        delay = rng.uniform(0.0, MAX_WRITER_LIFETIME)
        process = start_python([script, path, journal_mode])
        stdout, stderr = kill_after(process, delay)
        assert process.returncode == -signal.SIGKILL, "round {}: writer ended by itself:\n{}".format(
            round_number, stderr
        )
        master_id, acknowledged = parse_writer_output(stdout)
        rounds.append((round_number, delay, master_id, acknowledged))

    acknowledged_total = sum(len(acknowledged) for (_, _, _, acknowledged) in rounds)
    assert acknowledged_total > 0, "no writer reached its write loop; raise MAX_WRITER_LIFETIME"
    assert integrity_check(path) == [("ok",)]
    assert file_journal_mode(path) == ("wal" if journal_mode == "default" else journal_mode)

    conn = aepsych_store.connect(path, read_only=True)
    try:
        replayed = {}
        for experiment in aepsych_store.list_experiments(conn):
            records = list(aepsych_store.iter_replay(conn, experiment.unique_id))
            replayed[experiment.unique_id] = records
            # Each writer is its own experiment and records numbers 0, 1, 2, ...
            # so a lost or doubled row shows as a gap or a repeat here.
            tells = [r.message_contents for r in records if r.message_type == "tell"]
            assert tells == [tell(n) for n in range(len(tells))], "experiment {}".format(experiment.unique_id)

        for round_number, delay, master_id, acknowledged in rounds:
            context = "round {} (killed after {:.3f} s)".format(round_number, delay)
            if master_id is None:
                assert acknowledged == [], context
                continue
            assert master_id in replayed, context
            assert replayed[master_id][0].message_type == "setup", context
            records = {r.unique_id: r for r in replayed[master_id]}
            for row_id, number in acknowledged:
                assert row_id in records, "{}: acknowledged row {} is missing".format(context, row_id)
                assert records[row_id].message_type == "tell", context
                assert records[row_id].message_contents == tell(number), context
            tell_count = sum(1 for r in records.values() if r.message_type == "tell")
            # At most one commit can have landed between the last acknowledgement and the kill.
            assert len(acknowledged) <= tell_count <= len(acknowledged) + 1, context
    finally:
        conn.close()


def build_big_legacy_file(path, message_count):
    """Write a 2022-layout AEPsych file with message_count extra pickled tell messages."""
    build_legacy_file(path, "2022", protocol=5)
    conn = sqlite3.connect(str(path))

    def rows():
        for number in range(message_count):
            message = {
                "type": "tell",
                "message": {"config": {"x1": [number / message_count], "x2": [number % 7]}, "outcome": number % 2},
                "extra_info": {"trial": number},
            }
            timestamp = "2023-01-03 10:00:00.{:06d}".format(number % 1000000)
            yield (
                timestamp,
                "tell",
                pickle.dumps(message, protocol=5),
                pickle.dumps(message["extra_info"], protocol=5),
                1 + number % 2,
            )

    with conn:
        conn.executemany(
            "INSERT INTO replay_data (timestamp, message_type, message_contents, extra_info, master_table_id)"
            " VALUES (?, ?, ?, ?, ?)",
            rows(),
        )
        # What AEPsych stored for a strategy: a pickled io.BytesIO around torch.save bytes.
        buffer_pickle = pickle.dumps(io.BytesIO(b"PK\x03\x04 torch.save archive"), protocol=5)
        conn.executemany(
            "INSERT INTO strat_data (timestamp, strat, master_table_id) VALUES (?, ?, ?)",
            [("2023-01-03 11:00:00.000001", buffer_pickle, 1), ("2023-01-03 11:00:01.000001", buffer_pickle, 2)],
        )
    conn.close()
    return path


def snapshot(path):
    """Recover the file as any reader would and return its version, schema and row digests."""
    conn = sqlite3.connect(str(path))
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        schema = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name").fetchall()
        digests = {}
        for (type_, name, _, _) in schema:
            if type_ != "table":
                continue
            digest = hashlib.sha256()
            cursor = conn.execute('SELECT * FROM "{}" ORDER BY rowid'.format(name))
            for rows in iter(lambda: cursor.fetchmany(10000), []):
                digest.update(pickle.dumps(rows, protocol=4))
            digests[name] = digest.hexdigest()
    finally:
        conn.close()
    return {"version": version, "schema": schema, "rows": digests}


def upgraded_state(pristine, target, folder, monkeypatch):
    """Upgrade a copy of pristine through the steps up to version target and return its snapshot."""
    copy = folder / "reference-v{}.db".format(target)
    shutil.copyfile(str(pristine), str(copy))
    steps = tuple(step for step in aepsych_store._UPGRADE_STEPS if step[0] <= target)
    with monkeypatch.context() as patch:
        patch.setattr(aepsych_store, "_UPGRADE_STEPS", steps)
        aepsych_store.upgrade_file(copy, backup=False)
    return snapshot(copy)


def test_killed_update_leaves_old_or_new_file(tmp_path, monkeypatch):
    pristine = build_big_legacy_file(tmp_path / "pristine.db", UPDATE_MESSAGES)
    states = {0: snapshot(pristine)}
    assert states[0]["version"] == 0

    reference = tmp_path / "reference.db"
    shutil.copyfile(str(pristine), str(reference))
    started = time.monotonic()
    result = run_cli("--update", "--no-backup", reference)
    update_seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    new_state = snapshot(reference)
    assert new_state["version"] == aepsych_store.SCHEMA_VERSION
    states[aepsych_store.SCHEMA_VERSION] = new_state

    # Each upgrade step commits with its own user_version, so a kill between
    # two steps leaves a file at an intermediate version. Such a file must
    # hold exactly what an uninterrupted upgrade to that version gives.
    for target, _ in aepsych_store._UPGRADE_STEPS[:-1]:
        states[target] = upgraded_state(pristine, target, tmp_path, monkeypatch)
        assert states[target]["version"] == target

    rng = random.Random(SEED)
    work = tmp_path / "work.db"
    for round_number in range(UPDATE_ROUNDS):
        for leftover in (work, tmp_path / "work.db-journal"):
            if leftover.exists():
                leftover.unlink()
        shutil.copyfile(str(pristine), str(work))
        delay = rng.uniform(0.0, update_seconds)
        context = "round {} (killed after {:.3f} s of a {:.3f} s update)".format(round_number, delay, update_seconds)

        process = start_python(["-m", "aepsych_store", "--update", "--no-backup", work])
        kill_after(process, delay)

        assert integrity_check(work) == [("ok",)], context
        state = snapshot(work)
        assert state["version"] in states, context
        assert state == states[state["version"]], "{}: the file at version {} differs from an upgrade to it".format(
            context, state["version"]
        )

        rerun = run_cli("--update", "--no-backup", work)
        assert rerun.returncode == 0, "{}: {}".format(context, rerun.stderr)
        assert integrity_check(work) == [("ok",)], context
        assert snapshot(work) == new_state, context
