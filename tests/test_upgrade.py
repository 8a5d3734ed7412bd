"""Upgrades of every AEPsych layout generation to the current schema."""

import sqlite3

import pytest

import aepsych_store
from conftest import BUILT_MESSAGES, GENERATIONS, LEGACY_FILES, build_legacy_file, schema_of

SINGLE_STIMULUS_TELLS = [
    ((0.1, 4), 1),
    ((0.2, 0.1), -1),
    ((0.3, 3), 0.1),
    ((1, 0.2), 0),
    ((2, 2), -0.1),
    ((3, 1), 0),
    ((4, 0.3), 0),
]

# The seven tells of the real multi-stimulus file, as AEPsych's fixture
# documents them: par1 stimuli 0 and 1, par2 stimuli 0 and 1, outcomes 0 and 1.
MULTI_STIMULUS_TELLS = [
    (0.1, 0.2, 4, 0.1, 1, 0),
    (0.3, 1, 3, 0.2, -1, 0),
    (2, 3, 2, 1, 0.1, 0),
    (4, 0.1, 0.3, 0.2, 0, 0),
    (0.2, 2, 2, 0.3, -0.1, 0),
    (1, 0.3, 1, 0.1, 0, 0),
    (0.3, 0.1, 0.3, 4, 0, 0),
]


def fresh_schema(tmp_path):
    path = tmp_path / "fresh.sqlite"
    aepsych_store.connect(path).close()
    return schema_of(path)


def table_rows(path, table):
    conn = sqlite3.connect("file:{}?mode=ro".format(path), uri=True)
    try:
        return conn.execute("SELECT * FROM {} ORDER BY unique_id".format(table)).fetchall()
    finally:
        conn.close()


def upgraded(path):
    return aepsych_store.connect(path, upgrade=True)


@pytest.mark.parametrize("name", LEGACY_FILES)
def test_upgrade_real_file_matches_fresh_schema(legacy_copy, tmp_path, name):
    path = legacy_copy(name)
    upgraded(path).close()
    assert schema_of(path) == fresh_schema(tmp_path)


@pytest.mark.parametrize("generation", ("2021", "2022"))
def test_upgrade_built_file_matches_fresh_schema(tmp_path, generation):
    path = build_legacy_file(tmp_path / "legacy.db", generation)
    upgraded(path).close()
    assert schema_of(path) == fresh_schema(tmp_path)


def test_upgrade_2025_keeps_trial_rows(tmp_path):
    path = build_legacy_file(tmp_path / "legacy.db", "2025")
    raw = table_rows(path, "raw_data")
    params = table_rows(path, "param_data")
    outcomes = table_rows(path, "outcome_data")
    upgraded(path).close()

    assert schema_of(path) == fresh_schema(tmp_path)
    after = table_rows(path, "raw_data")
    # Experiment 1 keeps its one AEPsych trial, which gains an empty
    # extra_data column; experiment 2 had none and gains its two tells.
    assert [(r[0], r[1], r[2], r[4]) for r in after[:1]] == raw
    assert after[0][3] is None
    assert [r[4] for r in after[1:]] == [2, 2]
    assert table_rows(path, "param_data")[:1] == params
    assert table_rows(path, "outcome_data")[:1] == outcomes


@pytest.mark.parametrize("name", LEGACY_FILES)
def test_upgrade_keeps_message_ids_times_types(legacy_copy, name):
    path = legacy_copy(name)
    before = [row[:3] for row in table_rows(path, "replay_data")]
    upgraded(path).close()
    assert [row[:3] for row in table_rows(path, "replay_data")] == before


@pytest.mark.parametrize("name", LEGACY_FILES)
def test_upgrade_keeps_master_strat_config_rows(legacy_copy, name):
    path = legacy_copy(name)
    master = table_rows(path, "master")
    strats = table_rows(path, "strat_data")
    configs = table_rows(path, "config_data")
    upgraded(path).close()
    width = len(master[0]) if master else 0
    assert [row[:width] for row in table_rows(path, "master")] == master
    assert [row[:4] for row in table_rows(path, "strat_data")] == strats
    assert table_rows(path, "config_data") == configs


def test_upgrade_single_stimulus_replays_known_tells(legacy_copy):
    conn = upgraded(legacy_copy("aepsych-2022-single-stimulus.db"))
    records = list(aepsych_store.iter_replay(conn, 1))
    conn.close()

    assert [r.message_type for r in records] == ["setup"] + ["ask", "tell"] * 7
    tells = [r for r in records if r.message_type == "tell"]
    for record, ((x1, x2), outcome) in zip(tells, SINGLE_STIMULUS_TELLS):
        assert record.message_contents == {
            "type": "tell",
            "message": {"config": {"x1": [x1], "x2": [x2]}, "outcome": outcome},
            "extra_info": {"e1": 1, "e2": 2},
        }
        assert record.extra_info == {"e1": 1, "e2": 2}
    assert records[1].message_contents == {"type": "ask", "message": ""}
    assert "[common]" in records[0].message_contents["message"]["config_str"]


def test_upgrade_multi_stimulus_replays_known_tells(legacy_copy):
    conn = upgraded(legacy_copy("aepsych-2022-multi-stimulus.db"))
    tells = [r for r in aepsych_store.iter_replay(conn, 1) if r.message_type == "tell"]
    conn.close()

    assert len(tells) == len(MULTI_STIMULUS_TELLS)
    for record, (p1a, p1b, p2a, p2b, out0, out1) in zip(tells, MULTI_STIMULUS_TELLS):
        message = record.message_contents["message"]
        assert message["config"] == {"par1": [p1a, p1b], "par2": [p2a, p2b]}
        assert message["outcome"] == [out0, out1]


@pytest.mark.parametrize("generation", GENERATIONS)
def test_upgrade_built_file_replays_pickled_messages(tmp_path, generation):
    conn = upgraded(build_legacy_file(tmp_path / "legacy.db", generation))
    for master_id in (1, 2):
        records = list(aepsych_store.iter_replay(conn, master_id))
        assert [r.message_contents for r in records] == [m for _, m in BUILT_MESSAGES]
        assert [r.unique_id for r in records] == [master_id * 100 + i for i in range(len(BUILT_MESSAGES))]
        if generation != "2021":
            assert records[2].extra_info == {"rt": 0.25}
    conn.close()


@pytest.mark.parametrize("protocol", (0, 1, 2, 3, 4, 5))
def test_upgrade_reads_every_pickle_protocol(tmp_path, protocol):
    conn = upgraded(build_legacy_file(tmp_path / "legacy.db", "2022", protocol=protocol))
    records = list(aepsych_store.iter_replay(conn, 1))
    conn.close()
    assert [r.message_contents for r in records] == [m for _, m in BUILT_MESSAGES]


@pytest.mark.parametrize("name", LEGACY_FILES)
def test_upgrade_twice_changes_nothing(legacy_copy, name):
    path = legacy_copy(name)
    upgraded(path).close()
    before = path.read_bytes()
    report = aepsych_store.upgrade_file(path)
    assert report.old_version == report.new_version == aepsych_store.SCHEMA_VERSION
    assert report.backup_path is None
    assert path.read_bytes() == before


def test_upgrade_drops_unique_participant(legacy_copy):
    conn = upgraded(legacy_copy("aepsych-2022-single-stimulus.db"))
    participant, experiment_id = conn.execute("SELECT participant_id, experiment_id FROM master").fetchone()
    second = aepsych_store.record_setup(conn, participant_id=participant, experiment_id=experiment_id)
    rows = conn.execute("SELECT unique_id FROM master WHERE participant_id = ?", (participant,)).fetchall()
    conn.close()
    assert rows == [(1,), (second,)]


def test_upgrade_then_record_new_session(legacy_copy):
    conn = upgraded(legacy_copy("aepsych-2022-single-stimulus.db"))
    master_id = aepsych_store.record_setup(conn, {"type": "setup", "message": {"config_str": "[common]\n"}})
    aepsych_store.record_message(conn, master_id, "ask", {"type": "ask", "message": ""})
    old = list(aepsych_store.iter_replay(conn, 1))
    new = list(aepsych_store.iter_replay(conn, master_id))
    conn.close()
    assert len(old) == 15
    assert [r.message_type for r in new] == ["setup", "ask"]
    assert new[0].unique_id > old[-1].unique_id


def test_upgrade_keeps_user_index(tmp_path):
    path = build_legacy_file(tmp_path / "legacy.db", "2022")
    conn = sqlite3.connect(str(path))
    conn.execute("CREATE INDEX by_time ON replay_data (timestamp)")
    conn.close()
    report = aepsych_store.upgrade_file(path, backup=False)
    assert "version 1: kept by_time" in report.changes
    assert ("index", "by_time") in [o[:2] for o in schema_of(path)[0]]


def test_upgrade_report_lists_changes(legacy_copy):
    report = aepsych_store.upgrade_file(legacy_copy("aepsych-2021-original.db"), backup=False)
    assert (report.old_version, report.new_version) == (0, aepsych_store.SCHEMA_VERSION)
    assert "version 1: master: removed UNIQUE (experiment_id)" in report.changes
    assert "version 1: replay_data: added column extra_info" in report.changes
    assert "version 1: master: added column participant_id, extra_metadata" in report.changes


def test_upgrade_backup_equals_original(legacy_copy):
    path = legacy_copy("aepsych-2022-multi-stimulus.db")
    original_rows = {t: table_rows(path, t) for t in ("master", "replay_data", "strat_data", "config_data")}
    report = aepsych_store.upgrade_file(path)
    assert report.backup_path == str(path) + ".v0.bak"
    for table, rows in original_rows.items():
        assert table_rows(report.backup_path, table) == rows
    second = aepsych_store.upgrade_file(report.backup_path, backup=True)
    assert second.backup_path == str(path) + ".v0.bak.v0.bak"


def test_upgrade_failing_step_leaves_file_unchanged(tmp_path, monkeypatch):
    path = build_legacy_file(tmp_path / "legacy.db", "2022")
    before = path.read_bytes()

    def broken_step(conn, report):
        aepsych_store._upgrade_to_1(conn, report)
        raise aepsych_store.StoreError("simulated failure after the rebuild")

    monkeypatch.setattr(aepsych_store, "_UPGRADE_STEPS", ((1, broken_step),))
    with pytest.raises(aepsych_store.StoreError, match="upgrade step 1 failed and the file stays at version 0"):
        aepsych_store.upgrade_file(path, backup=False)
    assert path.read_bytes() == before
