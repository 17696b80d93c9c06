-- Where each node's configuration stands, written by the replica serving
-- it, so any replica can answer `meshctl proxy-status`.
CREATE TABLE NodeConfigStatus (
    node VARCHAR(63) PRIMARY KEY,
    replica VARCHAR(255) NOT NULL,
    connected INTEGER NOT NULL,
    -- The newest revision the node's configuration is known to match.
    synced_revision INTEGER,
    -- The push it rejected, while nothing newer was accepted.
    nack_revision INTEGER,
    nack_reason TEXT,
    last_seen TEXT NOT NULL
);
