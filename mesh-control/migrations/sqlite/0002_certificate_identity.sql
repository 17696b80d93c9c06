-- Every issuance is recorded with the identity it certifies, its serial and
-- the node that asked (NULL when the CA generated the key itself).
ALTER TABLE CertificateRecord ADD COLUMN spiffe_id VARCHAR(512) NOT NULL DEFAULT '';
ALTER TABLE CertificateRecord ADD COLUMN serial VARCHAR(40) NOT NULL DEFAULT '';
ALTER TABLE CertificateRecord ADD COLUMN node VARCHAR(63);
CREATE INDEX certificate_by_expiry ON CertificateRecord (expiry);
