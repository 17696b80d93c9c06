-- Kubernetes names nodes and service accounts with DNS subdomains (up to
-- 253 characters); SQLite does not enforce VARCHAR lengths, so nothing
-- changes here (PostgreSQL widens its columns in the same migration).
SELECT 1;
