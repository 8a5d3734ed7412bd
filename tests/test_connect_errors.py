"""connect(): what it opens, what it creates, and every way it rejects a file.

Each rejection must raise StoreError with a message that names the file and
the next step for the user, and must leave the file byte for byte as it was, with no
-wal, -shm or -journal file beside it.
"""

import os
import sqlite3
import tempfile

import pytest

import aepsych_store
from conftest import GENERATIONS, LEGACY_FILES, ROOT, build_legacy_file

SIDECAR_SUFFIXES = ("-wal", "-shm", "-journal")

# Verbs that start the last clause of a message, after its final "; ", when
# that clause gives the user a next step such as "check the path".
FIX_VERBS = (
    "check",
    "close",
    "copy",
    "create",
    "delete",
    "fix",
    "install",
    "move",
    "open",
    "pass",
    "remove",
    "rename",
    "restore",
    "retry",
    "run",
    "upgrade",
    "use",
)


def listing(folder):
    return sorted(os.listdir(str(folder)))


def sidecars(path):
    return [str(path) + suffix for suffix in SIDECAR_SUFFIXES if os.path.exists(str(path) + suffix)]


# The helpers below open files read-write on purpose: a mode=ro connection
# to a WAL-mode file leaves PATH-wal and PATH-shm behind, and the tests check
# that no such file is left.


def read_version(path):
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def make_current_file(path, version=None):
    """Write a database with schema.sql in rollback-journal mode, optionally at another version."""
    conn = sqlite3.connect(str(path))
    try:
        conn.executescript((ROOT / "schema.sql").read_text(encoding="utf-8"))
        conn.execute("INSERT INTO master (experiment_name) VALUES ('current')")
        conn.execute(
            "INSERT INTO replay_data (timestamp, message_type, message_contents, master_table_id)"
            " VALUES ('2024-05-01 09:00:00.000001', 'ask', '{}', 1)"
        )
        conn.execute("PRAGMA user_version = {:d}".format(aepsych_store.SCHEMA_VERSION if version is None else version))
        conn.commit()
    finally:
        conn.close()
    return path


def make_many_rows_file(path, rows=3000):
    """Write a new store database through connect() and fill it with many replay rows."""
    conn = aepsych_store.connect(path)
    master_id = aepsych_store.record_setup(conn, experiment_name="many rows")
    conn.close()

    conn = sqlite3.connect(str(path))
    with conn:
        conn.executemany(
            "INSERT INTO replay_data (timestamp, message_type, message_contents, master_table_id)"
            " VALUES ('2024-05-01 09:00:00.000001', 'tell', ?, ?)",
            [('{"trial": %d, "padding": "%s"}' % (i, "x" * 100), master_id) for i in range(rows)],
        )
    conn.close()
    return path


def truncate(path, size):
    with open(str(path), "r+b") as handle:
        handle.truncate(size)
    return path


def add_unknown_column(path, table="replay_data", column="reaction_ms"):
    conn = sqlite3.connect(str(path))
    try:
        conn.execute("ALTER TABLE {} ADD COLUMN {} INTEGER".format(table, column))
        conn.commit()
    finally:
        conn.close()
    return path


def make_other_tables_file(path):
    conn = sqlite3.connect(str(path))
    try:
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.execute("INSERT INTO notes VALUES ('a lab notebook, not an AEPsych database')")
        conn.commit()
    finally:
        conn.close()
    return path


def assert_rejected(path, *key_words, expected_type=aepsych_store.StoreError, **connect_options):
    """Open path with connect_options, expect expected_type, and check the file and message."""
    path = str(path)
    before = open(path, "rb").read() if os.path.isfile(path) else None
    folder_before = listing(os.path.dirname(path))

    with pytest.raises(expected_type) as caught:
        aepsych_store.connect(path, **connect_options)
    message = str(caught.value)

    assert path in message
    for word in key_words:
        assert word in message
    if before is not None:
        assert open(path, "rb").read() == before
    assert listing(os.path.dirname(path)) == folder_before
    assert sidecars(path) == []
    return message


# ---------------------------------------------------------------------------
# Missing files and read-only opens


def test_connect_missing_read_only(tmp_path):
    path = tmp_path / "missing.db"

    assert_rejected(path, "not found", "check the path", read_only=True)

    assert not path.exists()
    assert listing(tmp_path) == []


def test_connect_missing_no_create(tmp_path):
    path = tmp_path / "missing.db"

    assert_rejected(path, "not found", "check the path", create=False)

    assert not path.exists()
    assert listing(tmp_path) == []


def test_connect_missing_read_only_upgrade(tmp_path):
    path = tmp_path / "missing.db"

    assert_rejected(path, "not found", read_only=True, upgrade=True)

    assert listing(tmp_path) == []


def test_connect_missing_creates_new(tmp_path):
    path = tmp_path / "new.db"

    conn = aepsych_store.connect(path)
    conn.close()

    assert read_version(path) == aepsych_store.SCHEMA_VERSION
    assert sidecars(path) == []


def test_read_only_keeps_delete_mode_file(tmp_path):
    path = make_current_file(tmp_path / "current.db")
    before = path.read_bytes()

    conn = aepsych_store.connect(path, read_only=True)
    rows = conn.execute("SELECT experiment_name FROM master").fetchall()
    with pytest.raises(aepsych_store.StoreError):
        aepsych_store.record_message(conn, 1, "ask", {"type": "ask"})
    conn.close()

    assert rows == [("current",)]
    assert path.read_bytes() == before
    assert listing(tmp_path) == ["current.db"]


def test_read_only_keeps_wal_file(tmp_path):
    path = tmp_path / "store.db"
    conn = aepsych_store.connect(path)
    aepsych_store.record_setup(conn, experiment_name="wal")
    conn.close()
    before = path.read_bytes()
    assert listing(tmp_path) == ["store.db"]

    conn = aepsych_store.connect(path, read_only=True)
    experiments = aepsych_store.list_experiments(conn)
    conn.close()

    assert [e.experiment_name for e in experiments] == ["wal"]
    assert path.read_bytes() == before
    # In a folder it may write, SQLite's reader makes the WAL index files it
    # needs to see a writer that starts later; it writes no row.
    assert set(listing(tmp_path)) <= {"store.db", "store.db-wal", "store.db-shm"}


# ---------------------------------------------------------------------------
# Schema versions the module does not read


@pytest.mark.parametrize("version", [aepsych_store.SCHEMA_VERSION + 1, 2**31 - 1])
@pytest.mark.parametrize(
    "options",
    [{}, {"read_only": True}, {"upgrade": True}, {"read_only": True, "upgrade": True}],
    ids=["writable", "read_only", "upgrade", "read_only_upgrade"],
)
def test_connect_newer_version(tmp_path, version, options):
    path = make_current_file(tmp_path / "newer.db", version=version)

    assert_rejected(path, "schema version {}".format(version), "newer", "upgrade aepsych_store", **options)

    assert read_version(path) == version


@pytest.mark.parametrize("version", [-1, -(2**31)])
@pytest.mark.parametrize("options", [{}, {"read_only": True}, {"upgrade": True}], ids=["writable", "read_only", "upgrade"])
def test_connect_negative_version(tmp_path, version, options):
    path = make_current_file(tmp_path / "negative.db", version=version)

    assert_rejected(path, "invalid schema version {}".format(version), **options)

    assert read_version(path) == version


@pytest.mark.parametrize("options", [{}, {"read_only": True}, {"upgrade": True}], ids=["writable", "read_only", "upgrade"])
def test_connect_other_tables(tmp_path, options):
    path = make_other_tables_file(tmp_path / "notebook.db")

    assert_rejected(path, "not an AEPsych database", "notes", "nothing was changed", **options)


def test_connect_master_without_columns(tmp_path):
    path = tmp_path / "lookalike.db"
    conn = sqlite3.connect(str(path))
    conn.execute("CREATE TABLE master (x)")
    conn.execute("CREATE TABLE replay_data (y)")
    conn.commit()
    conn.close()

    assert_rejected(path, "not an AEPsych database", "master", "unique_id", upgrade=True)


# ---------------------------------------------------------------------------
# Legacy AEPsych files at version 0


@pytest.mark.parametrize("name", LEGACY_FILES)
@pytest.mark.parametrize("options", [{}, {"read_only": True}], ids=["writable", "read_only"])
def test_connect_legacy_needs_update(legacy_copy, name, options):
    path = legacy_copy(name)

    message = assert_rejected(path, expected_type=aepsych_store.UpgradeRequiredError, **options)

    assert "python -m aepsych_store --update {}".format(path) in message
    assert read_version(path) == 0


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("options", [{}, {"read_only": True}], ids=["writable", "read_only"])
def test_connect_built_legacy_needs_update(tmp_path, generation, options):
    path = build_legacy_file(tmp_path / "legacy-{}.db".format(generation), generation)

    message = assert_rejected(path, expected_type=aepsych_store.UpgradeRequiredError, **options)

    assert "python -m aepsych_store --update {}".format(path) in message


def replay_rows(path):
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute(
            "SELECT unique_id, timestamp, message_type, master_table_id FROM replay_data ORDER BY unique_id"
        ).fetchall()
    finally:
        conn.close()


def unique_indexes(path, table):
    conn = sqlite3.connect(str(path))
    try:
        return [row[1] for row in conn.execute("PRAGMA index_list({})".format(table)) if row[2]]
    finally:
        conn.close()


@pytest.mark.parametrize("name", LEGACY_FILES)
def test_connect_upgrade_legacy(legacy_copy, name):
    path = legacy_copy(name)
    rows_before = replay_rows(path)
    assert unique_indexes(path, "master") != []

    conn = aepsych_store.connect(path, upgrade=True)
    conn.close()

    assert read_version(path) == aepsych_store.SCHEMA_VERSION
    assert unique_indexes(path, "master") == []
    assert replay_rows(path) == rows_before
    assert sidecars(path) == []


@pytest.mark.parametrize("generation", GENERATIONS)
def test_connect_upgrade_built(tmp_path, generation):
    path = build_legacy_file(tmp_path / "legacy-{}.db".format(generation), generation)
    rows_before = replay_rows(path)

    conn = aepsych_store.connect(path, upgrade=True)
    conn.close()

    assert read_version(path) == aepsych_store.SCHEMA_VERSION
    assert [row[:3] for row in replay_rows(path)] == [row[:3] for row in rows_before]
    if generation == "2025":
        conn = sqlite3.connect(str(path))
        # Experiment 1 keeps its AEPsych trial; experiment 2 gains its two tells.
        assert conn.execute("SELECT * FROM param_data").fetchall() == [
            (1, "x1", "0.5", 1),
            (2, "x1", "0.5", 2),
            (3, "x1", "0.25", 3),
        ]
        conn.close()


@pytest.mark.parametrize("name", LEGACY_FILES)
def test_read_only_upgrade_legacy(legacy_copy, monkeypatch, name):
    path = legacy_copy(name)
    temp_root = path.parent / "temp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    before = path.read_bytes()
    folder_before = listing(path.parent)
    rows_before = replay_rows(path)

    conn = aepsych_store.connect(path, read_only=True, upgrade=True)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    rows = conn.execute(
        "SELECT unique_id, timestamp, message_type, master_table_id FROM replay_data ORDER BY unique_id"
    ).fetchall()
    temp_while_open = listing(temp_root)
    with pytest.raises(aepsych_store.StoreError):
        aepsych_store.record_setup(conn, experiment_name="must not be written")
    conn.close()

    assert version == aepsych_store.SCHEMA_VERSION
    assert rows == rows_before
    assert len(temp_while_open) == 1
    assert listing(temp_root) == []
    assert path.read_bytes() == before
    assert listing(path.parent) == folder_before
    assert read_version(path) == 0


def test_read_only_upgrade_built_2025(tmp_path, monkeypatch):
    path = build_legacy_file(tmp_path / "legacy-2025.db", "2025")
    temp_root = tmp_path / "temp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    before = path.read_bytes()

    conn = aepsych_store.connect(path, read_only=True, upgrade=True)
    experiments = aepsych_store.list_experiments(conn)
    conn.close()

    assert [(e.unique_id, e.participant_id, e.message_count) for e in experiments] == [
        (1, "p-1", 5),
        (2, "p-2", 5),
    ]
    assert listing(temp_root) == []
    assert path.read_bytes() == before


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize(
    "options",
    [{}, {"upgrade": True}, {"read_only": True, "upgrade": True}],
    ids=["writable", "upgrade", "read_only_upgrade"],
)
def test_connect_unknown_column(tmp_path, generation, options):
    path = add_unknown_column(build_legacy_file(tmp_path / "legacy-{}.db".format(generation), generation))

    assert_rejected(path, "replay_data", "reaction_ms", "nothing was changed", **options)

    assert read_version(path) == 0


# ---------------------------------------------------------------------------
# Files that are not SQLite databases, empty or damaged


@pytest.mark.parametrize(
    "options",
    [{}, {"read_only": True}, {"upgrade": True}, {"create": False}],
    ids=["writable", "read_only", "upgrade", "no_create"],
)
def test_connect_not_sqlite(tmp_path, options):
    path = tmp_path / "notes.db"
    path.write_bytes(b"participant,trial,outcome\n" * 400)

    assert_rejected(path, "not a SQLite database", "check the path", **options)


def test_connect_zero_byte_writable(tmp_path):
    path = tmp_path / "empty.db"
    path.write_bytes(b"")

    conn = aepsych_store.connect(path)
    master_id = aepsych_store.record_setup(conn, experiment_name="first")
    conn.close()

    assert master_id == 1
    assert read_version(path) == aepsych_store.SCHEMA_VERSION
    assert sidecars(path) == []


@pytest.mark.parametrize("options", [{"read_only": True}, {"read_only": True, "upgrade": True}], ids=["read_only", "read_only_upgrade"])
def test_connect_zero_byte_read_only(tmp_path, options):
    path = tmp_path / "empty.db"
    path.write_bytes(b"")

    assert_rejected(path, "empty", "check the", **options)

    assert path.stat().st_size == 0


def test_connect_zero_byte_no_create(tmp_path):
    path = tmp_path / "empty.db"
    path.write_bytes(b"")

    assert_rejected(path, "empty", create=False)

    assert path.stat().st_size == 0


@pytest.mark.parametrize("name", LEGACY_FILES)
@pytest.mark.parametrize(
    "options",
    [{}, {"read_only": True}, {"upgrade": True}, {"read_only": True, "upgrade": True}],
    ids=["writable", "read_only", "upgrade", "read_only_upgrade"],
)
def test_connect_truncated_legacy(legacy_copy, name, options):
    path = truncate(legacy_copy(name), 5000)

    assert_rejected(path, "damaged", "restore", **options)

    assert path.stat().st_size == 5000


@pytest.fixture(scope="module")
def many_rows_bytes(tmp_path_factory):
    """Return the bytes of a new store database with 3000 messages, cut to half its size."""
    path = make_many_rows_file(tmp_path_factory.mktemp("many") / "many.db")
    data = path.read_bytes()
    assert len(data) > 100000
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "options",
    [{}, {"upgrade": True}, {"create": False}],
    ids=["writable", "upgrade", "no_create"],
)
def test_connect_truncated_new(tmp_path, many_rows_bytes, options):
    path = tmp_path / "many.db"
    path.write_bytes(many_rows_bytes)

    assert_rejected(path, "damaged", "restore", **options)


def test_read_only_truncated_new(tmp_path, many_rows_bytes):
    # The cut file is switched to rollback-journal mode first, so this test
    # checks the damage alone; test_read_only_keeps_wal_file covers WAL mode.
    path = tmp_path / "many.db"
    data = bytearray(many_rows_bytes)
    data[18:20] = b"\x01\x01"  # file format write and read versions: 1 is rollback journal
    path.write_bytes(bytes(data))

    assert_rejected(path, "damaged", "restore", read_only=True)


# ---------------------------------------------------------------------------
# Paths that are not files


def test_connect_folder(tmp_path):
    folder = tmp_path / "data.db"
    folder.mkdir()

    assert_rejected(folder, read_only=True)
    assert_rejected(folder)

    assert listing(folder) == []


def test_connect_missing_parent(tmp_path):
    path = tmp_path / "no-such-folder" / "new.db"

    with pytest.raises(aepsych_store.StoreError) as caught:
        aepsych_store.connect(path)

    assert str(path) in str(caught.value)
    assert listing(tmp_path) == []


# ---------------------------------------------------------------------------
# Every message ends with the next step for the user


def fix_clause(message):
    return message.rsplit("; ", 1)[-1] if "; " in message else ""


def setup_missing(tmp_path):
    return tmp_path / "missing.db", {"read_only": True}


def setup_zero_byte(tmp_path):
    path = tmp_path / "empty.db"
    path.write_bytes(b"")
    return path, {"read_only": True}


def setup_newer(tmp_path):
    return make_current_file(tmp_path / "newer.db", version=2), {}


def setup_legacy(tmp_path):
    return build_legacy_file(tmp_path / "legacy.db", "2022"), {}


def setup_not_sqlite(tmp_path):
    path = tmp_path / "notes.db"
    path.write_bytes(b"participant,trial,outcome\n" * 400)
    return path, {}


def setup_truncated(tmp_path):
    path = make_current_file(tmp_path / "cut.db")
    truncate(path, 5000)
    return path, {}


def setup_negative(tmp_path):
    return make_current_file(tmp_path / "negative.db", version=-1), {}


def setup_other_tables(tmp_path):
    return make_other_tables_file(tmp_path / "notebook.db"), {}


def setup_unknown_column(tmp_path):
    return add_unknown_column(build_legacy_file(tmp_path / "legacy.db", "2022")), {"upgrade": True}


def setup_folder(tmp_path):
    folder = tmp_path / "data.db"
    folder.mkdir()
    return folder, {}


def setup_missing_parent(tmp_path):
    return tmp_path / "no-such-folder" / "new.db", {}


@pytest.mark.parametrize(
    "setup",
    [
        setup_missing,
        setup_zero_byte,
        setup_newer,
        setup_legacy,
        setup_not_sqlite,
        setup_truncated,
        setup_negative,
        setup_other_tables,
        setup_unknown_column,
        setup_folder,
        setup_missing_parent,
    ],
    ids=lambda setup: setup.__name__[len("setup_"):],
)
def test_error_names_next_step(tmp_path, setup):
    path, options = setup(tmp_path)

    with pytest.raises(aepsych_store.StoreError) as caught:
        aepsych_store.connect(path, **options)
    message = str(caught.value)

    assert str(path) in message
    assert fix_clause(message).split(" ", 1)[0] in FIX_VERBS
