-- Bootstrap tokens let a node obtain its first node certificate. Only a
-- SHA-256 of the secret half is stored; the token is shown once, when made.
CREATE TABLE NodeBootstrapToken (
    token_id VARCHAR(16) PRIMARY KEY,
    secret_sha256 VARCHAR(64) NOT NULL,
    node VARCHAR(63), -- NULL: any node may join with it
    description VARCHAR(256) NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
