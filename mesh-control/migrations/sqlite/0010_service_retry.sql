-- How callers retry a service's requests: {"on_statuses": [409],
-- "non_idempotent": bool, "backoff_base_ms": N, "backoff_max_ms": N,
-- "budget_percent": N, "budget_min_per_second": N}; NULL: the defaults.
ALTER TABLE ServicePolicy ADD COLUMN retry TEXT;
