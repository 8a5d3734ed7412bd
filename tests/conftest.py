"""Shared fixtures: copies of the real AEPsych files and legacy layouts built in code."""

import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LEGACY_DIR = Path(os.environ.get("AEPSYCH_LEGACY_DBS", ROOT.parent / "shared" / "legacy-dbs"))
LEGACY_FILES = (
    "aepsych-2021-original.db",
    "aepsych-2022-single-stimulus.db",
    "aepsych-2022-multi-stimulus.db",
)

# The layouts AEPsych's SQLAlchemy models created, as the real files and the
# legacy-dbs README describe them.
ORIGINAL_2021_DDL = """
CREATE TABLE master (
unique_id INTEGER NOT NULL,
experiment_name VARCHAR(256),
experiment_description VARCHAR(2048),
experiment_id VARCHAR(10),
PRIMARY KEY (unique_id),
UNIQUE (experiment_id)
);
CREATE TABLE replay_data (
unique_id INTEGER NOT NULL,
timestamp DATETIME,
message_type VARCHAR(64),
message_contents BLOB,
master_table_id INTEGER,
PRIMARY KEY (unique_id),
FOREIGN KEY(master_table_id) REFERENCES master (unique_id)
);
CREATE TABLE strat_data (
unique_id INTEGER NOT NULL, timestamp DATETIME, strat BLOB, master_table_id INTEGER,
PRIMARY KEY (unique_id), FOREIGN KEY(master_table_id) REFERENCES master (unique_id)
);
CREATE TABLE config_data (
unique_id INTEGER NOT NULL, timestamp DATETIME, config BLOB, master_table_id INTEGER,
PRIMARY KEY (unique_id), FOREIGN KEY(master_table_id) REFERENCES master (unique_id)
);
"""

MASTER_2022_DDL = """
CREATE TABLE master (
unique_id INTEGER NOT NULL,
experiment_name VARCHAR(256),
experiment_description VARCHAR(2048),
experiment_id VARCHAR(10),
participant_id VARCHAR(50),
extra_metadata VARCHAR(4096),
PRIMARY KEY (unique_id)
{unique}
);
"""

REPLAY_2022_DDL = """
CREATE TABLE replay_data (
unique_id INTEGER NOT NULL,
timestamp DATETIME,
message_type VARCHAR(64),
message_contents BLOB,
extra_info BLOB,
master_table_id INTEGER,
PRIMARY KEY (unique_id),
FOREIGN KEY(master_table_id) REFERENCES master (unique_id)
);
CREATE TABLE strat_data (
unique_id INTEGER NOT NULL, timestamp DATETIME, strat BLOB, master_table_id INTEGER,
PRIMARY KEY (unique_id), FOREIGN KEY(master_table_id) REFERENCES master (unique_id)
);
CREATE TABLE config_data (
unique_id INTEGER NOT NULL, timestamp DATETIME, config BLOB, master_table_id INTEGER,
PRIMARY KEY (unique_id), FOREIGN KEY(master_table_id) REFERENCES master (unique_id)
);
"""

TRIAL_TABLES_2025_DDL = """
CREATE TABLE raw_data (
unique_id INTEGER NOT NULL, timestamp DATETIME, model_data BOOLEAN, master_table_id INTEGER,
PRIMARY KEY (unique_id), FOREIGN KEY(master_table_id) REFERENCES master (unique_id)
);
CREATE TABLE param_data (
unique_id INTEGER NOT NULL, param_name VARCHAR(50), param_value VARCHAR(50), iteration_id INTEGER,
PRIMARY KEY (unique_id), FOREIGN KEY(iteration_id) REFERENCES raw_data (unique_id)
);
CREATE TABLE outcome_data (
unique_id INTEGER NOT NULL, outcome_name VARCHAR(50), outcome_value FLOAT, iteration_id INTEGER,
PRIMARY KEY (unique_id), FOREIGN KEY(iteration_id) REFERENCES raw_data (unique_id)
);
"""

GENERATIONS = ("2021", "2022", "2025")

# The messages every built legacy file holds, as AEPsych's server pickled them.
BUILT_MESSAGES = [
    ("setup", {"type": "setup", "message": {"config_str": "[common]\nparnames = [x1]\n"}}),
    ("ask", {"type": "ask", "message": ""}),
    (
        "tell",
        {
            "type": "tell",
            "message": {"config": {"x1": [0.5]}, "outcome": 1},
            "extra_info": {"rt": 0.25},
        },
    ),
    ("ask", {"type": "ask", "message": ""}),
    ("tell", {"type": "tell", "message": {"config": {"x1": [0.25]}, "outcome": 0}}),
]


def build_legacy_file(path, generation, protocol=pickle.DEFAULT_PROTOCOL):
    """Write a legacy AEPsych file of one layout generation with two experiments."""
    conn = sqlite3.connect(str(path))
    if generation == "2021":
        conn.executescript(ORIGINAL_2021_DDL)
    else:
        unique = ",\nUNIQUE (experiment_id),\nUNIQUE (participant_id)" if generation == "2022" else ""
        conn.executescript(MASTER_2022_DDL.format(unique=unique) + REPLAY_2022_DDL)
    if generation == "2025":
        conn.executescript(TRIAL_TABLES_2025_DDL)
    with conn:
        for master_id in (1, 2):
            if generation == "2021":
                conn.execute(
                    "INSERT INTO master VALUES (?, 'exp', 'desc', ?)", (master_id, "id-{}".format(master_id))
                )
            else:
                conn.execute(
                    "INSERT INTO master VALUES (?, 'exp', 'desc', ?, ?, NULL)",
                    (master_id, "id-{}".format(master_id), "p-{}".format(master_id)),
                )
            for index, (message_type, message) in enumerate(BUILT_MESSAGES):
                row_id = master_id * 100 + index
                timestamp = "2023-01-0{} 10:00:0{}.000001".format(master_id, index)
                contents = pickle.dumps(message, protocol=protocol)
                if generation == "2021":
                    conn.execute(
                        "INSERT INTO replay_data VALUES (?, ?, ?, ?, ?)",
                        (row_id, timestamp, message_type, contents, master_id),
                    )
                else:
                    extra = message.get("extra_info")
                    extra = None if extra is None else pickle.dumps(extra, protocol=protocol)
                    conn.execute(
                        "INSERT INTO replay_data VALUES (?, ?, ?, ?, ?, ?)",
                        (row_id, timestamp, message_type, contents, extra, master_id),
                    )
        if generation == "2025":
            conn.execute("INSERT INTO raw_data VALUES (1, '2023-01-01 10:00:02.000001', 1, 1)")
            conn.execute("INSERT INTO param_data VALUES (1, 'x1', '0.5', 1)")
            conn.execute("INSERT INTO outcome_data VALUES (1, 'outcome', 1.0, 1)")
    conn.close()
    return path


@pytest.fixture
def legacy_copy(tmp_path):
    """Return a function that copies one of the real AEPsych files into tmp_path."""

    def copy(name):
        source = LEGACY_DIR / name
        if not source.is_file():
            pytest.fail(
                "{} not found; set AEPSYCH_LEGACY_DBS to the folder with the real AEPsych files".format(source)
            )
        target = tmp_path / name
        shutil.copyfile(str(source), str(target))
        return target

    return copy


def run_cli(*args, cwd=None, timeout=60):
    """Run ``python -m aepsych_store`` in a subprocess and return the CompletedProcess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "aepsych_store"] + [str(a) for a in args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=True,
        timeout=timeout,
    )


def schema_of(path):
    """Return the schema of a file: sqlite_master rows and every table's columns."""
    conn = sqlite3.connect("file:{}?mode=ro".format(path), uri=True)
    try:
        objects = conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
        ).fetchall()
        columns = {
            name: conn.execute("PRAGMA table_info({})".format(name)).fetchall()
            for (type_, name, _, _) in objects
            if type_ == "table"
        }
        foreign_keys = {
            name: conn.execute("PRAGMA foreign_key_list({})".format(name)).fetchall()
            for (type_, name, _, _) in objects
            if type_ == "table"
        }
    finally:
        conn.close()
    return objects, columns, foreign_keys
