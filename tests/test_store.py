"""Writing and reading experiments, messages, strategies and configs."""

import datetime
import json
import sqlite3

import pytest

import aepsych_store

SETUP_WITH_METADATA = {
    "type": "setup",
    "message": {
        "config_str": (
            "[common]\nparnames = [x1, x2]\n\n"
            "[metadata]\n"
            "experiment_name = Contrast\n"
            "experiment_description = Contrast threshold\n"
            "experiment_id = exp-7\n"
            "participant_id = P03\n"
            "lab = Vision\n"
            "Room = 2B\n"
        )
    },
}


@pytest.fixture
def conn(tmp_path):
    connection = aepsych_store.connect(tmp_path / "store.sqlite")
    yield connection
    connection.close()


def master_row(conn, master_id):
    return conn.execute(
        "SELECT experiment_name, experiment_description, experiment_id, participant_id, extra_metadata"
        " FROM master WHERE unique_id = ?",
        (master_id,),
    ).fetchone()


def row_counts(conn):
    return [
        conn.execute("SELECT count(*) FROM {}".format(t)).fetchone()[0]
        for t in ("master", "replay_data", "strat_data", "config_data")
    ]


def test_connect_new_file_sets_version(tmp_path):
    path = tmp_path / "new.sqlite"
    aepsych_store.connect(path).close()
    conn = sqlite3.connect(str(path))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == aepsych_store.SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_connect_enforces_foreign_keys(conn):
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO replay_data (message_type, master_table_id) VALUES ('ask', 5)")


def test_record_setup_defaults(conn):
    master_id = aepsych_store.record_setup(conn)
    name, description, experiment_id, participant_id, extra = master_row(conn, master_id)
    assert (name, description, participant_id, extra) == ("default name", "default description", None, None)
    assert str(__import__("uuid").UUID(experiment_id, version=4)) == experiment_id
    assert conn.execute("SELECT count(*) FROM replay_data").fetchone()[0] == 0


def test_record_setup_metadata_from_config(conn):
    master_id = aepsych_store.record_setup(conn, SETUP_WITH_METADATA)
    name, description, experiment_id, participant_id, extra = master_row(conn, master_id)
    assert (name, description, experiment_id, participant_id) == ("Contrast", "Contrast threshold", "exp-7", "P03")
    assert json.loads(extra) == {"lab": "Vision", "Room": "2B"}
    (message_type, contents) = conn.execute("SELECT message_type, message_contents FROM replay_data").fetchone()
    assert message_type == "setup"
    assert json.loads(contents) == SETUP_WITH_METADATA


def test_record_setup_explicit_arguments_win(conn):
    master_id = aepsych_store.record_setup(
        conn,
        SETUP_WITH_METADATA,
        experiment_name="Override",
        participant_id="P99",
        extra_metadata={"lab": "Audio", "session": 2},
    )
    name, _, experiment_id, participant_id, extra = master_row(conn, master_id)
    assert (name, experiment_id, participant_id) == ("Override", "exp-7", "P99")
    assert json.loads(extra) == {"lab": "Audio", "Room": "2B", "session": 2}


def test_record_setup_common_not_metadata(conn):
    request = {"type": "setup", "message": {"config_str": "[common]\nlab = X\n\n[metadata]\nrig = 4\n"}}
    master_id = aepsych_store.record_setup(conn, request)
    assert json.loads(master_row(conn, master_id)[4]) == {"rig": "4"}


@pytest.mark.parametrize(
    "config_str, problem",
    [
        ("[metadata]\nexperiment_name = a\nexperiment_name = b\n", "experiment_name"),
        ("[metadata]\n[metadata]\n", "metadata"),
        ("experiment_name = a\n", "section"),
    ],
)
def test_record_setup_bad_config_writes_nothing(conn, config_str, problem):
    with pytest.raises(aepsych_store.StoreError) as raised:
        aepsych_store.record_setup(conn, {"type": "setup", "message": {"config_str": config_str}})
    assert "config_str is not valid INI" in str(raised.value)
    assert problem in str(raised.value)
    assert "nothing was written" in str(raised.value)
    assert row_counts(conn) == [0, 0, 0, 0]


def test_record_message_returns_committed_id(conn, tmp_path):
    master_id = aepsych_store.record_setup(conn)
    row_id = aepsych_store.record_message(conn, master_id, "ask", {"type": "ask", "message": ""})
    other = sqlite3.connect(str(tmp_path / "store.sqlite"))
    assert other.execute("SELECT message_type FROM replay_data WHERE unique_id = ?", (row_id,)).fetchone() == ("ask",)
    other.close()


def test_record_message_extra_info_from_message(conn):
    master_id = aepsych_store.record_setup(conn)
    tell = {"type": "tell", "message": {"config": {"x": [1]}, "outcome": 1}, "extra_info": {"rt": 0.4}}
    aepsych_store.record_message(conn, master_id, "tell", tell)
    aepsych_store.record_message(conn, master_id, "tell", tell, extra_info={"given": True})
    stored = conn.execute("SELECT extra_info FROM replay_data ORDER BY unique_id").fetchall()
    assert [json.loads(e) for (e,) in stored] == [{"rt": 0.4}, {"given": True}]


def test_record_message_json_readable_in_sql(conn):
    master_id = aepsych_store.record_setup(conn)
    aepsych_store.record_message(conn, master_id, "tell", {"message": {"config": {"x": 1}, "outcome": 0.75}})
    (outcome,) = conn.execute("SELECT json_extract(message_contents, '$.message.outcome') FROM replay_data").fetchone()
    assert outcome == 0.75


def test_record_message_unknown_master(conn):
    with pytest.raises(aepsych_store.StoreError, match="experiment 42 not found"):
        aepsych_store.record_message(conn, 42, "ask", {})
    assert row_counts(conn) == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "contents, problem",
    [
        ({"config": (1, 2)}, "would change"),
        ({1: "integer key"}, "would change"),
        ({"x": float("nan")}, "cannot be stored as JSON"),
        ({"x": b"bytes"}, "cannot be stored as JSON"),
        ({"x": {1, 2}}, "cannot be stored as JSON"),
        ({"x": "\ud800"}, "cannot be stored as JSON"),
    ],
)
def test_record_message_rejects_lossy_values(conn, contents, problem):
    master_id = aepsych_store.record_setup(conn)
    with pytest.raises(aepsych_store.StoreError, match=problem):
        aepsych_store.record_message(conn, master_id, "tell", contents)
    assert row_counts(conn) == [1, 0, 0, 0]


@pytest.mark.parametrize("master_id", [None, "1", 1.0, True])
def test_record_message_master_id_type(conn, master_id):
    aepsych_store.record_setup(conn)
    with pytest.raises(aepsych_store.StoreError, match="master_id must be an int"):
        aepsych_store.record_message(conn, master_id, "ask", {})


def test_iter_replay_follows_row_order(conn):
    master_id = aepsych_store.record_setup(conn)
    ids = [aepsych_store.record_message(conn, master_id, "ask", {"n": n}) for n in range(600)]
    # A clock that jumped back must not reorder the replay.
    conn.execute("UPDATE replay_data SET timestamp = '2001-01-01 00:00:00.000000' WHERE unique_id = ?", (ids[300],))
    records = list(aepsych_store.iter_replay(conn, master_id))
    assert [r.unique_id for r in records] == ids
    assert [r.message_contents for r in records] == [{"n": n} for n in range(600)]


def test_iter_replay_only_one_experiment(conn):
    first = aepsych_store.record_setup(conn)
    second = aepsych_store.record_setup(conn)
    aepsych_store.record_message(conn, first, "ask", {"of": 1})
    aepsych_store.record_message(conn, second, "ask", {"of": 2})
    assert [r.message_contents for r in aepsych_store.iter_replay(conn, second)] == [{"of": 2}]


def test_iter_replay_timestamp_layout(conn):
    master_id = aepsych_store.record_setup(conn)
    aepsych_store.record_message(conn, master_id, "ask", {})
    (record,) = aepsych_store.iter_replay(conn, master_id)
    parsed = datetime.datetime.strptime(record.timestamp, "%Y-%m-%d %H:%M:%S.%f")
    assert abs((datetime.datetime.now() - parsed).total_seconds()) < 60


def test_iter_replay_unknown_master(conn):
    with pytest.raises(aepsych_store.StoreError, match="experiment 3 not found"):
        list(aepsych_store.iter_replay(conn, 3))


@pytest.mark.parametrize(
    "stored, problem",
    [
        ("{not json", "unreadable message_contents"),
        ('{"x": NaN}', "NaN is not valid JSON"),
        (b"\x80\x04not a pickle", "unreadable message_contents"),
        (7, "neither JSON text nor a pickle"),
    ],
)
def test_iter_replay_unreadable_row(conn, stored, problem):
    master_id = aepsych_store.record_setup(conn)
    aepsych_store.record_message(conn, master_id, "ask", {"n": 1})
    bad_id = aepsych_store.record_message(conn, master_id, "ask", {"n": 2})
    aepsych_store.record_message(conn, master_id, "ask", {"n": 3})
    conn.execute("UPDATE replay_data SET message_contents = ? WHERE unique_id = ?", (stored, bad_id))

    with pytest.raises(aepsych_store.UnreadableRowError, match=problem) as raised:
        list(aepsych_store.iter_replay(conn, master_id))
    assert raised.value.table == "replay_data"
    assert raised.value.row_id == bad_id
    assert "replay_data row {}".format(bad_id) in str(raised.value)


def test_iter_replay_skips_unreadable_with_warning(conn, caplog):
    master_id = aepsych_store.record_setup(conn)
    ids = [aepsych_store.record_message(conn, master_id, "ask", {"n": n}) for n in range(3)]
    conn.execute("UPDATE replay_data SET extra_info = '{bad' WHERE unique_id = ?", (ids[1],))
    records = list(aepsych_store.iter_replay(conn, master_id, skip_unreadable=True))
    assert [r.unique_id for r in records] == [ids[0], ids[2]]
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "row {}".format(ids[1]) in caplog.records[0].getMessage()


@pytest.mark.parametrize("skip", [False, True])
def test_iter_replay_text_not_utf8(conn, skip, caplog):
    master_id = aepsych_store.record_setup(conn)
    ids = [aepsych_store.record_message(conn, master_id, "ask", {"n": n}) for n in range(700)]
    conn.execute(
        "UPDATE replay_data SET message_contents = CAST(X'7B22FF227D' AS TEXT) WHERE unique_id = ?", (ids[400],)
    )
    if not skip:
        with pytest.raises(aepsych_store.UnreadableRowError, match="not UTF-8") as raised:
            list(aepsych_store.iter_replay(conn, master_id))
        assert raised.value.row_id == ids[400]
        return
    records = list(aepsych_store.iter_replay(conn, master_id, skip_unreadable=True))
    assert [r.unique_id for r in records] == ids[:400] + ids[401:]
    assert "row {}".format(ids[400]) in caplog.records[0].getMessage()


def test_strat_bytes_round_trip(conn):
    master_id = aepsych_store.record_setup(conn)
    first = bytes(range(256)) * 10
    second = b"\x80\x05 looks like a pickle but is the server's own bytes"
    aepsych_store.save_strat(conn, master_id, first)
    aepsych_store.save_strat(conn, master_id, bytearray(second))
    assert aepsych_store.load_strat(conn, master_id) == second
    records = list(aepsych_store.iter_strats(conn, master_id))
    assert [(r.strat_format, r.strat) for r in records] == [("bytes", first), ("bytes", second)]


def test_strat_none_saved(conn):
    master_id = aepsych_store.record_setup(conn)
    assert aepsych_store.load_strat(conn, master_id) is None
    assert aepsych_store.load_config(conn, master_id) is None


def test_save_strat_rejects_non_bytes(conn):
    master_id = aepsych_store.record_setup(conn)
    with pytest.raises(aepsych_store.StoreError, match="strat must be bytes"):
        aepsych_store.save_strat(conn, master_id, "text")
    assert row_counts(conn) == [1, 0, 0, 0]


def test_config_text_round_trip(conn):
    master_id = aepsych_store.record_setup(conn)
    text = "[common]\nparnames = [x1, x2]\nlb = [0, 0]\n\n[opt_strat]\nmin_asks = 4\n"
    aepsych_store.save_config(conn, master_id, text)
    assert aepsych_store.load_config(conn, master_id) == text


def test_config_mapping_written_as_ini(conn):
    master_id = aepsych_store.record_setup(conn)
    aepsych_store.save_config(
        conn, master_id, {"common": {"parnames": ["x1", "x2"], "lb": [0, 0], "stimuli_per_trial": 1}}
    )
    text = aepsych_store.load_config(conn, master_id)
    parser = __import__("configparser").ConfigParser()
    parser.read_string(text)
    assert dict(parser["common"]) == {"parnames": "[x1, x2]", "lb": "[0, 0]", "stimuli_per_trial": "1"}


def test_config_latest_and_all(conn):
    master_id = aepsych_store.record_setup(conn)
    for n in range(3):
        aepsych_store.save_config(conn, master_id, "[common]\nround = {}\n".format(n))
    assert aepsych_store.load_config(conn, master_id) == "[common]\nround = 2\n"
    assert [r.config for r in aepsych_store.iter_configs(conn, master_id)] == [
        "[common]\nround = {}\n".format(n) for n in range(3)
    ]


@pytest.mark.parametrize(
    "config, problem",
    [
        ("[a]\nx = 1\nx = 2\n", "not valid INI"),
        ({"a": {"x": object()}}, "INI cannot hold"),
        ({"a": "not a mapping"}, "must map section names"),
        (b"[a]\n", "must be INI text"),
    ],
)
def test_save_config_bad_input(conn, config, problem):
    master_id = aepsych_store.record_setup(conn)
    with pytest.raises(aepsych_store.StoreError, match=problem):
        aepsych_store.save_config(conn, master_id, config)
    assert row_counts(conn) == [1, 0, 0, 0]


def test_list_experiments_counts_and_times(conn):
    first = aepsych_store.record_setup(conn, SETUP_WITH_METADATA)
    second = aepsych_store.record_setup(conn, participant_id="P1")
    for n in range(4):
        aepsych_store.record_message(conn, first, "ask", {"n": n})
    times = [t for (t,) in conn.execute("SELECT timestamp FROM replay_data ORDER BY unique_id")]

    experiments = aepsych_store.list_experiments(conn)
    assert [e.unique_id for e in experiments] == [first, second]
    assert experiments[0].message_count == 5
    assert (experiments[0].first_timestamp, experiments[0].last_timestamp) == (times[0], times[-1])
    assert experiments[0].extra_metadata == {"lab": "Vision", "Room": "2B"}
    assert (experiments[1].message_count, experiments[1].first_timestamp) == (0, None)
    assert experiments[1].participant_id == "P1"


def test_read_only_connection_rejects_writes(tmp_path):
    path = tmp_path / "store.sqlite"
    aepsych_store.connect(path).close()
    conn = aepsych_store.connect(path, read_only=True)
    with pytest.raises(aepsych_store.StoreError, match="read-only"):
        aepsych_store.record_setup(conn)
    conn.close()


def test_errors_share_one_base_class():
    assert issubclass(aepsych_store.UpgradeRequiredError, aepsych_store.StoreError)
    assert issubclass(aepsych_store.UnreadableRowError, aepsych_store.StoreError)


def test_open_transaction_rejected(conn):
    conn.execute("BEGIN")
    with pytest.raises(aepsych_store.StoreError, match="already has an open transaction"):
        aepsych_store.record_setup(conn)
    conn.execute("ROLLBACK")
