-- Where each node's admin endpoint listens, as the node reported it when
-- it connected: `meshctl proxy-config` reads the node's configuration there.
ALTER TABLE NodeConfigStatus ADD COLUMN admin_address TEXT;
