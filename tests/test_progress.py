"""--update shows progress on a terminal's stderr and stays silent otherwise."""

import os
import pickle
import pty
import sqlite3
import subprocess
import sys

from conftest import ROOT, build_legacy_file


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


def run_update(path, stderr_on_terminal):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "aepsych_store", "--update", "--no-backup", str(path)]
    if not stderr_on_terminal:
        result = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        return result.returncode, result.stderr.decode()
    controller, terminal = pty.openpty()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    return process.wait(timeout=120), output.decode(errors="replace")


def test_progress_on_terminal(tmp_path):
    path = build_legacy_file(tmp_path / "legacy.db", "2022")
    add_tells(path, 6000)
    status, stderr = run_update(path, stderr_on_terminal=True)
    assert status == 0
    assert "rows/s" in stderr
    assert "s left" in stderr


def test_progress_silent_without_terminal(tmp_path):
    path = build_legacy_file(tmp_path / "legacy.db", "2022")
    add_tells(path, 6000)
    status, stderr = run_update(path, stderr_on_terminal=False)
    assert status == 0
    assert stderr == ""
