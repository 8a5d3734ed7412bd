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
import datetime
import io
import json
import logging
import math
import os
import shutil
import sqlite3
import struct
import sys
import sysconfig
import tempfile
import uuid
import weakref
from pathlib import Path

__version__ = "0.1.0"

#: The schema version this module writes and reads, kept in PRAGMA user_version.
SCHEMA_VERSION = 1

logger = logging.getLogger(__name__)

_TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
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
_SELECT_USER_TABLES = (
    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
)

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


class UpgradeReport:
    """What an upgrade of one file did: versions, backup and the changes per step."""

    def __init__(self, path, old_version, new_version, backup_path=None, changes=()):
        self.path = path
        self.old_version = old_version
        self.new_version = new_version
        self.backup_path = backup_path
        self.changes = list(changes)

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
    mode = "ro" if read_only else ("rwc" if create else "rw")
    conn = _open(path, mode, timeout)
    try:
        version = _check_version(conn)
        if version == 0 and not _user_tables(conn):
            if read_only or not create:
                raise StoreError(
                    "{}: the file is an empty database, not an aepsych_store database;"
                    " open it with read_only=False and create=True to make it a new one".format(path)
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


def _open(path, mode, timeout):
    uri = Path(path).absolute().as_uri() + "?mode=" + mode
    if mode == "ro" and _is_idle_wal_file(path):
        # A reader of a WAL file makes PATH-wal and PATH-shm unless they
        # exist. With no PATH-wal, no writer has the file open, so every
        # committed page is in the file itself and it can be read as immutable.
        # NOTE: a writer that opens the file while this reader is open is not seen, and its checkpoint could change pages under the reader.
        uri += "&immutable=1"
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
    conn.read_only = mode == "ro"
    _execute(conn, "PRAGMA foreign_keys = ON")
    return conn


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


def _translate_error(conn, error):
    text = str(error)
    path = getattr(conn, "path", "?")
    if "database is locked" in text or "database table is locked" in text:
        return StoreError(
            "{}: the database is locked by another process; close the program using it"
            " or retry with a longer timeout".format(path)
        )
    if "file is not a database" in text:
        return StoreError("{}: not a SQLite database file; check the path".format(path))
    if "malformed" in text or "disk image" in text:
        return StoreError(
            "{}: the database file is damaged ({}); restore it from a backup".format(path, text)
        )
    if "readonly" in text or "read-only" in text:
        return StoreError(
            "{}: cannot write: {}; open it without read_only, or check the file's permissions".format(
                path, text
            )
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


def _upgrade_to_1(conn):
    """Rebuild AEPsych's tables in the version 1 layout: add missing columns, drop UNIQUE."""
    layout = _legacy_layout(conn)
    changes = []

    # SQLite cannot drop a constraint in place, so each table is renamed,
    # created anew and refilled. legacy_alter_table keeps the rename from
    # rewriting other tables' REFERENCES master clauses to the old name.
    extra_objects = _execute(
        conn,
        "SELECT name, sql FROM sqlite_master WHERE type IN ('index', 'trigger')"
        " AND sql IS NOT NULL AND tbl_name IN ('master', 'replay_data', 'strat_data', 'config_data')",
    ).fetchall()
    unique_columns = {table: _unique_constraints(conn, table) for table in layout}
    _execute(conn, "PRAGMA legacy_alter_table = ON")
    for table in layout:
        _execute(conn, "ALTER TABLE {0} RENAME TO _aepsych_store_old_{0}".format(table))

    for table, create_sql in _V1_TABLES.items():
        _execute(conn, create_sql)
        if table not in layout:
            changes.append("{}: created the missing table".format(table))
            continue
        old_columns = layout[table]
        column_list = ", ".join(old_columns)
        _execute(
            conn,
            "INSERT INTO {0} ({1}) SELECT {1} FROM _aepsych_store_old_{0}".format(table, column_list),
        )
        _execute(conn, "DROP TABLE _aepsych_store_old_{}".format(table))
        added = [c for c in _LEGACY_OPTIONAL_COLUMNS[table] if c not in old_columns]
        if table == "strat_data":
            added.append("strat_format")
        if added:
            changes.append("{}: added column {}".format(table, ", ".join(added)))
        for columns in unique_columns[table]:
            changes.append("{}: removed UNIQUE ({})".format(table, ", ".join(columns)))
    _execute(conn, "PRAGMA legacy_alter_table = OFF")

    for statement in _V1_INDEXES:
        _execute(conn, statement)
    for name, sql in extra_objects:
        _execute(conn, sql)
        changes.append("kept {}".format(name))
    return changes


# (version, step) pairs in order. Each step brings a file from the previous
# version to its own and never commits; run_upgrade_steps owns the transaction.
_UPGRADE_STEPS = ((1, _upgrade_to_1),)


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


def run_upgrade_steps(conn, *, unchanged_since=None):
    """Upgrade an open database to SCHEMA_VERSION and return the changes, step by step.

    Each step and its user_version bump commit together, so a crash leaves
    the file at the version before or after that step, never between. With
    ``unchanged_since`` (a PRAGMA data_version value read after a backup),
    the first step fails if another process wrote to the file since then.
    """
    changes = []
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
                try:
                    step_changes = step(conn)
                except StoreError as error:
                    raise StoreError(
                        "{}; upgrade step {} failed and the file stays at version {}".format(
                            error, target, version
                        )
                    ) from error
                _execute(conn, "PRAGMA user_version = {:d}".format(target))
        finally:
            _execute(conn, "PRAGMA foreign_keys = ON")
        for change in step_changes:
            logger.info("%s: version %d: %s", conn.path, target, change)
        changes.extend("version {}: {}".format(target, change) for change in step_changes)
    return changes


def upgrade_file(path, *, backup=True, timeout=10.0):
    """Upgrade a database file in place to SCHEMA_VERSION and return an UpgradeReport.

    With ``backup`` (the default), the file is first copied to
    ``PATH.vN.bak`` (N is its old version; a number is added if that name is
    taken). A file already at SCHEMA_VERSION is left byte for byte as it is.
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

        backup_path = data_version = None
        if backup:
            (data_version,) = _execute(conn, "PRAGMA data_version").fetchone()
            backup_path = _backup(conn, old_version)
        changes = run_upgrade_steps(conn, unchanged_since=data_version)
        return UpgradeReport(path, old_version, _read_version(conn), backup_path, changes)
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
    number = 1
    while os.path.exists(backup_path):
        backup_path = "{}.{}.bak".format(base, number)
        number += 1
    partial_path = backup_path + ".partial"
    (journal_mode,) = _execute(conn, "PRAGMA journal_mode").fetchone()
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
        os.replace(partial_path, backup_path)
    except sqlite3.Error as error:
        _remove_quietly(partial_path)
        raise _translate_error(conn, error) from error
    except OSError as error:
        _remove_quietly(partial_path)
        raise StoreError(
            "{}: cannot write the backup {}: {}; free some space or pass --no-backup".format(
                conn.path, backup_path, error
            )
        ) from error
    logger.info("%s: backup written to %s", conn.path, backup_path)
    return backup_path


def _remove_quietly(path):
    with contextlib.suppress(OSError):
        os.remove(path)


# ---------------------------------------------------------------------------
# Writing


def _now():
    # Local time without a zone, in the layout AEPsych's files use.
    return datetime.datetime.now().strftime(_TIMESTAMP_FORMAT)


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
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        same = json.loads(text) == value
        text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as error:
        raise StoreError(
            "{}: {} cannot be stored as JSON: {}; pass dicts, lists, str, int, float,"
            " bool and None only".format(conn.path, what, error)
        ) from error
    if not same:
        raise StoreError(
            "{}: {} would change when stored as JSON (a tuple, a non-string dict key or a"
            " similar value); convert it to plain JSON types first".format(conn.path, what)
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
    stored in that column too.
    """
    _check_writable(conn)
    _check_master_id(conn, master_id)
    if not isinstance(message_type, str) or not message_type:
        raise StoreError("{}: message_type must be a non-empty str, such as 'tell'".format(conn.path))
    if extra_info is None and isinstance(message_contents, dict):
        extra_info = message_contents.get("extra_info")
    contents_text = _encode_json(message_contents, "message_contents", conn)
    extra_text = _encode_json(extra_info, "extra_info", conn) if extra_info is not None else None
    return _insert_for_experiment(
        conn, _INSERT_MESSAGE, (_now(), message_type, contents_text, extra_text, master_id), master_id
    )


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
            message = "{}: replay_data row {} holds text that is not UTF-8".format(conn.path, bad_id)
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
            "{}: strat_data row {} holds a {}, not a pickle".format(conn.path, unique_id, type(strat).__name__),
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
        "{}: config_data row {} holds a {}, neither INI text nor a pickle".format(
            conn.path, unique_id, type(config).__name__
        ),
        table="config_data",
        row_id=unique_id,
    )


# ---------------------------------------------------------------------------
# Command line


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m aepsych_store",
        description="Upgrade and inspect AEPsych experiment databases (SQLite files).",
        epilog=(
            "Exit status: 0 on success, 1 when the file cannot be used (the message"
            " says why and the file is left unchanged), 2 for a wrong command line."
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
        help="print one line per experiment: id, name, participant, messages, first and last time",
    )
    parser.add_argument("db", nargs="?", help="the database file")
    parser.add_argument("--db", dest="db_option", metavar="DB", help="the database file (same as DB)")
    parser.add_argument("--no-backup", action="store_true", help="with --update, skip the backup copy")
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for another process's lock on the file (default: 10)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step to stderr")
    parser.add_argument("--version", action="version", version="aepsych_store " + __version__)
    return parser


def main(argv=None):
    """Run the command line and return its exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.db and args.db_option and args.db != args.db_option:
        parser.error("give the database once, as DB or as --db DB")
    db = args.db or args.db_option
    if not db:
        parser.error("the database file is missing: give it as DB or --db DB")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
    )

    try:
        if args.update:
            _print_upgrade(upgrade_file(db, backup=not args.no_backup, timeout=args.timeout))
        else:
            _print_summary(db, args.timeout)
    except StoreError as error:
        print("aepsych_store: error: {}".format(error), file=sys.stderr)
        return 1
    return 0


def _print_upgrade(report):
    if report.old_version == report.new_version:
        print("{}: already at schema version {}; nothing to do".format(report.path, report.new_version))
        return
    print("{}: upgraded from schema version {} to {}".format(report.path, report.old_version, report.new_version))
    if report.backup_path:
        print("backup of the old file: {}".format(report.backup_path))
    else:
        print("no backup made (--no-backup)")
    for change in report.changes:
        print("  " + change)


def _print_summary(db, timeout):
    conn = connect(db, read_only=True, upgrade=True, timeout=timeout)
    try:
        experiments = list_experiments(conn)
    finally:
        conn.close()
    header = ("id", "experiment_id", "name", "participant", "messages", "first", "last")
    rows = [header]
    for experiment in experiments:
        rows.append(
            tuple(
                "" if value is None else str(value)
                for value in (
                    experiment.unique_id,
                    experiment.experiment_id,
                    experiment.experiment_name,
                    experiment.participant_id,
                    experiment.message_count,
                    experiment.first_timestamp,
                    experiment.last_timestamp,
                )
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if not experiments:
        print("(no experiments)")


if __name__ == "__main__":
    sys.exit(main())
