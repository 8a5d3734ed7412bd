"""Write a database laid out the way AEPsych servers wrote them in 2022.

The result is the example for the README's first command: two experiments,
every message a pickled dict, each experiment's config a pickled
``aepsych.config.Config`` and each strategy a pickled ``io.BytesIO`` holding
a zip archive, as ``torch.save`` writes them. AEPsych itself is not needed:
a stand-in class is registered under AEPsych's module name so the pickles
name the same class. Usage: python examples/make_legacy_db.py OUT.db
"""

import configparser
import datetime
import io
import pickle
import random
import sqlite3
import sys
import types
import uuid
import zipfile

LAYOUT_2022 = """
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
	unique_id INTEGER NOT NULL,
	timestamp DATETIME,
	strat BLOB,
	master_table_id INTEGER,
	PRIMARY KEY (unique_id),
	FOREIGN KEY(master_table_id) REFERENCES master (unique_id)
);
CREATE TABLE config_data (
	unique_id INTEGER NOT NULL,
	timestamp DATETIME,
	config BLOB,
	master_table_id INTEGER,
	PRIMARY KEY (unique_id),
	FOREIGN KEY(master_table_id) REFERENCES master (unique_id)
);
"""

CONFIG_STR = """[common]
parnames = [contrast, frequency]
lb = [0, 1]
ub = [1, 20]
stimuli_per_trial = 1
outcome_types = [binary]
strategy_names = [init_strat, opt_strat]

[init_strat]
min_asks = 10
generator = SobolGenerator

[opt_strat]
min_asks = 20
generator = OptimizeAcqfGenerator
acqf = MCLevelSetEstimation
model = GPClassificationModel

[metadata]
experiment_name = Contrast sensitivity
experiment_description = Detection threshold over spatial frequency
"""


def _stand_in_config_class():
    """Register a ConfigParser subclass as aepsych.config.Config, as AEPsych names it."""
    package = types.ModuleType("aepsych")
    module = types.ModuleType("aepsych.config")

    class Config(configparser.ConfigParser):
        def __init__(self):
            super().__init__(default_section="common")

    Config.__module__ = "aepsych.config"
    Config.__qualname__ = "Config"
    module.Config = Config
    package.config = module
    sys.modules.setdefault("aepsych", package)
    sys.modules.setdefault("aepsych.config", module)
    return Config


def _strategy_archive(seed):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", bytes(random.Random(seed).getrandbits(8) for _ in range(2000)))
    buffer.seek(0)
    return buffer


def main(out_path):
    config_class = _stand_in_config_class()
    rng = random.Random(2022)
    conn = sqlite3.connect(out_path)
    conn.executescript(LAYOUT_2022)
    clock = datetime.datetime(2022, 10, 27, 12, 32, 23, 220994)
    row_id = 0
    with conn:
        for master_id, participant in ((1, "P01"), (2, "P02")):
            conn.execute(
                "INSERT INTO master VALUES (?, 'Contrast sensitivity', 'Detection threshold', ?, ?, NULL)",
                (master_id, str(uuid.UUID(int=rng.getrandbits(128), version=4)), participant),
            )
            config = config_class()
            config.read_string(CONFIG_STR)
            conn.execute(
                "INSERT INTO config_data VALUES (?, ?, ?, ?)",
                (master_id, str(clock), pickle.dumps(config, protocol=5), master_id),
            )
            messages = [("setup", {"type": "setup", "version": "0.01", "message": {"config_str": CONFIG_STR}})]
            for _ in range(20):
                messages.append(("ask", {"type": "ask", "message": ""}))
                trial = {
                    "config": {"contrast": [round(rng.random(), 3)], "frequency": [rng.randint(1, 20)]},
                    "outcome": rng.randint(0, 1),
                }
                messages.append(("tell", {"type": "tell", "message": trial, "extra_info": {"rt_ms": rng.randint(200, 900)}}))
            for message_type, message in messages:
                row_id += 1
                clock += datetime.timedelta(milliseconds=rng.randint(5, 1500))
                extra = message.get("extra_info")
                conn.execute(
                    "INSERT INTO replay_data VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        row_id,
                        str(clock),
                        message_type,
                        pickle.dumps(message, protocol=5),
                        None if extra is None else pickle.dumps(extra, protocol=5),
                        master_id,
                    ),
                )
            conn.execute(
                "INSERT INTO strat_data VALUES (?, ?, ?, ?)",
                (master_id, str(clock), pickle.dumps(_strategy_archive(master_id), protocol=5), master_id),
            )
    conn.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/make_legacy_db.py OUT.db")
    main(sys.argv[1])
