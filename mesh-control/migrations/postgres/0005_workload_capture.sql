-- What capture leaves alone for each workload (excluded ports and ranges).
ALTER TABLE Workload ADD COLUMN capture JSONB NOT NULL DEFAULT '{}';
