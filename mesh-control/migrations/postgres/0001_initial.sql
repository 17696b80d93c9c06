-- The mesh's desired state. The seed's four tables keep their exact columns
-- and defaults; the mesh's additions follow them. Every change bumps
-- mesh_revision in the same transaction, and resource_changes records what
-- changed at which revision (the configuration push reads it).

CREATE TABLE mesh_revision (
    id INT PRIMARY KEY CHECK (id = 1),
    revision BIGINT NOT NULL
);
INSERT INTO mesh_revision (id, revision) VALUES (1, 0);

CREATE TABLE resource_changes (
    revision BIGINT NOT NULL,
    kind VARCHAR(32) NOT NULL,
    namespace VARCHAR(63) NOT NULL,
    name VARCHAR(63) NOT NULL,
    op VARCHAR(8) NOT NULL CHECK (op IN ('upsert', 'delete')),
    PRIMARY KEY (revision, kind, namespace, name)
);

CREATE TABLE Namespace (
    name VARCHAR(63) PRIMARY KEY,
    capture BOOLEAN NOT NULL DEFAULT FALSE,
    labels JSONB NOT NULL DEFAULT '{}',
    revision BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

CREATE TABLE Service (
    namespace VARCHAR(63) NOT NULL,
    name VARCHAR(63) NOT NULL,
    ports JSONB NOT NULL,
    load_balancer VARCHAR(32) NOT NULL DEFAULT 'round_robin'
        CHECK (load_balancer IN ('round_robin', 'least_request', 'consistent_hash')),
    hash_header VARCHAR(256),
    labels JSONB NOT NULL DEFAULT '{}',
    revision BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    PRIMARY KEY (namespace, name)
);

CREATE TABLE Workload (
    namespace VARCHAR(63) NOT NULL,
    name VARCHAR(63) NOT NULL,
    service_account VARCHAR(63) NOT NULL,
    node VARCHAR(63) NOT NULL,
    pod_ip INET NOT NULL,
    version VARCHAR(32) NOT NULL,
    services JSONB NOT NULL DEFAULT '[]',
    labels JSONB NOT NULL DEFAULT '{}',
    revision BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    PRIMARY KEY (namespace, name)
);
CREATE INDEX workload_by_node ON Workload (node);

CREATE TABLE ServicePolicy (
    service_name VARCHAR(128) PRIMARY KEY,
    retry_attempts INT NOT NULL DEFAULT 3,
    timeout_ms INT NOT NULL DEFAULT 5000,
    cb_threshold INT NOT NULL DEFAULT 50, -- % error rate to open circuit
    cb_window_sec INT NOT NULL DEFAULT 30,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    cb_recovery_timeout_ms INT NOT NULL DEFAULT 10000,
    namespace VARCHAR(63) NOT NULL,
    name VARCHAR(63) NOT NULL,
    labels JSONB NOT NULL DEFAULT '{}',
    revision BIGINT NOT NULL DEFAULT 0,
    UNIQUE (namespace, name),
    CHECK (service_name = name || '.' || namespace),
    CHECK (retry_attempts BETWEEN 0 AND 10),
    CHECK (timeout_ms BETWEEN 1 AND 3600000),
    CHECK (cb_threshold BETWEEN 1 AND 100),
    CHECK (cb_window_sec BETWEEN 1 AND 3600),
    CHECK (cb_recovery_timeout_ms BETWEEN 1 AND 3600000)
);

CREATE TABLE CertificateRecord (
    service_name VARCHAR(128) NOT NULL,
    cert_pem TEXT NOT NULL,
    private_key TEXT NOT NULL, -- encrypted at rest
    expiry TIMESTAMPTZ NOT NULL,
    issued_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    PRIMARY KEY (service_name, issued_at)
);

CREATE TABLE TrafficSplit (
    id BIGSERIAL PRIMARY KEY,
    source_service VARCHAR(128), -- NULL = applies to all callers
    destination_service VARCHAR(128) NOT NULL,
    v1_weight INT NOT NULL DEFAULT 100,
    v2_weight INT NOT NULL DEFAULT 0,
    header_match JSONB, -- optional header-based routing rules
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    namespace VARCHAR(63) NOT NULL,
    name VARCHAR(63) NOT NULL,
    labels JSONB NOT NULL DEFAULT '{}',
    revision BIGINT NOT NULL DEFAULT 0,
    UNIQUE (namespace, name),
    CHECK (v1_weight >= 0 AND v2_weight >= 0 AND v1_weight + v2_weight > 0)
);
CREATE INDEX traffic_split_latest ON TrafficSplit (destination_service, updated_at DESC, id DESC);

CREATE TABLE ServiceEndpoint (
    service_name VARCHAR(128) NOT NULL,
    pod_ip INET NOT NULL,
    port INT NOT NULL,
    version VARCHAR(32),
    healthy BOOLEAN NOT NULL DEFAULT TRUE,
    workload VARCHAR(63),
    revision BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (service_name, pod_ip, port)
);

CREATE TABLE AuthorizationPolicy (
    namespace VARCHAR(63) NOT NULL,
    name VARCHAR(63) NOT NULL,
    target VARCHAR(63),
    action VARCHAR(8) NOT NULL CHECK (action IN ('allow', 'deny')),
    rules JSONB NOT NULL DEFAULT '[]',
    labels JSONB NOT NULL DEFAULT '{}',
    revision BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    PRIMARY KEY (namespace, name)
);
