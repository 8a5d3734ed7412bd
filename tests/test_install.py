"""The two ways a lab installs the store: copying two files, or pip install."""

import os
import shutil
import subprocess
import sys
import venv

from conftest import LEGACY_DIR, ROOT

USE_STORE = """
import sys
import aepsych_store
conn = aepsych_store.connect(sys.argv[1], upgrade=True)
master_id = aepsych_store.record_setup(conn, participant_id="P1")
aepsych_store.record_message(conn, master_id, "ask", {"type": "ask", "message": ""})
print(aepsych_store.__file__)
print(len(aepsych_store.list_experiments(conn)), len(list(aepsych_store.iter_replay(conn, 1))))
conn.close()
"""


def clean_environment():
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def test_install_copying_two_files(tmp_path):
    folder = tmp_path / "lab"
    folder.mkdir()
    shutil.copyfile(str(ROOT / "aepsych_store.py"), str(folder / "aepsych_store.py"))
    shutil.copyfile(str(ROOT / "schema.sql"), str(folder / "schema.sql"))
    shutil.copyfile(str(LEGACY_DIR / "aepsych-2022-single-stimulus.db"), str(folder / "old.db"))

    result = subprocess.run(
        [sys.executable, "-c", USE_STORE, "old.db"],
        cwd=str(folder),
        env=clean_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(folder / "aepsych_store.py")
    assert lines[1] == "2 15"


def test_install_pip_into_fresh_venv(tmp_path):
    environment = tmp_path / "venv"
    venv.create(str(environment), with_pip=True)
    python = str(environment / "bin" / "python")
    source = tmp_path / "source"
    shutil.copytree(str(ROOT), str(source), ignore=shutil.ignore_patterns(".git", ".venvs", "__pycache__", "build", "*.egg-info"))
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", str(source)],
        env=clean_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        universal_newlines=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(str(LEGACY_DIR / "aepsych-2022-single-stimulus.db"), str(work / "old.db"))

    result = subprocess.run(
        [python, "-c", USE_STORE, "old.db"],
        cwd=str(work),
        env=clean_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert str(environment) in lines[0]
    assert lines[1] == "2 15"

    command = subprocess.run(
        [python, "-m", "aepsych_store", "--summarize", "old.db"],
        cwd=str(work),
        env=clean_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=True,
        timeout=60,
    )
    assert command.returncode == 0, command.stderr
    assert "P1" in command.stdout
