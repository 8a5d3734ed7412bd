-- Fresh aepsych_store database at schema version 3 (PRAGMA user_version = 3).
--
-- Table and column names, and the declared column types, are the ones AEPsych
-- servers have written since 2021, so files from either program read alike.
-- The upgrade steps in aepsych_store.py bring older files to exactly this
-- layout; tests compare the two.
--
-- Storage classes tell the formats apart: message_contents, extra_info and
-- extra_metadata hold JSON text when this store wrote them and a Python pickle
-- (BLOB) in rows AEPsych wrote. config contains INI text or a legacy pickle.

CREATE TABLE master (
	unique_id INTEGER NOT NULL,
	experiment_name VARCHAR(256),
	experiment_description VARCHAR(2048),
	experiment_id VARCHAR(10),
	participant_id VARCHAR(50),
	extra_metadata VARCHAR(4096),
	PRIMARY KEY (unique_id)
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

-- strat_format is 'bytes' for a strategy stored as the server's raw bytes.
-- NULL marks a pickle written by AEPsych, which never sets this column.
CREATE TABLE strat_data (
	unique_id INTEGER NOT NULL,
	timestamp DATETIME,
	strat BLOB,
	master_table_id INTEGER,
	strat_format VARCHAR(16),
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

-- One row per trial, written with each tell: the query-friendly view of the
-- replay log. Names and columns are AEPsych 0.8's. param_value contains the
-- value as text (AEPsych's VARCHAR); extra_data is a JSON object.
CREATE TABLE raw_data (
	unique_id INTEGER NOT NULL,
	timestamp DATETIME,
	model_data BOOLEAN,
	extra_data BLOB,
	master_table_id INTEGER,
	PRIMARY KEY (unique_id),
	FOREIGN KEY(master_table_id) REFERENCES master (unique_id)
);

CREATE TABLE param_data (
	unique_id INTEGER NOT NULL,
	param_name VARCHAR(50),
	param_value VARCHAR(50),
	iteration_id INTEGER,
	PRIMARY KEY (unique_id),
	FOREIGN KEY(iteration_id) REFERENCES raw_data (unique_id)
);

CREATE TABLE outcome_data (
	unique_id INTEGER NOT NULL,
	outcome_name VARCHAR(50),
	outcome_value FLOAT,
	iteration_id INTEGER,
	PRIMARY KEY (unique_id),
	FOREIGN KEY(iteration_id) REFERENCES raw_data (unique_id)
);

-- Every read path selects one experiment's rows in unique_id order. An index
-- on master_table_id alone serves that, because SQLite appends the rowid
-- (unique_id) to every index entry.
CREATE INDEX master_experiment_id ON master (experiment_id);
CREATE INDEX replay_data_master_table_id ON replay_data (master_table_id);
CREATE INDEX strat_data_master_table_id ON strat_data (master_table_id);
CREATE INDEX config_data_master_table_id ON config_data (master_table_id);
CREATE INDEX raw_data_master_table_id ON raw_data (master_table_id);
CREATE INDEX param_data_iteration_id ON param_data (iteration_id);
CREATE INDEX outcome_data_iteration_id ON outcome_data (iteration_id);
