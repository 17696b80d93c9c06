-- The store refuses a second workload at an address already taken; this
-- finds the holder without reading every workload.
CREATE INDEX workload_by_address ON Workload (pod_ip);
