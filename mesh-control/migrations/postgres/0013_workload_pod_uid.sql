-- The Kubernetes pod's UID, when the workload is a pod: nodes find the
-- pod's network namespace through its cgroup, which is named after it.
-- No two workloads may claim the same pod.
ALTER TABLE Workload ADD COLUMN pod_uid VARCHAR(36);
CREATE UNIQUE INDEX workload_pod_uid ON Workload (pod_uid);
