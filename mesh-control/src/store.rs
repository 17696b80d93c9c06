//! The desired state in SQL, behind one interface with two backends:
//! SQLite (a file, the embedded default) and PostgreSQL (production, several
//! control-plane replicas). Both run the same queries through sqlx's `Any`
//! driver; their schemas are twins (see `migrations/`), PostgreSQL with its
//! native types.
//!
//! Every change runs in one transaction that bumps the global revision, so
//! a multi-document apply lands whole or not at all, and the configuration
//! push can key off the revision.

mod backend;
mod certificates;
mod endpoints;
mod kinds;
mod nodes;
mod rows;
mod stats;
mod tokens;

use std::{collections::BTreeSet, net::IpAddr, sync::Arc, time::Duration};

use mesh_model::{
    Kind, Resource,
    split::{SplitRule, TrafficSplitSpec, Version},
};
use serde::Serialize;
use sqlx::{
    AnyConnection, AnyPool, Executor as _, Row as _,
    any::{AnyPoolOptions, install_default_drivers},
};

pub use backend::Backend;
pub use certificates::{CertificateRow, NewCertificate};
pub use endpoints::{Endpoint, Mark, affected as endpoints_affected_by};
pub use nodes::{NodeConfigStatus, now_rfc3339};
pub use stats::{EdgeReport, Signals};
pub use tokens::{MAX_TOKEN_TTL, NewToken, TokenInfo, TokenRejected};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://...")]
    UnsupportedUrl(String),
    #[error("connecting to the {backend} database at {url}")]
    Connect {
        backend: &'static str,
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrating the {backend} schema")]
    Migrate {
        backend: &'static str,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{reference}: {message}")]
    Conflict { reference: String, message: String },
    #[error("{reference}: the stored row cannot be read back: {message}")]
    Corrupt { reference: String, message: String },
}

impl StoreError {
    /// Whether the database could not be reached, is shutting down or
    /// starting, or gave no connection in time (rather than refusing this
    /// operation): the caller may retry later. A transaction that failed
    /// this way was rolled back, unless the connection broke during its
    /// commit, when its outcome is unknown.
    pub fn is_unavailable(&self) -> bool {
        let StoreError::Database(error) = self else {
            return matches!(self, StoreError::Connect { .. });
        };
        match error {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            // SQLSTATE class 08 (connection exception) and 57 (operator
            // intervention: shutdown, crash recovery, cannot connect now).
            sqlx::Error::Database(error) => error
                .code()
                .is_some_and(|code| code.starts_with("08") || code.starts_with("57")),
            _ => false,
        }
    }
}

/// How long an operation waits for a database connection before it is
/// answered "unavailable": long enough for a burst of writes to queue,
/// short enough that a caller learns of an outage while it can act.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// What an apply did to one resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Applied {
    Created,
    Configured,
    Unchanged,
}

/// The outcome of an apply.
#[derive(Clone, Debug, Serialize)]
pub struct ApplyOutcome {
    /// The revision after the apply (unchanged when nothing changed).
    pub revision: i64,
    /// Each resource's reference and what happened to it, in input order.
    pub results: Vec<(String, Applied)>,
}

/// Whether an apply keeps what it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Commit {
    Yes,
    No,
}

/// A change recorded at a revision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    pub revision: i64,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub op: String,
}

/// A stored traffic split, as the seed's `compute_traffic_split` reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredSplit {
    pub id: i64,
    pub namespace: String,
    pub name: String,
    pub spec: TrafficSplitSpec,
    pub updated_at: String,
}

/// The store.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Counts commits made through this process (and, once
    /// [`Store::listen_for_writes`] runs, other replicas' commits), so
    /// followers need not wait for their next poll.
    writes: Arc<tokio::sync::watch::Sender<u64>>,
    url: StoreUrl,
}

/// The database URL, shown without its password.
#[derive(Clone)]
struct StoreUrl(Arc<str>);

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

/// A role held by this replica alone; see [`Store::try_lead`].
#[derive(Debug)]
pub struct Leadership(Holder);

#[derive(Debug)]
enum Holder {
    /// SQLite: the only replica.
    Only,
    /// PostgreSQL: the session holding the advisory lock.
    Session(AnyConnection),
    /// The lock was lost: this value no longer means anything.
    Lost,
}

impl Leadership {
    /// Whether the role is still held: its session answers within 5 s and
    /// still holds the lock. Once not, never again.
    pub async fn held(&mut self) -> bool {
        let connection = match &mut self.0 {
            Holder::Only => return true,
            Holder::Lost => return false,
            Holder::Session(connection) => connection,
        };
        let asked = sqlx::query(
            "SELECT EXISTS (SELECT 1 FROM pg_locks \
             WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid())",
        )
        .fetch_one(connection);
        let holds = match tokio::time::timeout(Duration::from_secs(5), asked).await {
            Ok(Ok(row)) => row.try_get::<bool, _>(0).unwrap_or(false),
            _ => false,
        };
        if !holds {
            // Dropped, the session ends and releases whatever it held.
            self.0 = Holder::Lost;
        }
        holds
    }
}

/// The advisory-lock key of a role: FNV-1a of its name, stable across
/// builds and replicas.
fn lock_key(role: &str) -> i64 {
    let hash = role.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    i64::from_be_bytes(hash.to_be_bytes())
}

/// The PostgreSQL channel every committed write notifies.
const WRITES_CHANNEL: &str = "mesh_revision";

impl Store {
    /// Connects to `url` (`sqlite://path?mode=rwc` or `postgres://...`) and
    /// brings the schema up to date.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let store = Self::connect(url).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Connects without migrating.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let backend =
            Backend::from_url(url).ok_or_else(|| StoreError::UnsupportedUrl(redact(url)))?;
        install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Sqlite => 4,
                Backend::Postgres => 16,
            })
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(move |conn, _| Box::pin(async move { prepare(conn, backend).await }))
            .connect(url)
            .await
            .map_err(|source| StoreError::Connect {
                backend: backend.name(),
                url: redact(url),
                source,
            })?;
        Ok(Self {
            pool,
            backend,
            writes: Arc::new(tokio::sync::watch::Sender::new(0)),
            url: StoreUrl(url.into()),
        })
    }

    /// Changes with every commit made through this process, and after
    /// [`Store::listen_for_writes`] with other replicas' commits too.
    pub fn writes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.writes.subscribe()
    }

    /// On PostgreSQL, follows every replica's commits (LISTEN/NOTIFY: each
    /// write transaction notifies at commit) into [`Store::writes`];
    /// returns once listening. Nothing to do on SQLite, which has one
    /// replica. A notification lost while the listening connection
    /// reconnects is covered by the followers' polling.
    pub async fn listen_for_writes(&self) -> Result<(), StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(());
        }
        let mut listener = sqlx::postgres::PgListener::connect(&self.url.0).await?;
        listener.listen(WRITES_CHANNEL).await?;
        let writes = Arc::downgrade(&self.writes);
        tokio::spawn(async move {
            loop {
                let received = listener.recv().await;
                let Some(writes) = writes.upgrade() else {
                    return;
                };
                // After an error too: something may have been missed.
                writes.send_modify(|n| *n += 1);
                if let Err(error) = received {
                    tracing::warn!(%error, "listening for other replicas' writes; reconnecting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });
        Ok(())
    }

    fn wrote(&self) {
        self.writes.send_modify(|n| *n += 1);
    }

    /// Applies the schema migrations not yet applied.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = match self.backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite"),
            Backend::Postgres => sqlx::migrate!("./migrations/postgres"),
        };
        migrator
            .run(&self.pool)
            .await
            .map_err(|source| StoreError::Migrate {
                backend: self.backend.name(),
                source,
            })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The current revision.
    pub async fn revision(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT revision FROM mesh_revision WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("revision")?)
    }

    /// Creates or updates every resource, in one transaction: all land, or
    /// none does. Resources identical to what is stored are left alone, and
    /// when nothing changes the revision does not move. A resource that
    /// carries `metadata.resource_version` is written only if the stored one
    /// is still at that revision.
    pub async fn apply(&self, resources: &[Resource]) -> Result<ApplyOutcome, StoreError> {
        self.apply_in(resources, Commit::Yes).await
    }

    /// Runs an apply to the end — every check, conflict and result — then
    /// rolls it back: what `apply` would do, with nothing changed.
    pub async fn dry_run(&self, resources: &[Resource]) -> Result<ApplyOutcome, StoreError> {
        self.apply_in(resources, Commit::No).await
    }

    async fn apply_in(
        &self,
        resources: &[Resource],
        commit: Commit,
    ) -> Result<ApplyOutcome, StoreError> {
        let backend = self.backend;
        let mut tx = self.pool.begin_with(backend.begin_write()).await?;
        // Taken first: the revision row's lock serialises writers, so what
        // this transaction reads next is not changed under it.
        let revision = bump_revision(&mut tx, backend).await?;
        let mut changed = false;
        let mut results = Vec::with_capacity(resources.len());
        let mut endpoints_to_refresh = BTreeSet::new();
        for resource in resources {
            let reference = resource.reference();
            let existing = kinds::read(
                &mut tx,
                backend,
                resource.kind(),
                resource.namespace(),
                resource.name(),
            )
            .await?;
            check_expected_version(resource, existing.as_ref())?;
            if existing.as_ref().is_some_and(|e| same(e, resource)) {
                results.push((reference, Applied::Unchanged));
                continue;
            }
            changed = true;
            check_unique_pod(&mut tx, resource).await?;
            kinds::write(&mut tx, backend, resource, revision).await?;
            record_change(
                &mut tx,
                revision,
                resource.kind(),
                resource.namespace(),
                resource.name(),
                "upsert",
            )
            .await?;
            endpoints_to_refresh.extend(endpoints::affected(existing.as_ref()));
            endpoints_to_refresh.extend(endpoints::affected(Some(resource)));
            let applied = if existing.is_some() {
                Applied::Configured
            } else {
                Applied::Created
            };
            results.push((reference, applied));
        }
        if changed {
            for resource in resources {
                check_namespace_exists(&mut tx, backend, resource).await?;
            }
            check_unique_addresses(&mut tx, backend, resources).await?;
            for (namespace, service) in &endpoints_to_refresh {
                endpoints::refresh(&mut tx, backend, namespace, service, revision).await?;
            }
        }
        // Nothing changed, or only checking: the revision bump goes too.
        if !changed || commit == Commit::No {
            tx.rollback().await?;
            return Ok(ApplyOutcome {
                revision: revision - 1,
                results,
            });
        }
        tx.commit().await?;
        self.wrote();
        Ok(ApplyOutcome { revision, results })
    }

    /// One resource, with `metadata.resource_version` set.
    pub async fn get(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<Resource>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        kinds::read(&mut conn, self.backend, kind, namespace, name).await
    }

    /// Every resource of `kind`, in one namespace or all, sorted by
    /// namespace then name.
    pub async fn list(
        &self,
        kind: Kind,
        namespace: Option<&str>,
    ) -> Result<Vec<Resource>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        kinds::list(&mut conn, self.backend, kind, namespace).await
    }

    /// Deletes one resource; returns the new revision. A namespace is
    /// deleted only once it holds nothing.
    pub async fn delete(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<i64, StoreError> {
        let backend = self.backend;
        let mut tx = self.pool.begin_with(backend.begin_write()).await?;
        let reference = match namespace {
            Some(ns) if kind.namespaced() => format!("{kind}/{ns}/{name}"),
            _ => format!("{kind}/{name}"),
        };
        let Some(existing) = kinds::read(&mut tx, backend, kind, namespace, name).await? else {
            return Err(StoreError::NotFound(reference));
        };
        if kind == Kind::Namespace {
            let held = kinds::count_in_namespace(&mut tx, name).await?;
            if held > 0 {
                return Err(StoreError::Conflict {
                    reference,
                    message: format!(
                        "the namespace still holds {held} resources; delete them first"
                    ),
                });
            }
        }
        let revision = bump_revision(&mut tx, backend).await?;
        kinds::remove(&mut tx, kind, existing.namespace(), name).await?;
        record_change(
            &mut tx,
            revision,
            kind,
            existing.namespace(),
            name,
            "delete",
        )
        .await?;
        for (namespace, service) in endpoints::affected(Some(&existing)) {
            endpoints::refresh(&mut tx, backend, &namespace, &service, revision).await?;
        }
        tx.commit().await?;
        self.wrote();
        Ok(revision)
    }

    /// The endpoints of `service_name` (`name.namespace`), by address and port.
    pub async fn endpoints(&self, service_name: &str) -> Result<Vec<Endpoint>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        endpoints::list(&mut conn, self.backend, Some(service_name)).await
    }

    /// Every endpoint of every service, by service then address and port.
    pub async fn all_endpoints(&self) -> Result<Vec<Endpoint>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        endpoints::list(&mut conn, self.backend, None).await
    }

    /// Marks one endpoint healthy or not (the operator's marking); returns
    /// the new revision.
    pub async fn set_endpoint_health(
        &self,
        service_name: &str,
        ip: IpAddr,
        port: u16,
        healthy: bool,
    ) -> Result<i64, StoreError> {
        self.set_endpoint_mark(service_name, ip, port, (Mark::Healthy, healthy))
            .await
    }

    /// Records the readiness the endpoint's node observed; returns the new
    /// revision.
    pub async fn set_endpoint_ready(
        &self,
        service_name: &str,
        ip: IpAddr,
        port: u16,
        ready: bool,
    ) -> Result<i64, StoreError> {
        self.set_endpoint_mark(service_name, ip, port, (Mark::Ready, ready))
            .await
    }

    async fn set_endpoint_mark(
        &self,
        service_name: &str,
        ip: IpAddr,
        port: u16,
        mark: (Mark, bool),
    ) -> Result<i64, StoreError> {
        let backend = self.backend;
        let mut tx = self.pool.begin_with(backend.begin_write()).await?;
        let revision = bump_revision(&mut tx, backend).await?;
        let found =
            endpoints::set_mark(&mut tx, backend, service_name, ip, port, mark, revision).await?;
        if !found {
            return Err(StoreError::NotFound(format!(
                "endpoint {ip}:{port} of {service_name}"
            )));
        }
        let (name, namespace) = service_name.split_once('.').unwrap_or((service_name, ""));
        record_change(
            &mut tx,
            revision,
            Kind::Service,
            Some(namespace),
            name,
            "upsert",
        )
        .await?;
        tx.commit().await?;
        self.wrote();
        Ok(revision)
    }

    /// The seed's split lookup: the most recently updated split for
    /// `destination_service` (`name.namespace`). With a `source_service`,
    /// only splits for every caller or for that caller count.
    pub async fn latest_split(
        &self,
        destination_service: &str,
        source_service: Option<&str>,
    ) -> Result<Option<StoredSplit>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        kinds::latest_split(&mut conn, self.backend, destination_service, source_service).await
    }

    /// The seed's `compute_traffic_split`: the version a request to
    /// `destination_service` goes to. No split: v1. Otherwise a header match
    /// sends it to v2, else `roll(total)` (uniform in `1..=total`) decides
    /// by weight.
    pub async fn compute_traffic_split<'h>(
        &self,
        destination_service: &str,
        source_service: Option<&str>,
        header: impl Fn(&str) -> Option<&'h str>,
        roll: impl FnOnce(u32) -> u32,
    ) -> Result<Version, StoreError> {
        let Some(split) = self
            .latest_split(destination_service, source_service)
            .await?
        else {
            return Ok(Version::V1);
        };
        let rule = SplitRule::new(&split.spec).map_err(|e| StoreError::Corrupt {
            reference: format!("TrafficSplit/{}/{}", split.namespace, split.name),
            message: format!("header_match: {e}"),
        })?;
        let total = rule.total_weight();
        let roll = if total == 0 { 0 } else { roll(total) };
        Ok(rule.choose(header, roll))
    }

    /// Changes recorded after `revision`, oldest first.
    pub async fn changes_since(&self, revision: i64) -> Result<Vec<Change>, StoreError> {
        let rows = sqlx::query(
            "SELECT revision, kind, namespace, name, op FROM resource_changes \
             WHERE revision > $1 ORDER BY revision, kind, namespace, name",
        )
        .bind(revision)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Change {
                    revision: row.try_get("revision")?,
                    kind: row.try_get("kind")?,
                    namespace: row.try_get("namespace")?,
                    name: row.try_get("name")?,
                    op: row.try_get("op")?,
                })
            })
            .collect()
    }

    /// Records an issued certificate (the seed's CertificateRecord).
    pub async fn record_certificate(
        &self,
        certificate: &NewCertificate<'_>,
    ) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        certificates::record(&mut conn, self.backend, certificate).await
    }

    /// Recorded certificates, of one service or all, oldest first.
    pub async fn certificates(
        &self,
        service_name: Option<&str>,
    ) -> Result<Vec<CertificateRow>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        certificates::list(&mut conn, self.backend, service_name).await
    }

    /// Makes a node bootstrap token valid for `ttl` from `now`, for `node`
    /// alone or (`None`) for any node.
    pub async fn create_bootstrap_token(
        &self,
        node: Option<&str>,
        description: &str,
        ttl: time::Duration,
        now: time::OffsetDateTime,
    ) -> Result<NewToken, StoreError> {
        let mut conn = self.pool.acquire().await?;
        tokens::create(&mut conn, self.backend, node, description, ttl, now).await
    }

    /// The bootstrap tokens, soonest to expire first.
    pub async fn bootstrap_tokens(&self) -> Result<Vec<TokenInfo>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        tokens::list(&mut conn, self.backend).await
    }

    /// Revokes a bootstrap token; whether it existed.
    pub async fn delete_bootstrap_token(&self, id: &str) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        tokens::delete(&mut conn, id).await
    }

    /// Checks a bootstrap token presented by a node joining as `node`.
    pub async fn check_bootstrap_token(
        &self,
        token: &str,
        node: &str,
        now: time::OffsetDateTime,
    ) -> Result<Result<TokenInfo, TokenRejected>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        tokens::check(&mut conn, self.backend, token, node, now).await
    }

    /// Records several nodes' states in one transaction.
    pub async fn record_node_statuses(
        &self,
        statuses: &[NodeConfigStatus],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with(self.backend.begin_write()).await?;
        for status in statuses {
            nodes::record(&mut tx, self.backend, status).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Keeps what `node` reported of its workloads' requests, and prunes
    /// reports older than an hour.
    pub async fn record_request_stats(
        &self,
        node: &str,
        reports: &[EdgeReport],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with(self.backend.begin_write()).await?;
        stats::record(&mut tx, node, now_ms(), reports).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Golden signals over the last `window` (at most an hour), per
    /// service, or per calling workload and service when `by_edge`.
    pub async fn request_signals(
        &self,
        window: std::time::Duration,
        by_edge: bool,
    ) -> Result<Vec<Signals>, StoreError> {
        let window_ms = i64::try_from(window.as_millis())
            .unwrap_or(stats::KEPT_MS)
            .min(stats::KEPT_MS);
        let now = now_ms();
        let mut conn = self.pool.acquire().await?;
        let reports = stats::since(&mut conn, now - window_ms).await?;
        Ok(stats::summarize(&reports, now, window_ms, by_edge))
    }

    /// Every node's configuration state, by node name.
    pub async fn node_statuses(&self) -> Result<Vec<NodeConfigStatus>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        nodes::list(&mut conn, self.backend).await
    }

    /// The right to do `role` (a job only one replica may do at a time:
    /// mirroring Kubernetes), if no other replica holds it; held while the
    /// returned [`Leadership`] lives. On PostgreSQL it is an advisory lock
    /// on a connection of its own, so a replica that dies or loses the
    /// database loses it and another takes it. SQLite has one replica.
    pub async fn try_lead(&self, role: &str) -> Result<Option<Leadership>, StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(Some(Leadership(Holder::Only)));
        }
        let mut connection = self.pool.acquire().await?.detach();
        // The server ends a session whose peer vanished in about 30 s, and
        // its lock with it: another replica then takes over.
        for setting in [
            "SET tcp_keepalives_idle = 10",
            "SET tcp_keepalives_interval = 5",
            "SET tcp_keepalives_count = 3",
            "SET tcp_user_timeout = 20000",
        ] {
            connection.execute(setting).await?;
        }
        let held: bool = sqlx::query("SELECT pg_try_advisory_lock($1)")
            .bind(lock_key(role))
            .fetch_one(&mut connection)
            .await?
            .try_get(0)?;
        Ok(held.then_some(Leadership(Holder::Session(connection))))
    }

    /// A connection of its own to the store's database, for maintenance and
    /// for tests that look below the API.
    pub async fn raw_connection(&self) -> Result<AnyConnection, StoreError> {
        Ok(self.pool.acquire().await?.detach())
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

async fn prepare(conn: &mut AnyConnection, backend: Backend) -> Result<(), sqlx::Error> {
    match backend {
        Backend::Sqlite => {
            conn.execute(
                "PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 30000; \
                 PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;",
            )
            .await?;
        }
        Backend::Postgres => {
            conn.execute("SET TIME ZONE 'UTC'").await?;
        }
    }
    Ok(())
}

/// Whether two resources are the same apart from their stored revision.
fn same(stored: &Resource, incoming: &Resource) -> bool {
    let mut a = stored.clone();
    let mut b = incoming.clone();
    a.metadata_mut().resource_version = None;
    b.metadata_mut().resource_version = None;
    a == b
}

fn check_expected_version(
    resource: &Resource,
    existing: Option<&Resource>,
) -> Result<(), StoreError> {
    let Some(expected) = resource.metadata().resource_version else {
        return Ok(());
    };
    let conflict = |message: String| StoreError::Conflict {
        reference: resource.reference(),
        message,
    };
    match existing.and_then(|e| e.metadata().resource_version) {
        Some(actual) if actual == expected => Ok(()),
        Some(actual) => Err(conflict(format!(
            "changed at revision {actual} since revision {expected} that this update is based on; get it again and reapply"
        ))),
        None => Err(conflict(format!(
            "does not exist, but the update expects revision {expected}; remove metadata.resource_version to create it"
        ))),
    }
}

async fn check_namespace_exists(
    conn: &mut AnyConnection,
    backend: Backend,
    resource: &Resource,
) -> Result<(), StoreError> {
    let Some(namespace) = resource.namespace() else {
        return Ok(());
    };
    if kinds::read(conn, backend, Kind::Namespace, None, namespace)
        .await?
        .is_none()
    {
        return Err(StoreError::Conflict {
            reference: resource.reference(),
            message: format!(
                "namespace {namespace} does not exist; create it (kind: Namespace) first or in the same apply"
            ),
        });
    }
    Ok(())
}

/// Refuses a workload or service address another workload or service
/// already has: every node maps addresses to identities and services, and
/// two claimants would let one redirect (or downgrade) the other's traffic.
async fn check_unique_addresses(
    conn: &mut AnyConnection,
    backend: Backend,
    resources: &[Resource],
) -> Result<(), StoreError> {
    let claims: Vec<(&Resource, &str, std::net::IpAddr)> = resources
        .iter()
        .filter_map(|r| match r {
            Resource::Workload(w) => Some((r, "spec.ip", w.spec.ip)),
            Resource::Service(s) => s.spec.vip.map(|vip| (r, "spec.vip", vip)),
            _ => None,
        })
        .collect();
    let holders_sql = [
        (
            Kind::Workload,
            format!(
                "SELECT namespace, name FROM Workload WHERE pod_ip = {}",
                backend.inet_param("$1")
            ),
        ),
        (
            Kind::Service,
            format!(
                "SELECT namespace, name FROM Service WHERE vip = {}",
                backend.inet_param("$1")
            ),
        ),
    ];
    for (resource, field, address) in claims {
        for (kind, sql) in &holders_sql {
            let holders = sqlx::query(sql)
                .bind(address.to_string())
                .fetch_all(&mut *conn)
                .await?;
            for row in &holders {
                let namespace: String = row.try_get("namespace")?;
                let name: String = row.try_get("name")?;
                let itself = *kind == resource.kind()
                    && Some(namespace.as_str()) == resource.namespace()
                    && name == resource.name();
                if !itself {
                    return Err(StoreError::Conflict {
                        reference: resource.reference(),
                        message: format!(
                            "{field}: {address} is already the address of {kind} {namespace}/{name}"
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Refuses a workload claiming another workload's pod: a pod UID leads a
/// node to a pod's network namespace, so the pod would be captured, and
/// served, as the claimant. Checked before the write (a unique index backs
/// it up).
async fn check_unique_pod(conn: &mut AnyConnection, resource: &Resource) -> Result<(), StoreError> {
    let Resource::Workload(w) = resource else {
        return Ok(());
    };
    let Some(uid) = &w.spec.pod_uid else {
        return Ok(());
    };
    let holders = sqlx::query("SELECT namespace, name FROM Workload WHERE pod_uid = $1")
        .bind(uid.clone())
        .fetch_all(&mut *conn)
        .await?;
    for row in &holders {
        let namespace: String = row.try_get("namespace")?;
        let name: String = row.try_get("name")?;
        if Some(namespace.as_str()) != resource.namespace() || name != resource.name() {
            return Err(StoreError::Conflict {
                reference: resource.reference(),
                message: format!(
                    "spec.pod_uid: {uid} is already the pod of Workload {namespace}/{name}"
                ),
            });
        }
    }
    Ok(())
}

/// The control plane's clock, in Unix milliseconds.
fn now_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

/// Moves the global revision on by one and returns it. Being the first
/// write of a transaction, it also serialises writers: revisions follow
/// commit order.
async fn bump_revision(conn: &mut AnyConnection, backend: Backend) -> Result<i64, StoreError> {
    let row = sqlx::query(
        "UPDATE mesh_revision SET revision = revision + 1 WHERE id = 1 RETURNING revision",
    )
    .fetch_one(&mut *conn)
    .await?;
    if backend == Backend::Postgres {
        // Delivered at commit, dropped with a rollback.
        sqlx::query(&format!("NOTIFY {WRITES_CHANNEL}"))
            .execute(&mut *conn)
            .await?;
    }
    Ok(row.try_get("revision")?)
}

async fn record_change(
    conn: &mut AnyConnection,
    revision: i64,
    kind: Kind,
    namespace: Option<&str>,
    name: &str,
    op: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO resource_changes (revision, kind, namespace, name, op) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (revision, kind, namespace, name) DO UPDATE SET op = excluded.op",
    )
    .bind(revision)
    .bind(kind.as_str())
    .bind(namespace.unwrap_or(""))
    .bind(name)
    .bind(op)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(
            redact("postgres://mesh:s3cret@db:5432/mesh"),
            "postgres://mesh:***@db:5432/mesh"
        );
        assert_eq!(redact("postgres://mesh@db/mesh"), "postgres://mesh@db/mesh");
        assert_eq!(redact("sqlite://mesh.db"), "sqlite://mesh.db");
    }
}
