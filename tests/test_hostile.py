"""Hostile and damaged payloads: the store raises its own error, runs nothing and changes nothing."""

import pickle
import random
import sqlite3
import struct
import subprocess
import sys
import tracemalloc

import pytest

import aepsych_store
from conftest import build_legacy_file, run_cli


def command_pickles(command):
    """Return pickles that each run `command` through a different opcode when unpickled."""
    text = command.encode()
    quoted = b"'" + text + b"'"
    unicode_arg = b"X" + struct.pack("<I", len(text)) + text
    return {
        "reduce_global": b"cos\nsystem\n(S" + quoted + b"\ntR.",
        "reduce_stack_global": (
            b"\x80\x04\x8c\x02os\x8c\x06system\x93" + unicode_arg + b"\x85R."
        ),
        "inst": b"(S" + quoted + b"\nios\nsystem\n.",
        "obj": b"(cos\nsystem\nS" + quoted + b"\no.",
        "newobj": b"\x80\x02cos\nsystem\n" + unicode_arg + b"\x85\x81.",
        "newobj_ex": b"\x80\x04cos\nsystem\n" + unicode_arg + b"\x85}\x92.",
        "build_setstate": b"\x80\x02cos\n_wrap_close\n)\x81" + unicode_arg + b"b.",
        "eval": b"cbuiltins\neval\n(S'__import__(\"os\").system(\"" + text + b"\")'\ntR.",
        "exec": b"cbuiltins\nexec\n(S'__import__(\"os\").system(\"" + text + b"\")'\ntR.",
        "popen": b"csubprocess\nPopen\n((S'sh'\nS'-c'\nS" + quoted + b"\nltR.",
        "ext": b"\x80\x02\x82\x01" + unicode_arg + b"\x85R.",
    }


def damaged_pickles():
    real = pickle.dumps({"type": "tell", "message": {"config": {"x": [0.5]}, "outcome": 1}}, protocol=5)
    rng = random.Random(20221027)
    return {
        "deep_nesting": b"\x80\x04" + b"]" * 200000 + b"a" * 199999 + b".",
        "huge_bytes8": b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"abc.",
        "huge_unicode8": b"\x80\x04\x8d" + struct.pack("<Q", 2**40) + b"abc.",
        "huge_binunicode": b"\x80\x04X" + struct.pack("<I", 2**31) + b"abc.",
        "huge_frame": b"\x80\x04\x95" + struct.pack("<Q", 2**62) + b"}.",
        "truncated": real[: len(real) // 2],
        "random_bytes": bytes(rng.getrandbits(8) for _ in range(300)),
        "empty": b"",
    }


@pytest.fixture
def canary(tmp_path):
    return tmp_path / "CANARY"


def store_with_row(tmp_path, column, value):
    """Make a store with three asks and put value into one column of the middle one."""
    path = tmp_path / "store.sqlite"
    conn = aepsych_store.connect(path, journal_mode="delete")
    master_id = aepsych_store.record_setup(conn)
    ids = [aepsych_store.record_message(conn, master_id, "ask", {"n": n}) for n in range(3)]
    conn.execute("UPDATE replay_data SET {} = ? WHERE unique_id = ?".format(column), (value, ids[1]))
    conn.close()
    return path, master_id, ids


def test_payload_runs_when_unpickled(tmp_path, canary):
    # Shows the canary check can fail: plain pickle.loads, in a separate
    # process, does run the payload that the store must refuse.
    payload = command_pickles("touch {}".format(canary))["reduce_global"]
    subprocess.run([sys.executable, "-c", "import pickle,sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=payload, timeout=30, check=False)
    assert canary.exists()


@pytest.mark.parametrize("column", ["message_contents", "extra_info"])
@pytest.mark.parametrize("name", sorted(command_pickles("x")))
def test_replay_refuses_command_pickle(tmp_path, canary, column, name):
    payload = command_pickles("touch {}".format(canary))[name]
    path, master_id, ids = store_with_row(tmp_path, column, payload)
    before = path.read_bytes()

    conn = aepsych_store.connect(path, read_only=True)
    with pytest.raises(aepsych_store.UnreadableRowError) as raised:
        list(aepsych_store.iter_replay(conn, master_id))
    conn.close()

    assert (raised.value.table, raised.value.row_id) == ("replay_data", ids[1])
    assert "replay_data row {}".format(ids[1]) in str(raised.value)
    assert str(path) in str(raised.value)
    assert not canary.exists()
    assert path.read_bytes() == before


@pytest.mark.parametrize("name", sorted(damaged_pickles()))
def test_replay_refuses_damaged_pickle(tmp_path, name):
    path, master_id, ids = store_with_row(tmp_path, "message_contents", damaged_pickles()[name])
    before = path.read_bytes()
    conn = aepsych_store.connect(path, read_only=True)

    tracemalloc.start()
    with pytest.raises(aepsych_store.UnreadableRowError) as raised:
        list(aepsych_store.iter_replay(conn, master_id))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    conn.close()

    assert raised.value.row_id == ids[1]
    # The deep-nesting payload itself is 400 kB; nothing may approach the
    # gigabytes the length fields claim.
    assert peak < 64 * 2**20
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "text, problem",
    [
        ("{not json", "Expecting"),
        ('{"x": NaN}', "NaN is not valid JSON"),
        ('{"x": -Infinity}', "Infinity is not valid JSON"),
        ("", "Expecting value"),
    ],
)
def test_replay_refuses_bad_json(tmp_path, text, problem):
    path, master_id, ids = store_with_row(tmp_path, "extra_info", text)
    before = path.read_bytes()
    conn = aepsych_store.connect(path, read_only=True)
    with pytest.raises(aepsych_store.UnreadableRowError, match=problem) as raised:
        list(aepsych_store.iter_replay(conn, master_id))
    conn.close()
    assert raised.value.row_id == ids[1]
    assert path.read_bytes() == before


def test_replay_skip_logs_each_row(tmp_path, caplog, canary):
    payload = command_pickles("touch {}".format(canary))["reduce_global"]
    path, master_id, ids = store_with_row(tmp_path, "message_contents", payload)
    conn = aepsych_store.connect(path, read_only=True)
    records = list(aepsych_store.iter_replay(conn, master_id, skip_unreadable=True))
    conn.close()
    assert [r.unique_id for r in records] == [ids[0], ids[2]]
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "row {}".format(ids[1]) in warnings[0].getMessage()
    assert not canary.exists()


@pytest.mark.parametrize("name", sorted(command_pickles("x")))
def test_load_config_refuses_command_pickle(tmp_path, canary, name):
    path = build_legacy_file(tmp_path / "legacy.db", "2022")
    conn = sqlite3.connect(str(path))
    conn.execute(
        "INSERT INTO config_data VALUES (7, '2023-01-01 10:00:00.000000', ?, 1)",
        (command_pickles("touch {}".format(canary))[name],),
    )
    conn.commit()
    conn.close()
    aepsych_store.upgrade_file(path, backup=False)
    before = path.read_bytes()

    conn = aepsych_store.connect(path, read_only=True)
    with pytest.raises(aepsych_store.UnreadableRowError) as raised:
        aepsych_store.load_config(conn, 1)
    conn.close()
    assert (raised.value.table, raised.value.row_id) == ("config_data", 7)
    assert not canary.exists()
    assert path.read_bytes() == before


@pytest.mark.parametrize("name", sorted(command_pickles("x")))
def test_load_strat_refuses_command_pickle(tmp_path, canary, name):
    path = build_legacy_file(tmp_path / "legacy.db", "2022")
    conn = sqlite3.connect(str(path))
    conn.execute(
        "INSERT INTO strat_data VALUES (5, '2023-01-01 10:00:00.000000', ?, 1)",
        (command_pickles("touch {}".format(canary))[name],),
    )
    conn.commit()
    conn.close()
    aepsych_store.upgrade_file(path, backup=False)
    before = path.read_bytes()

    conn = aepsych_store.connect(path, read_only=True)
    with pytest.raises(aepsych_store.UnreadableRowError) as raised:
        aepsych_store.load_strat(conn, 1)
    conn.close()
    assert (raised.value.table, raised.value.row_id) == ("strat_data", 5)
    assert not canary.exists()
    assert path.read_bytes() == before


def test_update_keeps_hostile_rows_and_lists_them(tmp_path, canary):
    path = build_legacy_file(tmp_path / "legacy.db", "2022")
    payloads = command_pickles("touch {}".format(canary))
    conn = sqlite3.connect(str(path))
    conn.execute("UPDATE replay_data SET message_contents = ? WHERE unique_id = 101", (payloads["reduce_global"],))
    conn.execute("UPDATE replay_data SET extra_info = ? WHERE unique_id = 102", (payloads["inst"],))
    conn.execute("INSERT INTO config_data VALUES (3, '2023-01-01 10:00:00.000000', ?, 1)", (payloads["obj"],))
    conn.execute("INSERT INTO strat_data VALUES (4, '2023-01-01 10:00:00.000000', ?, 2)", (payloads["eval"],))
    # A message whose experiment does not exist.
    conn.execute(
        "INSERT INTO replay_data VALUES (999, '2023-01-01 10:00:00.000000', 'ask', ?, NULL, 77)",
        (pickle.dumps({"type": "ask"}),),
    )
    conn.commit()
    conn.close()

    result = run_cli("--update", "--no-backup", path)

    assert result.returncode == 3, result.stderr
    assert "could not be read" in result.stderr
    for table, row_id in (("replay_data", 101), ("replay_data", 102), ("config_data", 3), ("strat_data", 4)):
        assert any(table in line and str(row_id) in line for line in result.stdout.splitlines()), (table, row_id)
    assert "master_table_id 77 points to no experiment" in result.stdout
    conn = sqlite3.connect(str(path))
    assert conn.execute("PRAGMA user_version").fetchone() == (aepsych_store.SCHEMA_VERSION,)
    assert conn.execute("SELECT message_contents FROM replay_data WHERE unique_id = 101").fetchone() == (
        payloads["reduce_global"],
    )
    assert conn.execute("SELECT extra_info FROM replay_data WHERE unique_id = 102").fetchone() == (payloads["inst"],)
    assert conn.execute("SELECT config FROM config_data WHERE unique_id = 3").fetchone() == (payloads["obj"],)
    assert conn.execute("SELECT strat FROM strat_data WHERE unique_id = 4").fetchone() == (payloads["eval"],)
    converted = conn.execute(
        "SELECT count(*) FROM replay_data WHERE typeof(message_contents) = 'text'"
    ).fetchone()[0]
    conn.close()
    # Eleven messages, the orphan included; only the hostile row 101 stays a pickle.
    assert converted == 10
    assert not canary.exists()
