-- Kubernetes names nodes and service accounts with DNS subdomains (up to
-- 253 characters: ip-10-0-0-1.ec2.internal), not only labels.
ALTER TABLE Workload ALTER COLUMN node TYPE VARCHAR(253);
ALTER TABLE Workload ALTER COLUMN service_account TYPE VARCHAR(253);
ALTER TABLE CertificateRecord ALTER COLUMN node TYPE VARCHAR(253);
ALTER TABLE CertificateRecord ALTER COLUMN service_name TYPE VARCHAR(320);
-- spiffe://<trust domain, 255>/ns/<63>/sa/<253>
ALTER TABLE CertificateRecord ALTER COLUMN spiffe_id TYPE VARCHAR(600);
ALTER TABLE NodeBootstrapToken ALTER COLUMN node TYPE VARCHAR(253);
ALTER TABLE NodeConfigStatus ALTER COLUMN node TYPE VARCHAR(253);
ALTER TABLE RequestStats ALTER COLUMN node TYPE VARCHAR(253);
