-- What the node running an endpoint's workload last observed of its
-- readiness (its probes), kept apart from healthy (the operator's marking):
-- callers use an endpoint only when both say yes.
ALTER TABLE ServiceEndpoint ADD COLUMN ready BOOLEAN NOT NULL DEFAULT TRUE;
