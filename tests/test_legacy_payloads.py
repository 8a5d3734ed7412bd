"""Configs and strategies from legacy AEPsych files, read without AEPsych and without unpickling."""

import configparser
import io
import json
import pickle
import sqlite3
import sys
import zipfile

import pytest

import aepsych_store
from conftest import ROOT, build_legacy_file

SHARED_2022 = ("aepsych-2022-single-stimulus.db", "aepsych-2022-multi-stimulus.db")


def parse_ini(text):
    parser = configparser.ConfigParser(interpolation=None, default_section="no default section")
    parser.read_string(text)
    return parser


def setup_config_str(path):
    conn = sqlite3.connect("file:{}?mode=ro".format(path), uri=True)
    blob = conn.execute("SELECT message_contents FROM replay_data WHERE message_type = 'setup'").fetchone()[0]
    conn.close()
    # pickle.loads is acceptable here only because these are AEPsych's own
    # public test fixtures; it gives the expected values independently of
    # the module's decoder, which never unpickles.
    return pickle.loads(blob)["message"]["config_str"]


@pytest.mark.parametrize("name", SHARED_2022)
def test_load_config_recovers_setup_options(legacy_copy, name):
    path = legacy_copy(name)
    expected = parse_ini(setup_config_str(path))
    conn = aepsych_store.connect(path, upgrade=True)
    recovered = parse_ini(aepsych_store.load_config(conn, 1))
    conn.close()

    for section in expected.sections():
        assert recovered.has_section(section), section
        for option, value in expected.items(section):
            assert recovered.get(section, option) == value, (section, option)


def test_load_config_without_aepsych_imported(legacy_copy):
    path = legacy_copy("aepsych-2022-multi-stimulus.db")
    conn = aepsych_store.connect(path, upgrade=True)
    text = aepsych_store.load_config(conn, 1)
    conn.close()
    assert "parnames = [par1, par2]" in text
    assert not any(module.split(".")[0] in ("aepsych", "torch") for module in sys.modules)


@pytest.mark.parametrize("name", SHARED_2022)
def test_load_strat_returns_torch_archive(legacy_copy, name):
    path = legacy_copy(name)
    conn = aepsych_store.connect(path, upgrade=True)
    strat = aepsych_store.load_strat(conn, 1)
    (record,) = aepsych_store.iter_strats(conn, 1)
    conn.close()

    assert strat[:4] == b"PK\x03\x04"
    assert zipfile.is_zipfile(io.BytesIO(strat))
    assert record.strat_format == "pickled-bytesio"
    assert record.strat == strat


def test_load_strat_other_pickle_returned_as_stored(tmp_path):
    path = build_legacy_file(tmp_path / "legacy.db", "2022")
    # An older server pickled the strategy object itself; an OrderedDict of
    # floats stands in for one here.
    stored = pickle.dumps(__import__("collections").OrderedDict(a=1.0), protocol=2)
    conn = sqlite3.connect(str(path))
    conn.execute("INSERT INTO strat_data VALUES (1, '2023-01-01 10:00:00.000000', ?, 1)", (stored,))
    conn.commit()
    conn.close()

    conn = aepsych_store.connect(path, upgrade=True)
    (record,) = aepsych_store.iter_strats(conn, 1)
    conn.close()
    assert record.strat_format == "pickle"
    assert record.strat == stored


def test_example_database_configs_and_strats(tmp_path):
    path = tmp_path / "example.db"
    path.write_bytes((ROOT / "examples" / "legacy-2022.db").read_bytes())
    conn = aepsych_store.connect(path, upgrade=True)
    for master_id in (1, 2):
        config = parse_ini(aepsych_store.load_config(conn, master_id))
        assert config.get("opt_strat", "acqf") == "MCLevelSetEstimation"
        assert config.get("common", "parnames") == "[contrast, frequency]"
        assert zipfile.is_zipfile(io.BytesIO(aepsych_store.load_strat(conn, master_id)))
    conn.close()


@pytest.mark.parametrize("name", SHARED_2022)
def test_upgraded_file_answers_json_extract(legacy_copy, name):
    path = legacy_copy(name)
    aepsych_store.upgrade_file(path, backup=False)
    conn = sqlite3.connect(str(path))
    types = conn.execute(
        "SELECT json_extract(message_contents, '$.type') FROM replay_data ORDER BY unique_id"
    ).fetchall()
    outcomes = conn.execute(
        "SELECT json_extract(message_contents, '$.message.outcome') FROM replay_data"
        " WHERE message_type = 'tell' ORDER BY unique_id"
    ).fetchall()
    blobs = conn.execute("SELECT count(*) FROM replay_data WHERE typeof(message_contents) = 'blob'").fetchone()
    conn.close()
    assert [t for (t,) in types] == ["setup"] + ["ask", "tell"] * 7
    assert len(outcomes) == 7
    assert blobs == (0,)


@pytest.mark.parametrize("name", SHARED_2022)
def test_replay_same_before_and_after_conversion(legacy_copy, tmp_path, name):
    path = legacy_copy(name)
    before = [
        (row_id, pickle.loads(contents), None if extra is None else pickle.loads(extra))
        for row_id, contents, extra in sqlite3.connect(str(path)).execute(
            "SELECT unique_id, message_contents, extra_info FROM replay_data ORDER BY unique_id"
        )
    ]
    conn = aepsych_store.connect(path, upgrade=True)
    after = [(r.unique_id, r.message_contents, r.extra_info) for r in aepsych_store.iter_replay(conn, 1)]
    conn.close()
    assert after == before


def test_conversion_keeps_values_json_cannot_hold(tmp_path):
    path = build_legacy_file(tmp_path / "legacy.db", "2022")
    awkward = {
        "tuple": {"type": "query", "message": {"x": (1, 2)}},
        "int key": {"type": "query", "message": {1: "one"}},
        "nan": {"type": "query", "message": {"x": float("nan")}},
        "bytes": {"type": "query", "message": {"x": b"\x00"}},
    }
    conn = sqlite3.connect(str(path))
    stored = {}
    for row_id, (label, value) in enumerate(awkward.items(), start=900):
        blob = pickle.dumps(value, protocol=4)
        stored[row_id] = blob
        conn.execute(
            "INSERT INTO replay_data VALUES (?, '2023-01-01 11:00:00.000000', 'query', ?, NULL, 1)", (row_id, blob)
        )
    conn.commit()
    conn.close()

    report = aepsych_store.upgrade_file(path, backup=False)

    kept = {row_id: reason for table, column, row_id, reason in report.kept_as_pickle}
    assert sorted(kept) == sorted(stored)
    assert "JSON would change it" in kept[900]
    assert "JSON would change it" in kept[901]
    assert "JSON cannot hold it" in kept[902]
    assert "JSON cannot hold it" in kept[903]
    assert report.unreadable == []
    conn = sqlite3.connect(str(path))
    for row_id, blob in stored.items():
        assert conn.execute("SELECT message_contents FROM replay_data WHERE unique_id = ?", (row_id,)).fetchone() == (
            blob,
        )
    conn.close()
    conn = aepsych_store.connect(path)
    replayed = {r.unique_id: r.message_contents for r in aepsych_store.iter_replay(conn, 1)}
    conn.close()
    assert replayed[900] == awkward["tuple"]
    assert replayed[901] == awkward["int key"]
    assert replayed[903] == awkward["bytes"]


def test_legacy_extra_metadata_pickle_converted(tmp_path):
    path = build_legacy_file(tmp_path / "legacy.db", "2022")
    conn = sqlite3.connect(str(path))
    conn.execute("UPDATE master SET extra_metadata = ? WHERE unique_id = 1", (pickle.dumps({"lab": "V1"}),))
    conn.execute("UPDATE master SET extra_metadata = ? WHERE unique_id = 2", (json.dumps({"lab": "V2"}),))
    conn.commit()
    conn.close()

    conn = aepsych_store.connect(path, upgrade=True)
    metadata = [e.extra_metadata for e in aepsych_store.list_experiments(conn)]
    stored = conn.execute("SELECT extra_metadata FROM master ORDER BY unique_id").fetchall()
    conn.close()
    assert metadata == [{"lab": "V1"}, {"lab": "V2"}]
    assert [json.loads(text) for (text,) in stored] == [{"lab": "V1"}, {"lab": "V2"}]
