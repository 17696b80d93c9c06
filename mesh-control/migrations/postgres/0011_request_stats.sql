-- What nodes reported of their workloads' requests, per calling workload
-- and service called, one row per report: `meshctl stat` and `meshctl top`
-- sum the rows of a recent window. Rows older than an hour are pruned as
-- reports arrive.
CREATE TABLE RequestStats (
    node VARCHAR(63) NOT NULL,
    -- When the control plane received the report (Unix milliseconds).
    reported_at BIGINT NOT NULL,
    interval_ms BIGINT NOT NULL,
    source_namespace VARCHAR(63) NOT NULL,
    source_workload VARCHAR(253) NOT NULL,
    namespace VARCHAR(63) NOT NULL,
    service VARCHAR(63) NOT NULL,
    requests BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    -- Requests per latency bucket, a JSON array.
    latency TEXT NOT NULL
);
CREATE INDEX request_stats_by_time ON RequestStats (reported_at);
