//! Where each node's pushed configuration stands (`NodeConfigStatus`),
//! written by the replica that serves the node so every replica can report
//! on every node.

use serde::Serialize;
use sqlx::AnyConnection;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{Backend, StoreError, rows::Columns};

/// One node's configuration state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeConfigStatus {
    pub node: String,
    /// The replica serving (or that last served) the node.
    pub replica: String,
    pub connected: bool,
    /// The newest revision the node's configuration is known to match.
    pub synced_revision: Option<i64>,
    /// The push it rejected, while nothing newer was accepted.
    pub nack_revision: Option<i64>,
    pub nack_reason: Option<String>,
    pub last_seen: String,
    /// Where the node's admin endpoint listens, as it reported.
    pub admin_address: Option<String>,
}

/// Writes one node's state. A replica's record of a stream that ended does
/// not overwrite another replica's: the node has moved there, and records
/// are written in batches, so the two may land in either order.
pub(super) async fn record(
    conn: &mut AnyConnection,
    b: Backend,
    status: &NodeConfigStatus,
) -> Result<(), StoreError> {
    let sql = format!(
        "INSERT INTO NodeConfigStatus (node, replica, connected, synced_revision, nack_revision, nack_reason, last_seen, admin_address) \
         VALUES ($1, $2, $3, $4, $5, $6, {}, $8) \
         ON CONFLICT (node) DO UPDATE SET replica = excluded.replica, connected = excluded.connected, \
         synced_revision = excluded.synced_revision, nack_revision = excluded.nack_revision, \
         nack_reason = excluded.nack_reason, last_seen = excluded.last_seen, \
         admin_address = COALESCE(excluded.admin_address, NodeConfigStatus.admin_address) \
         WHERE excluded.connected OR NodeConfigStatus.replica = excluded.replica",
        b.time_param("$7")
    );
    sqlx::query(&sql)
        .bind(&status.node)
        .bind(&status.replica)
        .bind(status.connected)
        .bind(status.synced_revision)
        .bind(status.nack_revision)
        .bind(status.nack_reason.as_deref())
        .bind(&status.last_seen)
        .bind(status.admin_address.as_deref())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub(super) async fn list(
    conn: &mut AnyConnection,
    b: Backend,
) -> Result<Vec<NodeConfigStatus>, StoreError> {
    let sql = format!(
        "SELECT node, replica, connected, synced_revision, nack_revision, nack_reason, {}, admin_address \
         FROM NodeConfigStatus ORDER BY node",
        b.time_column("last_seen")
    );
    let rows = sqlx::query(&sql).fetch_all(&mut *conn).await?;
    rows.iter()
        .map(|row| {
            let c = Columns::new(row, "NodeConfigStatus".into());
            Ok(NodeConfigStatus {
                node: c.text("node")?,
                replica: c.text("replica")?,
                connected: c.boolean("connected")?,
                synced_revision: c.opt_int("synced_revision")?,
                nack_revision: c.opt_int("nack_revision")?,
                nack_reason: c.opt_text("nack_reason")?,
                last_seen: c.text("last_seen")?,
                admin_address: c.opt_text("admin_address")?,
            })
        })
        .collect()
}

/// Now, as `last_seen` is written.
pub fn now_rfc3339() -> String {
    let now = OffsetDateTime::now_utc();
    now.format(&Rfc3339).unwrap_or_else(|_| now.to_string())
}
