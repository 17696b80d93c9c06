-- The Kubernetes pod's UID, when the workload is a pod: nodes find the
-- pod's network namespace through its cgroup, which is named after it.
ALTER TABLE Workload ADD COLUMN pod_uid VARCHAR(36);
