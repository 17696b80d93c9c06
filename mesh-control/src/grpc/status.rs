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
    wake: Arc<Notify>,
}

impl StatusBook {
    /// Starts writing to `store`; the writer stops when every copy of the
    /// book is gone.
    pub fn start(store: Store) -> Self {
        let book = Self {
            store,
            dirty: Arc::default(),
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

    /// Writes what is waiting, now: the last records of a replica going
    /// down.
    pub async fn flush(&self) {
        flush(&self.store, &self.dirty).await;
    }
}

fn take(
    dirty: &Mutex<HashMap<String, NodeConfigStatus>>,
) -> std::sync::MutexGuard<'_, HashMap<String, NodeConfigStatus>> {
    dirty.lock().unwrap_or_else(|e| e.into_inner())
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
    tracing::warn!(%error, nodes = batch.len(), "recording nodes' configuration state; will retry");
    // Put back what no newer record replaced.
    let mut waiting = take(dirty);
    for status in batch {
        waiting.entry(status.node.clone()).or_insert(status);
    }
    false
}
