"""Benchmark aepsych_store against plain sqlite3 code doing the same work.

Usage, from anywhere:

    python bench/bench_store.py [--size tiny|full]

Every measurement runs the store and a plain sqlite3 loop side by side in
this one process, on files with the same schema and pragmas, and reports the
ratio store / plain. Load from other programs on a shared machine then slows
both sides alike. Each figure is the best of up to three interleaved trials. The script prints a markdown table on stdout and its progress on
stderr, and exits 1 if any measurement failed (its row then says why).

--size tiny finishes in seconds and only proves that the script still works;
its figures mean little. --size full is the one recorded in docs/benchmarks.md.
"""

import argparse
import datetime
import json
import os
import pickle
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aepsych_store  # noqa: E402  (needs the path set above)

SIZES = {
    "tiny": {"record": 200, "replay": (1000, 2000, 5000), "update": (1000, 5000)},
    "full": {"record": 2000, "replay": (10000, 100000, 1000000), "update": (100000, 1000000)},
}

RECORD_TARGET = 0.8
REPLAY_TARGET = 0.7
UPDATE_TARGET = 20000  # messages per second, on a 2-core machine
# A replay's tracemalloc peak may exceed the smallest replay's by this much
# and still count as flat.
FLAT_MEMORY_SLACK = 2 * 1024 * 1024

TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S.%f"

REPLAY_COLUMNS = "unique_id, timestamp, message_type, message_contents, extra_info"
PLAIN_INSERT_MESSAGE = (
    "INSERT INTO replay_data (timestamp, message_type, message_contents, extra_info, master_table_id)"
    " VALUES (?, ?, ?, ?, ?)"
)
PLAIN_SELECT_REPLAY = (
    "SELECT " + REPLAY_COLUMNS + " FROM replay_data WHERE master_table_id = ? ORDER BY unique_id"
)

# The 2022 AEPsych layout, as its SQLAlchemy models created it.
LEGACY_2022_DDL = """
CREATE TABLE master (
unique_id INTEGER NOT NULL,
experiment_name VARCHAR(256),
experiment_description VARCHAR(2048),
experiment_id VARCHAR(10),
participant_id VARCHAR(50),
extra_metadata VARCHAR(4096),
PRIMARY KEY (unique_id),
UNIQUE (experiment_id),
UNIQUE (participant_id)
);
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

# The plain reference for --update: the same copy of replay_data into a
# table of the version 1 layout, in one transaction.
PLAIN_COPY_REPLAY = """
CREATE TABLE replay_copy (
unique_id INTEGER NOT NULL,
timestamp DATETIME,
message_type VARCHAR(64),
message_contents BLOB,
extra_info BLOB,
master_table_id INTEGER,
PRIMARY KEY (unique_id),
FOREIGN KEY(master_table_id) REFERENCES master (unique_id)
);
INSERT INTO replay_copy (unique_id, timestamp, message_type, message_contents, extra_info, master_table_id)
SELECT unique_id, timestamp, message_type, message_contents, extra_info, master_table_id FROM replay_data;
"""


def tell_message(number):
    """Return a tell message as an AEPsych client sends it."""
    return {
        "type": "tell",
        "message": {"config": {"x1": [number * 0.001], "x2": [number % 7]}, "outcome": number % 2},
        "extra_info": {"trial": number, "rt": 0.25},
    }


def encode_json(value):
    # The encoding the store uses for message_contents and extra_info.
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def progress(text):
    print(text, file=sys.stderr, flush=True)


def repeats_for(count, single_from=1000000):
    """Return how many trials to run: three, but one from single_from messages up."""
    return 3 if count < single_from else 1


def best_rate(count, trials):
    """Return messages per second of the fastest of the given durations."""
    return count / min(trials)


# ---------------------------------------------------------------------------
# record_message

# A setup whose config tells the store how to split a tell into trial rows.
SETUP_REQUEST = {
    "type": "setup",
    "message": {"config_str": "[common]\nparnames = [x1, x2]\nstimuli_per_trial = 1\noutcome_types = [binary]\n"},
}
ASK_MESSAGE = {"type": "ask", "message": ""}

# record_message writes a tell's trial to these tables in the transaction of
# its replay_data row, so the plain loop does the same.
PLAIN_INSERT_TRIAL = "INSERT INTO raw_data (timestamp, model_data, extra_data, master_table_id) VALUES (?, ?, ?, ?)"
PLAIN_INSERT_PARAM = "INSERT INTO param_data (param_name, param_value, iteration_id) VALUES (?, ?, ?)"
PLAIN_INSERT_OUTCOME = "INSERT INTO outcome_data (outcome_name, outcome_value, iteration_id) VALUES (?, ?, ?)"
RECORDED_TABLES = ("replay_data", "raw_data", "param_data", "outcome_data")


def store_record(path, message_type, messages, synchronous):
    conn = aepsych_store.connect(path, synchronous=synchronous)
    try:
        master_id = aepsych_store.record_setup(conn, SETUP_REQUEST, experiment_name="bench")
        started = time.perf_counter()
        for message in messages:
            aepsych_store.record_message(conn, master_id, message_type, message)
        return time.perf_counter() - started
    finally:
        conn.close()


def plain_record(path, message_type, messages, synchronous):
    conn = sqlite3.connect(str(path))
    try:
        conn.execute("PRAGMA journal_mode = wal")
        conn.execute("PRAGMA synchronous = " + synchronous)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.executescript((ROOT / "schema.sql").read_text(encoding="utf-8"))
        master_id = conn.execute("INSERT INTO master (experiment_name) VALUES ('bench')").lastrowid
        conn.execute(
            PLAIN_INSERT_MESSAGE,
            (datetime.datetime.now().strftime(TIMESTAMP_FORMAT), "setup", encode_json(SETUP_REQUEST), None, master_id),
        )
        conn.commit()
        started = time.perf_counter()
        for message in messages:
            timestamp = datetime.datetime.now().strftime(TIMESTAMP_FORMAT)
            extra_info = message.get("extra_info")
            extra_text = None if extra_info is None else encode_json(extra_info)
            conn.execute(PLAIN_INSERT_MESSAGE, (timestamp, message_type, encode_json(message), extra_text, master_id))
            if message_type == "tell":
                trial_id = conn.execute(PLAIN_INSERT_TRIAL, (timestamp, True, extra_text, master_id)).lastrowid
                conn.executemany(
                    PLAIN_INSERT_PARAM,
                    [(name, repr(values[0]), trial_id) for name, values in message["message"]["config"].items()],
                )
                conn.execute(PLAIN_INSERT_OUTCOME, ("outcome", float(message["message"]["outcome"]), trial_id))
            conn.commit()
        return time.perf_counter() - started
    finally:
        conn.close()


def row_counts(path):
    conn = sqlite3.connect(str(path))
    try:
        return [conn.execute("SELECT count(*) FROM " + table).fetchone()[0] for table in RECORDED_TABLES]
    finally:
        conn.close()


def measure_record(folder, message_type, count, synchronous):
    if message_type == "tell":
        messages = [tell_message(number) for number in range(count)]
    else:
        messages = [ASK_MESSAGE] * count
    store_trials = []
    plain_trials = []
    for trial in range(repeats_for(count)):
        progress("record_message {} synchronous={}: trial {}".format(message_type, synchronous, trial + 1))
        name = "record-{}-{}-{}-{}.db".format(message_type, synchronous, trial, "{}")
        store_path = folder / name.format("store")
        plain_path = folder / name.format("plain")
        store_trials.append(store_record(store_path, message_type, messages, synchronous))
        plain_trials.append(plain_record(plain_path, message_type, messages, synchronous))
        store_rows = row_counts(store_path)
        plain_rows = row_counts(plain_path)
        if store_rows != plain_rows:
            raise RuntimeError(
                "the plain loop wrote {} rows to {} but the store wrote {}, so the comparison is"
                " unfair; make plain_record write the same rows".format(
                    plain_rows, ", ".join(RECORDED_TABLES), store_rows
                )
            )
    store = best_rate(count, store_trials)
    plain = best_rate(count, plain_trials)
    return Row(
        record_measure(message_type, synchronous),
        count,
        format_rate(store),
        format_rate(plain),
        store / plain,
        ">= {}".format(RECORD_TARGET),
        store / plain >= RECORD_TARGET,
    )


def record_measure(message_type, synchronous):
    description = "tell + trial rows" if message_type == "tell" else message_type
    return "record_message {} (wal, synchronous={})".format(description, synchronous)


# ---------------------------------------------------------------------------
# iter_replay


def build_replay_file(path, counts):
    """Write a store file with one experiment per count and return the experiments' ids."""
    conn = aepsych_store.connect(path, journal_mode="delete")
    conn.close()
    conn = sqlite3.connect(str(path))
    conn.execute("PRAGMA synchronous = OFF")  # a scratch file, rebuilt on every run
    master_ids = []
    with conn:
        for count in counts:
            master_id = conn.execute(
                "INSERT INTO master (experiment_name) VALUES (?)", ("{} messages".format(count),)
            ).lastrowid
            master_ids.append(master_id)
            conn.executemany(
                PLAIN_INSERT_MESSAGE,
                (
                    (
                        "2024-01-01 10:00:00.{:06d}".format(number % 1000000),
                        "tell",
                        encode_json(tell_message(number)),
                        encode_json(tell_message(number)["extra_info"]),
                        master_id,
                    )
                    for number in range(count)
                ),
            )
    conn.close()
    return master_ids


def store_replay(path, master_id):
    conn = aepsych_store.connect(path, read_only=True)
    try:
        count = 0
        for _ in aepsych_store.iter_replay(conn, master_id):
            count += 1
        return count
    finally:
        conn.close()


def plain_replay(path, master_id):
    conn = sqlite3.connect(Path(path).absolute().as_uri() + "?mode=ro", uri=True)
    try:
        count = 0
        for unique_id, timestamp, message_type, contents, extra_info in conn.execute(
            PLAIN_SELECT_REPLAY, (master_id,)
        ):
            _ = (
                unique_id,
                timestamp,
                message_type,
                json.loads(contents),
                None if extra_info is None else json.loads(extra_info),
            )
            count += 1
        return count
    finally:
        conn.close()


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def traced_peak(function, *args):
    """Run function under tracemalloc and return its peak of traced bytes."""
    tracemalloc.start()
    try:
        function(*args)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def measure_replay(folder, counts):
    path = folder / "replay.db"
    progress("iter_replay: building a file with {} messages".format(sum(counts)))
    master_ids = build_replay_file(path, counts)
    rows = []
    smallest_peak = None
    for count, master_id in zip(counts, master_ids):
        store_trials = []
        plain_trials = []
        for trial in range(repeats_for(count)):
            progress("iter_replay {}: trial {}".format(count, trial + 1))
            seconds, replayed = timed(store_replay, path, master_id)
            check_count("iter_replay", replayed, count)
            store_trials.append(seconds)
            seconds, replayed = timed(plain_replay, path, master_id)
            check_count("plain replay", replayed, count)
            plain_trials.append(seconds)
        store = best_rate(count, store_trials)
        plain = best_rate(count, plain_trials)
        rows.append(
            Row(
                "iter_replay speed",
                count,
                format_rate(store),
                format_rate(plain),
                store / plain,
                ">= {}".format(REPLAY_TARGET),
                store / plain >= REPLAY_TARGET,
            )
        )

        progress("iter_replay {}: peak memory".format(count))
        store_peak = traced_peak(store_replay, path, master_id)
        plain_peak = traced_peak(plain_replay, path, master_id)
        if smallest_peak is None:
            smallest_peak = store_peak
        rows.append(
            Row(
                "iter_replay peak memory",
                count,
                format_bytes(store_peak),
                format_bytes(plain_peak),
                store_peak / plain_peak,
                "<= {} + {}".format(format_bytes(smallest_peak), format_bytes(FLAT_MEMORY_SLACK)),
                store_peak <= smallest_peak + FLAT_MEMORY_SLACK,
            )
        )
    os.remove(str(path))
    return rows


def check_count(what, seen, expected):
    if seen != expected:
        raise RuntimeError("{} yielded {} messages, expected {}".format(what, seen, expected))


# ---------------------------------------------------------------------------
# --update


def build_legacy_file(path, count):
    """Write a 2022-layout AEPsych file with count pickled tell messages in two experiments."""
    conn = sqlite3.connect(str(path))
    conn.executescript(LEGACY_2022_DDL)
    conn.execute("PRAGMA synchronous = OFF")  # a scratch file, rebuilt on every run
    with conn:
        conn.execute("INSERT INTO master VALUES (1, 'bench', 'bench', 'id-1', 'p-1', NULL)")
        conn.execute("INSERT INTO master VALUES (2, 'bench', 'bench', 'id-2', 'p-2', NULL)")
        # The real AEPsych files use pickle protocol 5.
        conn.executemany(
            PLAIN_INSERT_MESSAGE,
            (
                (
                    "2024-01-01 10:00:00.{:06d}".format(number % 1000000),
                    "tell",
                    pickle.dumps(tell_message(number), protocol=5),
                    pickle.dumps(tell_message(number)["extra_info"], protocol=5),
                    1 + number % 2,
                )
                for number in range(count)
            ),
        )
    conn.close()


def store_update(path):
    started = time.perf_counter()
    report = aepsych_store.upgrade_file(path, backup=False)
    seconds = time.perf_counter() - started
    if report.new_version != aepsych_store.SCHEMA_VERSION:
        raise RuntimeError("upgrade_file left the file at version {}".format(report.new_version))
    return seconds


def plain_copy(path):
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        for statement in PLAIN_COPY_REPLAY.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        conn.close()


def measure_update(folder, count):
    pristine = folder / "legacy-{}.db".format(count)
    work = folder / "legacy-work.db"
    progress("--update {}: building a legacy file".format(count))
    build_legacy_file(pristine, count)
    store_trials = []
    plain_trials = []
    try:
        # An upgrade of 100,000 messages or more takes many seconds, so it runs once.
        for trial in range(repeats_for(count, single_from=100000)):
            progress("--update {}: trial {}".format(count, trial + 1))
            shutil.copyfile(str(pristine), str(work))
            store_trials.append(store_update(work))
            shutil.copyfile(str(pristine), str(work))
            plain_trials.append(plain_copy(work))
    finally:
        for leftover in (pristine, work):
            if leftover.exists():
                os.remove(str(leftover))
    store = best_rate(count, store_trials)
    plain = best_rate(count, plain_trials)
    return Row(
        "--update (upgrade_file)",
        count,
        format_rate(store),
        format_rate(plain) + " (INSERT ... SELECT copy)",
        store / plain,
        ">= {:,} msgs/s".format(UPDATE_TARGET),
        store >= UPDATE_TARGET,
    )


# ---------------------------------------------------------------------------
# The table


class Row:
    """One line of the result table."""

    def __init__(self, measure, messages, store, plain, ratio, target, met):
        self.measure = measure
        self.messages = messages
        self.store = store
        self.plain = plain
        self.ratio = ratio
        self.target = target
        self.met = met

    def cells(self):
        ratio = "" if self.ratio is None else "{:.2f}".format(self.ratio)
        met = {True: "yes", False: "no", None: ""}[self.met]
        return [self.measure, "{:,}".format(self.messages), self.store, self.plain, ratio, self.target, met]


def failed_row(measure, messages, error):
    message = " ".join(str(error).split())
    return Row(measure, messages, "failed: {}: {}".format(type(error).__name__, message), "", None, "", None)


def format_rate(rate):
    return "{:,.0f} msgs/s".format(rate)


def format_bytes(size):
    return "{:,.0f} KiB".format(size / 1024)


def print_table(rows):
    header = ["measure", "messages", "aepsych_store", "plain sqlite3", "ratio", "target", "met"]
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for row in rows:
        print("| " + " | ".join(cell.replace("|", "\\|") for cell in row.cells()) + " |")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line():
    return "{} CPUs ({}), Python {}, SQLite {}, {}".format(
        os.cpu_count(),
        cpu_model(),
        platform.python_version(),
        sqlite3.sqlite_version,
        platform.platform(),
    )


def run(size, folder):
    sizes = SIZES[size]
    rows = []
    for message_type in ("ask", "tell"):
        for synchronous in ("full", "normal"):
            try:
                rows.append(measure_record(folder, message_type, sizes["record"], synchronous))
            except Exception as error:  # the table reports it and the exit status is 1
                rows.append(failed_row(record_measure(message_type, synchronous), sizes["record"], error))
    try:
        rows.extend(measure_replay(folder, sizes["replay"]))
    except Exception as error:
        for count in sizes["replay"]:
            rows.append(failed_row("iter_replay speed", count, error))
            rows.append(failed_row("iter_replay peak memory", count, error))
    for count in sizes["update"]:
        try:
            rows.append(measure_update(folder, count))
        except Exception as error:
            rows.append(failed_row("--update (upgrade_file)", count, error))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark aepsych_store against plain sqlite3.")
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="full",
        help="tiny: a few thousand messages, to check the script runs; full: up to a million (default)",
    )
    parser.add_argument(
        "--tmp",
        metavar="FOLDER",
        help="folder for the scratch files, which need up to about 1 GB at full size"
        " (default: the system's temporary folder)",
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="aepsych_store-bench-", dir=args.tmp))
    try:
        rows = run(args.size, folder)
    finally:
        shutil.rmtree(str(folder), ignore_errors=True)

    print("aepsych_store {} benchmark, --size {}, {}".format(
        aepsych_store.__version__, args.size, datetime.date.today().isoformat()
    ))
    print("machine: " + machine_line())
    print()
    print_table(rows)
    print()
    print("total time: {:.0f} s".format(time.perf_counter() - started))
    return 1 if any(row.ratio is None for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
