-- The requests each workload of a service accepts, enforced at its node:
-- {"requests_per_second": N, "burst": M, "per_source": bool}; NULL: none.
ALTER TABLE ServicePolicy ADD COLUMN rate_limit TEXT;
