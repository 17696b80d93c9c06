-- What capture leaves alone for each workload (excluded ports and ranges).
ALTER TABLE Workload ADD COLUMN capture TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(capture));
