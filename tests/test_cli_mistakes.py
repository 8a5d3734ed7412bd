"""Mistakes a careless user makes on the command line: each is caught and nothing is lost."""

import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

import aepsych_store
from conftest import ROOT, build_legacy_file, run_cli


def add_tells(path, count):
    conn = sqlite3.connect(str(path))
    tell = pickle.dumps({"type": "tell", "message": {"config": {"x1": [0.5]}, "outcome": 1}}, protocol=4)
    conn.executemany(
        "INSERT INTO replay_data (timestamp, message_type, message_contents, master_table_id)"
        " VALUES ('2023-01-01 10:00:00.000000', 'tell', ?, 1)",
        [(tell,)] * count,
    )
    conn.commit()
    conn.close()


def user_version(path):
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def test_tocsv_swapped_paths_keep_database(tmp_path):
    database = tmp_path / "session.db"
    conn = aepsych_store.connect(database)
    aepsych_store.record_setup(conn)
    conn.close()
    other = build_legacy_file(tmp_path / "legacy.db", "2022")
    before = database.read_bytes()

    result = run_cli("--tocsv", database, other)

    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert "is a SQLite database" in result.stderr
    assert "order of the two paths" in result.stderr
    assert database.read_bytes() == before


def test_update_interrupted_then_rerun(tmp_path):
    path = build_legacy_file(tmp_path / "legacy.db", "2022")
    add_tells(path, 150000)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, "-m", "aepsych_store", "--update", "--no-backup", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=True,
    )
    time.sleep(1.5)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)

    if process.returncode == 0:
        pytest.skip("the upgrade finished before the interrupt arrived")
    assert process.returncode == 130
    assert stderr.splitlines()[-1].startswith("aepsych_store: interrupted; ")
    assert "Traceback" not in stderr
    version = user_version(path)
    assert "schema version {}, complete".format(version) in stderr
    conn = sqlite3.connect(str(path))
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()

    rerun = run_cli("--update", "--no-backup", path, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert user_version(path) == aepsych_store.SCHEMA_VERSION
    conn = sqlite3.connect(str(path))
    assert conn.execute("SELECT count(*) FROM raw_data").fetchone() == (150000 + 4,)
    conn.close()


def test_update_twice_at_once(tmp_path):
    path = build_legacy_file(tmp_path / "legacy.db", "2022")
    add_tells(path, 60000)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "aepsych_store", "--update", "--timeout", "300", str(path)]
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in processes]
    for process in processes:
        process.stdout.close()
        process.stderr.close()

    statuses = sorted(status for status, _, _ in results)
    assert statuses in ([0, 0], [0, 1]), results
    upgraded = [out for status, out, _ in results if "upgraded from schema version 0" in out]
    assert len(upgraded) >= 1, results
    # Both runs copy the file first, and one that ran no step removes its
    # copy. Rarely the second run takes over between two steps of the first
    # and keeps a copy of that intermediate version.
    backups = sorted(name for name in os.listdir(str(tmp_path)) if ".bak" in name)
    assert 1 <= len(backups) <= 2, backups
    versions = sorted(user_version(tmp_path / name) for name in backups)
    assert versions[0] == 0
    assert all(version < aepsych_store.SCHEMA_VERSION for version in versions)
    assert user_version(path) == aepsych_store.SCHEMA_VERSION


@pytest.mark.parametrize("value", ["-5", "nan", "inf", "soon"])
def test_update_bad_timeout(tmp_path, value):
    path = build_legacy_file(tmp_path / "legacy.db", "2022")
    before = path.read_bytes()
    result = run_cli("--update", path, "--timeout", value)
    assert result.returncode == 2
    assert "--timeout" in result.stderr
    assert path.read_bytes() == before


def test_connect_without_schema_creates_nothing(tmp_path):
    folder = tmp_path / "lab"
    folder.mkdir()
    shutil.copyfile(str(ROOT / "aepsych_store.py"), str(folder / "aepsych_store.py"))
    result = subprocess.run(
        [sys.executable, "-c", "import aepsych_store; aepsych_store.connect('new.db')"],
        cwd=str(folder),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "schema.sql not found" in result.stderr
    assert sorted(os.listdir(str(folder))) == ["__pycache__", "aepsych_store.py"] or sorted(
        os.listdir(str(folder))
    ) == ["aepsych_store.py"]


def test_backup_permission_advice(tmp_path, monkeypatch):
    path = build_legacy_file(tmp_path / "legacy.db", "2022")
    before = path.read_bytes()

    def refuse(source, target):
        raise PermissionError(13, "Permission denied", target)

    monkeypatch.setattr(aepsych_store.shutil, "copyfile", refuse)
    with pytest.raises(aepsych_store.StoreError) as raised:
        aepsych_store.upgrade_file(path)
    assert "Permission denied" in str(raised.value)
    assert "write permission on the file's folder" in str(raised.value)
    assert "free some space" not in str(raised.value)
    assert path.read_bytes() == before
