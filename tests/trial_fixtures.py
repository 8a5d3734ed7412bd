"""Documented trial rows of the real AEPsych files, plain sqlite3 readers, and a large-file builder.

The readers use only the sqlite3 module, so the tests that compare against
them do not depend on the code under test.
"""

import json
import sqlite3

import aepsych_store

MULTI_STIMULUS = "aepsych-2022-multi-stimulus.db"
SINGLE_STIMULUS = "aepsych-2022-single-stimulus.db"
ORIGINAL_2021 = "aepsych-2021-original.db"

# The documented trials of aepsych-2022-multi-stimulus.db, one tuple per trial.
MULTI_STIMULUS_COLUMNS = ("par1_stimuli0", "par1_stimuli1", "par2_stimuli0", "par2_stimuli1", "outcome_0", "outcome_1")
MULTI_STIMULUS_TRIALS = [
    (0.1, 0.2, 4, 0.1, 1, 0),
    (0.3, 1, 3, 0.2, -1, 0),
    (2, 3, 2, 1, 0.1, 0),
    (4, 0.1, 0.3, 0.2, 0, 0),
    (0.2, 2, 2, 0.3, -0.1, 0),
    (1, 0.3, 1, 0.1, 0, 0),
    (0.3, 0.1, 0.3, 4, 0, 0),
]

# The documented "x1, x2, outcome" of the seven tells of aepsych-2022-single-stimulus.db.
SINGLE_STIMULUS_COLUMNS = ("x1", "x2", "outcome")
SINGLE_STIMULUS_TRIALS = [
    (0.1, 4, 1),
    (0.2, 0.1, -1),
    (0.3, 3, 0.1),
    (1, 0.2, 0),
    (2, 2, -0.1),
    (3, 1, 0),
    (4, 0.3, 0),
]
SINGLE_STIMULUS_EXTRA_INFO = {"e1": 1, "e2": 2}

KNOWN_TRIALS = {
    MULTI_STIMULUS: (MULTI_STIMULUS_COLUMNS, MULTI_STIMULUS_TRIALS),
    SINGLE_STIMULUS: (SINGLE_STIMULUS_COLUMNS, SINGLE_STIMULUS_TRIALS),
    ORIGINAL_2021: ((), []),
}

EXPERIMENT_COLUMNS = ("experiment_id", "experiment_name", "experiment_description", "participant_id")


def open_read_write(path):
    # Read-write on purpose: a mode=ro connection to a WAL-mode file leaves PATH-wal and PATH-shm behind.
    return sqlite3.connect(str(path))


def experiment_columns(path):
    """Return the four experiment columns of every master row, by unique_id, read with plain sqlite3."""
    conn = open_read_write(path)
    try:
        rows = conn.execute(
            "SELECT unique_id, experiment_id, experiment_name, experiment_description, participant_id"
            " FROM master ORDER BY unique_id"
        ).fetchall()
    finally:
        conn.close()
    return {row[0]: dict(zip(EXPERIMENT_COLUMNS, row[1:])) for row in rows}


def tell_timestamps(path, master_id=1):
    """Return the timestamps of an experiment's tell messages in recording order."""
    conn = open_read_write(path)
    try:
        return [
            row[0]
            for row in conn.execute(
                "SELECT timestamp FROM replay_data WHERE message_type = 'tell' AND master_table_id = ?"
                " ORDER BY unique_id",
                (master_id,),
            )
        ]
    finally:
        conn.close()


def tell_extra_info(path, master_id=1):
    """Return the extra_info of an experiment's tells from a file whose extra_info is JSON text."""
    conn = open_read_write(path)
    try:
        return [
            json.loads(row[0]) if row[0] is not None else None
            for row in conn.execute(
                "SELECT extra_info FROM replay_data WHERE message_type = 'tell' AND master_table_id = ?"
                " ORDER BY unique_id",
                (master_id,),
            )
        ]
    finally:
        conn.close()


def known_rows(name):
    """Return the documented trials of a real AEPsych file as dicts of parameter and outcome columns."""
    columns, trials = KNOWN_TRIALS[name]
    return [dict(zip(columns, values)) for values in trials]


def row_counts(path):
    """Count the rows of every table of the store's schema."""
    conn = open_read_write(path)
    try:
        return {
            table: conn.execute("SELECT count(*) FROM {}".format(table)).fetchone()[0]
            for table in ("master", "replay_data", "strat_data", "config_data", "raw_data", "param_data", "outcome_data")
        }
    finally:
        conn.close()


def many_trials(path, count):
    """Write a new store with one experiment of count trials, filled in SQL; return its master id.

    Each trial has parameters x1 and x2 (text such as "3.5"), an outcome,
    and extra_data {"rt": N}.
    """
    conn = aepsych_store.connect(path)
    master_id = aepsych_store.record_setup(
        conn, {"type": "setup", "message": {"config_str": "[common]\nparnames = [x1, x2]\n"}}
    )
    conn.close()
    raw = sqlite3.connect(str(path))
    raw.executescript(
        """
        BEGIN;
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count})
        INSERT INTO raw_data (unique_id, timestamp, model_data, extra_data, master_table_id)
        SELECT i, '2024-01-01 10:00:00.000000', 1, '{{"rt":' || (i % 1000) || '}}', {master_id} FROM n;
        INSERT INTO param_data (param_name, param_value, iteration_id)
        SELECT p.name, CAST(r.unique_id % 97 AS TEXT) || '.5', r.unique_id
        FROM raw_data r CROSS JOIN (SELECT 'x1' AS name UNION ALL SELECT 'x2') p ORDER BY r.unique_id, p.name;
        INSERT INTO outcome_data (outcome_name, outcome_value, iteration_id)
        SELECT 'outcome', unique_id % 2, unique_id FROM raw_data;
        COMMIT;
        """.format(count=count, master_id=master_id)
    )
    raw.close()
    return master_id
