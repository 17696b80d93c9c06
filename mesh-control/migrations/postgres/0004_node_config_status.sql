-- Where each node's configuration stands, written by the replica serving
-- it, so any replica can answer `meshctl proxy-status`.
CREATE TABLE NodeConfigStatus (
    node VARCHAR(63) PRIMARY KEY,
    replica VARCHAR(255) NOT NULL,
    connected BOOLEAN NOT NULL,
    -- The newest revision the node's configuration is known to match.
    synced_revision BIGINT,
    -- The push it rejected, while nothing newer was accepted.
    nack_revision BIGINT,
    nack_reason TEXT,
    last_seen TIMESTAMPTZ NOT NULL
);
