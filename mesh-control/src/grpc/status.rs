//! Where each node's configuration stands, written to the store in batches.
//!
//! Every ACK moves a node's recorded revision, and with a hundred nodes a
//! change means a hundred ACKs: written one by one, the records would cost
//! the store more than the change itself and sit in the next write's way.
//! Sessions update the book in memory; one task writes what changed since
//! its last write, in one transaction, at most every [`FLUSH_EVERY`].

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::Notify;

use crate::store::{NodeConfigStatus, Store};

/// How long a record may wait to be written: how far `proxy-status` may
/// trail the nodes.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);

#[derive(Clone, Debug)]
pub struct StatusBook {
    store: Store,
    dirty: Arc<Mutex<HashMap<String, NodeConfigStatus>>>,
    /// Each node's latest session on this replica: a session that ended
    /// after a newer one began (a node reopening its stream) must not mark
    /// the node disconnected.
    sessions: Arc<Mutex<HashMap<String, u64>>>,
    wake: Arc<Notify>,
}

impl StatusBook {
    /// Starts writing to `store`; the writer stops when every copy of the
    /// book is gone.
    pub fn start(store: Store) -> Self {
        let book = Self {
            store,
            dirty: Arc::default(),
            sessions: Arc::default(),
            wake: Arc::new(Notify::new()),
        };
        let dirty = Arc::downgrade(&book.dirty);
        let store = book.store.clone();
        let wake = book.wake.clone();
        tokio::spawn(async move {
            loop {
                wake.notified().await;
                tokio::time::sleep(FLUSH_EVERY).await;
                let Some(dirty) = dirty.upgrade() else {
                    return;
                };
                if !flush(&store, &dirty).await {
                    wake.notify_one();
                }
            }
        });
        book
    }

    /// Records `status` (replacing what was waiting for its node).
    pub fn record(&self, status: NodeConfigStatus) {
        take(&self.dirty).insert(status.node.clone(), status);
        self.wake.notify_one();
    }

    /// Notes that a session for `node` begins; returns its number, for
    /// [`StatusBook::record_end`].
    pub fn begin(&self, node: &str) -> u64 {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let session = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.sessions).insert(node.to_owned(), session);
        session
    }

    /// Records the last `status` of `session`, unless a newer session for
    /// the node has begun since (its records stand).
    pub fn record_end(&self, session: u64, status: NodeConfigStatus) {
        let mut sessions = lock(&self.sessions);
        if sessions.get(&status.node) != Some(&session) {
            return;
        }
        sessions.remove(&status.node);
        drop(sessions);
        self.record(status);
    }

    /// Writes what is waiting, now: the last records of a replica going
    /// down.
    pub async fn flush(&self) {
        flush(&self.store, &self.dirty).await;
    }
}

fn take(
    dirty: &Mutex<HashMap<String, NodeConfigStatus>>,
) -> std::sync::MutexGuard<'_, HashMap<String, NodeConfigStatus>> {
    lock(dirty)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes what is waiting; false if the store failed (it waits again).
async fn flush(store: &Store, dirty: &Mutex<HashMap<String, NodeConfigStatus>>) -> bool {
    let batch: Vec<NodeConfigStatus> = take(dirty).drain().map(|(_, s)| s).collect();
    if batch.is_empty() {
        return true;
    }
    let Err(error) = store.record_node_statuses(&batch).await else {
        return true;
    };
    tracing::warn!(error = %crate::api::DisplayChain(&error), nodes = batch.len(), "recording nodes' configuration state; will retry");
    // Put back what no newer record replaced.
    let mut waiting = take(dirty);
    for status in batch {
        waiting.entry(status.node.clone()).or_insert(status);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(node: &str, connected: bool) -> NodeConfigStatus {
        NodeConfigStatus {
            node: node.into(),
            replica: "a".into(),
            connected,
            synced_revision: Some(1),
            nack_revision: None,
            nack_reason: None,
            last_seen: crate::store::now_rfc3339(),
            admin_address: None,
        }
    }

    #[tokio::test]
    async fn a_session_that_ends_after_its_successor_began_leaves_the_node_connected() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("m.db").display());
        let store = Store::open(&url).await.unwrap();
        let book = StatusBook::start(store.clone());

        // node1 reopens its stream: the old session ends after the new
        // one has begun and recorded.
        let old = book.begin("node1");
        book.record(status("node1", true));
        let new = book.begin("node1");
        book.record(status("node1", true));
        book.record_end(old, status("node1", false));
        book.flush().await;
        let nodes = store.node_statuses().await.unwrap();
        assert!(nodes[0].connected, "{nodes:?}");

        // The latest session's end does count.
        book.record_end(new, status("node1", false));
        book.flush().await;
        assert!(!store.node_statuses().await.unwrap()[0].connected);
    }
}
