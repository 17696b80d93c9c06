-- A service's virtual address (a Kubernetes ClusterIP): callers connect to
-- it and their node picks one of the service's endpoints. Optional; the
-- store refuses an address another service or a workload already has, and
-- the index finds the holder.
ALTER TABLE Service ADD COLUMN vip TEXT;
CREATE INDEX service_by_vip ON Service (vip);
