"""Store AEPsych experiment messages, strategies and configs in SQLite.

One module on the standard library, with the fresh schema in ``schema.sql``
beside it. Every function takes a connection from :func:`connect`. New values
are written as JSON or INI text; rows that AEPsych itself wrote hold Python
pickles, which this module decodes as data only and never unpickles.

Run ``python -m aepsych_store --help`` for the command line.
"""

import argparse
import collections
import configparser
import contextlib
import csv
import datetime
import errno
import io
import itertools
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle  # for pickle.dumps only: nothing read from a file is ever unpickled
import re
import shutil
import signal
import sqlite3
import struct
import sys
import sysconfig
from time import monotonic as _monotonic
import tempfile
import threading
import traceback
import uuid
import weakref
from pathlib import Path

__version__ = "0.1.0"

#: The schema version this module writes and reads, kept in PRAGMA user_version.
SCHEMA_VERSION = 3

logger = logging.getLogger(__name__)

_MIN_ROWID = -(2**63)
_BATCH_SIZE = 256

# Tables and columns of AEPsych's layouts before this store took over. Columns
# in _LEGACY_OPTIONAL_COLUMNS are missing from the original 2021 layout.
_LEGACY_COLUMNS = {
    "master": ("unique_id", "experiment_name", "experiment_description", "experiment_id"),
    "replay_data": ("unique_id", "timestamp", "message_type", "message_contents", "master_table_id"),
    "strat_data": ("unique_id", "timestamp", "strat", "master_table_id"),
    "config_data": ("unique_id", "timestamp", "config", "master_table_id"),
}
_LEGACY_OPTIONAL_COLUMNS = {
    "master": ("participant_id", "extra_metadata"),
    "replay_data": ("extra_info",),
    "strat_data": (),
    "config_data": (),
}
_METADATA_COLUMNS = ("experiment_name", "experiment_description", "experiment_id", "participant_id")


# ---------------------------------------------------------------------------
# Errors


class StoreError(Exception):
    """Base class of every error this module raises."""


class UpgradeRequiredError(StoreError):
    """A file is at an older schema version and was opened without upgrade=True."""


class UnreadableRowError(StoreError):
    """A stored value could not be decoded; ``table`` and ``row_id`` name the row."""

    def __init__(self, message, *, table, row_id):
        super().__init__(message)
        self.table = table
        self.row_id = row_id


# ---------------------------------------------------------------------------
# SQL the module runs often. The fresh schema itself is schema.sql.

_INSERT_MASTER = (
    "INSERT INTO master (experiment_name, experiment_description, experiment_id,"
    " participant_id, extra_metadata) VALUES (?, ?, ?, ?, ?)"
)
_INSERT_MESSAGE = (
    "INSERT INTO replay_data (timestamp, message_type, message_contents, extra_info,"
    " master_table_id) VALUES (?, ?, ?, ?, ?)"
)
_INSERT_STRAT = (
    "INSERT INTO strat_data (timestamp, strat, master_table_id, strat_format)"
    " VALUES (?, ?, ?, 'bytes')"
)
_INSERT_CONFIG = "INSERT INTO config_data (timestamp, config, master_table_id) VALUES (?, ?, ?)"
_SELECT_MASTER_EXISTS = "SELECT 1 FROM master WHERE unique_id = ?"
_SELECT_LATEST_SETUP = (
    "SELECT unique_id, message_contents FROM replay_data"
    " WHERE master_table_id = ? AND message_type = 'setup' ORDER BY unique_id DESC LIMIT 1"
)
_SELECT_NEXT_TRIAL_ID = "SELECT coalesce(max(unique_id), 0) + 1 FROM raw_data"
_INSERT_TRIAL = (
    "INSERT INTO raw_data (unique_id, timestamp, model_data, extra_data, master_table_id) VALUES (?, ?, ?, ?, ?)"
)
_INSERT_PARAM = "INSERT INTO param_data (param_name, param_value, iteration_id) VALUES (?, ?, ?)"
_INSERT_OUTCOME = "INSERT INTO outcome_data (outcome_name, outcome_value, iteration_id) VALUES (?, ?, ?)"
_SELECT_REPLAY = (
    "SELECT unique_id, timestamp, message_type, message_contents, extra_info"
    " FROM replay_data WHERE master_table_id = ? AND unique_id >= ? ORDER BY unique_id"
)
_SELECT_REPLAY_BEFORE = (
    "SELECT unique_id, timestamp, message_type, message_contents, extra_info"
    " FROM replay_data WHERE master_table_id = ? AND unique_id >= ? AND unique_id < ?"
    " ORDER BY unique_id"
)
# The TEXT values of replay rows as raw bytes, to find one that is not UTF-8.
_SELECT_REPLAY_TEXT_BYTES = """
SELECT unique_id,
       CASE WHEN typeof(timestamp) = 'text' THEN CAST(timestamp AS BLOB) END,
       CASE WHEN typeof(message_type) = 'text' THEN CAST(message_type AS BLOB) END,
       CASE WHEN typeof(message_contents) = 'text' THEN CAST(message_contents AS BLOB) END,
       CASE WHEN typeof(extra_info) = 'text' THEN CAST(extra_info AS BLOB) END
FROM replay_data WHERE master_table_id = ? AND unique_id >= ? ORDER BY unique_id
"""
_SELECT_STRATS = (
    "SELECT unique_id, timestamp, strat, strat_format FROM strat_data"
    " WHERE master_table_id = ? ORDER BY unique_id"
)
_SELECT_LATEST_STRAT = _SELECT_STRATS + " DESC LIMIT 1"
_SELECT_CONFIGS = (
    "SELECT unique_id, timestamp, config FROM config_data"
    " WHERE master_table_id = ? ORDER BY unique_id"
)
_SELECT_LATEST_CONFIG = _SELECT_CONFIGS + " DESC LIMIT 1"
_SELECT_EXPERIMENTS = """
SELECT m.unique_id, m.experiment_id, m.experiment_name, m.experiment_description,
       m.participant_id, m.extra_metadata,
       (SELECT count(*) FROM replay_data r WHERE r.master_table_id = m.unique_id),
       (SELECT r.timestamp FROM replay_data r WHERE r.master_table_id = m.unique_id
        ORDER BY r.unique_id LIMIT 1),
       (SELECT r.timestamp FROM replay_data r WHERE r.master_table_id = m.unique_id
        ORDER BY r.unique_id DESC LIMIT 1)
FROM master m ORDER BY m.unique_id
"""
_SELECT_LEGACY_CONFIGS = "SELECT unique_id, config FROM config_data WHERE typeof(config) = 'blob'"
_SELECT_LEGACY_STRATS = (
    "SELECT unique_id, strat FROM strat_data WHERE typeof(strat) = 'blob'"
    " AND strat_format IS NOT 'bytes'"
)
_SELECT_ORPHANS = (
    "SELECT 'replay_data', unique_id, master_table_id FROM replay_data"
    " WHERE master_table_id NOT IN (SELECT unique_id FROM master)"
    " UNION ALL SELECT 'strat_data', unique_id, master_table_id FROM strat_data"
    " WHERE master_table_id NOT IN (SELECT unique_id FROM master)"
    " UNION ALL SELECT 'config_data', unique_id, master_table_id FROM config_data"
    " WHERE master_table_id NOT IN (SELECT unique_id FROM master)"
)
_SELECT_USER_TABLES = (
    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
)

# Trials and their parameter and outcome rows, each in raw_data.unique_id
# order, so iter_trials merges three cursors and never sorts. Every query
# here walks a table or an index in its order (a test checks EXPLAIN QUERY PLAN).
_SELECT_TRIALS = (
    "SELECT unique_id, timestamp, model_data, extra_data, master_table_id FROM raw_data ORDER BY unique_id"
)
_SELECT_TRIAL_PARAMS = (
    "SELECT iteration_id, param_name, param_value FROM param_data"
    " WHERE typeof(iteration_id) = 'integer' ORDER BY iteration_id, unique_id"
)
_SELECT_TRIAL_OUTCOMES = (
    "SELECT iteration_id, outcome_name, outcome_value FROM outcome_data"
    " WHERE typeof(iteration_id) = 'integer' ORDER BY iteration_id, unique_id"
)
_SELECT_EXPERIMENT_TRIALS = (
    "SELECT unique_id, timestamp, model_data, extra_data, master_table_id FROM raw_data"
    " WHERE master_table_id = ? ORDER BY unique_id"
)
_SELECT_EXPERIMENT_PARAMS = (
    "SELECT p.iteration_id, p.param_name, p.param_value FROM raw_data r"
    " JOIN param_data p ON p.iteration_id = r.unique_id"
    " WHERE r.master_table_id = ? ORDER BY r.unique_id, p.unique_id"
)
_SELECT_EXPERIMENT_OUTCOMES = (
    "SELECT o.iteration_id, o.outcome_name, o.outcome_value FROM raw_data r"
    " JOIN outcome_data o ON o.iteration_id = r.unique_id"
    " WHERE r.master_table_id = ? ORDER BY r.unique_id, o.unique_id"
)
_SELECT_MASTER_ROW = (
    "SELECT unique_id, experiment_id, experiment_name, experiment_description, participant_id,"
    " extra_metadata FROM master WHERE unique_id = ?"
)
_SELECT_MASTER_IDS = "SELECT unique_id FROM master ORDER BY unique_id"
_SELECT_MASTERS_BY_EXPERIMENT_ID = "SELECT unique_id FROM master WHERE experiment_id = ? ORDER BY unique_id"
_SELECT_ORPHAN_TRIAL = (
    "SELECT 1 FROM raw_data WHERE master_table_id IS NULL"
    " OR master_table_id NOT IN (SELECT unique_id FROM master) LIMIT 1"
)
_COUNT_EXPERIMENT_TRIALS = "SELECT count(*) FROM raw_data WHERE master_table_id = ?"

# raw_data.extra_data (alias r) when it is valid JSON text, else NULL. CASE
# evaluates its branches in order, so json_valid never gets a legacy pickle
# BLOB, which SQLite 3.45 and later would read as binary JSON.
_EXTRA_DATA_JSON = (
    "CASE WHEN typeof(r.extra_data) <> 'text' THEN NULL WHEN json_valid(r.extra_data) THEN r.extra_data END"
)

# The names that a group of trials uses, in order of first appearance. The
# group is one experiment, or the trials whose experiment is missing.
_TrialNameQueries = collections.namedtuple("_TrialNameQueries", "params outcomes extra_keys extra_other")


def _trial_name_queries(where):
    return _TrialNameQueries(
        params=(
            "SELECT p.param_name FROM raw_data r JOIN param_data p ON p.iteration_id = r.unique_id"
            " WHERE {} GROUP BY p.param_name ORDER BY min(p.unique_id)".format(where)
        ),
        outcomes=(
            "SELECT o.outcome_name FROM raw_data r JOIN outcome_data o ON o.iteration_id = r.unique_id"
            " WHERE {} GROUP BY o.outcome_name ORDER BY min(o.unique_id)".format(where)
        ),
        extra_keys=(
            "SELECT j.key FROM raw_data r, json_each({1}) j WHERE {0} AND typeof(j.key) = 'text'"
            " GROUP BY j.key ORDER BY min(r.unique_id), min(j.id)".format(where, _EXTRA_DATA_JSON)
        ),
        # Legacy pickles, and any text that is not a JSON object as this store
        # writes it, are decoded in Python. Invalid JSON raises there too.
        extra_other=(
            "SELECT r.unique_id, r.extra_data FROM raw_data r WHERE {} AND r.extra_data IS NOT NULL"
            " AND (typeof(r.extra_data) <> 'text' OR substr(r.extra_data, 1, 1) <> '{{')"
            " ORDER BY r.unique_id".format(where)
        ),
    )


_EXPERIMENT_NAME_QUERIES = _trial_name_queries("r.master_table_id = ?")
_ORPHAN_NAME_QUERIES = _trial_name_queries(
    "(r.master_table_id IS NULL OR r.master_table_id NOT IN (SELECT unique_id FROM master))"
)

# --combine reads an input attached to the output's connection as
# combine_source and copies its rows in SQL, byte for byte, with unique_id
# shifted past the output's largest id so that every row keeps its order.
# An experiment's fingerprint: its experiment_id, message count and the
# timestamps of its first and last messages, for spotting the same session
# in copies of one file.
_SELECT_SOURCE_EXPERIMENTS = """
SELECT m.unique_id, m.experiment_name, m.experiment_description, m.experiment_id,
       m.participant_id, m.extra_metadata,
       (SELECT count(*) FROM combine_source.replay_data r WHERE r.master_table_id = m.unique_id),
       (SELECT r.timestamp FROM combine_source.replay_data r WHERE r.master_table_id = m.unique_id
        ORDER BY r.unique_id LIMIT 1),
       (SELECT r.timestamp FROM combine_source.replay_data r WHERE r.master_table_id = m.unique_id
        ORDER BY r.unique_id DESC LIMIT 1)
FROM combine_source.master m ORDER BY m.unique_id
"""
_SELECT_OUTPUT_ORIGINS = """
SELECT m.unique_id, m.extra_metadata,
       (SELECT count(*) FROM main.replay_data r WHERE r.master_table_id = m.unique_id),
       m.experiment_id,
       (SELECT r.timestamp FROM main.replay_data r WHERE r.master_table_id = m.unique_id
        ORDER BY r.unique_id LIMIT 1),
       (SELECT r.timestamp FROM main.replay_data r WHERE r.master_table_id = m.unique_id
        ORDER BY r.unique_id DESC LIMIT 1)
FROM main.master m ORDER BY m.unique_id
"""
# (table, query of the source's id range, insert) for the tables that refer
# to master. The insert's parameters: id shift, new master id, old master id.
_COPY_EXPERIMENT_TABLES = tuple(
    (
        table,
        "SELECT min(unique_id), max(unique_id) FROM combine_source.{} WHERE master_table_id = ?".format(table),
        "INSERT INTO main.{0} (unique_id, {1}, master_table_id) SELECT unique_id + ?, {1}, ?"
        " FROM combine_source.{0} WHERE master_table_id = ?".format(table, columns),
    )
    for table, columns in (
        ("replay_data", "timestamp, message_type, message_contents, extra_info"),
        ("strat_data", "timestamp, strat, strat_format"),
        ("config_data", "timestamp, config"),
        ("raw_data", "timestamp, model_data, extra_data"),
    )
)
# The same for the tables that refer to raw_data. The insert's parameters:
# id shift, raw_data id shift, old master id.
_COPY_TRIAL_TABLES = tuple(
    (
        table,
        "SELECT min(t.unique_id), max(t.unique_id) FROM combine_source.raw_data r"
        " JOIN combine_source.{} t ON t.iteration_id = r.unique_id WHERE r.master_table_id = ?".format(table),
        "INSERT INTO main.{0} (unique_id, {1}, iteration_id) SELECT t.unique_id + ?, t.{2}, t.iteration_id + ?"
        " FROM combine_source.raw_data r JOIN combine_source.{0} t ON t.iteration_id = r.unique_id"
        " WHERE r.master_table_id = ?".format(table, columns, columns.replace(", ", ", t.")),
    )
    for table, columns in (
        ("param_data", "param_name, param_value"),
        ("outcome_data", "outcome_name, outcome_value"),
    )
)
_SELECT_MAX_ID = "SELECT max(unique_id) FROM main.{}"
_MAX_ROWID = 2**63 - 1

# The four tables at schema version 1, frozen here for the upgrade step that
# creates them. schema.sql may move on; this step must not.
_V1_TABLES = {
    "master": """CREATE TABLE master (
	unique_id INTEGER NOT NULL,
	experiment_name VARCHAR(256),
	experiment_description VARCHAR(2048),
	experiment_id VARCHAR(10),
	participant_id VARCHAR(50),
	extra_metadata VARCHAR(4096),
	PRIMARY KEY (unique_id)
)""",
    "replay_data": """CREATE TABLE replay_data (
	unique_id INTEGER NOT NULL,
	timestamp DATETIME,
	message_type VARCHAR(64),
	message_contents BLOB,
	extra_info BLOB,
	master_table_id INTEGER,
	PRIMARY KEY (unique_id),
	FOREIGN KEY(master_table_id) REFERENCES master (unique_id)
)""",
    "strat_data": """CREATE TABLE strat_data (
	unique_id INTEGER NOT NULL,
	timestamp DATETIME,
	strat BLOB,
	master_table_id INTEGER,
	strat_format VARCHAR(16),
	PRIMARY KEY (unique_id),
	FOREIGN KEY(master_table_id) REFERENCES master (unique_id)
)""",
    "config_data": """CREATE TABLE config_data (
	unique_id INTEGER NOT NULL,
	timestamp DATETIME,
	config BLOB,
	master_table_id INTEGER,
	PRIMARY KEY (unique_id),
	FOREIGN KEY(master_table_id) REFERENCES master (unique_id)
)""",
}
_V1_INDEXES = (
    "CREATE INDEX master_experiment_id ON master (experiment_id)",
    "CREATE INDEX replay_data_master_table_id ON replay_data (master_table_id)",
    "CREATE INDEX strat_data_master_table_id ON strat_data (master_table_id)",
    "CREATE INDEX config_data_master_table_id ON config_data (master_table_id)",
)


# ---------------------------------------------------------------------------
# Records returned by the readers

ReplayRecord = collections.namedtuple(
    "ReplayRecord", "unique_id timestamp message_type message_contents extra_info"
)
StratRecord = collections.namedtuple("StratRecord", "unique_id timestamp strat_format strat")
ConfigRecord = collections.namedtuple("ConfigRecord", "unique_id timestamp config")
Experiment = collections.namedtuple(
    "Experiment",
    "unique_id experiment_id experiment_name experiment_description participant_id"
    " extra_metadata message_count first_timestamp last_timestamp",
)
ExperimentSummary = collections.namedtuple(
    "ExperimentSummary",
    "unique_id experiment_id experiment_name experiment_description participant_id"
    " extra_metadata_keys message_count created last_modified stimuli_per_trial"
    " parameters outcomes trial_count",
)
# Lists of (source unique_id, output unique_id) pairs, and of (source
# unique_id, reason) for the experiments that could not be copied.
CombineResult = collections.namedtuple("CombineResult", "copied already_present skipped")


class UpgradeReport:
    """What an upgrade of one file did.

    ``changes`` lists what each step changed, in words. ``unreadable`` and
    ``kept_as_pickle`` list (table, column, row id, reason) for legacy values
    that could not be decoded, and for those JSON cannot hold exactly; both
    stay in the file byte for byte. ``skipped_tells`` lists (row id, reason)
    for recorded tells that could not be split into trials.
    """

    def __init__(self, path, old_version, new_version, backup_path=None, progress=None):
        self.path = path
        self.old_version = old_version
        self.new_version = new_version
        self.backup_path = backup_path
        self.changes = []
        self.unreadable = []
        self.kept_as_pickle = []
        self.skipped_tells = []
        self.steps_run = []
        self._progress = progress
        self._rows_done = 0

    def progress(self, rows):
        self._rows_done += rows
        if self._progress is not None:
            self._progress(self._rows_done)

    def __repr__(self):
        return "UpgradeReport(path={!r}, old_version={}, new_version={}, backup_path={!r})".format(
            self.path, self.old_version, self.new_version, self.backup_path
        )


# ---------------------------------------------------------------------------
# Connections


class StoreConnection(sqlite3.Connection):
    """A sqlite3 connection that remembers which file it is for error messages."""

    path = "?"
    read_only = False
    # The file the user opened, also when the connection reads an upgraded temporary copy of it.
    source_path = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # master_id -> (parnames, stimuli_per_trial) of its latest setup.
        self.trial_layouts = {}

    def close(self):
        super().close()
        cleanup = getattr(self, "_cleanup", None)
        if cleanup is not None:
            cleanup()


def connect(
    path,
    *,
    read_only=False,
    upgrade=False,
    create=True,
    journal_mode="wal",
    synchronous="full",
    timeout=10.0,
):
    """Open an aepsych_store database and return its connection.

    A missing or empty file becomes a new database at SCHEMA_VERSION, unless
    ``create`` is false or ``read_only`` is true. A file at an older version
    raises UpgradeRequiredError unless ``upgrade`` is true; a read-only open
    with ``upgrade`` reads from an upgraded temporary copy and leaves the file
    as it is. ``journal_mode`` is "wal" (the default), "delete" for files on
    network shares, where the write-ahead log does not work, or None to keep
    the file's mode. ``synchronous`` "full" syncs every commit to disk before
    it returns; "normal" is faster but may lose the last commits on a power
    cut. ``timeout`` is how many seconds to wait for another process's lock.
    """
    path = os.fspath(path)
    if read_only or not create:
        _check_file_exists(path)
    if read_only:
        mode = "ro"
    elif create:
        mode = "rwc"
        _schema_path()  # raises before a file is created if schema.sql is missing
    else:
        mode = "rw"
    conn = _open(path, mode, timeout)
    try:
        version = _check_version(conn)
        if version == 0 and not _user_tables(conn):
            if read_only or not create:
                raise StoreError(
                    "{}: the file is an empty database, not an aepsych_store database; check the"
                    " path (aepsych_store.connect() without read_only makes it a new database)".format(path)
                )
            _create_schema(conn)
            version = SCHEMA_VERSION
        elif version == 0:
            _legacy_layout(conn)

        if version < SCHEMA_VERSION:
            if not upgrade:
                raise UpgradeRequiredError(
                    "{}: the file is at schema version {} and this aepsych_store uses version {};"
                    " upgrade it with: python -m aepsych_store --update {}".format(
                        path, version, SCHEMA_VERSION, path
                    )
                )
            if read_only:
                return _open_upgraded_copy(conn, timeout)
            _apply_settings(conn, journal_mode, synchronous)
            run_upgrade_steps(conn)
        elif not read_only:
            _apply_settings(conn, journal_mode, synchronous)
    except BaseException:
        conn.close()
        raise
    return conn


def _check_file_exists(path):
    if not os.path.exists(path):
        raise StoreError("{}: file not found; check the path".format(path))
    if os.path.isdir(path):
        raise StoreError("{}: is a folder, not a database file".format(path))


def _file_uri(path, mode):
    """Return the URI that opens path in mode "ro", "rw" or "rwc".

    A reader of a WAL file needs PATH-wal and PATH-shm, and only the last
    read-write connection to close removes them. So a read-only open of an
    idle WAL file (one without PATH-wal, so no writer has it open) becomes a
    read-write open whose caller must not write (``_open`` sets
    query_only), which leaves no file behind. In a folder without write
    permission no writer can start either, and the file is read as
    immutable.
    """
    uri = Path(path).absolute().as_uri() + "?mode="
    if mode == "ro" and _is_idle_wal_file(path):
        if _folder_is_read_only(path):
            # NOTE: an immutable reader does not see a writer that starts while it reads (possible only for a user who may write the folder).
            return uri + "ro&immutable=1"
        if os.access(path, os.W_OK):
            return uri + "rw"
    return uri + mode


def _open(path, mode, timeout):
    uri = _file_uri(path, mode)
    try:
        conn = sqlite3.connect(
            uri, uri=True, timeout=timeout, isolation_level=None, factory=StoreConnection
        )
    except sqlite3.Error as error:
        raise StoreError(
            "{}: cannot open the file: {}; check that its folder exists and that you may"
            " read it (and write it, unless read_only)".format(path, error)
        ) from error
    conn.path = path
    conn.source_path = path
    conn.read_only = mode == "ro"
    _execute(conn, "PRAGMA foreign_keys = ON")
    if conn.read_only:
        _execute(conn, "PRAGMA query_only = ON")
    return conn


def _folder_is_read_only(path):
    """Tell whether the file's folder has no write permission, for this user or in its mode bits."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        mode = os.stat(folder).st_mode
    except OSError:
        return False
    # root may write anywhere, so a folder without any write bit counts as read-only too.
    return not os.access(folder, os.W_OK) or not mode & 0o222


def _is_sqlite_file(path):
    """Tell whether path is a file that starts with SQLite's header."""
    try:
        with open(path, "rb") as handle:
            return handle.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def _is_idle_wal_file(path):
    """Tell whether a file's header says WAL mode and no PATH-wal file exists beside it."""
    if os.path.exists(path + "-wal"):
        return False
    try:
        with open(path, "rb") as handle:
            header = handle.read(20)
    except OSError:
        return False
    # Bytes 18 and 19 of the header are the file format's write and read versions: 2 means WAL.
    return header[:16] == b"SQLite format 3\x00" and header[18:20] == b"\x02\x02"


def _apply_settings(conn, journal_mode, synchronous):
    if journal_mode is not None:
        if journal_mode not in ("wal", "delete"):
            raise StoreError("journal_mode must be 'wal', 'delete' or None, not {!r}".format(journal_mode))
        (current,) = _execute(conn, "PRAGMA journal_mode").fetchone()
        if current.lower() != journal_mode:
            (result,) = _execute(conn, "PRAGMA journal_mode = " + journal_mode).fetchone()
            if result.lower() != journal_mode:
                raise StoreError(
                    "{}: cannot switch to journal_mode {} (SQLite kept {});"
                    " close other programs using the file or pass journal_mode=None".format(
                        conn.path, journal_mode, result
                    )
                )
    if synchronous not in ("full", "normal"):
        raise StoreError("synchronous must be 'full' or 'normal', not {!r}".format(synchronous))
    _execute(conn, "PRAGMA synchronous = " + synchronous)


def _read_version(conn):
    (version,) = _execute(conn, "PRAGMA user_version").fetchone()
    return version


def _check_version(conn):
    version = _read_version(conn)
    if version < 0:
        raise StoreError(
            "{}: invalid schema version {} in PRAGMA user_version, so this is not an"
            " aepsych_store database or it is damaged; check the path or restore the file"
            " from a backup".format(conn.path, version)
        )
    if version > SCHEMA_VERSION:
        raise StoreError(
            "{}: the file is at schema version {}, newer than this aepsych_store ({});"
            " upgrade aepsych_store to read it".format(conn.path, version, SCHEMA_VERSION)
        )
    return version


def _user_tables(conn):
    return [name for (name,) in _execute(conn, _SELECT_USER_TABLES)]


def _schema_path():
    """Find schema.sql beside the module, or where ``pip install`` put it."""
    candidates = [Path(__file__).with_name("schema.sql")]
    for prefix in {sysconfig.get_path("data"), sys.prefix}:
        candidates.append(Path(prefix, "share", "aepsych_store", "schema.sql"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise StoreError(
        "schema.sql not found next to {}; copy it beside aepsych_store.py".format(__file__)
    )


def _schema_statements():
    """Split schema.sql into single statements, which can run inside a transaction."""
    statements = []
    pending = ""
    for line in _schema_path().read_text(encoding="utf-8").splitlines(keepends=True):
        if not pending and (not line.strip() or line.lstrip().startswith("--")):
            continue
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip().rstrip(";"))
            pending = ""
    return statements


def _create_schema(conn):
    statements = _schema_statements()
    with _transaction(conn):
        # Another process may have initialized the file since we looked.
        if _read_version(conn) != 0 or _user_tables(conn):
            return
        for statement in statements:
            _execute(conn, statement)
        _execute(conn, "PRAGMA user_version = {:d}".format(SCHEMA_VERSION))
    logger.info("%s: created a new database at schema version %d", conn.path, SCHEMA_VERSION)


def _open_upgraded_copy(conn, timeout):
    """Copy a read-only file to a temporary folder, upgrade the copy and open it."""
    folder = tempfile.mkdtemp(prefix="aepsych_store-")
    copy_path = os.path.join(folder, "upgraded.sqlite")
    try:
        target = sqlite3.connect(copy_path)
        try:
            conn.backup(target)
        finally:
            target.close()
        conn.close()
        copy = _open(copy_path, "rw", timeout)
        copy.path = "{} (upgraded temporary copy)".format(conn.path)
        copy.source_path = conn.path
        copy._cleanup = weakref.finalize(copy, shutil.rmtree, folder, ignore_errors=True)
        run_upgrade_steps(copy)
        _execute(copy, "PRAGMA query_only = ON")
        copy.read_only = True
    except sqlite3.Error as error:
        shutil.rmtree(folder, ignore_errors=True)
        raise StoreError("{}: cannot make an upgraded copy: {}".format(conn.path, error)) from error
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return copy


# ---------------------------------------------------------------------------
# The one place where sqlite3 errors become StoreError


def _execute(conn, sql, parameters=()):
    try:
        return conn.execute(sql, parameters)
    except sqlite3.Error as error:
        raise _translate_error(conn, error) from error


def _executemany(conn, sql, rows):
    try:
        return conn.executemany(sql, rows)
    except sqlite3.Error as error:
        raise _translate_error(conn, error) from error


def _translate_error(conn, error):
    text = str(error)
    path = getattr(conn, "path", "?")
    if "database is locked" in text or "database table is locked" in text:
        return StoreError(
            "{}: the database is locked by another process; close the program using it,"
            " or retry with a longer timeout (--timeout SECONDS on the command line)".format(path)
        )
    if "file is not a database" in text:
        return StoreError("{}: not a SQLite database file; check the path".format(path))
    if "malformed" in text or "disk image" in text:
        return StoreError(
            "{}: the database file is damaged ({}); restore it from a backup".format(path, text)
        )
    if "readonly" in text or "read-only" in text:
        if getattr(conn, "read_only", False):
            return StoreError("{}: cannot write: {}; open it without read_only to write".format(path, text))
        return StoreError(
            "{}: cannot write: {}; check that you may write both the file and its folder,"
            " where SQLite keeps its journal".format(path, text)
        )
    return StoreError("{}: SQLite error: {}".format(path, text))


@contextlib.contextmanager
def _transaction(conn):
    """Run the block in one write transaction, rolled back if anything raises."""
    if conn.in_transaction:
        raise StoreError(
            "{}: the connection already has an open transaction; commit or roll it back first".format(
                conn.path
            )
        )
    _execute(conn, "BEGIN IMMEDIATE")
    try:
        yield
        _execute(conn, "COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


# ---------------------------------------------------------------------------
# Upgrades


def _upgrade_to_1(conn, report):
    """Rebuild AEPsych's four tables in the version 1 layout: add missing columns, drop UNIQUE."""
    layout = _legacy_layout(conn)
    extra_objects = _execute(
        conn,
        "SELECT name, sql FROM sqlite_master WHERE type IN ('index', 'trigger')"
        " AND sql IS NOT NULL AND tbl_name IN ('master', 'replay_data', 'strat_data', 'config_data')",
    ).fetchall()
    unique_columns = {table: _unique_constraints(conn, table) for table in layout}

    _rebuild_tables(conn, _V1_TABLES, layout)
    for statement in _V1_INDEXES:
        _execute(conn, statement)
    for name, sql in extra_objects:
        _execute(conn, sql)
        report.changes.append("version 1: kept {}".format(name))

    for table in _V1_TABLES:
        if table not in layout:
            report.changes.append("version 1: {}: created the missing table".format(table))
            continue
        added = [c for c in _LEGACY_OPTIONAL_COLUMNS[table] if c not in layout[table]]
        if table == "strat_data":
            added.append("strat_format")
        if added:
            report.changes.append("version 1: {}: added column {}".format(table, ", ".join(added)))
        for columns in unique_columns[table]:
            report.changes.append("version 1: {}: removed UNIQUE ({})".format(table, ", ".join(columns)))


def _rebuild_tables(conn, create_statements, layout):
    """Create tables anew from create_statements, keeping the rows of those in layout.

    layout maps an existing table to its column names. SQLite cannot drop a
    constraint or reorder columns in place, so each existing table is renamed,
    created anew and refilled, keeping every unique_id. legacy_alter_table
    keeps the rename from rewriting other tables' REFERENCES clauses to the
    old name.
    """
    _execute(conn, "PRAGMA legacy_alter_table = ON")
    for table in layout:
        _execute(conn, "ALTER TABLE {0} RENAME TO _aepsych_store_old_{0}".format(table))
    for table, create_sql in create_statements.items():
        _execute(conn, create_sql)
        if table in layout:
            columns = ", ".join(layout[table])
            _execute(conn, "INSERT INTO {0} ({1}) SELECT {1} FROM _aepsych_store_old_{0}".format(table, columns))
            _execute(conn, "DROP TABLE _aepsych_store_old_{}".format(table))
    _execute(conn, "PRAGMA legacy_alter_table = OFF")


def _upgrade_to_2(conn, report):
    """Rewrite legacy pickles as JSON text wherever JSON represents exactly the same value."""
    _convert_message_pickles(conn, report)
    _convert_metadata_pickles(conn, report)
    _check_legacy_payloads(conn, report)


def _convert_message_pickles(conn, report):
    """Convert replay_data's pickled message_contents and extra_info, both in one pass over the table."""
    columns = ("message_contents", "extra_info")
    converted = dict.fromkeys(columns, 0)
    problems = {column: ([], []) for column in columns}
    with _BatchWorkers(conn.path, _worker_count(_estimate_message_count(conn))) as workers:
        for updates, kept, unreadable, row_count in workers.map(_convert_message_rows, _pickled_message_batches(conn)):
            _executemany(conn, _UPDATE_CONVERTED_MESSAGE, updates)
            for contents_text, extra_text, _ in updates:
                converted["message_contents"] += contents_text is not None
                converted["extra_info"] += extra_text is not None
            for column, unique_id, reason in kept:
                problems[column][0].append(("replay_data", column, unique_id, reason))
            for column, unique_id, error in unreadable:
                problems[column][1].append(("replay_data", column, unique_id, error))
                logger.warning(
                    "%s: replay_data row %d: unreadable %s kept as it is: %s", conn.path, unique_id, column, error
                )
            report.progress(row_count)

    # The report lists message_contents before extra_info, as it did when
    # each column had a pass of its own.
    for column in columns:
        kept, unreadable = problems[column]
        report.kept_as_pickle.extend(kept)
        report.unreadable.extend(unreadable)
        if converted[column]:
            report.changes.append(
                "version 2: replay_data.{}: converted {} pickles to JSON".format(column, converted[column])
            )


def _pickled_message_batches(conn):
    """Yield lists of (unique_id, message_contents, extra_info) rows with a pickle in either column."""
    next_id = _MIN_ROWID
    while True:
        rows = _execute(conn, _SELECT_PICKLED_MESSAGES, (next_id, _CONVERSION_BATCH)).fetchall()
        if not rows:
            return
        next_id = rows[-1][0] + 1
        yield rows


def _convert_message_rows(rows):
    """Convert the pickles of (unique_id, message_contents, extra_info) rows to JSON text where it is exact.

    Return (updates, kept, unreadable, row count): updates are parameters
    of _UPDATE_CONVERTED_MESSAGE, and kept and unreadable list
    (column, unique_id, reason). This runs in worker processes, so it takes
    and returns plain data only.
    """
    updates = []
    kept = []
    unreadable = []
    for unique_id, contents_blob, extra_blob in rows:
        contents_text = extra_text = None
        extra = _NOT_DECODED
        if contents_blob is not None:
            try:
                contents, shares_values = _decode_pickle_sharing(contents_blob)
            except ValueError as error:
                unreadable.append(("message_contents", unique_id, str(error)))
            else:
                contents_text, reason = _plain_json(contents)
                if reason is not None:
                    kept.append(("message_contents", unique_id, reason))
                # AEPsych pickled a tell's extra_info twice, inside the message
                # and in its own column. Decoding pickle.dumps of a part of a
                # tree stays within the decoder's depth and size limits, so a
                # column that contains exactly those bytes needs no decoding.
                if (
                    extra_blob is not None
                    and not shares_values
                    and type(contents) is dict
                    and "extra_info" in contents
                    and _is_pickle_of(contents["extra_info"], extra_blob)
                ):
                    extra = contents["extra_info"]
                    if contents_text is not None:
                        # JSON represents a part of an exactly represented value exactly too.
                        extra_text = _plain_json_encode(extra)
        if extra_blob is not None and extra_text is None:
            if extra is _NOT_DECODED:
                try:
                    extra = _decode_pickle(extra_blob)
                except ValueError as error:
                    unreadable.append(("extra_info", unique_id, str(error)))
            if extra is not _NOT_DECODED:
                extra_text, reason = _plain_json(extra)
                if reason is not None:
                    kept.append(("extra_info", unique_id, reason))
        if contents_text is not None or extra_text is not None:
            updates.append((contents_text, extra_text, unique_id))
    return updates, kept, unreadable, len(rows)


# Stands for a value that is not decoded (yet), because None is a value.
_NOT_DECODED = object()


def _is_pickle_of(value, blob):
    """Tell whether blob is byte for byte what pickle.dumps(value) writes at blob's protocol.

    Then blob contains exactly value. This pickles the store's own decoded
    value and compares bytes, so nothing read from the file is unpickled.
    """
    # Protocols 2 and above start with PROTO and the protocol number.
    if len(blob) < 2 or blob[0] != 0x80 or not 2 <= blob[1] <= pickle.HIGHEST_PROTOCOL:
        return False
    return pickle.dumps(value, protocol=blob[1]) == blob


def _convert_metadata_pickles(conn, report):
    """Convert master's pickled extra_metadata, which has one row per experiment."""
    converted = 0
    next_id = _MIN_ROWID
    while True:
        rows = _execute(conn, _SELECT_PICKLED_METADATA, (next_id, _CONVERSION_BATCH)).fetchall()
        if not rows:
            break
        updates = []
        for unique_id, blob in rows:
            try:
                value = _decode_pickle(blob)
            except ValueError as error:
                report.unreadable.append(("master", "extra_metadata", unique_id, str(error)))
                logger.warning(
                    "%s: master row %d: unreadable extra_metadata kept as it is: %s", conn.path, unique_id, error
                )
                continue
            text, reason = _plain_json(value)
            if text is None:
                report.kept_as_pickle.append(("master", "extra_metadata", unique_id, reason))
                continue
            updates.append((text, unique_id))
        _executemany(conn, _UPDATE_CONVERTED_METADATA, updates)
        converted += len(updates)
        next_id = rows[-1][0] + 1
        report.progress(len(rows))
    if converted:
        report.changes.append("version 2: master.extra_metadata: converted {} pickles to JSON".format(converted))


def _check_legacy_payloads(conn, report):
    """List legacy configs and strategies that cannot be read; they stay as they are."""
    checks = (
        ("config_data", "config", _SELECT_LEGACY_CONFIGS, _ini_from_pickled_config),
        ("strat_data", "strat", _SELECT_LEGACY_STRATS, _bytes_from_pickled_bytesio),
    )
    for table, column, sql, read in checks:
        for unique_id, blob in _execute(conn, sql):
            try:
                read(conn, blob, unique_id)
            except UnreadableRowError as error:
                report.unreadable.append((table, column, unique_id, str(error)))
                logger.warning("%s", error)


# Rows of replay_data with a pickle in message_contents or extra_info. A
# column that contains no pickle reads as NULL, so its text is never decoded:
# it may be text that is not UTF-8, which sqlite3 cannot return as str.
_SELECT_PICKLED_MESSAGES = (
    "SELECT unique_id,"
    " CASE WHEN typeof(message_contents) = 'blob' THEN message_contents END,"
    " CASE WHEN typeof(extra_info) = 'blob' THEN extra_info END"
    " FROM replay_data WHERE unique_id >= ?"
    " AND (typeof(message_contents) = 'blob' OR typeof(extra_info) = 'blob')"
    " ORDER BY unique_id LIMIT ?"
)
# A NULL parameter leaves its column as it is.
_UPDATE_CONVERTED_MESSAGE = (
    "UPDATE replay_data SET message_contents = coalesce(?, message_contents),"
    " extra_info = coalesce(?, extra_info) WHERE unique_id = ?"
)
_SELECT_PICKLED_METADATA = (
    "SELECT unique_id, extra_metadata FROM master WHERE typeof(extra_metadata) = 'blob' AND unique_id >= ?"
    " ORDER BY unique_id LIMIT ?"
)
_UPDATE_CONVERTED_METADATA = "UPDATE master SET extra_metadata = ? WHERE unique_id = ?"
_CONVERSION_BATCH = 2000


_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _make_plain_json_encode():
    """Return a function that encodes like _JSON_ENCODER.encode, for values without reference cycles.

    The values that the store decoded itself never contain themselves, so
    the cycle check can go. JSONEncoder.encode also builds a new C encoder
    on every call, which took longer than encoding a small dict. So where
    CPython has the C encoder, one is built here and reused, with the
    arguments that JSONEncoder.iterencode passes it in CPython 3.8 to 3.13.
    """
    encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"), check_circular=False)
    make_c_encoder = getattr(json.encoder, "c_make_encoder", None)
    if make_c_encoder is None:
        return encoder.encode
    c_encoder = make_c_encoder(
        None, encoder.default, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )

    def encode(value):
        return "".join(c_encoder(value, 0))

    return encode


_plain_json_encode = _make_plain_json_encode()


def _exact_json(value):
    """Return (JSON text, None) if JSON represents value exactly, else (None, the reason)."""
    try:
        text = _JSON_ENCODER.encode(value)
        text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as error:
        return None, "JSON cannot hold it: {}".format(error)
    # json.dumps turns tuples into lists and int keys into strings; the
    # comparison catches both, because [1] != (1,) and {1: 2} != {"1": 2}.
    if json.loads(text) != value:
        return None, "JSON would change it (a tuple or a non-string dict key)"
    return text, None


def _plain_json(value):
    """Return (JSON text, None) if JSON represents value exactly, else (None, the reason).

    Like _exact_json, for values that _decode_pickle or the JSON decoder
    built: they hold only the built-in types themselves, never subclasses,
    and no reference cycles. For such values a walk for tuples and non-str
    dict keys gives the same result as _exact_json's json.loads round trip,
    in less time.
    """
    text, reason = _json_of_json_value(value)
    if text is not None and not _json_keeps_shape(value):
        return None, "JSON would change it (a tuple or a non-string dict key)"
    return text, reason


def _json_of_json_value(value):
    """Return (JSON text, None) for a value that the JSON decoder built, or (None, the reason) if JSON cannot hold it.

    Such a value has no tuple and no key other than a str. What is left to
    check is what the encoder rejects: an infinite float (from a number such
    as 1e999) and a str with a lone surrogate (from an escape such as \\ud800).
    """
    try:
        text = _plain_json_encode(value)
        text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as error:
        return None, "JSON cannot hold it: {}".format(error)
    return text, None


def _json_keeps_shape(value):
    """Tell whether value has no tuple and no dict key other than a str, which JSON would change."""
    pending = [value]
    while pending:
        item = pending.pop()
        kind = type(item)
        if kind is dict:
            for key in item:
                if type(key) is not str:
                    return False
            pending.extend(item.values())
        elif kind is list:
            pending.extend(item)
        elif kind is tuple:
            return False
    return True


def _upgrade_to_3(conn, report):
    """Add the trial tables, or bring AEPsych 0.8's to this layout, and fill them from recorded tells."""
    tables = set(_user_tables(conn))
    layout = {}
    for table, required in _TRIAL_COLUMNS.items():
        if table not in tables:
            continue
        columns = [row[1] for row in _execute(conn, "PRAGMA table_info({})".format(table))]
        optional = ("extra_data",) if table == "raw_data" else ()
        unknown = [c for c in columns if c not in required and c not in optional]
        missing = [c for c in required if c not in columns]
        if unknown or missing:
            raise StoreError(
                "{}: table {} is not laid out as AEPsych's (missing {}, unknown {});"
                " rename it and upgrade again (nothing was changed)".format(
                    conn.path, table, ", ".join(missing) or "nothing", ", ".join(unknown) or "nothing"
                )
            )
        layout[table] = columns
    _rebuild_tables(conn, _V3_TABLES, layout)

    master_ids = [master_id for (master_id,) in _execute(conn, _SELECT_MASTER_IDS).fetchall()]
    with_trials = {master_id for (master_id,) in _execute(conn, _SELECT_MASTERS_WITH_TRIALS)}
    counts = _fill_trials(conn, [m for m in master_ids if m not in with_trials], report)
    # Building each index once after the rows are in takes less time than
    # updating it on every insert.
    for statement in _V3_INDEXES:
        _execute(conn, statement)

    for master_id in master_ids:
        if master_id in with_trials:
            report.changes.append("version 3: experiment {}: kept the trial rows it has".format(master_id))
        elif counts[master_id]:
            report.changes.append(
                "version 3: experiment {}: wrote {} trials from its tells".format(master_id, counts[master_id])
            )


def _fill_trials(conn, master_ids, report):
    """Write the trial rows of the recorded tells of the given experiments; return {master_id: trial count}."""
    counts = dict.fromkeys(master_ids, 0)
    with _BatchWorkers(conn.path, _worker_count(_estimate_message_count(conn))) as workers:
        for master_id, rows, skipped, unreadable, row_count in workers.map(
            _split_tells, _tell_batches(conn, master_ids)
        ):
            for unique_id, column, error in unreadable:
                logger.warning(
                    "%s: replay_data row %d has an unreadable %s: %s; skipped it", conn.path, unique_id, column, error
                )
            for unique_id, reason in skipped:
                report.skipped_tells.append((unique_id, reason))
                logger.warning("%s: replay_data row %d: tell not split into trials: %s", conn.path, unique_id, reason)
            counts[master_id] += _insert_trial_rows(conn, master_id, rows)
            report.progress(row_count)
    return counts


def _tell_batches(conn, master_ids):
    """Yield (master_id, tells, row count) for each experiment's tells in order, a batch at a time.

    Each tell is (unique_id, timestamp, message_contents, extra_info,
    layout), where layout is that of the last setup before it. Setups are
    read here, in order, so that batches can be split anywhere.
    """
    for master_id in master_ids:
        layout = _DEFAULT_LAYOUT
        next_id = _MIN_ROWID
        while next_id is not None:
            rows, next_id = _read_trial_sources(conn, master_id, next_id)
            tells = []
            for unique_id, timestamp, message_type, contents, extra in rows:
                if message_type == "setup":
                    layout = _layout_of_setup_row(conn, unique_id, contents, extra, layout)
                else:
                    tells.append((unique_id, timestamp, contents, extra, layout))
            yield master_id, tells, len(rows)


def _read_trial_sources(conn, master_id, first_id):
    """Return a batch of an experiment's setups and tells from first_id on, and the id after it (None at the end)."""
    parameters = (master_id, first_id, _CONVERSION_BATCH)
    try:
        rows = conn.execute(_SELECT_TRIAL_SOURCES, parameters).fetchall()
        last_id = rows[-1][0] if rows else None
    except sqlite3.Error as error:
        # sqlite3 fails the whole query when one TEXT value is not UTF-8.
        if "decode" not in str(error).lower():
            raise _translate_error(conn, error) from error
        ids = [unique_id for (unique_id,) in _execute(conn, _SELECT_TRIAL_SOURCE_IDS, parameters)]
        rows = _read_decodable_rows(conn, ids)
        last_id = ids[-1] if ids else None
    return rows, None if last_id is None else last_id + 1


def _read_decodable_rows(conn, ids):
    """Read the replay rows with the given ids one by one, skipping those whose text is not UTF-8."""
    rows = []
    for unique_id in ids:
        try:
            rows.append(conn.execute(_SELECT_TRIAL_SOURCE, (unique_id,)).fetchone())
        except sqlite3.Error as error:
            if "decode" not in str(error).lower():
                raise _translate_error(conn, error) from error
            logger.warning("%s: replay_data row %d contains text that is not UTF-8; skipped it", conn.path, unique_id)
    return rows


def _layout_of_setup_row(conn, unique_id, contents, extra, layout):
    """Return the trial layout a setup row sets, or layout unchanged if the row cannot be read."""
    try:
        value = _decode_stored(conn, contents, "replay_data", "message_contents", unique_id)
        # iter_replay(skip_unreadable=True) skips a row whose extra_info
        # cannot be read, and the upgrade reads setups and tells as it would.
        _decode_stored(conn, extra, "replay_data", "extra_info", unique_id)
    except UnreadableRowError as error:
        logger.warning("%s; skipped it", error)
        return layout
    return _layout_of_setup(value)


def _split_tells(batch):
    """Split a batch from _tell_batches into trial rows.

    Return (master_id, the trial rows as a _TrialRows, skipped tells as
    (unique_id, reason), unreadable rows as (unique_id, column, error), row
    count). This runs in worker processes, so it takes and returns plain
    data only.
    """
    master_id, tells, row_count = batch
    rows = _new_trial_rows()
    skipped = []
    unreadable = []
    for unique_id, timestamp, contents_raw, extra_raw, layout in tells:
        try:
            contents = _decode_cell(contents_raw)
        except (ValueError, RecursionError) as error:
            unreadable.append((unique_id, "message_contents", str(error)))
            continue
        # Like a setup, a tell whose extra_info cannot be read is skipped.
        try:
            _decode_cell(extra_raw)
        except (ValueError, RecursionError) as error:
            unreadable.append((unique_id, "extra_info", str(error)))
            continue
        # A value that came from JSON text needs no check for tuples.
        to_json = _json_of_json_value if type(contents_raw) is str else _plain_json
        try:
            prepared = _prepare_trials(contents, layout, to_json=to_json)
        except ValueError as error:
            skipped.append((unique_id, str(error)))
            continue
        _add_trial_rows(rows, timestamp, prepared)
    return master_id, rows, skipped, unreadable, row_count


def _decode_cell(raw):
    """Decode a stored JSON text or legacy pickle as _decode_stored does, without a connection.

    Raise ValueError or RecursionError if it cannot be read.
    """
    if raw is None:
        return None
    if type(raw) is str:
        return _JSON_DECODER.decode(raw)
    if type(raw) is bytes:
        return _decode_pickle(raw)
    raise ValueError("a {} is neither JSON text nor a pickle".format(type(raw).__name__))


def _estimate_message_count(conn):
    """Estimate the rows of replay_data from its id range, which SQLite reads without a scan."""
    (count,) = _execute(conn, _SELECT_MESSAGE_ID_SPAN).fetchone()
    return count


_SELECT_MASTER_IDS = "SELECT unique_id FROM master ORDER BY unique_id"
_SELECT_MASTERS_WITH_TRIALS = "SELECT DISTINCT master_table_id FROM raw_data"
# max() and min() each in a query of its own, where SQLite reads one end of
# the table instead of every row.
_SELECT_MESSAGE_ID_SPAN = (
    "SELECT coalesce((SELECT max(unique_id) FROM replay_data) - (SELECT min(unique_id) FROM replay_data) + 1, 0)"
)
# The rows that step 3 needs: setups set the layout of the tells after them.
_SELECT_TRIAL_SOURCES = (
    "SELECT unique_id, timestamp, message_type, message_contents, extra_info FROM replay_data"
    " WHERE master_table_id = ? AND unique_id >= ? AND message_type IN ('setup', 'tell')"
    " ORDER BY unique_id LIMIT ?"
)
_SELECT_TRIAL_SOURCE_IDS = (
    "SELECT unique_id FROM replay_data"
    " WHERE master_table_id = ? AND unique_id >= ? AND message_type IN ('setup', 'tell')"
    " ORDER BY unique_id LIMIT ?"
)
_SELECT_TRIAL_SOURCE = (
    "SELECT unique_id, timestamp, message_type, message_contents, extra_info FROM replay_data WHERE unique_id = ?"
)


_TRIAL_COLUMNS = {
    "raw_data": ("unique_id", "timestamp", "model_data", "master_table_id"),
    "param_data": ("unique_id", "param_name", "param_value", "iteration_id"),
    "outcome_data": ("unique_id", "outcome_name", "outcome_value", "iteration_id"),
}

# The trial tables at schema version 3, frozen for the step that creates them.
_V3_TABLES = {
    "raw_data": """CREATE TABLE raw_data (
	unique_id INTEGER NOT NULL,
	timestamp DATETIME,
	model_data BOOLEAN,
	extra_data BLOB,
	master_table_id INTEGER,
	PRIMARY KEY (unique_id),
	FOREIGN KEY(master_table_id) REFERENCES master (unique_id)
)""",
    "param_data": """CREATE TABLE param_data (
	unique_id INTEGER NOT NULL,
	param_name VARCHAR(50),
	param_value VARCHAR(50),
	iteration_id INTEGER,
	PRIMARY KEY (unique_id),
	FOREIGN KEY(iteration_id) REFERENCES raw_data (unique_id)
)""",
    "outcome_data": """CREATE TABLE outcome_data (
	unique_id INTEGER NOT NULL,
	outcome_name VARCHAR(50),
	outcome_value FLOAT,
	iteration_id INTEGER,
	PRIMARY KEY (unique_id),
	FOREIGN KEY(iteration_id) REFERENCES raw_data (unique_id)
)""",
}
_V3_INDEXES = (
    "CREATE INDEX raw_data_master_table_id ON raw_data (master_table_id)",
    "CREATE INDEX param_data_iteration_id ON param_data (iteration_id)",
    "CREATE INDEX outcome_data_iteration_id ON outcome_data (iteration_id)",
)


# (version, step) pairs in order. Each step brings a file from the previous
# version to its own and never commits; run_upgrade_steps owns the transaction.
_UPGRADE_STEPS = ((1, _upgrade_to_1), (2, _upgrade_to_2), (3, _upgrade_to_3))


def _legacy_layout(conn):
    """Check that a version 0 file is AEPsych's and return its tables' column names."""
    tables = set(_user_tables(conn))
    missing_tables = [t for t in ("master", "replay_data") if t not in tables]
    if missing_tables:
        raise StoreError(
            "{}: not an AEPsych database: it has the tables {} but no {} table;"
            " check that the path names an AEPsych database (nothing was changed)".format(
                conn.path, ", ".join(sorted(tables)), " and ".join(missing_tables)
            )
        )
    layout = {}
    for table, required in _LEGACY_COLUMNS.items():
        if table not in tables:
            continue
        columns = [row[1] for row in _execute(conn, "PRAGMA table_info({})".format(table))]
        missing = [c for c in required if c not in columns]
        if missing:
            raise StoreError(
                "{}: not an AEPsych database layout: table {} has no column {};"
                " check that the path names an AEPsych database (nothing was changed)".format(
                    conn.path, table, ", ".join(missing)
                )
            )
        unknown = [c for c in columns if c not in required and c not in _LEGACY_OPTIONAL_COLUMNS[table]]
        if unknown:
            raise StoreError(
                "{}: table {} has column {} that this aepsych_store does not know, and an"
                " upgrade would lose it; copy that column's data elsewhere and drop the column,"
                " then upgrade again (nothing was changed)".format(conn.path, table, ", ".join(unknown))
            )
        layout[table] = columns
    return layout


def _unique_constraints(conn, table):
    constraints = []
    for row in _execute(conn, "PRAGMA index_list({})".format(table)):
        name, origin = row[1], row[3]
        if origin == "u":
            constraints.append([info[2] for info in _execute(conn, "PRAGMA index_info({})".format(_quote(name)))])
    return constraints


def _quote(identifier):
    return '"' + identifier.replace('"', '""') + '"'


def run_upgrade_steps(conn, *, unchanged_since=None, report=None):
    """Upgrade an open database to SCHEMA_VERSION and return an UpgradeReport.

    Each step and its user_version bump commit together, so a crash leaves
    the file at the version before or after that step, never between. With
    ``unchanged_since`` (a PRAGMA data_version value read before a backup),
    the first step fails if another process wrote to the file since then.
    """
    if report is None:
        report = UpgradeReport(conn.path, _check_version(conn), None)
    for target, step in _UPGRADE_STEPS:
        if target <= _check_version(conn):
            continue
        # PRAGMA foreign_keys cannot change inside a transaction, and a
        # rebuild would trip it while parent and child tables are swapped.
        _execute(conn, "PRAGMA foreign_keys = OFF")
        try:
            with _transaction(conn):
                if unchanged_since is not None:
                    (data_version,) = _execute(conn, "PRAGMA data_version").fetchone()
                    if data_version != unchanged_since:
                        raise StoreError(
                            "{}: another process wrote to the file after the backup was made;"
                            " stop it and run the upgrade again (nothing was changed)".format(conn.path)
                        )
                    unchanged_since = None
                version = _check_version(conn)
                if target <= version:
                    continue  # another process ran this step meanwhile
                logger.info("%s: upgrading from version %d to %d", conn.path, version, target)
                try:
                    step(conn, report)
                except StoreError as error:
                    raise StoreError(
                        "{}; upgrade step {} failed and the file stays at version {}".format(error, target, version)
                    ) from error
                _execute(conn, "PRAGMA user_version = {:d}".format(target))
            report.steps_run.append(target)
        finally:
            _execute(conn, "PRAGMA foreign_keys = ON")
    report.new_version = _read_version(conn)
    for table, unique_id, master_id in _execute(conn, _SELECT_ORPHANS):
        reason = "master_table_id {} points to no experiment".format(master_id)
        report.unreadable.append((table, "master_table_id", unique_id, reason))
        logger.warning("%s: %s row %d: %s; the row is kept as it is", conn.path, table, unique_id, reason)
    for change in report.changes:
        logger.info("%s: %s", conn.path, change)
    return report


def upgrade_file(path, *, backup=True, timeout=10.0, progress=None):
    """Upgrade a database file in place to SCHEMA_VERSION and return an UpgradeReport.

    With ``backup`` (the default), the file is first copied to
    ``PATH.vN.bak`` (N is its old version; a number is added if that name is
    taken). A file already at SCHEMA_VERSION is left byte for byte as it is.
    ``progress``, if given, is called with the number of rows each step has
    handled so far.
    """
    path = os.fspath(path)
    _check_file_exists(path)
    if os.path.getsize(path) == 0:
        raise StoreError(
            "{}: the file is empty (0 bytes), so there is nothing to upgrade;"
            " check the path (aepsych_store.connect() makes an empty file a new database)".format(path)
        )
    conn = _open(path, "rw", timeout)
    try:
        old_version = _check_version(conn)
        if old_version == SCHEMA_VERSION:
            return UpgradeReport(path, old_version, old_version)
        if old_version == 0 and not _user_tables(conn):
            raise StoreError(
                "{}: the file is an empty database with no tables, so there is nothing to"
                " upgrade; check the path (aepsych_store.connect() makes it a new database)".format(path)
            )
        if old_version == 0:
            _legacy_layout(conn)

        report = UpgradeReport(path, old_version, None, progress=progress)
        data_version = None
        if backup:
            (data_version,) = _execute(conn, "PRAGMA data_version").fetchone()
            report.backup_path = _backup(conn, old_version)
        try:
            run_upgrade_steps(conn, unchanged_since=data_version, report=report)
        finally:
            if not report.steps_run and report.backup_path is not None:
                # The file is as it was when copied, or another process upgraded
                # it and made its own backup, so this copy is redundant.
                _remove_quietly(report.backup_path)
                report.backup_path = None
        if not report.steps_run:
            report.old_version = report.new_version
        return report
    finally:
        conn.close()


def _backup(conn, version):
    """Copy the database to PATH.vN.bak and sync the copy to disk; return its path.

    A file in rollback-journal mode is copied byte for byte under the write
    lock, so no other process changes it meanwhile. A WAL-mode file
    keeps recent commits in PATH-wal, so it is copied through SQLite's backup
    API, which gives the same rows in a file that is not byte-identical.
    """
    base = "{}.v{}".format(conn.path, version)
    backup_path = base + ".bak"
    (journal_mode,) = _execute(conn, "PRAGMA journal_mode").fetchone()
    try:
        # A name of this process's own, so two upgrades never share a partial copy.
        handle, partial_path = tempfile.mkstemp(
            prefix=os.path.basename(base) + ".", suffix=".partial", dir=os.path.dirname(os.path.abspath(base))
        )
        os.close(handle)
    except OSError as error:
        raise _backup_error(conn, backup_path, error) from error
    try:
        if journal_mode.lower() == "wal":
            target = sqlite3.connect(partial_path)
            try:
                conn.backup(target)
            finally:
                target.close()
        else:
            with _transaction(conn):
                shutil.copyfile(conn.path, partial_path)
        with open(partial_path, "rb") as handle:
            os.fsync(handle.fileno())
        backup_path = _claim_name(partial_path, base)
    except sqlite3.Error as error:
        _remove_quietly(partial_path)
        raise _translate_error(conn, error) from error
    except OSError as error:
        _remove_quietly(partial_path)
        raise _backup_error(conn, backup_path, error) from error
    logger.info("%s: backup written to %s", conn.path, backup_path)
    return backup_path


def _claim_name(partial_path, base):
    """Give the finished copy the first free name of BASE.bak, BASE.1.bak, ...; return it.

    os.link fails when the name exists, so two processes never claim the
    same one, and an older backup is never overwritten.
    """
    candidate = base + ".bak"
    number = 1
    while True:
        try:
            os.link(partial_path, candidate)
        except FileExistsError:
            candidate = "{}.{}.bak".format(base, number)
            number += 1
            continue
        os.remove(partial_path)
        return candidate


def _backup_error(conn, backup_path, error):
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "the upgrade needs write permission on the file's folder, for the backup and SQLite's journal"
    else:
        advice = "free some space, or pass --no-backup to upgrade without a backup"
    return StoreError("{}: cannot write the backup {}: {}; {}".format(conn.path, backup_path, error, advice))


def _remove_quietly(path):
    with contextlib.suppress(OSError):
        os.remove(path)


# ---------------------------------------------------------------------------
# Worker processes for the upgrade steps
#
# Decoding pickles, encoding JSON and splitting tells take most of an
# upgrade's time and need no database, so worker processes do them on
# batches of rows while the main process alone reads and writes SQLite.
# Batches and results travel between these processes as pickles that they
# wrote themselves. Values read from the file travel inside them as bytes
# and str, and only the data-only decoder reads those bytes as a pickle.

# An upgrade of fewer messages than this runs in the main process. Starting
# two workers, sending each a batch and stopping them took 0.01 s with fork
# and 0.18 s with spawn on a 2-core machine, where 20,000 messages took
# about 1.4 s in one process.
_MIN_ROWS_FOR_WORKERS = 20000
# The main process's reads and writes took about a third of an upgrade's
# processor time, so it cannot keep many more workers busy than this.
# NOTE: an estimate; only 2 workers on 2 cores were measured.
_MAX_WORKERS = 4
# A multiprocessing start method ("fork", "spawn", ...), or None for the
# platform's default. Tests set it.
_WORKER_START_METHOD = None
# Seconds to wait for a worker to exit after its pipe closes.
_WORKER_EXIT_TIMEOUT = 5.0


def _worker_count(message_count):
    """Return how many worker processes an upgrade of about message_count messages should start (0 for none)."""
    if message_count < _MIN_ROWS_FOR_WORKERS:
        return 0
    # multiprocessing lets no daemonic process (a Pool worker, say) start children.
    if multiprocessing.current_process().daemon:
        return 0
    if not _main_module_reimport_is_safe():
        return 0
    if hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    else:
        cpus = os.cpu_count() or 1
    return min(cpus, _MAX_WORKERS) if cpus >= 2 else 0


def _main_module_reimport_is_safe():
    """Tell whether worker processes can start without running the calling program again.

    The spawn and forkserver start methods (spawn is the default on macOS
    and Windows) import the main module in every new process. A script that
    calls upgrade_file outside an ``if __name__ == "__main__":`` block would
    then run again in each worker, so workers start under those methods only
    when the main module is this one (``python -m aepsych_store``) or has no
    file (an interactive session, ``python -c``).
    """
    if multiprocessing.get_context(_WORKER_START_METHOD).get_start_method() == "fork":
        return True
    main = sys.modules.get("__main__")
    return main is None or main is sys.modules.get(__name__) or getattr(main, "__file__", None) is None


_Worker = collections.namedtuple("_Worker", "process connection")


class _BatchWorkers:
    """Worker processes that apply a function to batches, as a context manager that stops them on exit.

    With a count of 0, map() runs the function in this process. This
    process sends a worker its next batch only after reading its last
    result, so the two never wait for each other on a full pipe.
    """

    def __init__(self, path, count):
        self._path = path
        self._workers = []
        context = multiprocessing.get_context(_WORKER_START_METHOD)
        try:
            for _ in range(count):
                self._workers.append(_start_worker(context, [worker.connection for worker in self._workers]))
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def map(self, function, batches):
        """Yield function(batch) for each batch, in the order of batches."""
        if not self._workers:
            for batch in batches:
                yield function(batch)
            return
        batches = iter(batches)
        busy = collections.deque()
        for worker in self._workers:
            if not self._send_next_batch(worker, function, batches):
                break
            busy.append(worker)
        while busy:
            worker = busy.popleft()
            result = self._receive_result(worker)
            if self._send_next_batch(worker, function, batches):
                busy.append(worker)
            yield result

    def close(self):
        """Stop the workers: each exits when its pipe closes, or is terminated after a timeout."""
        for worker in self._workers:
            worker.connection.close()
        for worker in self._workers:
            worker.process.join(_WORKER_EXIT_TIMEOUT)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join()
        self._workers = []

    def _send_next_batch(self, worker, function, batches):
        """Send the worker the next batch; return False if there is none."""
        batch = next(batches, None)
        if batch is None:
            return False
        try:
            worker.connection.send((function, batch))
        except OSError:
            raise self._worker_ended(worker) from None
        return True

    def _receive_result(self, worker):
        try:
            succeeded, result = worker.connection.recv()
        except (EOFError, OSError):
            raise self._worker_ended(worker) from None
        if not succeeded:
            raise RuntimeError("{}: upgrade worker process {} failed:\n{}".format(
                self._path, worker.process.pid, result
            ))
        return result

    def _worker_ended(self, worker):
        worker.process.join(_WORKER_EXIT_TIMEOUT)
        return StoreError(
            "{}: upgrade worker process {} ended unexpectedly (exit code {}); run the upgrade again".format(
                self._path, worker.process.pid, worker.process.exitcode
            )
        )


def _start_worker(context, other_connections):
    """Start a worker process and return it as a _Worker."""
    connection, worker_end = context.Pipe()
    # A forked child inherits every open pipe end. It closes the ones that
    # belong to this process, so that a pipe reports EOF to each side as
    # soon as the other side's process ends.
    process = context.Process(
        target=_run_worker,
        args=(worker_end, [connection] + other_connections),
        name="aepsych_store upgrade worker",
        daemon=True,
    )
    # A forked child starts with this process's SIGINT handler, which would
    # print a traceback on Ctrl-C before _run_worker ignores SIGINT, so the
    # fork happens with SIGINT ignored. signal() works in the main thread only.
    previous = None
    if threading.current_thread() is threading.main_thread():
        # getsignal gives None for a handler set outside Python, which could not be restored.
        previous = signal.getsignal(signal.SIGINT)
        if previous is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process.start()
    finally:
        worker_end.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return _Worker(process, connection)


def _run_worker(connection, connections_to_close):
    """Apply the functions that arrive on connection to their batches until it closes or the parent ends."""
    for inherited in connections_to_close:
        inherited.close()
    # Ctrl-C reaches the whole process group, and the parent handles it by closing the pipes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The parent's sentinel becomes ready when the parent ends, even by
    # SIGKILL, so a worker never outlives it.
    parent = multiprocessing.parent_process()
    watched = [connection] if parent is None else [connection, parent.sentinel]
    while True:
        ready = multiprocessing.connection.wait(watched)
        if connection not in ready or (parent is not None and parent.sentinel in ready):
            return
        try:
            function, batch = connection.recv()
        except (EOFError, OSError):
            return  # the parent closed the pipe or ended, perhaps in the middle of a message
        try:
            reply = (True, function(batch))
        except Exception:
            reply = (False, traceback.format_exc())
        try:
            connection.send(reply)
        except OSError:
            return  # the parent closed the pipe or ended


# ---------------------------------------------------------------------------
# Writing


def _now():
    # Local time without a zone, in the layout AEPsych's files use.
    return datetime.datetime.now().isoformat(" ", "microseconds")


def _check_writable(conn):
    if getattr(conn, "read_only", False):
        raise StoreError("{}: the connection is read-only; open it with read_only=False to write".format(conn.path))


def _check_master_id(conn, master_id):
    if type(master_id) is not int:
        raise StoreError(
            "{}: master_id must be an int (the value record_setup returned), not {!r}".format(
                conn.path, master_id
            )
        )


def _experiment_not_found(conn, master_id):
    return StoreError(
        "{}: experiment {} not found in master; use the id that record_setup returned,"
        " or list the experiments with: python -m aepsych_store --summarize {}".format(
            conn.path, master_id, conn.path
        )
    )


def _check_experiment(conn, master_id):
    _check_master_id(conn, master_id)
    if _execute(conn, _SELECT_MASTER_EXISTS, (master_id,)).fetchone() is None:
        raise _experiment_not_found(conn, master_id)


def _insert_for_experiment(conn, sql, parameters, master_id):
    """Insert a row that refers to master_id; the foreign key rejects an unknown id."""
    try:
        return conn.execute(sql, parameters).lastrowid
    except sqlite3.IntegrityError as error:
        if "FOREIGN KEY" in str(error):
            raise _experiment_not_found(conn, master_id) from error
        raise _translate_error(conn, error) from error
    except sqlite3.Error as error:
        raise _translate_error(conn, error) from error


def _encode_json(value, what, conn):
    """Return value as JSON text, or raise if JSON would not give back the same value."""
    text, reason = _exact_json(value)
    if text is None:
        raise StoreError(
            "{}: {} cannot be stored as JSON: {}; pass dicts, lists, str, int, float,"
            " bool and None only".format(conn.path, what, reason)
        )
    return text


def _metadata_from_config(conn, config_str):
    """Read the [metadata] section of a setup's config_str as a dict of strings."""
    parser = _parse_ini(conn, config_str, "config_str")
    if not parser.has_section("metadata"):
        return {}
    return dict(parser.items("metadata", raw=True))


# A ConfigParser whose default section is this name has, in practice, no
# default section: AEPsych makes [common] its default, and reading the config
# that way would copy every [common] option into [metadata].
_NO_DEFAULT_SECTION = "\x00 aepsych_store: no default section"


def _parse_ini(conn, text, what):
    if not isinstance(text, str):
        raise StoreError("{}: {} must be INI text (str), not {}".format(conn.path, what, type(text).__name__))
    parser = configparser.ConfigParser(interpolation=None, default_section=_NO_DEFAULT_SECTION)
    parser.optionxform = str
    try:
        parser.read_string(text)
    except configparser.Error as error:
        message = " ".join(str(error).split())
        raise StoreError(
            "{}: {} is not valid INI: {}; fix the config, nothing was written".format(conn.path, what, message)
        ) from error
    return parser


def record_setup(
    conn,
    request=None,
    *,
    experiment_name=None,
    experiment_description=None,
    experiment_id=None,
    participant_id=None,
    extra_metadata=None,
):
    """Record a new experiment and its setup message; return its master.unique_id.

    The [metadata] section of ``request["message"]["config_str"]`` fills
    experiment_name, experiment_description, experiment_id and
    participant_id, and its other options go into extra_metadata. Explicit
    arguments win over the config. Defaults: name "default name",
    description "default description", a new uuid4 string as experiment_id,
    participant_id NULL.
    """
    _check_writable(conn)
    metadata = {}
    if request is not None:
        if not isinstance(request, dict):
            raise StoreError(
                "{}: the setup request must be a dict, not {}".format(conn.path, type(request).__name__)
            )
        message = request.get("message")
        if isinstance(message, dict) and message.get("config_str") is not None:
            metadata = _metadata_from_config(conn, message["config_str"])

    explicit = {
        "experiment_name": experiment_name,
        "experiment_description": experiment_description,
        "experiment_id": experiment_id,
        "participant_id": participant_id,
    }
    columns = {name: explicit[name] if explicit[name] is not None else metadata.pop(name, None) for name in explicit}
    for name in _METADATA_COLUMNS:
        metadata.pop(name, None)
    if columns["experiment_name"] is None:
        columns["experiment_name"] = "default name"
    if columns["experiment_description"] is None:
        columns["experiment_description"] = "default description"
    if columns["experiment_id"] is None:
        columns["experiment_id"] = str(uuid.uuid4())
    if extra_metadata is not None:
        if not isinstance(extra_metadata, dict):
            raise StoreError("{}: extra_metadata must be a dict".format(conn.path))
        metadata.update(extra_metadata)
    metadata_text = _encode_json(metadata, "extra_metadata", conn) if metadata else None

    if request is not None:
        contents_text = _encode_json(request, "the setup request", conn)
        extra_info = request.get("extra_info")
        extra_text = _encode_json(extra_info, "extra_info", conn) if extra_info is not None else None

    with _transaction(conn):
        master_id = _execute(
            conn,
            _INSERT_MASTER,
            (
                columns["experiment_name"],
                columns["experiment_description"],
                columns["experiment_id"],
                columns["participant_id"],
                metadata_text,
            ),
        ).lastrowid
        if request is not None:
            _execute(conn, _INSERT_MESSAGE, (_now(), "setup", contents_text, extra_text, master_id))
    return master_id


def record_message(conn, master_id, message_type, message_contents, extra_info=None):
    """Record one message of an experiment, commit it and return its replay_data.unique_id.

    Without ``extra_info``, a top-level "extra_info" key of the message is
    stored in that column too. A tell also writes its trials to raw_data,
    param_data and outcome_data in the same transaction, split by the
    parnames and stimuli_per_trial of the experiment's setup config.
    """
    _check_writable(conn)
    _check_master_id(conn, master_id)
    if not isinstance(message_type, str) or not message_type:
        raise StoreError("{}: message_type must be a non-empty str, such as 'tell'".format(conn.path))
    if extra_info is None and isinstance(message_contents, dict):
        extra_info = message_contents.get("extra_info")
    contents_text = _encode_json(message_contents, "message_contents", conn)
    extra_text = _encode_json(extra_info, "extra_info", conn) if extra_info is not None else None
    timestamp = _now()
    parameters = (timestamp, message_type, contents_text, extra_text, master_id)
    if message_type == "setup":
        conn.trial_layouts.pop(master_id, None)
    if message_type != "tell":
        return _insert_for_experiment(conn, _INSERT_MESSAGE, parameters, master_id)

    _check_experiment(conn, master_id)
    try:
        prepared = _prepare_trials(message_contents, _experiment_layout(conn, master_id))
    except ValueError as error:
        raise StoreError(
            "{}: the tell cannot be split into trials: {}; nothing was written".format(conn.path, error)
        ) from error
    with _transaction(conn):
        row_id = _insert_for_experiment(conn, _INSERT_MESSAGE, parameters, master_id)
        _write_trials(conn, master_id, [(timestamp, prepared)])
    return row_id


def save_strat(conn, master_id, strat):
    """Store a strategy's bytes (for example a torch.save buffer's contents); return the row id."""
    _check_writable(conn)
    _check_master_id(conn, master_id)
    if not isinstance(strat, (bytes, bytearray, memoryview)):
        raise StoreError(
            "{}: strat must be bytes, not {}; for a torch strategy pass the contents of"
            " the buffer torch.save wrote, buffer.getvalue()".format(conn.path, type(strat).__name__)
        )
    return _insert_for_experiment(conn, _INSERT_STRAT, (_now(), bytes(strat), master_id), master_id)


def save_config(conn, master_id, config):
    """Store a config, given as INI text or a mapping of sections; return the row id."""
    _check_writable(conn)
    _check_master_id(conn, master_id)
    if isinstance(config, collections.abc.Mapping):
        text = _ini_from_mapping(conn, config)
    else:
        text = config
    _parse_ini(conn, text, "config")
    return _insert_for_experiment(conn, _INSERT_CONFIG, (_now(), text, master_id), master_id)


def _ini_from_mapping(conn, config):
    parser = configparser.ConfigParser(interpolation=None, default_section=_NO_DEFAULT_SECTION)
    parser.optionxform = str
    for section, options in config.items():
        if not isinstance(section, str) or not isinstance(options, collections.abc.Mapping):
            raise StoreError(
                "{}: a config mapping must map section names to mappings of options;"
                " section {!r} does not".format(conn.path, section)
            )
        parser.add_section(section)
        for key, value in options.items():
            parser.set(section, str(key), _ini_value(conn, section, key, value))
    buffer = io.StringIO()
    parser.write(buffer)
    return buffer.getvalue()


def _ini_value(conn, section, key, value):
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return str(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, bool, int, float)) for v in value):
        # AEPsych reads lists written this way: lb = [0, 0]
        return "[" + ", ".join(str(v) for v in value) + "]"
    raise StoreError(
        "{}: config option [{}] {} has a value of type {} that INI cannot hold;"
        " use a str, a number or a list of them".format(conn.path, section, key, type(value).__name__)
    )


# ---------------------------------------------------------------------------
# Reading


def _reject_json_constant(name):
    raise ValueError("{} is not valid JSON".format(name))


_JSON_DECODER = json.JSONDecoder(parse_constant=_reject_json_constant)


def _decode_stored(conn, raw, table, column, row_id):
    """Decode a stored JSON text or legacy pickle into the Python value it holds."""
    if raw is None:
        return None
    try:
        if type(raw) is str:
            return _JSON_DECODER.decode(raw)
        if type(raw) is bytes:
            return _decode_pickle(raw)
        raise ValueError("a {} is neither JSON text nor a pickle".format(type(raw).__name__))
    except (ValueError, RecursionError) as error:
        raise UnreadableRowError(
            "{}: {} row {} has an unreadable {}: {}".format(conn.path, table, row_id, column, error),
            table=table,
            row_id=row_id,
        ) from error


def iter_replay(conn, master_id, *, skip_unreadable=False):
    """Yield an experiment's messages as ReplayRecord tuples, in the order they were recorded.

    The order is by unique_id, not by timestamp, because clocks jump. Rows
    are read in batches, so memory does not grow with the number of
    messages. A row that cannot be decoded raises UnreadableRowError, or,
    with ``skip_unreadable``, is logged at WARNING and skipped.
    """
    _check_experiment(conn, master_id)
    next_id = _MIN_ROWID
    while next_id is not None:
        next_id = yield from _replay_segment(conn, master_id, next_id, skip_unreadable)


def _replay_segment(conn, master_id, first_id, skip_unreadable):
    """Yield records from first_id on; return where to resume after a non-UTF-8 row, or None."""
    cursor = _execute(conn, _SELECT_REPLAY, (master_id, first_id))
    while True:
        try:
            rows = cursor.fetchmany(_BATCH_SIZE)
        except sqlite3.Error as error:
            # sqlite3 fails the whole batch when one TEXT value is not UTF-8.
            bad_id = _find_undecodable_row(conn, master_id, first_id, error)
            before = _execute(conn, _SELECT_REPLAY_BEFORE, (master_id, first_id, bad_id))
            yield from _decode_replay_rows(conn, before, skip_unreadable)
            message = "{}: replay_data row {} contains text that is not UTF-8".format(conn.path, bad_id)
            if not skip_unreadable:
                raise UnreadableRowError(message, table="replay_data", row_id=bad_id) from error
            logger.warning("%s; skipped it", message)
            return bad_id + 1
        if not rows:
            return None
        yield from _decode_replay_rows(conn, rows, skip_unreadable)
        first_id = rows[-1][0] + 1


def _decode_replay_rows(conn, rows, skip_unreadable):
    for unique_id, timestamp, message_type, contents, extra in rows:
        try:
            record = ReplayRecord(
                unique_id,
                timestamp,
                message_type,
                _decode_stored(conn, contents, "replay_data", "message_contents", unique_id),
                _decode_stored(conn, extra, "replay_data", "extra_info", unique_id),
            )
        except UnreadableRowError as error:
            if not skip_unreadable:
                raise
            logger.warning("%s; skipped it", error)
            continue
        yield record


def _find_undecodable_row(conn, master_id, first_id, error):
    """Return the id of the first replay row from first_id on whose text is not UTF-8."""
    if "decode" not in str(error).lower():
        raise _translate_error(conn, error) from error
    for row in _execute(conn, _SELECT_REPLAY_TEXT_BYTES, (master_id, first_id)):
        for value in row[1:]:
            if value is not None:
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    return row[0]
    raise _translate_error(conn, error) from error


def list_experiments(conn):
    """Return every experiment in the file as Experiment tuples, with message counts and times."""
    experiments = []
    for row in _execute(conn, _SELECT_EXPERIMENTS).fetchall():
        metadata = _decode_stored(conn, row[5], "master", "extra_metadata", row[0])
        experiments.append(Experiment(*row[:5], metadata, *row[6:]))
    return experiments


def iter_strats(conn, master_id):
    """Yield an experiment's saved strategies as StratRecord tuples, oldest first.

    strat_format is "bytes" for a strategy this store saved,
    "pickled-bytesio" for a legacy pickled io.BytesIO, whose inner bytes are
    returned, and "pickle" for any other legacy pickle, returned as stored.
    """
    _check_experiment(conn, master_id)
    for row in _execute(conn, _SELECT_STRATS, (master_id,)):
        yield _strat_record(conn, row)


def load_strat(conn, master_id):
    """Return the bytes of an experiment's latest strategy, or None if it has none."""
    _check_experiment(conn, master_id)
    row = _execute(conn, _SELECT_LATEST_STRAT, (master_id,)).fetchone()
    return None if row is None else _strat_record(conn, row).strat


def _strat_record(conn, row):
    unique_id, timestamp, strat, strat_format = row
    if strat_format == "bytes":
        return StratRecord(unique_id, timestamp, "bytes", strat)
    if not isinstance(strat, bytes):
        raise UnreadableRowError(
            "{}: strat_data row {} contains a {}, not a pickle".format(conn.path, unique_id, type(strat).__name__),
            table="strat_data",
            row_id=unique_id,
        )
    inner = _bytes_from_pickled_bytesio(conn, strat, unique_id)
    if inner is not None:
        return StratRecord(unique_id, timestamp, "pickled-bytesio", inner)
    return StratRecord(unique_id, timestamp, "pickle", strat)


def iter_configs(conn, master_id):
    """Yield an experiment's saved configs as ConfigRecord tuples with INI text, oldest first."""
    _check_experiment(conn, master_id)
    for unique_id, timestamp, config in _execute(conn, _SELECT_CONFIGS, (master_id,)):
        yield ConfigRecord(unique_id, timestamp, _config_text(conn, config, unique_id))


def load_config(conn, master_id):
    """Return an experiment's latest config as INI text, or None if it has none."""
    _check_experiment(conn, master_id)
    row = _execute(conn, _SELECT_LATEST_CONFIG, (master_id,)).fetchone()
    return None if row is None else _config_text(conn, row[2], row[0])


def _config_text(conn, config, unique_id):
    if isinstance(config, str):
        return config
    if isinstance(config, bytes):
        return _ini_from_pickled_config(conn, config, unique_id)
    raise UnreadableRowError(
        "{}: config_data row {} contains a {}, neither INI text nor a pickle".format(
            conn.path, unique_id, type(config).__name__
        ),
        table="config_data",
        row_id=unique_id,
    )


# ---------------------------------------------------------------------------
# Data-only pickle reader
#
# Old AEPsych databases store pickles, and a database file is untrusted input:
# pickle.loads on such bytes can run arbitrary code. _decode_pickle interprets
# the opcode stream of protocols 0 to 5 itself and never imports, looks up or
# calls anything that the pickle names.
# ---------------------------------------------------------------------------



class _PickleDecodeError(ValueError):
    """Invalid, unsupported or unsafe pickle data, with a message that names the opcode and byte offset."""


class _PickledGlobal:
    """Inert reference to a global ``module.name`` that a pickle names.

    The names are kept as the pickle spells them: protocols 0 to 2 written by
    Python 3 spell ``builtins`` as ``__builtin__``. Nothing is imported.
    """

    __slots__ = ("module", "name")

    def __init__(self, module, name):
        self.module = module
        self.name = name

    def __eq__(self, other):
        if type(other) is not _PickledGlobal:
            return NotImplemented
        return self.module == other.module and self.name == other.name

    def __hash__(self):
        return hash((self.module, self.name))

    def __repr__(self):
        return "_PickledGlobal(%r, %r)" % (self.module, self.name)


class _PickledObject:
    """Inert record of an object that a pickle would build by calling ``cls``.

    ``cls`` is a _PickledGlobal or whatever value the pickle called.
    ``args`` (a tuple) and ``kwargs`` (a dict) are the call's arguments.
    ``state`` is the value that BUILD would pass to ``__setstate__``, or None
    without BUILD. ``listitems`` collects the values of APPEND, APPENDS and
    ADDITEMS, and ``dictitems`` the pairs of SETITEM and SETITEMS.

    Records are mutable because a pickle refers to an object before BUILD
    sets its state, so records can form cycles. Equality and hashing are by
    identity for the same reason.
    """

    __slots__ = ("cls", "args", "kwargs", "state", "listitems", "dictitems")

    def __init__(self, cls, args=(), kwargs=None, state=None, listitems=None, dictitems=None):
        self.cls = cls
        self.args = args
        self.kwargs = {} if kwargs is None else kwargs
        self.state = state
        self.listitems = [] if listitems is None else listitems
        self.dictitems = {} if dictitems is None else dictitems

    def __repr__(self):
        # Only one level is shown, because records can be cyclic or deep.
        parts = [_describe_value(self.cls)]
        parts.append("args=(%s)" % ", ".join(_describe_value(arg) for arg in self.args[:8]))
        if self.kwargs:
            parts.append("kwargs=%s" % _describe_value(self.kwargs))
        if self.state is not None:
            parts.append("state=%s" % _describe_value(self.state))
        if self.listitems:
            parts.append("listitems=%s" % _describe_value(self.listitems))
        if self.dictitems:
            parts.append("dictitems=%s" % _describe_value(self.dictitems))
        return "_PickledObject(%s)" % ", ".join(parts)


def _describe_value(value):
    """Return a short, non-recursive description of value for reprs."""
    kind = type(value)
    if kind is _PickledGlobal:
        return repr(value)
    if kind is _PickledObject:
        if type(value.cls) is _PickledGlobal:
            return "<_PickledObject %s.%s>" % (value.cls.module, value.cls.name)
        return "<_PickledObject>"
    if kind in (str, bytes, bytearray):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    if kind is int and value.bit_length() > 160:
        # repr() of an int above 4300 digits raises on Python 3.11+.
        return "<int of %d bits>" % value.bit_length()
    if kind in (int, float, bool) or value is None:
        return repr(value)
    if kind in (list, tuple, dict, set, frozenset):
        return "<%s of %d items>" % (kind.__name__, len(value))
    return "<%s>" % kind.__name__


_OPCODE_NAMES = {
    0x28: "MARK", 0x2E: "STOP", 0x30: "POP", 0x31: "POP_MARK", 0x32: "DUP",
    0x46: "FLOAT", 0x49: "INT", 0x4A: "BININT", 0x4B: "BININT1", 0x4C: "LONG",
    0x4D: "BININT2", 0x4E: "NONE", 0x50: "PERSID", 0x51: "BINPERSID",
    0x52: "REDUCE", 0x53: "STRING", 0x54: "BINSTRING", 0x55: "SHORT_BINSTRING",
    0x56: "UNICODE", 0x58: "BINUNICODE", 0x61: "APPEND", 0x62: "BUILD",
    0x63: "GLOBAL", 0x64: "DICT", 0x7D: "EMPTY_DICT", 0x65: "APPENDS",
    0x67: "GET", 0x68: "BINGET", 0x69: "INST", 0x6A: "LONG_BINGET",
    0x6C: "LIST", 0x5D: "EMPTY_LIST", 0x6F: "OBJ", 0x70: "PUT", 0x71: "BINPUT",
    0x72: "LONG_BINPUT", 0x73: "SETITEM", 0x74: "TUPLE", 0x29: "EMPTY_TUPLE",
    0x75: "SETITEMS", 0x47: "BINFLOAT",
    0x80: "PROTO", 0x81: "NEWOBJ", 0x82: "EXT1", 0x83: "EXT2", 0x84: "EXT4",
    0x85: "TUPLE1", 0x86: "TUPLE2", 0x87: "TUPLE3", 0x88: "NEWTRUE",
    0x89: "NEWFALSE", 0x8A: "LONG1", 0x8B: "LONG4",
    0x42: "BINBYTES", 0x43: "SHORT_BINBYTES",
    0x8C: "SHORT_BINUNICODE", 0x8D: "BINUNICODE8", 0x8E: "BINBYTES8",
    0x8F: "EMPTY_SET", 0x90: "ADDITEMS", 0x91: "FROZENSET", 0x92: "NEWOBJ_EX",
    0x93: "STACK_GLOBAL", 0x94: "MEMOIZE", 0x95: "FRAME",
    0x96: "BYTEARRAY8", 0x97: "NEXT_BUFFER", 0x98: "READONLY_BUFFER",
}

# Opcodes whose argument starts with one byte read by indexing, so an
# IndexError there means the data ended inside the argument.
_ONE_BYTE_ARGUMENT = frozenset((0x4B, 0x68, 0x71, 0x55, 0x43, 0x8C, 0x80, 0x8A, 0x82))

# GET, BINGET and LONG_BINGET, where an IndexError means a missing memo key.
_MEMO_READS = frozenset((0x67, 0x68, 0x6A))

_HIGHEST_PROTOCOL = 5

# Python 3.11+ rejects int() of more than 4300 digits by default, and older
# versions take quadratic time on long digit strings, so text integers (INT,
# LONG, GET, PUT) are capped at the same length on every version.
_MAX_TEXT_DIGITS = 4300

# hash() and == of nested tuples recurse in C without a depth check. CPython
# 3.8 to 3.13 on Linux x86-64 with an 8 MB main-thread stack crashed with a
# segmentation fault on hash() of tuples nested 300,000 deep but not 100,000
# deep. Thread stacks can be 16 times smaller, so max_depth, which also
# limits tuple keys, is capped far below that.
_MAX_DEPTH_LIMIT = 1000
_DEFAULT_MAX_DEPTH = 200

_unpack_double = struct.Struct(">d").unpack_from
_unpack_int32 = struct.Struct("<i").unpack_from
_unpack_uint32 = struct.Struct("<I").unpack_from
_unpack_uint16 = struct.Struct("<H").unpack_from
_unpack_uint64 = struct.Struct("<Q").unpack_from


class _NestingError(Exception):
    """Decoded data that nests too deep, expands too far or contains itself.

    The message continues a sentence that starts with the opcode and offset.
    """


class _WalkLimit(Exception):
    """A limit that _measure_nesting hit: "depth", "items" or "cycle"."""


def _build_set(args):
    return set(_constructor_items(args, "set"))


def _build_frozenset(args):
    return frozenset(_constructor_items(args, "frozenset"))


def _constructor_items(args, name):
    if args == ():
        return ()
    if len(args) == 1 and type(args[0]) is list:
        return args[0]
    raise ValueError("%s() expects no argument or one list, as CPython writes it" % name)


def _build_bytes(args):
    if args != ():
        raise ValueError("bytes() expects no argument, as CPython writes it for b''")
    return b""


def _build_bytearray(args):
    if args == ():
        return bytearray()
    if len(args) == 1 and type(args[0]) is bytes:
        return bytearray(args[0])
    raise ValueError("bytearray() expects no argument or one bytes value, as CPython writes it")


def _build_encoded_bytes(args):
    if len(args) != 2 or type(args[0]) is not str or args[1] not in ("latin1", "latin-1"):
        raise ValueError("_codecs.encode() expects (str, 'latin1'), as CPython writes it for bytes")
    return args[0].encode("latin-1")


# Plain-data decoding admits REDUCE calls to these globals only, because
# CPython's protocols 0 to 3 write set, frozenset, bytes and bytearray values
# through them. Each entry is a reimplementation checked against the argument
# shapes CPython writes; the real callable is never looked up.
_PLAIN_CONSTRUCTORS = {
    ("builtins", "set"): _build_set,
    ("__builtin__", "set"): _build_set,
    ("builtins", "frozenset"): _build_frozenset,
    ("__builtin__", "frozenset"): _build_frozenset,
    ("builtins", "bytes"): _build_bytes,
    ("__builtin__", "bytes"): _build_bytes,
    ("builtins", "bytearray"): _build_bytearray,
    ("__builtin__", "bytearray"): _build_bytearray,
    ("_codecs", "encode"): _build_encoded_bytes,
}

_PLAIN_CONSTRUCTOR_NAMES = "builtins.set, builtins.frozenset, builtins.bytes, builtins.bytearray and _codecs.encode"


def _decode_pickle(data, *, allow_objects=False, max_depth=_DEFAULT_MAX_DEPTH):
    """Decode a pickle to plain Python data without importing or calling anything it names.

    With allow_objects false, only dict, list, tuple, set, frozenset, str,
    bytes, bytearray, int, float, bool and None are admitted. Any opcode that
    names a global or would call something raises _PickleDecodeError. The one
    exception is REDUCE calls to set, frozenset, bytes, bytearray and
    _codecs.encode in the shapes that protocols 0 to 3 write for plain data.
    With allow_objects true, globals become _PickledGlobal references and
    calls become _PickledObject records.

    max_depth is the maximum number of nested containers (and, with
    allow_objects, records) in the result. Data after the STOP opcode is
    rejected: pickle.dumps never writes any, so it signals a damaged or
    crafted blob.

    Raise _PickleDecodeError for any invalid, truncated, unsupported or too
    deeply nested input; raise TypeError or ValueError for invalid arguments.
    """
    if type(data) is not bytes:
        if not isinstance(data, (bytearray, memoryview)):
            raise TypeError("data must be bytes, bytearray or memoryview, not %s" % type(data).__name__)
        data = bytes(data)
    if type(max_depth) is not int or not 1 <= max_depth <= _MAX_DEPTH_LIMIT:
        raise ValueError("max_depth must be an int from 1 to %d, not %r" % (_MAX_DEPTH_LIMIT, max_depth))
    return _interpret(data, allow_objects, max_depth)[0]


def _decode_pickle_sharing(data):
    """Decode a pickle of plain data like _decode_pickle(data) and return (value, shares_values).

    shares_values is false if no GET or DUP opcode shared a value other than
    a str, so that the value is a tree.
    """
    if type(data) is not bytes:
        raise TypeError("data must be bytes, not %s" % type(data).__name__)
    return _interpret(data, False, _DEFAULT_MAX_DEPTH)


def _interpret(data, allow_objects, max_depth):
    """Run the opcode stream of data and return (the value at STOP, whether a GET or DUP shared a non-str value)."""
    size = len(data)
    stack = []
    # MARK saves the current stack here and starts an empty one, so opcodes
    # that take the items since the last MARK take the whole current stack.
    metastack = []
    # CPython's picklers number memo entries 0, 1, 2, ... in order, so the
    # memo is a list and a PUT that would leave a gap is rejected.
    memo = []
    memoize = memo.append
    # pos is the offset of the current opcode until its branch ends, so error
    # messages and the exception handlers below can report it.
    pos = 0
    op = -1
    # Without GET or DUP of a container no value is shared, so the result is
    # a tree no deeper than the number of containers built, and the walk
    # after STOP can be skipped.
    containers = 0
    tuples_built = 0
    shared = False
    globals_seen = False
    key_guard = None
    try:
        # Most pickles start with PROTO and FRAME, and reading them here keeps
        # them out of the dispatch chain.
        if size > 1 and data[0] == 0x80:
            op = 0x80
            _check_protocol(data, 0)
            pos = 2
            if size > 2 and data[2] == 0x95:
                op = 0x95
                _check_frame(data, 2, size)
                pos = 11

        # The chain is ordered by how often CPython writes each opcode for
        # AEPsych messages and configs. Branches that push one value fall
        # through to the code after the chain; the others end in continue.
        while True:
            op = data[pos]
            if op == 0x8C:  # SHORT_BINUNICODE
                end = pos + 2 + data[pos + 1]
                if end > size:
                    raise _truncated(op, pos, end - pos - 2, size - pos - 2)
                value = data[pos + 2:end].decode("utf-8", "surrogatepass")
                pos = end
            elif op == 0x4B:  # BININT1
                value = data[pos + 1]
                pos += 2
            elif op == 0x28:  # MARK
                metastack.append(stack)
                stack = []
                pos += 1
                continue
            elif op == 0x7D:  # EMPTY_DICT
                value = {}
                containers += 1
                pos += 1
            elif op == 0x75:  # SETITEMS
                items = stack
                stack = metastack.pop()
                target = stack[-1]
                count = len(items)
                if count & 1:
                    raise _error(op, pos, "has a key without a value (%d items after MARK)" % count)
                if shared or tuples_built > max_depth:
                    key_guard = _check_keys(key_guard, items[::2], max_depth, size)
                if type(target) is dict:
                    for index in range(0, count, 2):
                        target[items[index]] = items[index + 1]
                elif type(target) is _PickledObject:
                    for index in range(0, count, 2):
                        target.dictitems[items[index]] = items[index + 1]
                else:
                    raise _wrong_target(op, pos, "a dict", target)
                pos += 1
                continue
            elif op == 0x47:  # BINFLOAT
                value = _unpack_double(data, pos + 1)[0]
                pos += 9
            elif op == 0x5D:  # EMPTY_LIST
                value = []
                containers += 1
                pos += 1
            elif op == 0x65:  # APPENDS
                items = stack
                stack = metastack.pop()
                target = stack[-1]
                if type(target) is list:
                    target.extend(items)
                elif type(target) is _PickledObject:
                    target.listitems.extend(items)
                else:
                    raise _wrong_target(op, pos, "a list", target)
                pos += 1
                continue
            elif op == 0x61:  # APPEND
                value = stack.pop()
                target = stack[-1]
                if type(target) is list:
                    target.append(value)
                elif type(target) is _PickledObject:
                    target.listitems.append(value)
                else:
                    raise _wrong_target(op, pos, "a list", target)
                pos += 1
                continue
            elif op == 0x68:  # BINGET
                value = memo[data[pos + 1]]
                if type(value) is not str:
                    shared = True
                pos += 2
            elif op == 0x73:  # SETITEM
                value = stack.pop()
                key = stack.pop()
                target = stack[-1]
                if shared or tuples_built > max_depth:
                    key_guard = _check_keys(key_guard, (key,), max_depth, size)
                if type(target) is dict:
                    target[key] = value
                elif type(target) is _PickledObject:
                    target.dictitems[key] = value
                else:
                    raise _wrong_target(op, pos, "a dict", target)
                pos += 1
                continue
            elif op == 0x4E:  # NONE
                value = None
                pos += 1
            elif op == 0x88:  # NEWTRUE
                value = True
                pos += 1
            elif op == 0x89:  # NEWFALSE
                value = False
                pos += 1
            elif op == 0x2E:  # STOP
                break
            elif op == 0x86:  # TUPLE2
                second = stack.pop()
                value = (stack.pop(), second)
                containers += 1
                tuples_built += 1
                pos += 1
            elif op == 0x85:  # TUPLE1
                value = (stack.pop(),)
                containers += 1
                tuples_built += 1
                pos += 1
            elif op == 0x52:  # REDUCE
                args = stack.pop()
                func = stack.pop()
                if type(args) is not tuple:
                    raise _error(op, pos, "needs a tuple of arguments, not %s" % type(args).__name__)
                if (shared or tuples_built > max_depth) and _is_plain_constructor(func):
                    for arg in args:
                        if type(arg) is list:
                            key_guard = _check_keys(key_guard, arg, max_depth, size)
                value = _reduce(op, pos, func, args, allow_objects)
                containers += 1
                pos += 1
            elif op == 0x29:  # EMPTY_TUPLE
                value = ()
                containers += 1
                tuples_built += 1
                pos += 1
            elif op == 0x62:  # BUILD
                state = stack.pop()
                target = stack[-1]
                if not allow_objects:
                    raise _calls_rejected(op, pos, "would set an object's state")
                if type(target) is not _PickledObject:
                    raise _wrong_target(op, pos, "an object record", target)
                if target.state is not None:
                    raise _error(op, pos, "sets the state of an object that already has one, "
                                 "which CPython's pickler never writes")
                target.state = state
                pos += 1
                continue
            elif op == 0x6A:  # LONG_BINGET
                value = memo[_unpack_uint32(data, pos + 1)[0]]
                if type(value) is not str:
                    shared = True
                pos += 5
            elif op == 0x74:  # TUPLE
                value = tuple(stack)
                stack = metastack.pop()
                containers += 1
                tuples_built += 1
                pos += 1
            elif op == 0x87:  # TUPLE3
                third = stack.pop()
                second = stack.pop()
                value = (stack.pop(), second, third)
                containers += 1
                tuples_built += 1
                pos += 1
            elif op == 0x94:  # MEMOIZE after an opcode that does not push
                memoize(stack[-1])
                pos += 1
                continue
            elif op == 0x71:  # BINPUT after an opcode that does not push
                _put(memo, data[pos + 1], stack[-1], op, pos)
                pos += 2
                continue
            elif op == 0x58:  # BINUNICODE
                end = pos + 5 + _unpack_uint32(data, pos + 1)[0]
                if end > size:
                    raise _truncated(op, pos, end - pos - 5, size - pos - 5)
                value = data[pos + 5:end].decode("utf-8", "surrogatepass")
                pos = end
            elif op == 0x4A:  # BININT
                value = _unpack_int32(data, pos + 1)[0]
                pos += 5
            elif op == 0x4D:  # BININT2
                value = _unpack_uint16(data, pos + 1)[0]
                pos += 3
            elif op == 0x93:  # STACK_GLOBAL
                name = stack.pop()
                module = stack.pop()
                if type(module) is not str or type(name) is not str:
                    raise _error(op, pos, "needs a str module and name, not %s and %s"
                                 % (type(module).__name__, type(name).__name__))
                value = _global(op, pos, module, name, allow_objects)
                globals_seen = True
                pos += 1
            elif op == 0x81:  # NEWOBJ
                args = stack.pop()
                cls = stack.pop()
                if not allow_objects:
                    raise _calls_rejected(op, pos, "would call %s" % _describe_callable(cls))
                if type(args) is not tuple:
                    raise _error(op, pos, "needs a tuple of arguments, not %s" % type(args).__name__)
                value = _PickledObject(cls, args)
                containers += 1
                pos += 1
            elif op == 0x72:  # LONG_BINPUT
                _put(memo, _unpack_uint32(data, pos + 1)[0], stack[-1], op, pos)
                pos += 5
                continue
            elif op == 0x8A:  # LONG1
                end = pos + 2 + data[pos + 1]
                if end > size:
                    raise _truncated(op, pos, end - pos - 2, size - pos - 2)
                value = int.from_bytes(data[pos + 2:end], "little", signed=True)
                pos = end
            elif op == 0x8B:  # LONG4
                length = _unpack_int32(data, pos + 1)[0]
                if length < 0:
                    raise _error(op, pos, "has a negative length %d" % length)
                end = pos + 5 + length
                if end > size:
                    raise _truncated(op, pos, length, size - pos - 5)
                value = int.from_bytes(data[pos + 5:end], "little", signed=True)
                pos = end
            elif op == 0x43:  # SHORT_BINBYTES
                end = pos + 2 + data[pos + 1]
                if end > size:
                    raise _truncated(op, pos, end - pos - 2, size - pos - 2)
                value = data[pos + 2:end]
                pos = end
            elif op == 0x42:  # BINBYTES
                end = pos + 5 + _unpack_uint32(data, pos + 1)[0]
                if end > size:
                    raise _truncated(op, pos, end - pos - 5, size - pos - 5)
                value = data[pos + 5:end]
                pos = end
            elif op == 0x8E or op == 0x8D or op == 0x96:  # BINBYTES8, BINUNICODE8, BYTEARRAY8
                end = pos + 9 + _unpack_uint64(data, pos + 1)[0]
                if end > size:
                    raise _truncated(op, pos, end - pos - 9, size - pos - 9)
                value = data[pos + 9:end]
                if op == 0x8D:
                    value = value.decode("utf-8", "surrogatepass")
                elif op == 0x96:
                    value = bytearray(value)
                pos = end
            elif op == 0x55:  # SHORT_BINSTRING
                end = pos + 2 + data[pos + 1]
                if end > size:
                    raise _truncated(op, pos, end - pos - 2, size - pos - 2)
                value = data[pos + 2:end].decode("ascii")
                pos = end
            elif op == 0x54:  # BINSTRING
                length = _unpack_int32(data, pos + 1)[0]
                if length < 0:
                    raise _error(op, pos, "has a negative length %d" % length)
                end = pos + 5 + length
                if end > size:
                    raise _truncated(op, pos, length, size - pos - 5)
                value = data[pos + 5:end].decode("ascii")
                pos = end
            elif op == 0x6C:  # LIST
                value = stack
                stack = metastack.pop()
                containers += 1
                pos += 1
            elif op == 0x64:  # DICT
                items = stack
                stack = metastack.pop()
                if len(items) & 1:
                    raise _error(op, pos, "has a key without a value (%d items after MARK)" % len(items))
                if shared or tuples_built > max_depth:
                    key_guard = _check_keys(key_guard, items[::2], max_depth, size)
                iterator = iter(items)
                value = dict(zip(iterator, iterator))
                containers += 1
                pos += 1
            elif op == 0x8F:  # EMPTY_SET
                value = set()
                containers += 1
                pos += 1
            elif op == 0x90:  # ADDITEMS
                items = stack
                stack = metastack.pop()
                target = stack[-1]
                if shared or tuples_built > max_depth:
                    key_guard = _check_keys(key_guard, items, max_depth, size)
                if type(target) is set:
                    target.update(items)
                elif type(target) is _PickledObject:
                    target.listitems.extend(items)
                else:
                    raise _wrong_target(op, pos, "a set", target)
                pos += 1
                continue
            elif op == 0x91:  # FROZENSET
                items = stack
                stack = metastack.pop()
                if shared or tuples_built > max_depth:
                    key_guard = _check_keys(key_guard, items, max_depth, size)
                value = frozenset(items)
                containers += 1
                pos += 1
            elif op == 0x30:  # POP
                # Like pickle, POP on an empty stack discards the last MARK.
                if stack:
                    stack.pop()
                else:
                    stack = metastack.pop()
                pos += 1
                continue
            elif op == 0x31:  # POP_MARK
                stack = metastack.pop()
                pos += 1
                continue
            elif op == 0x32:  # DUP
                value = stack[-1]
                shared = True
                pos += 1
            elif op == 0x95:  # FRAME
                # A frame only groups opcodes for buffered reading, so its
                # length is checked and otherwise ignored.
                _check_frame(data, pos, size)
                pos += 9
                continue
            elif op == 0x80:  # PROTO
                _check_protocol(data, pos)
                pos += 2
                continue
            elif op == 0x49 or op == 0x4C:  # INT, LONG
                end = _find_line_end(data, op, pos)
                line = data[pos + 1:end]
                if len(line) > _MAX_TEXT_DIGITS:
                    raise _error(op, pos, "has %d digits; at most %d are accepted" % (len(line), _MAX_TEXT_DIGITS))
                if op == 0x4C:
                    # Python 2 writes longs with an L suffix.
                    value = int(line[:-1] if line.endswith(b"L") else line, 0)
                elif line == b"01":
                    # Protocols 0 and 1 write bools as INT 01 and INT 00.
                    value = True
                elif line == b"00":
                    value = False
                else:
                    value = int(line)
                pos = end + 1
            elif op == 0x46:  # FLOAT
                end = _find_line_end(data, op, pos)
                value = float(data[pos + 1:end])
                pos = end + 1
            elif op == 0x56:  # UNICODE
                end = _find_line_end(data, op, pos)
                value = data[pos + 1:end].decode("raw-unicode-escape")
                pos = end + 1
            elif op == 0x53:  # STRING
                end = _find_line_end(data, op, pos)
                line = data[pos + 1:end]
                if len(line) < 2 or line[0] != line[-1] or line[0] not in b"\"'":
                    raise _error(op, pos, "needs an argument in matching quotes")
                value = _unescape_string(line[1:-1]).decode("ascii")
                pos = end + 1
            elif op == 0x67:  # GET
                end = _find_line_end(data, op, pos)
                value = memo[_parse_memo_key(data, op, pos, end)]
                if type(value) is not str:
                    shared = True
                pos = end + 1
            elif op == 0x70:  # PUT
                end = _find_line_end(data, op, pos)
                _put(memo, _parse_memo_key(data, op, pos, end), stack[-1], op, pos)
                pos = end + 1
                continue
            elif op == 0x63:  # GLOBAL
                module, name, end = _read_global_name(data, op, pos)
                value = _global(op, pos, module, name, allow_objects)
                globals_seen = True
                pos = end
            elif op == 0x69:  # INST
                module, name, end = _read_global_name(data, op, pos)
                if not allow_objects:
                    raise _calls_rejected(op, pos, "would call %s.%s" % (module, name))
                args = tuple(stack)
                stack = metastack.pop()
                value = _PickledObject(_PickledGlobal(module, name), args)
                containers += 1
                globals_seen = True
                pos = end
            elif op == 0x6F:  # OBJ
                items = stack
                stack = metastack.pop()
                if not items:
                    raise _error(op, pos, "needs a class after MARK")
                if not allow_objects:
                    raise _calls_rejected(op, pos, "would call %s" % _describe_callable(items[0]))
                value = _PickledObject(items[0], tuple(items[1:]))
                containers += 1
                pos += 1
            elif op == 0x92:  # NEWOBJ_EX
                kwargs = stack.pop()
                args = stack.pop()
                cls = stack.pop()
                if not allow_objects:
                    raise _calls_rejected(op, pos, "would call %s" % _describe_callable(cls))
                if type(args) is not tuple or type(kwargs) is not dict:
                    raise _error(op, pos, "needs a tuple of arguments and a dict of keyword arguments, "
                                 "not %s and %s" % (type(args).__name__, type(kwargs).__name__))
                value = _PickledObject(cls, args, kwargs)
                containers += 1
                pos += 1
            elif op == 0x50 or op == 0x51:  # PERSID, BINPERSID
                raise _error(op, pos, "refers to a persistent ID, which only the pickling application "
                             "can resolve; persistent IDs are not supported")
            elif op == 0x82 or op == 0x83 or op == 0x84:  # EXT1, EXT2, EXT4
                raise _error(op, pos, "refers to the copyreg extension registry, which names a global "
                             "outside the pickle; extension codes are not supported")
            elif op == 0x97 or op == 0x98:  # NEXT_BUFFER, READONLY_BUFFER
                raise _error(op, pos, "uses a protocol 5 out-of-band buffer, which is not supported")
            else:
                raise _unknown(op, pos)

            stack.append(value)
            # Protocols 4 and 5 write MEMOIZE, and protocols 1 to 3 BINPUT,
            # after most pushed values; storing it here saves a dispatch round.
            op = data[pos]
            if op == 0x94:
                memoize(value)
                pos += 1
            elif op == 0x71 and pos + 1 < size and data[pos + 1] == len(memo):
                memoize(value)
                pos += 2

        # STOP: the pickle must hold exactly one value and end here.
        if metastack:
            raise _error(op, pos, "leaves %d MARK(s) unclosed" % len(metastack))
        if len(stack) != 1:
            raise _error(op, pos, "expects exactly one value on the stack, found %d" % len(stack))
        if pos + 1 != size:
            raise _error(op, pos, "is followed by %d more bytes; a pickle must end at STOP" % (size - pos - 1))
        result = stack[0]
        if shared or globals_seen or containers > max_depth:
            _check_result(result, allow_objects, max_depth, size)
        return result, shared

    except _PickleDecodeError:
        raise
    except _NestingError as exc:
        raise _error(op, pos, str(exc)) from None
    except IndexError:
        if pos >= size:
            raise _PickleDecodeError("pickle data ends at byte offset %d without a STOP opcode" % size) from None
        if op in _ONE_BYTE_ARGUMENT and pos + 2 > size:
            raise _truncated(op, pos, 1, 0) from None
        if op in _MEMO_READS:
            raise _error(op, pos, "refers to a memo key that is not defined (the memo has %d entries)"
                         % len(memo)) from None
        raise _error(op, pos, "causes a stack underflow: it needs more values than the stack "
                     "holds since the last MARK, or a MARK that is missing") from None
    except struct.error:
        raise _error(op, pos, "is truncated: its fixed-size argument runs past the end of the data") from None
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise _error(op, pos, "has an invalid argument or operand: %s" % exc) from None
    except (MemoryError, RecursionError) as exc:
        raise _error(op, pos, "exhausted resources: %s" % type(exc).__name__) from None


def _check_protocol(data, pos):
    """Raise _PickleDecodeError if the PROTO opcode at pos declares an unknown protocol."""
    protocol = data[pos + 1]
    if protocol > _HIGHEST_PROTOCOL:
        raise _error(0x80, pos, "declares protocol %d, but only protocols 0 to %d exist"
                     % (protocol, _HIGHEST_PROTOCOL))


def _check_frame(data, pos, size):
    """Raise _PickleDecodeError if the FRAME opcode at pos claims more bytes than remain."""
    length = _unpack_uint64(data, pos + 1)[0]
    if pos + 9 + length > size:
        raise _truncated(0x95, pos, length, size - pos - 9)


def _put(memo, index, value, op, pos):
    """Store value under memo key index for a PUT, BINPUT or LONG_BINPUT opcode at pos."""
    if index < len(memo):
        memo[index] = value
    elif index == len(memo):
        memo.append(value)
    else:
        raise _error(op, pos, "stores memo key %d while the memo has %d entries; CPython's picklers "
                     "number memo keys in order" % (index, len(memo)))


def _parse_memo_key(data, op, pos, end):
    """Return the memo key of the GET or PUT opcode at pos, whose text ends at end."""
    line = data[pos + 1:end]
    if len(line) > _MAX_TEXT_DIGITS:
        raise _error(op, pos, "has %d digits; at most %d are accepted" % (len(line), _MAX_TEXT_DIGITS))
    key = int(line)
    if key < 0:
        raise _error(op, pos, "has a negative memo key %d" % key)
    return key


def _error(op, start, problem):
    """Return a _PickleDecodeError naming op and its byte offset."""
    name = _OPCODE_NAMES.get(op) or "unknown opcode 0x%02x" % op
    return _PickleDecodeError("%s at byte offset %d %s" % (name, start, problem))


def _truncated(op, start, needed, available):
    return _error(op, start, "is truncated: its argument needs %d bytes but %d remain"
                  % (needed, max(available, 0)))


def _unknown(op, start):
    return _PickleDecodeError("unknown opcode 0x%02x at byte offset %d; the data is not a pickle "
                             "of protocol 0 to %d" % (op, start, _HIGHEST_PROTOCOL))


def _wrong_target(op, start, expected, target):
    return _error(op, start, "needs %s below its operands, not %s" % (expected, type(target).__name__))


def _calls_rejected(op, start, action):
    return _error(op, start, "%s, which plain-data decoding rejects; use allow_objects=True "
                  "to read it as an inert record" % action)


def _describe_callable(value):
    if type(value) is _PickledGlobal:
        return "%s.%s" % (value.module, value.name)
    return "a value of type %s" % type(value).__name__


def _find_line_end(data, op, pos):
    """Return the offset of the newline ending the text argument of the opcode at pos."""
    end = data.find(b"\n", pos + 1)
    if end < 0:
        raise _error(op, pos, "is truncated: its text argument has no terminating newline")
    return end


def _read_global_name(data, op, pos):
    """Return the module and name lines of the GLOBAL or INST opcode at pos, and the next offset."""
    module_end = _find_line_end(data, op, pos)
    name_end = data.find(b"\n", module_end + 1)
    if name_end < 0:
        raise _error(op, pos, "is truncated: its name has no terminating newline")
    module = data[pos + 1:module_end].decode("utf-8")
    name = data[module_end + 1:name_end].decode("utf-8")
    return module, name, name_end + 1


def _global(op, start, module, name, allow_objects):
    """Return the reference that GLOBAL or STACK_GLOBAL pushes for module.name."""
    if not allow_objects and (module, name) not in _PLAIN_CONSTRUCTORS:
        raise _error(op, start, "names %s.%s, but plain-data decoding admits only %s; use "
                     "allow_objects=True to read it as an inert reference"
                     % (module, name, _PLAIN_CONSTRUCTOR_NAMES))
    return _PickledGlobal(module, name)


def _is_plain_constructor(func):
    return type(func) is _PickledGlobal and (func.module, func.name) in _PLAIN_CONSTRUCTORS


def _reduce(op, start, func, args, allow_objects):
    """Return the value that REDUCE leaves for func(*args), calling nothing the pickle names."""
    constructor = None
    if type(func) is _PickledGlobal:
        constructor = _PLAIN_CONSTRUCTORS.get((func.module, func.name))
    if constructor is None:
        if allow_objects:
            return _PickledObject(func, args)
        raise _calls_rejected(op, start, "would call %s" % _describe_callable(func))
    try:
        return constructor(args)
    except ValueError as exc:
        raise _error(op, start, "calls %s.%s with invalid arguments: %s" % (func.module, func.name, exc)) from None


_STRING_ESCAPE = re.compile(rb"\\(x[0-9A-Fa-f]{2}|[0-7]{1,3}|[\s\S]?)")

_SIMPLE_ESCAPES = {
    b"\n": b"", b"\\": b"\\", b"'": b"'", b'"': b'"', b"a": b"\a", b"b": b"\b",
    b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v",
}


def _unescape_string(text):
    """Undo the Python 2 repr escapes of a STRING argument.

    This replaces codecs.escape_decode, which pickle uses, because that
    function warns on unknown escapes and is not a documented API.
    """
    return _STRING_ESCAPE.sub(_replace_escape, text)


def _replace_escape(match):
    escape = match.group(1)
    if not escape:
        raise ValueError("STRING argument ends in a lone backslash")
    first = escape[:1]
    if first == b"x":
        if len(escape) != 3:
            raise ValueError("STRING argument has an invalid \\x escape")
        return bytes((int(escape[1:], 16),))
    if first in b"01234567":
        code = int(escape, 8)
        if code > 0xFF:
            raise ValueError("STRING argument has an octal escape above \\377")
        return bytes((code,))
    return _SIMPLE_ESCAPES.get(escape, b"\\" + escape)


def _check_keys(guard, keys, max_depth, size):
    """Check dict keys or set items before they are hashed, and return the _KeyGuard in use."""
    if guard is None:
        guard = _KeyGuard(max_depth, size)
    for key in keys:
        if type(key) is tuple:
            guard.check_tuple(key)
    return guard


class _KeyGuard:
    """Limits on hashing tuple keys for one decode.

    hash() and == walk nested tuples recursively in C, without a depth check
    and without caching the result, so a deep tuple crashes the interpreter
    and a tuple that refers twice to the level below takes exponential time.
    Each tuple key may nest at most max_depth tuples, and all tuple keys
    together may expand (shared parts counted each time) to at most
    2**20 + 16 * len(data) items, an estimate of the hashing work.

    NOTE: int keys are not charged, although hashing an int takes time in
    proportion to its size and is not cached, so a huge int reused as a key
    through the memo costs that time per insertion. Keys with colliding
    hashes (crafted ints) also make insertion quadratic, as in pickle.
    """

    __slots__ = ("max_depth", "budget", "cache")

    def __init__(self, max_depth, size):
        self.max_depth = max_depth
        self.budget = (1 << 20) + 16 * size
        self.cache = {}

    def check_tuple(self, key):
        """Charge the cost of hashing key, and raise _NestingError if it exceeds the limits."""
        try:
            items = _measure_nesting(key, _tuple_children, self.max_depth, self.budget, self.cache, False)[1]
        except _WalkLimit as exc:
            if str(exc) == "depth":
                raise _NestingError("has a tuple key nested deeper than max_depth=%d, which hash() "
                                    "cannot walk safely" % self.max_depth) from None
            items = self.budget
        self.budget -= items + 1
        if self.budget < 0:
            raise _NestingError("has tuple keys that together expand to too many items to hash "
                                "in reasonable time")


def _check_result(result, allow_objects, max_depth, size):
    """Raise _NestingError if the decoded result is too deep, too large when expanded, or cyclic.

    With allow_objects, records and their fields are walked too. A reference
    back to a value still being walked counts as a leaf there, because
    pickled objects such as configparser.ConfigParser refer back to
    themselves.

    Without allow_objects, a cycle is an error. The result may also expand
    to at most 2**20 + 16 * len(data) items when shared values are counted
    each time they are reached. A tree never exceeds that, but consumers
    such as json.dumps walk a shared value once per reference.
    """
    max_items = (1 << 20) + 16 * size
    try:
        if allow_objects:
            _measure_nesting(result, _object_children, max_depth, None, {}, True)
        else:
            _measure_nesting(result, _plain_children, max_depth, max_items, {}, False)
    except _WalkLimit as exc:
        if str(exc) == "depth":
            raise _NestingError("finishes a value nested deeper than max_depth=%d; pass a larger "
                                "max_depth only if such deep data is expected" % max_depth) from None
        if str(exc) == "items":
            raise _NestingError("finishes a value whose shared references expand to more than %d "
                                "items" % max_items) from None
        raise _NestingError("finishes a value that contains itself (a reference cycle), which "
                            "plain data cannot have") from None


def _tuple_children(value):
    return value if type(value) is tuple else None


def _plain_children(value):
    kind = type(value)
    if kind is list or kind is tuple or kind is set or kind is frozenset:
        return value
    if kind is dict:
        return itertools.chain.from_iterable(value.items())
    if kind is _PickledGlobal:
        raise _NestingError("finishes a value that contains the global %s.%s itself; plain-data "
                            "decoding admits that global only as the function of a REDUCE call"
                            % (value.module, value.name))
    return None


def _object_children(value):
    kind = type(value)
    if kind is list or kind is tuple or kind is set or kind is frozenset:
        return value
    if kind is dict:
        return itertools.chain.from_iterable(value.items())
    if kind is _PickledObject:
        return (value.cls, value.args, value.kwargs, value.state, value.listitems, value.dictitems)
    return None


def _measure_nesting(root, children_of, max_depth, max_items, done, allow_cycles):
    """Return the nesting height and expanded item count of root, walking iteratively.

    children_of returns an iterable of a container's values (dict keys
    included) or None for a leaf. done caches finished containers by id,
    together with the container so that the id stays valid, so each shared
    container is walked once.

    Raise _WalkLimit("depth") if root nests more than max_depth containers,
    _WalkLimit("items") if it expands to more than max_items items (None
    means no limit), and _WalkLimit("cycle") if it contains itself, unless
    allow_cycles is true.
    """
    kids = children_of(root)
    if kids is None:
        return 0, 0
    entry = done.get(id(root))
    if entry is not None:
        return entry[1], entry[2]
    on_path = {id(root)}
    # Each frame is [container, iterator over its values, tallest child height, items so far].
    path = [[root, iter(kids), 0, 0]]
    while path:
        frame = path[-1]
        descended = False
        for child in frame[1]:
            frame[3] += 1
            kids = children_of(child)
            if kids is None:
                continue
            child_id = id(child)
            entry = done.get(child_id)
            if entry is None:
                if child_id in on_path:
                    if allow_cycles:
                        continue
                    raise _WalkLimit("cycle")
                if len(path) >= max_depth:
                    raise _WalkLimit("depth")
                on_path.add(child_id)
                path.append([child, iter(kids), 0, 0])
                descended = True
                break
            if len(path) + entry[1] > max_depth:
                raise _WalkLimit("depth")
            if entry[1] > frame[2]:
                frame[2] = entry[1]
            frame[3] += entry[2]
            if max_items is not None and frame[3] > max_items:
                raise _WalkLimit("items")
        if descended:
            continue
        path.pop()
        node, _, tallest, items = frame
        on_path.discard(id(node))
        done[id(node)] = (node, tallest + 1, items)
        if path:
            parent = path[-1]
            if tallest + 1 > parent[2]:
                parent[2] = tallest + 1
            parent[3] += items
            if max_items is not None and parent[3] > max_items:
                raise _WalkLimit("items")
    entry = done[id(root)]
    return entry[1], entry[2]


# ---------------------------------------------------------------------------
# Legacy configs and strategies


# Modules whose globals a pickled strategy may name: AEPsych's own, the
# libraries its strategies are built from, and the standard containers.
# Anything else (os, subprocess, builtins.eval, ...) has no place in a
# strategy, so such a row is reported as unreadable rather than returned.
_STRATEGY_MODULES = frozenset((
    "aepsych", "torch", "botorch", "gpytorch", "linear_operator", "numpy", "scipy",
    "collections", "copyreg", "_codecs", "io", "_io",
))
_STRATEGY_BUILTINS = frozenset(("dict", "list", "set", "frozenset", "tuple", "bytearray", "bytes",
                                "int", "float", "complex", "bool", "slice", "range", "object"))
_BYTESIO_CLASSES = (_PickledGlobal("_io", "BytesIO"), _PickledGlobal("io", "BytesIO"))


def _decode_legacy_object(conn, data, table, row_id):
    try:
        return _decode_pickle(data, allow_objects=True)
    except _PickleDecodeError as error:
        raise UnreadableRowError(
            "{}: {} row {} contains a pickle that cannot be read as data: {}".format(conn.path, table, row_id, error),
            table=table,
            row_id=row_id,
        ) from error


def _named_globals(root):
    """Return every _PickledGlobal reachable from a decoded pickle, walking cycles once."""
    found = set()
    seen = set()
    pending = [root]
    while pending:
        value = pending.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if type(value) is _PickledGlobal:
            found.add(value)
        elif type(value) is _PickledObject:
            pending.extend((value.cls, value.args, value.kwargs, value.state, value.listitems, value.dictitems))
        elif type(value) is dict:
            pending.extend(value.keys())
            pending.extend(value.values())
        elif type(value) in (list, tuple, set, frozenset):
            pending.extend(value)
    return found


def _bytes_from_pickled_bytesio(conn, data, row_id):
    """Return the bytes inside a legacy pickled io.BytesIO, or None for another legacy strategy."""
    value = _decode_legacy_object(conn, data, "strat_data", row_id)
    if type(value) is _PickledObject and value.cls in _BYTESIO_CLASSES:
        state = value.state
        if type(state) is tuple and state and type(state[0]) in (bytes, bytearray):
            return bytes(state[0])
    for name in _named_globals(value):
        module = name.module.split(".")[0]
        allowed = (
            module in _STRATEGY_MODULES
            or module in ("builtins", "__builtin__") and name.name in _STRATEGY_BUILTINS
        )
        if not allowed:
            raise UnreadableRowError(
                "{}: strat_data row {} is a pickle that names {}.{}, which a strategy has no use for;"
                " the row may be hostile, so it is not returned (nothing in it was run)".format(
                    conn.path, row_id, name.module, name.name
                ),
                table="strat_data",
                row_id=row_id,
            )
    return None


def _ini_from_pickled_config(conn, data, row_id):
    """Rebuild the INI text of a legacy pickled ConfigParser (such as aepsych.config.Config)."""
    value = _decode_legacy_object(conn, data, "config_data", row_id)
    state = value.state if type(value) is _PickledObject else None
    sections = _plain_mapping(state.get("_sections")) if type(state) is dict else None
    defaults = _plain_mapping(state.get("_defaults", {})) if type(state) is dict else None
    if sections is None or defaults is None:
        raise UnreadableRowError(
            "{}: config_data row {} contains a pickle of {} without the sections of a ConfigParser;"
            " load it with AEPsych if you trust the file".format(conn.path, row_id, _describe_value(value)),
            table="config_data",
            row_id=row_id,
        )
    default_section = state.get("default_section")
    if type(default_section) is not str:
        default_section = "DEFAULT"

    parser = configparser.ConfigParser(interpolation=None, default_section=default_section, allow_no_value=True)
    parser.optionxform = str
    try:
        for option, option_value in defaults.items():
            parser.set(default_section, _config_string(option), _config_value(option_value))
        for section, options in sections.items():
            options = _plain_mapping(options)
            if options is None:
                raise ValueError("section {!r} is not a mapping of options".format(section))
            parser.add_section(_config_string(section))
            for option, option_value in options.items():
                parser.set(section, _config_string(option), _config_value(option_value))
    except (ValueError, configparser.Error) as error:
        raise UnreadableRowError(
            "{}: config_data row {} contains a config that cannot be written as INI: {}".format(conn.path, row_id, error),
            table="config_data",
            row_id=row_id,
        ) from error
    buffer = io.StringIO()
    parser.write(buffer)
    return buffer.getvalue()


def _plain_mapping(value):
    """Return a dict for a decoded dict or OrderedDict record, else None."""
    if type(value) is dict:
        return value
    if type(value) is _PickledObject and value.cls == _PickledGlobal("collections", "OrderedDict"):
        items = value.dictitems
        return dict(items) if type(items) is dict else dict(items)
    return None


def _config_string(value):
    if type(value) is not str:
        raise ValueError("a section or option name is {}, not text".format(_describe_value(value)))
    return value


def _config_value(value):
    if value is None or type(value) is str:
        return value
    raise ValueError("an option value is {}, not text".format(_describe_value(value)))


# ---------------------------------------------------------------------------
# Trials: how a tell becomes rows of raw_data, param_data and outcome_data

_Trial = collections.namedtuple("_Trial", "params outcomes")


def _trial_layout(config_str):
    """Return (parnames, stimuli_per_trial) from a setup's [common] section.

    parnames is None when the config does not name the parameters; then a
    tell's own config keys, in their order, are the parameters.
    """
    parser = configparser.ConfigParser(interpolation=None, default_section=_NO_DEFAULT_SECTION)
    parser.read_string(config_str)
    if not parser.has_section("common"):
        return None, 1
    common = parser["common"]
    parnames = None
    if "parnames" in common:
        # AEPsych writes lists as [a, b] and reads them by splitting on commas.
        parnames = [name.strip() for name in common["parnames"].strip().strip("[]").split(",") if name.strip()]
    try:
        stimuli_per_trial = int(common.get("stimuli_per_trial", "1"))
    except ValueError:
        raise ValueError("[common] stimuli_per_trial is {!r}, not a whole number".format(common["stimuli_per_trial"]))
    if stimuli_per_trial < 1:
        raise ValueError("[common] stimuli_per_trial is {}, but must be at least 1".format(stimuli_per_trial))
    return parnames, stimuli_per_trial


def _is_scalar(value):
    return isinstance(value, (int, float, str))


def _describe_shape(value, depth=0):
    """Describe the shape of a JSON value in words, such as 'a list of 2 lists of 3 numbers'."""
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, dict):
        keys = ", ".join(str(key) for key in list(value)[:8])
        return "a dict with keys {}".format(keys) if keys else "an empty dict"
    if isinstance(value, list):
        if not value:
            return "an empty list"
        if depth >= 2:
            return "a list of {}".format(len(value))
        kinds = sorted({_describe_shape(item, depth + 1) for item in value[:50]})
        if len(kinds) == 1:
            return "a list of {} {}".format(len(value), _plural(kinds[0]))
        return "a list of {} ({})".format(len(value), " or ".join(kinds))
    return "a {}".format(type(value).__name__)


def _plural(description):
    """Turn 'a number' into 'numbers' and 'a list of 2 numbers' into 'lists of 2 numbers'."""
    words = description.split(" ")
    if words[0] in ("a", "an"):
        words = words[1:]
    if words[0] == "empty":
        words[1] += "s"
    else:
        words[0] += "s"
    return " ".join(words)


def _number(value, what):
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    raise ValueError("{} is {}, not a number".format(what, _describe_shape(value)))


def _trials_from_tell(message, parnames, stimuli_per_trial):
    """Split a tell's message into trials; raise ValueError that shows a shape it cannot split."""
    if not isinstance(message, dict):
        raise ValueError("the tell's message is {}, not a dict with config and outcome".format(_describe_shape(message)))
    config = message.get("config")
    if not isinstance(config, dict) or not config:
        raise ValueError("the tell's config is {}, not a dict of parameter values".format(_describe_shape(config)))
    if "outcome" not in message:
        raise ValueError("the tell has no outcome")
    names = list(config)
    if parnames:
        if sorted(parnames) != sorted(names):
            raise ValueError(
                "the tell's config has the parameters {} but the setup's [common] parnames is [{}]".format(
                    ", ".join(names), ", ".join(parnames)
                )
            )
        names = list(parnames)

    if stimuli_per_trial == 1:
        columns = {name: _single_stimulus_values(config[name], name) for name in names}
    else:
        columns = {name: _multi_stimulus_values(config[name], name, stimuli_per_trial) for name in names}
    counts = {len(values) for values in columns.values()}
    if len(counts) != 1:
        raise ValueError(
            "the tell's parameters give different numbers of trials: {}".format(
                ", ".join("{} is {}".format(name, _describe_shape(config[name])) for name in names)
            )
        )
    (count,) = counts
    outcomes = _outcomes_per_trial(message["outcome"], count, stimuli_per_trial)

    trials = []
    for index in range(count):
        params = []
        for name in names:
            value = columns[name][index]
            if stimuli_per_trial == 1:
                params.append((name, value))
            else:
                params.extend(("{}_stimuli{}".format(name, j), item) for j, item in enumerate(value))
        trials.append(_Trial(params, outcomes[index]))
    return trials


def _single_stimulus_values(value, name):
    if _is_scalar(value):
        return [value]
    if isinstance(value, list) and value and all(_is_scalar(item) for item in value):
        return value
    raise ValueError("parameter {} is {}; one stimulus per trial needs a value or a list of values".format(
        name, _describe_shape(value)))


def _multi_stimulus_values(value, name, stimuli):
    if isinstance(value, list) and len(value) == stimuli and all(_is_scalar(item) for item in value):
        return [value]
    if (
        isinstance(value, list)
        and value
        and all(isinstance(trial, list) and len(trial) == stimuli and all(_is_scalar(item) for item in trial) for trial in value)
    ):
        return value
    raise ValueError(
        "parameter {} is {}; {} stimuli per trial need a list of {} values or a list of such lists".format(
            name, _describe_shape(value), stimuli, stimuli
        )
    )


def _outcomes_per_trial(outcome, count, stimuli_per_trial):
    """Return one list of (outcome_name, value) pairs per trial."""
    if isinstance(outcome, dict):
        # A multi-outcome experiment: one row per outcome name.
        per_name = {name: _outcome_values(value, count, "outcome {}".format(name)) for name, value in outcome.items()}
        return [[(name, values[index]) for name, values in per_name.items()] for index in range(count)]
    if count == 1:
        if isinstance(outcome, list) and len(outcome) == 1 and stimuli_per_trial == 1:
            return [[("outcome", _number(outcome[0], "the outcome"))]]
        if isinstance(outcome, list) and stimuli_per_trial > 1:
            return [[("outcome_{}".format(j), _number(item, "the outcome")) for j, item in enumerate(outcome)]]
        return [[("outcome", _number(outcome, "the outcome"))]]
    if not isinstance(outcome, list) or len(outcome) != count:
        raise ValueError("the tell has {} trials but its outcome is {}".format(count, _describe_shape(outcome)))
    trials = []
    for item in outcome:
        if isinstance(item, list):
            trials.append([("outcome_{}".format(j), _number(value, "the outcome")) for j, value in enumerate(item)])
        else:
            trials.append([("outcome", _number(item, "the outcome"))])
    return trials


def _outcome_values(value, count, what):
    if isinstance(value, list):
        if len(value) != count:
            raise ValueError("{} is {} for {} trials".format(what, _describe_shape(value), count))
        return [_number(item, what) for item in value]
    if count != 1:
        raise ValueError("{} is {} for {} trials".format(what, _describe_shape(value), count))
    return [_number(value, what)]


_DEFAULT_LAYOUT = (None, 1)


def _layout_of_setup(contents):
    """Return (parnames, stimuli_per_trial) of a setup message, or the default for a setup without them."""
    message = contents.get("message") if isinstance(contents, dict) else None
    config_str = message.get("config_str") if isinstance(message, dict) else None
    if not isinstance(config_str, str):
        return _DEFAULT_LAYOUT
    try:
        return _trial_layout(config_str)
    except (configparser.Error, ValueError) as error:
        # NOTE: tells of a setup whose [common] cannot be read are split as one stimulus per trial.
        logger.warning("setup config unreadable, tells are split as one stimulus per trial: %s", error)
        return _DEFAULT_LAYOUT


def _experiment_layout(conn, master_id):
    """Return the trial layout of an experiment's latest setup, cached on the connection."""
    layout = conn.trial_layouts.get(master_id)
    if layout is None:
        row = _execute(conn, _SELECT_LATEST_SETUP, (master_id,)).fetchone()
        layout = _DEFAULT_LAYOUT
        if row is not None:
            layout = _layout_of_setup(_decode_stored(conn, row[1], "replay_data", "message_contents", row[0]))
        conn.trial_layouts[master_id] = layout
    return layout


def _prepare_trials(contents, layout, to_json=_exact_json):
    """Return (trials, model_data, extra_data JSON) of a tell, or raise ValueError naming the problem.

    to_json encodes the extra data like _exact_json; the upgrade passes a
    faster equivalent for the values it decoded itself.
    """
    message = contents.get("message") if isinstance(contents, dict) else None
    if not isinstance(message, dict):
        raise ValueError("the tell has no message dict; it is {}".format(_describe_shape(contents)))
    parnames, stimuli_per_trial = layout
    trials = _trials_from_tell(message, parnames, stimuli_per_trial)
    model_data = message.get("model_data", True)
    if not isinstance(model_data, bool):
        raise ValueError("the tell's model_data is {}, not true or false".format(_describe_shape(model_data)))
    extra = _trial_extra_data(contents, message)
    extra_text = None
    if extra:
        extra_text, reason = to_json(extra)
        if extra_text is None:
            raise ValueError("the tell's extra data cannot be stored: {}".format(reason))
    return trials, model_data, extra_text


def _write_trials(conn, master_id, tells):
    """Insert the trials of prepared tells, given as (timestamp, prepared) pairs; return how many."""
    rows = _new_trial_rows()
    for timestamp, prepared in tells:
        _add_trial_rows(rows, timestamp, prepared)
    return _insert_trial_rows(conn, master_id, rows)


# The trial rows of a batch of one experiment's tells, a list per column: a
# few lists pickle and insert faster than a tuple per row. A param or an
# outcome refers to its trial by the trial's index in the batch, because
# the raw_data ids are known only when the batch is inserted.
_TrialRows = collections.namedtuple(
    "_TrialRows",
    "timestamps model_data extra_data param_trials param_names param_values"
    " outcome_trials outcome_names outcome_values",
)


def _new_trial_rows():
    return _TrialRows(*([] for _ in _TrialRows._fields))


def _add_trial_rows(rows, timestamp, prepared):
    """Append the rows of a prepared tell to a _TrialRows."""
    trials, model_data, extra_text = prepared
    for trial in trials:
        index = len(rows.timestamps)
        rows.timestamps.append(timestamp)
        rows.model_data.append(model_data)
        rows.extra_data.append(extra_text)
        for name, value in trial.params:
            rows.param_trials.append(index)
            rows.param_names.append(name)
            rows.param_values.append(_param_text(value))
        for name, value in trial.outcomes:
            rows.outcome_trials.append(index)
            rows.outcome_names.append(name)
            rows.outcome_values.append(value)


def _insert_trial_rows(conn, master_id, rows):
    """Insert a _TrialRows, numbering its trials from max(raw_data.unique_id) + 1; return how many.

    The caller owns the write transaction, so numbering the new raw_data rows
    as SQLite itself would cannot collide.
    """
    (first_id,) = _execute(conn, _SELECT_NEXT_TRIAL_ID).fetchone()
    count = len(rows.timestamps)
    trial_ids = range(first_id, first_id + count)
    _executemany(
        conn,
        _INSERT_TRIAL,
        zip(trial_ids, rows.timestamps, rows.model_data, rows.extra_data, itertools.repeat(master_id)),
    )
    _executemany(
        conn, _INSERT_PARAM, zip(rows.param_names, rows.param_values, [first_id + i for i in rows.param_trials])
    )
    _executemany(
        conn,
        _INSERT_OUTCOME,
        zip(rows.outcome_names, rows.outcome_values, [first_id + i for i in rows.outcome_trials]),
    )
    return count


def _param_text(value):
    # param_value is text, as in AEPsych's files; repr of a float reads back exactly.
    return value if isinstance(value, str) else repr(value)


def _trial_extra_data(contents, message):
    """Collect a tell's extra_info and the message keys besides config, outcome and model_data."""
    extra = {}
    if isinstance(contents, dict) and isinstance(contents.get("extra_info"), dict):
        extra.update(contents["extra_info"])
    for key, value in message.items():
        if key not in ("config", "outcome", "model_data"):
            extra[key] = value
    return extra


# ---------------------------------------------------------------------------
# Reading trials: one dict per trial, streamed from the trial tables

# The columns every trial row starts with, before its parameters and outcomes.
TRIAL_COLUMNS = (
    "experiment_id",
    "experiment_name",
    "experiment_description",
    "participant_id",
    "timestamp",
    "model_data",
)
_EXPERIMENT_COLUMNS = TRIAL_COLUMNS[:4]

_INTEGER_TEXT = re.compile(r"[-+]?[0-9]+")
_NUMBER_TEXT = re.compile(r"[-+]?(?:[0-9]+|(?=\.[0-9]))((?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)")


def iter_trials(conn, master_id=None):
    """Yield one dict per trial of one experiment, or of every experiment, in raw_data.unique_id order.

    Each dict contains the TRIAL_COLUMNS, then the trial's parameters (numeric
    text becomes an int or a float, other text stays a str), its outcomes,
    the experiment's extra metadata keys and the trial's extra_data keys.
    Within one experiment, a key whose name an earlier column already uses
    gets its table as a prefix, such as "extra_data.timestamp", so no value
    is lost. Trials whose experiment is missing from master come with
    experiment columns of None. Before the first row, one pass of SQL over
    the trial tables collects every experiment's key names for those
    prefixes. Memory does not grow with the number of trials. A stored value
    that cannot be decoded raises UnreadableRowError.
    """
    if master_id is not None:
        _check_experiment(conn, master_id)
    master_ids = None if master_id is None else (master_id,)
    rows = _iter_trial_rows(conn, master_ids, _TrialGroups(conn))
    try:
        yield from rows
    finally:
        rows.close()


def trial_columns(conn, master_id=None):
    """Return the keys that iter_trials yields for one experiment or every experiment, in column order."""
    if master_id is not None:
        _check_experiment(conn, master_id)
    groups = _TrialGroups(conn)
    return _union_columns(groups.in_file_order(None if master_id is None else (master_id,)))


class _TrialGroup:
    """The experiment values of one group of trials and the column name of each of its keys.

    A group is one experiment, or all trials whose experiment is missing.
    ``names`` maps each table (param_data, outcome_data, extra_metadata,
    extra_data) to {key: column name}.
    """

    def __init__(self, experiment, metadata):
        self.experiment = experiment
        self.names = {table: {} for table in ("param_data", "outcome_data", "extra_metadata", "extra_data")}
        self._order = list(TRIAL_COLUMNS)
        self._taken = set(TRIAL_COLUMNS)
        self._csv_layout = None
        self.metadata = metadata

    def column(self, table, key):
        """Return the column name of a key of table, choosing one the first time the key is seen."""
        names = self.names[table]
        name = names.get(key)
        if name is not None:
            return name
        name = str(key)
        if name in self._taken:
            name = "{}.{}".format(table, key)
            number = 2
            while name in self._taken:
                name = "{}.{}.{}".format(table, key, number)
                number += 1
        self._taken.add(name)
        self._order.append(name)
        names[key] = name
        return name

    def column_names(self):
        return list(self._order)

    def csv_layout(self, column_index):
        """Return (row template, {table: {key: cell index}}) of this group for a CSV with column_index."""
        if self._csv_layout is None:
            template = [None] * len(column_index)
            for name, value in self.experiment.items():
                template[column_index[name]] = value
            indexes = {table: {key: column_index[name] for key, name in names.items()} for table, names in self.names.items()}
            for key, value in self.metadata.items():
                template[indexes["extra_metadata"][key]] = _flat_value(value)
            self._csv_layout = template, indexes
        return self._csv_layout


class _TrialGroups:
    """The _TrialGroup of each master_table_id, built when first needed."""

    def __init__(self, conn):
        self.conn = conn
        self._by_master = {}
        self._orphans = None

    def get(self, master_table_id):
        group = self._by_master.get(master_table_id)
        if group is None:
            group = self._load(master_table_id)
            self._by_master[master_table_id] = group
        return group

    def in_file_order(self, master_ids):
        """Return the groups of master_ids, or of every experiment and the orphan trials if None."""
        conn = self.conn
        if master_ids is not None:
            return [self.get(master_id) for master_id in master_ids]
        groups = [self.get(master_id) for (master_id,) in _execute(conn, _SELECT_MASTER_IDS).fetchall()]
        if _execute(conn, _SELECT_ORPHAN_TRIAL).fetchone() is not None:
            groups.append(self._orphan_group())
        return groups

    def _load(self, master_table_id):
        conn = self.conn
        row = None
        if master_table_id is not None:
            row = _execute(conn, _SELECT_MASTER_ROW, (master_table_id,)).fetchone()
        if row is None:
            return self._orphan_group()
        unique_id = row[0]
        experiment = dict(zip(_EXPERIMENT_COLUMNS, row[1:5]))
        metadata = _stored_mapping(conn, row[5], "master", "extra_metadata", unique_id)
        group = _TrialGroup(experiment, metadata)
        _add_trial_names(conn, group, _EXPERIMENT_NAME_QUERIES, (unique_id,))
        return group

    def _orphan_group(self):
        if self._orphans is None:
            if _execute(self.conn, _SELECT_ORPHAN_TRIAL).fetchone() is not None:
                logger.warning(
                    "%s: raw_data has trials whose experiment is missing from master;"
                    " they are read with empty experiment columns",
                    self.conn.path,
                )
            self._orphans = _TrialGroup(dict.fromkeys(_EXPERIMENT_COLUMNS), {})
            _add_trial_names(self.conn, self._orphans, _ORPHAN_NAME_QUERIES, ())
        return self._orphans


def _add_trial_names(conn, group, queries, parameters):
    """Give a column to every parameter, outcome, extra metadata and extra_data key of a group.

    Parameters, outcomes and extra_data keys come in order of first use.
    """
    for (name,) in _execute(conn, queries.params, parameters).fetchall():
        group.column("param_data", name)
    for (name,) in _execute(conn, queries.outcomes, parameters).fetchall():
        group.column("outcome_data", name)
    for key in group.metadata:
        group.column("extra_metadata", key)
    # NOTE: json_each needs SQLite's JSON functions, built in from SQLite 3.38 on; an older SQLite compiled without them fails here.
    for (key,) in _execute(conn, queries.extra_keys, parameters).fetchall():
        group.column("extra_data", key)
    # Legacy files can hold a pickle in every row, so these rows are not fetched all at once.
    cursor = _execute(conn, queries.extra_other, parameters)
    try:
        for row_id, raw in cursor:
            for key in _stored_mapping(conn, raw, "raw_data", "extra_data", row_id):
                group.column("extra_data", key)
    except sqlite3.Error as error:
        raise _translate_error(conn, error) from error
    finally:
        cursor.close()


def _union_columns(groups):
    """Return the columns of several groups: TRIAL_COLUMNS, then every parameter, outcome and extra key.

    Parameters of all groups come before any outcome, and outcomes before
    the extra metadata and extra_data keys, so a CSV of several experiments
    keeps the same order as a CSV of one.
    """
    groups = list(groups)
    columns = dict.fromkeys(TRIAL_COLUMNS)
    for table in ("param_data", "outcome_data", "extra_metadata", "extra_data"):
        for group in groups:
            for name in group.names[table].values():
                columns.setdefault(name, None)
    return list(columns)


def _merged_trials(conn, master_ids):
    """Yield (raw_data row, its param_data rows, its outcome_data rows) for master_ids (None: every trial).

    The three tables are read in raw_data.unique_id order and merged, so
    nothing is sorted and memory does not grow with the number of trials.
    """
    if master_ids is not None and len(master_ids) == 1:
        parameters = (master_ids[0],)
        trials = _execute(conn, _SELECT_EXPERIMENT_TRIALS, parameters)
        params = _execute(conn, _SELECT_EXPERIMENT_PARAMS, parameters)
        outcomes = _execute(conn, _SELECT_EXPERIMENT_OUTCOMES, parameters)
        wanted = None
    else:
        trials = _execute(conn, _SELECT_TRIALS)
        params = _execute(conn, _SELECT_TRIAL_PARAMS)
        outcomes = _execute(conn, _SELECT_TRIAL_OUTCOMES)
        wanted = None if master_ids is None else set(master_ids)

    # The three statements are open together from here on, so they read one
    # snapshot of the file: SQLite keeps a read transaction while any is active.
    try:
        param = next(params, None)
        outcome = next(outcomes, None)
        for trial in trials:
            trial_id = trial[0]
            trial_params = []
            while param is not None and param[0] <= trial_id:
                if param[0] == trial_id:
                    trial_params.append(param)
                param = next(params, None)
            trial_outcomes = []
            while outcome is not None and outcome[0] <= trial_id:
                if outcome[0] == trial_id:
                    trial_outcomes.append(outcome)
                outcome = next(outcomes, None)
            if wanted is None or trial[4] in wanted:
                yield trial, trial_params, trial_outcomes
    except sqlite3.Error as error:
        raise _translate_error(conn, error) from error
    finally:
        trials.close()
        params.close()
        outcomes.close()


def _iter_trial_rows(conn, master_ids, groups):
    """Yield the trial dicts of iter_trials."""
    for (trial_id, timestamp, model_data, extra_raw, master_table_id), params, outcomes in _merged_trials(
        conn, master_ids
    ):
        group = groups.get(master_table_id)
        row = dict(group.experiment)
        row["timestamp"] = timestamp
        row["model_data"] = None if model_data is None else bool(model_data)
        names = group.names["param_data"]
        for _, name, value in params:
            row[names.get(name) or group.column("param_data", name)] = _number_or_text(value)
        names = group.names["outcome_data"]
        for _, name, value in outcomes:
            row[names.get(name) or group.column("outcome_data", name)] = value
        if group.metadata:
            names = group.names["extra_metadata"]
            for key, value in group.metadata.items():
                row[names[key]] = value
        if extra_raw is not None:
            names = group.names["extra_data"]
            for key, value in _extra_data(conn, extra_raw, trial_id).items():
                row[names.get(key) or group.column("extra_data", key)] = value
        yield row


def _iter_csv_rows(conn, master_ids, groups, columns):
    """Yield one list of CSV cells per trial, in the order of columns.

    Parameter values stay the text they are stored as. Dict and list values
    become JSON text.
    """
    column_index = {name: index for index, name in enumerate(columns)}
    for (trial_id, timestamp, model_data, extra_raw, master_table_id), params, outcomes in _merged_trials(
        conn, master_ids
    ):
        group = groups.get(master_table_id)
        try:
            template, indexes = group.csv_layout(column_index)
            cells = template[:]
            cells[4] = timestamp
            cells[5] = None if model_data is None else bool(model_data)
            index = indexes["param_data"]
            for _, name, value in params:
                cells[index[name]] = value
            index = indexes["outcome_data"]
            for _, name, value in outcomes:
                cells[index[name]] = value
            if extra_raw is not None:
                index = indexes["extra_data"]
                for key, value in _extra_data(conn, extra_raw, trial_id).items():
                    cells[index[key]] = _flat_value(value)
        except KeyError as error:
            # Cannot happen inside one read transaction, since the columns
            # come from the same snapshot; checked so that no value is dropped.
            raise StoreError(
                "{}: raw_data row {} has the key {} that the CSV header lacks; run the export again".format(
                    conn.path, trial_id, error
                )
            ) from error
        yield cells


def _extra_data(conn, raw, row_id):
    """Decode one raw_data.extra_data value into a dict, with a fast path for JSON object text."""
    if type(raw) is str:
        try:
            value = _JSON_DECODER.decode(raw)
        except ValueError:
            value = None
        if type(value) is dict:
            return value
    return _stored_mapping(conn, raw, "raw_data", "extra_data", row_id)


def _number_or_text(value):
    """Return numeric text as an int or a float, and any other value as it is."""
    if type(value) is str:
        match = _NUMBER_TEXT.fullmatch(value)
        if match is not None:
            try:
                # Group 1 is a fraction or an exponent, which makes the text a float.
                return float(value) if match.group(1) else int(value)
            except ValueError:
                # int() of more than 4300 digits raises on Python 3.11 and later.
                return value
    return value


def _flat_value(value):
    """Return a dict or list as JSON text for a CSV cell, and any other value as it is."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=repr)
    return value


def _stored_mapping(conn, raw, table, column, row_id):
    """Decode a stored JSON object into a dict; a NULL is an empty dict.

    AEPsych 0.8 stored the JSON text of extra_data inside a pickle, so a
    decoded str is read as JSON once more.
    """
    value = _decode_stored(conn, raw, table, column, row_id)
    if type(value) is str:
        try:
            value = _JSON_DECODER.decode(value)
        except ValueError as error:
            raise UnreadableRowError(
                "{}: {} row {} has a {} that is neither a JSON object nor a pickle of one: {}".format(
                    conn.path, table, row_id, column, error
                ),
                table=table,
                row_id=row_id,
            ) from error
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UnreadableRowError(
            "{}: {} row {} has a {} that is {}, not a JSON object; set it to a JSON object or NULL".format(
                conn.path, table, row_id, column, _describe_shape(value)
            ),
            table=table,
            row_id=row_id,
        )
    return value


@contextlib.contextmanager
def _read_snapshot(conn):
    """Read the block's queries from one snapshot of the file, unless the caller has a transaction open."""
    if conn.in_transaction:
        yield
        return
    _execute(conn, "BEGIN")
    try:
        yield
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


# ---------------------------------------------------------------------------
# Summaries and CSV export


def summarize_experiments(conn):
    """Return an ExperimentSummary per experiment, in master order.

    created and last_modified are the timestamps of its first and last
    message. stimuli_per_trial comes from its latest setup (1 without one).
    parameters and outcomes are the names in its trial rows, in order of
    first use.
    """
    summaries = []
    with _read_snapshot(conn):
        for experiment in list_experiments(conn):
            unique_id = experiment.unique_id
            metadata = _as_mapping(conn, experiment.extra_metadata, "master", "extra_metadata", unique_id)
            queries = _EXPERIMENT_NAME_QUERIES
            parameters = [name for (name,) in _execute(conn, queries.params, (unique_id,)).fetchall()]
            outcomes = [name for (name,) in _execute(conn, queries.outcomes, (unique_id,)).fetchall()]
            (trial_count,) = _execute(conn, _COUNT_EXPERIMENT_TRIALS, (unique_id,)).fetchone()
            summaries.append(
                ExperimentSummary(
                    unique_id=unique_id,
                    experiment_id=experiment.experiment_id,
                    experiment_name=experiment.experiment_name,
                    experiment_description=experiment.experiment_description,
                    participant_id=experiment.participant_id,
                    extra_metadata_keys=[str(key) for key in metadata],
                    message_count=experiment.message_count,
                    created=experiment.first_timestamp,
                    last_modified=experiment.last_timestamp,
                    stimuli_per_trial=_experiment_layout(conn, unique_id)[1],
                    parameters=parameters,
                    outcomes=outcomes,
                    trial_count=trial_count,
                )
            )
    return summaries


def _as_mapping(conn, value, table, column, row_id):
    """Return an already decoded JSON object as a dict, reading a str as JSON text as _stored_mapping does."""
    if type(value) is str:
        return _stored_mapping(conn, value, table, column, row_id)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UnreadableRowError(
            "{}: {} row {} has a {} that is {}, not a JSON object; set it to a JSON object or NULL".format(
                conn.path, table, row_id, column, _describe_shape(value)
            ),
            table=table,
            row_id=row_id,
        )
    return value


def find_experiments(conn, identifier):
    """Return the master unique_ids of the experiments that identifier names.

    identifier is matched against master.experiment_id first, which may
    name several setups of one experiment. When no experiment_id matches
    and identifier is a whole number, it is taken as a master unique_id.
    """
    identifier = str(identifier)
    found = [row[0] for row in _execute(conn, _SELECT_MASTERS_BY_EXPERIMENT_ID, (identifier,)).fetchall()]
    if not found and _INTEGER_TEXT.fullmatch(identifier.strip()):
        if _execute(conn, _SELECT_MASTER_EXISTS, (int(identifier),)).fetchone() is not None:
            found = [int(identifier)]
    if not found:
        raise StoreError(
            "{}: no experiment has experiment_id or unique_id {!r}; list them with:"
            " python -m aepsych_store --summarize {}".format(conn.path, identifier, conn.source_path or conn.path)
        )
    return found


def export_trials_csv(conn, path, master_ids=None):
    """Write one CSV row per trial to path and return the number of trials written.

    The header row contains the keys of iter_trials, collected with SQL before
    the trials are streamed, so memory does not grow with the number of
    trials. master_ids selects experiments (None: every trial). Dict and
    list values are written as JSON text, None as an empty cell. The rows go
    to PATH.partial first, which is renamed to path at the end, so a failed
    export leaves no partial file behind.
    """
    path = os.fspath(path)
    for source in (conn.source_path, _main_file(conn)):
        if source and _same_file(path, source):
            raise StoreError(
                "{}: is the database being exported; choose another name for the CSV file".format(path)
            )
    partial = path + ".partial"
    count = 0
    with _read_snapshot(conn):
        groups = _TrialGroups(conn)
        columns = _union_columns(groups.in_file_order(master_ids))
        try:
            with open(partial, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(columns)
                for cells in _iter_csv_rows(conn, master_ids, groups, columns):
                    writer.writerow(cells)
                    count += 1
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        except OSError as error:
            _remove_quietly(partial)
            raise StoreError(
                "{}: cannot write the CSV file: {}; check that its folder exists and that you may write there".format(
                    path, error.strerror or error
                )
            ) from error
        except BaseException:
            _remove_quietly(partial)
            raise
    logger.info("%s: wrote %d trials to %s", conn.path, count, path)
    return count


def _main_file(conn):
    """Return the path of the file that conn reads, or None for an in-memory database."""
    for _, name, file_name in _execute(conn, "PRAGMA database_list").fetchall():
        if name == "main":
            return file_name or None
    return None


def _same_file(first, second):
    """Tell whether two paths name the same file; a path that does not exist is compared by name."""
    try:
        return os.path.samefile(first, second)
    except OSError:
        return os.path.normcase(os.path.realpath(first)) == os.path.normcase(os.path.realpath(second))


# ---------------------------------------------------------------------------
# Combining files


def combine_file(conn, source_path, *, timeout=10.0):
    """Copy every experiment of the file at source_path into conn's database; return a CombineResult.

    Each experiment gets new unique_ids, and every row that refers to it
    (messages, strategies, configs, trials with their parameters and
    outcomes) is copied as stored, in its order. Its extra_metadata records
    the source as "origin_db" (the file's real absolute path) and
    "origin_master_id" (its unique_id there), unless it already has both
    from an earlier combine. An experiment whose origin is already in the
    output is not copied again, so rerunning a combine adds nothing.

    The source is opened read-only and never changes; a file at an older
    schema version is read from an upgraded temporary copy. All of one
    source's experiments are written in one transaction.
    """
    _check_writable(conn)
    source_path = os.fspath(source_path)
    output = _main_file(conn)
    if output and _same_file(source_path, output):
        raise StoreError("{}: is the output file itself; a file cannot be combined into itself".format(source_path))
    origin = os.path.realpath(source_path)

    source = connect(source_path, read_only=True, upgrade=True, timeout=timeout)
    try:
        source_file = _main_file(source)
        if source_file is None:
            raise StoreError("{}: cannot find the file behind the connection".format(source_path))
        _execute(conn, "ATTACH DATABASE ? AS combine_source", (_file_uri(source_file, "ro"),))
        try:
            with _transaction(conn):
                result = _copy_experiments(conn, source, origin)
        finally:
            _execute(conn, "DETACH DATABASE combine_source")
    finally:
        source.close()
    logger.info(
        "%s: copied %d experiments from %s, %d already present",
        conn.path, len(result.copied), source_path, len(result.already_present),
    )
    return result


def _copy_experiments(conn, source, origin):
    """Copy the experiments of the attached combine_source; the caller owns the transaction."""
    present, fingerprints = _output_origins(conn)
    result = CombineResult([], [], [])
    for row in _execute(conn, _SELECT_SOURCE_EXPERIMENTS).fetchall():
        old_id, name, description, experiment_id, participant_id, metadata_raw, message_count, first, last = row
        fingerprint = (experiment_id, message_count, first, last)
        if message_count and fingerprint in fingerprints:
            # The same recorded session, reached through another copy of its file.
            result.already_present.append((old_id, fingerprints[fingerprint]))
            continue
        try:
            metadata = dict(_stored_mapping(source, metadata_raw, "master", "extra_metadata", old_id))
        except UnreadableRowError as error:
            result.skipped.append((old_id, str(error)))
            logger.warning("%s; experiment %d not copied", error, old_id)
            continue
        if "origin_db" not in metadata or "origin_master_id" not in metadata:
            metadata["origin_db"] = origin
            metadata["origin_master_id"] = old_id
        key = _origin_key(metadata)

        if key in present:
            output_id, output_count = present[key]
            if output_count != message_count:
                logger.warning(
                    "%s: experiment %d has %d messages but its copy, experiment %d of %s, has %d;"
                    " it is not copied again (combine into a new file to get the current version)",
                    source.source_path, old_id, message_count, output_id, conn.path, output_count,
                )
            result.already_present.append((old_id, output_id))
            continue
        metadata_text, reason = _exact_json(metadata)
        if metadata_text is None:
            message = "{}: master row {} has extra_metadata that JSON cannot hold: {}".format(
                source.source_path, old_id, reason
            )
            result.skipped.append((old_id, message))
            logger.warning("%s; experiment %d not copied", message, old_id)
            continue

        new_id = _execute(
            conn, _INSERT_MASTER, (name, description, experiment_id, participant_id, metadata_text)
        ).lastrowid
        _copy_experiment_rows(conn, old_id, new_id)
        present[key] = (new_id, message_count)
        fingerprints[fingerprint] = new_id
        result.copied.append((old_id, new_id))
    return result


def _output_origins(conn):
    """Index the output's experiments by origin and by fingerprint.

    Return a dict of (origin_db, origin_master_id) to (unique_id, message
    count), and a dict of fingerprint to unique_id.
    """
    origins = {}
    fingerprints = {}
    for unique_id, metadata_raw, message_count, experiment_id, first, last in _execute(
        conn, _SELECT_OUTPUT_ORIGINS
    ).fetchall():
        fingerprints.setdefault((experiment_id, message_count, first, last), unique_id)
        try:
            metadata = _stored_mapping(conn, metadata_raw, "master", "extra_metadata", unique_id)
        except UnreadableRowError:
            continue  # a row this store did not write, so not a copy made by combine_file
        if "origin_db" in metadata and "origin_master_id" in metadata:
            origins.setdefault(_origin_key(metadata), (unique_id, message_count))
    return origins, fingerprints


def _origin_key(metadata):
    # str() makes any JSON value usable as a dict key.
    return str(metadata["origin_db"]), str(metadata["origin_master_id"])


def _copy_experiment_rows(conn, old_id, new_id):
    """Copy the rows that refer to one source experiment, shifting ids past the output's largest."""
    raw_shift = None
    for table, range_sql, insert_sql in _COPY_EXPERIMENT_TABLES:
        shift = _id_shift(conn, table, range_sql, old_id)
        if shift is None:
            continue
        _execute(conn, insert_sql, (shift, new_id, old_id))
        if table == "raw_data":
            raw_shift = shift
    if raw_shift is None:
        return
    for table, range_sql, insert_sql in _COPY_TRIAL_TABLES:
        shift = _id_shift(conn, table, range_sql, old_id)
        if shift is not None:
            _execute(conn, insert_sql, (shift, raw_shift, old_id))


def _id_shift(conn, table, range_sql, old_id):
    """Return what to add to source ids so they follow the output's largest id, or None for no rows."""
    first, last = _execute(conn, range_sql, (old_id,)).fetchone()
    if first is None:
        return None
    (largest,) = _execute(conn, _SELECT_MAX_ID.format(table)).fetchone()
    shift = (0 if largest is None else largest) + 1 - first
    if last + shift > _MAX_ROWID:
        raise StoreError(
            "{}: copying would push {}.unique_id past SQLite's largest rowid; combine into a new file".format(
                conn.path, table
            )
        )
    return shift


# ---------------------------------------------------------------------------
# Command line


# Exit status of the command line. argparse exits with 2 for a wrong command line.
EXIT_OK = 0
EXIT_ERROR = 1
# Some rows (--update) or some inputs (--combine) could not be read; the rest was done.
EXIT_SKIPPED = 3
# As a shell reports a program stopped by SIGINT: 128 + 2.
EXIT_INTERRUPTED = 130

_COMBINE_SUFFIXES = (".db", ".sqlite")
_SUMMARY_DESCRIPTION_WIDTH = 40


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m aepsych_store",
        description="Upgrade, inspect, export and combine AEPsych experiment databases (SQLite files).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Exit status:\n"
            "  0  success\n"
            "  1  a file could not be used; the message on stderr explains why, and the\n"
            "     file is unchanged\n"
            "  2  a wrong command line\n"
            "  3  --update finished but some rows could not be read (they are listed\n"
            "     and kept byte for byte), or --combine skipped an input file or an\n"
            "     experiment it could not read (each is named on stderr) and copied\n"
            "     everything else\n"
            "  130  interrupted (Ctrl-C); --update leaves the file at a complete\n"
            "     schema version, and running it again finishes the upgrade\n"
            "\n"
            "Read-only commands (--summarize, --tocsv, and --combine on its inputs)\n"
            "never write to the files they read; an old file is read from an upgraded\n"
            "temporary copy."
        ),
    )

    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument(
        "--update",
        action="store_true",
        help="upgrade the database in place to schema version {}, after copying it to"
        " DB.vN.bak (N is its old version)".format(SCHEMA_VERSION),
    )
    action.add_argument(
        "--summarize",
        action="store_true",
        help="print one row per experiment: ids, name, description, participant, extra metadata"
        " keys, message count, first and last message time, stimuli per trial, parameter and"
        " outcome names, trial count (long descriptions are shortened; --json prints them whole)",
    )
    action.add_argument(
        "--tocsv",
        metavar="OUT.csv",
        help="write one CSV row per trial of DB to OUT.csv: experiment columns, timestamp,"
        " model_data, parameters, outcomes, extra metadata and extra_data keys",
    )
    action.add_argument(
        "--combine",
        metavar="OUT.sqlite",
        help="copy every experiment of the input files (IN... after it: files, or folders searched"
        " with their subfolders for *.db and *.sqlite) into OUT.sqlite, created if missing;"
        " rerunning adds nothing twice",
    )

    parser.add_argument("paths", nargs="*", metavar="DB", help="the database file (with --combine: IN...)")
    parser.add_argument("--db", dest="db_option", metavar="DB", help="the database file (same as DB)")
    parser.add_argument("--no-backup", action="store_true", help="with --update, skip the backup copy")

    parser.add_argument(
        "--json", action="store_true", help="with --summarize, print a JSON list of objects instead of a table"
    )
    parser.add_argument(
        "--experiment",
        metavar="ID",
        help="with --tocsv, export only this experiment: an experiment_id (all setups that share it)"
        " or, when no experiment_id matches, a master unique_id as --summarize lists it",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATH",
        help="with --combine, skip this file, or every file under this folder (repeatable)",
    )

    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for another process's lock on the file (default: 10)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step to stderr")
    parser.add_argument("--version", action="version", version="aepsych_store " + __version__)
    return parser


def _check_command_line(parser, args):
    """Exit with status 2 on options that do not fit the action; return the database path or the inputs."""
    if args.json and not args.summarize:
        parser.error("--json works only with --summarize")
    if args.experiment is not None and not args.tocsv:
        parser.error("--experiment works only with --tocsv")
    if args.exclude and not args.combine:
        parser.error("--exclude works only with --combine")
    if args.no_backup and not args.update:
        parser.error("--no-backup works only with --update")

    if args.combine:
        if args.db_option:
            parser.error("--combine takes its inputs after OUT.sqlite, not with --db")
        if not args.paths:
            parser.error("the input files are missing: give them after --combine OUT.sqlite")
        for path in args.paths:
            if _same_file(path, args.combine):
                parser.error("{} is the output of --combine and cannot be one of its inputs".format(path))
        return args.paths

    if len(args.paths) > 1:
        parser.error("give one database file, not {}".format(len(args.paths)))
    db = args.paths[0] if args.paths else None
    if db and args.db_option and db != args.db_option:
        parser.error("give the database once, as DB or as --db DB")
    db = db or args.db_option
    if not db:
        parser.error("the database file is missing: give it as DB or --db DB")
    return db


def _seconds(text):
    """Parse a --timeout value: a finite number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("{!r} is not a number of seconds".format(text))
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError("{!r} must be a finite number of seconds, 0 or more".format(text))
    return value


def main(argv=None):
    """Run the command line and return its exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    target = _check_command_line(parser, args)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
    )

    progress = None
    try:
        if args.update:
            progress = _TerminalProgress(target) if sys.stderr.isatty() else None
            report = upgrade_file(target, backup=not args.no_backup, timeout=args.timeout, progress=progress)
            if progress is not None:
                progress.finish()
            return _print_upgrade(report)
        elif args.summarize:
            _print_summary(target, args.timeout, args.json)
        elif args.tocsv:
            _write_csv(target, args.tocsv, args.experiment, args.timeout)
        else:
            return _combine(args.combine, target, args.exclude, args.timeout)
    except StoreError as error:
        print("aepsych_store: error: {}".format(error), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if progress is not None:
            progress.finish()
        print("aepsych_store: interrupted; {}".format(_state_after_interrupt(args, target)), file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


def _state_after_interrupt(args, target):
    """Say in words where an interrupted command left its file."""
    if not args.update:
        return "the files it read are unchanged"
    try:
        conn = sqlite3.connect(Path(target).absolute().as_uri() + "?mode=ro", uri=True)
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return "run --update again to finish the upgrade"
    # The step that was running rolled back, so the file is at a complete version.
    return "{} is at schema version {}, complete; run --update again to finish the upgrade".format(target, version)


def _print_upgrade(report):
    """Print an upgrade report and return the exit status it calls for."""
    if report.old_version == report.new_version:
        print("{}: already at schema version {}; nothing to do".format(report.path, report.new_version))
        return EXIT_OK
    print("{}: upgraded from schema version {} to {}".format(report.path, report.old_version, report.new_version))
    if report.backup_path:
        print("backup of the old file: {}".format(report.backup_path))
    else:
        print("no backup made (--no-backup)")
    for change in report.changes:
        print("  " + change)
    for heading, rows in (
        ("kept as pickles, because JSON cannot hold them exactly", report.kept_as_pickle),
        ("unreadable, kept byte for byte", report.unreadable),
    ):
        for (table, column, reason), ids in _group_rows(rows):
            print("  {} {}.{} {}: rows {} ({})".format(
                len(ids), table, column, heading, ", ".join(str(i) for i in ids), reason))
    for unique_id, reason in report.skipped_tells:
        print("  replay_data row {}: tell not split into trials: {}".format(unique_id, reason))
    if report.unreadable:
        print(
            "{}: {} rows could not be read; they are listed above and kept as they were".format(
                report.path, len(report.unreadable)
            ),
            file=sys.stderr,
        )
        return EXIT_SKIPPED
    return EXIT_OK


def _group_rows(rows):
    """Group (table, column, row id, reason) tuples by everything but the row id."""
    groups = collections.OrderedDict()
    for table, column, unique_id, reason in rows:
        # A reason names its row; drop that so equal problems group together.
        reason = reason.replace("{} row {}".format(table, unique_id), "{} row".format(table))
        groups.setdefault((table, column, reason), []).append(unique_id)
    return groups.items()


class _TerminalProgress:
    """Show an upgrade's rows done, rate and estimated time left on a terminal's stderr."""

    def __init__(self, path):
        self.started = _monotonic()
        self.shown = 0.0
        self.total = None
        self.path = path

    def __call__(self, rows_done):
        now = _monotonic()
        if now - self.shown < 0.5:
            return
        self.shown = now
        if self.total is None:
            self.total = _estimate_upgrade_rows(self.path)
        rate = rows_done / max(now - self.started, 1e-9)
        left = max(self.total - rows_done, 0) / rate if rate and self.total else 0
        sys.stderr.write("\r{:,} rows, {:,.0f} rows/s, about {:.0f} s left   ".format(rows_done, rate, left))
        sys.stderr.flush()

    def finish(self):
        if self.shown:
            sys.stderr.write("\n")


def _estimate_upgrade_rows(path):
    """Estimate how many rows an upgrade reads: each message once per data step."""
    try:
        conn = sqlite3.connect(Path(path).absolute().as_uri() + "?mode=ro", uri=True)
        try:
            (count,) = conn.execute("SELECT count(*) FROM replay_data").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    # NOTE: an estimate: step 2 reads every pickled message and step 3 every tell, about half of them.
    return count + count // 2


def _print_summary(db, timeout, as_json):
    conn = connect(db, read_only=True, upgrade=True, timeout=timeout)
    try:
        summaries = summarize_experiments(conn)
    finally:
        conn.close()
    if as_json:
        print(json.dumps([summary._asdict() for summary in summaries], indent=2, ensure_ascii=False))
        return

    header = (
        "id", "experiment_id", "name", "description", "participant", "metadata keys", "messages",
        "created", "last modified", "stimuli", "parameters", "outcomes", "trials",
    )
    rows = [header]
    for summary in summaries:
        description = summary.experiment_description
        if description is not None and len(description) > _SUMMARY_DESCRIPTION_WIDTH:
            description = description[: _SUMMARY_DESCRIPTION_WIDTH - 3] + "..."
        values = (
            summary.unique_id,
            summary.experiment_id,
            summary.experiment_name,
            description,
            summary.participant_id,
            ", ".join(summary.extra_metadata_keys),
            summary.message_count,
            summary.created,
            summary.last_modified,
            summary.stimuli_per_trial,
            ", ".join(str(name) for name in summary.parameters),
            ", ".join(str(name) for name in summary.outcomes),
            summary.trial_count,
        )
        # A line break inside a value would break the table's alignment.
        rows.append(tuple("" if value is None else " ".join(str(value).splitlines()) for value in values))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if not summaries:
        print("(no experiments)")


def _write_csv(db, out, experiment, timeout):
    if os.path.exists(db) and _same_file(out, db):
        raise StoreError("{}: is the database itself; choose another name for the CSV file".format(out))
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise StoreError("{}: the folder {} does not exist; create it or choose another path".format(out, folder))
    if os.path.isdir(out):
        raise StoreError("{}: is a folder; give the path of the CSV file to write".format(out))
    if _is_sqlite_file(out):
        raise StoreError(
            "{}: is a SQLite database, and --tocsv would overwrite it with CSV; the command"
            " is --tocsv OUT.csv DB, so check the order of the two paths".format(out)
        )

    conn = connect(db, read_only=True, upgrade=True, timeout=timeout)
    try:
        master_ids = None if experiment is None else find_experiments(conn, experiment)
        count = export_trials_csv(conn, out, master_ids)
    finally:
        conn.close()
    print("{}: wrote {} {} from {}".format(out, count, "trial" if count == 1 else "trials", db))


def _combine(out, inputs, excludes, timeout):
    files, skipped = _combine_inputs(inputs, excludes, out)
    if not files and not skipped:
        raise StoreError(
            "no *.db or *.sqlite file found in {}; check the paths".format(", ".join(inputs))
        )
    conn = connect(out, timeout=timeout)
    try:
        for path in files:
            try:
                result = combine_file(conn, path, timeout=timeout)
            except StoreError as error:
                _print_skipped(path, error)
                skipped += 1
                continue
            print(
                "{}: experiments copied into {}: {}, already there: {}".format(
                    path, out, len(result.copied), len(result.already_present)
                )
            )
            for old_id, reason in result.skipped:
                _print_skipped(path, "experiment {} not copied: {}".format(old_id, _without_prefix(reason, path)))
                skipped += 1
    finally:
        conn.close()
    return EXIT_SKIPPED if skipped else EXIT_OK


def _print_skipped(path, reason):
    print("aepsych_store: skipped {}: {}".format(path, _without_prefix(reason, path)), file=sys.stderr)


def _without_prefix(reason, path):
    # Most error messages start with the file name already.
    reason = str(reason)
    prefix = "{}: ".format(path)
    return reason[len(prefix):] if reason.startswith(prefix) else reason


def _combine_inputs(inputs, excludes, out):
    """Expand the inputs of --combine into database files; return them and the number of missing inputs.

    A folder contributes its *.db and *.sqlite files and those of its
    subfolders, in name order. Files under an --exclude path, the output
    file, and files already listed are left out.
    """
    excluded = [os.path.realpath(path) for path in excludes]

    def is_excluded(path):
        real = os.path.realpath(path)
        if _same_file(real, out):
            return True
        return any(real == item or real.startswith(item.rstrip(os.sep) + os.sep) for item in excluded)

    files = []
    seen = set()
    missing = 0
    for path in inputs:
        if os.path.isdir(path):
            found = []
            for folder, subfolders, names in os.walk(path):
                subfolders.sort()
                found.extend(
                    os.path.join(folder, name)
                    for name in sorted(names)
                    if name.lower().endswith(_COMBINE_SUFFIXES)
                )
        elif os.path.exists(path):
            found = [path]
        else:
            _print_skipped(path, "file not found")
            missing += 1
            continue
        for candidate in found:
            real = os.path.realpath(candidate)
            if real in seen or is_excluded(candidate):
                continue
            seen.add(real)
            files.append(candidate)
    return files, missing


if __name__ == "__main__":
    sys.exit(main())
