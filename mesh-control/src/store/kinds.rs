//! Each kind's table: the row a resource is stored as, and back. The seed's
//! tables key services by `service_name` = `<name>.<namespace>` (a DNS
//! label cannot contain a dot, so the split is unambiguous).

use mesh_model::{
    Kind, Metadata, Object, Resource,
    authz::{Action, AuthorizationPolicySpec},
    namespace::{NamespaceSpec, captured},
    policy::ServicePolicySpec,
    service::ServiceSpec,
    split::TrafficSplitSpec,
    workload::WorkloadSpec,
};
use sqlx::{AnyConnection, any::AnyRow};

use super::{
    Backend, StoreError, StoredSplit,
    rows::{Columns, to_json},
};

/// `<name>.<namespace>`, the seed's service key.
pub(super) fn service_name(namespace: &str, name: &str) -> String {
    format!("{name}.{namespace}")
}

/// The service name part of a seed service key in `namespace`.
fn short_name(service_name: &str) -> &str {
    service_name
        .split_once('.')
        .map_or(service_name, |(name, _)| name)
}

fn columns(kind: Kind, b: Backend) -> String {
    let json = |c: &str| b.json_column(c);
    match kind {
        Kind::Namespace => format!("name, {}, revision", json("labels")),
        Kind::Service => format!(
            "namespace, name, {}, load_balancer, hash_header, {}, {}, revision",
            json("ports"),
            b.inet_column("vip"),
            json("labels")
        ),
        Kind::Workload => format!(
            "namespace, name, service_account, node, {}, version, {}, {}, {}, pod_uid, revision",
            b.inet_column("pod_ip"),
            json("services"),
            json("capture"),
            json("labels")
        ),
        Kind::ServicePolicy => format!(
            "namespace, name, retry_attempts, timeout_ms, cb_threshold, cb_window_sec, \
             cb_recovery_timeout_ms, {}, {}, {}, revision",
            json("rate_limit"),
            json("retry"),
            json("labels")
        ),
        Kind::TrafficSplit => format!(
            "id, namespace, name, source_service, destination_service, v1_weight, v2_weight, \
             {}, {}, revision, {}",
            json("header_match"),
            json("labels"),
            b.time_column("updated_at")
        ),
        Kind::AuthorizationPolicy => format!(
            "namespace, name, target, action, {}, {}, revision",
            json("rules"),
            json("labels")
        ),
    }
}

/// One resource, if stored.
pub(super) async fn read(
    conn: &mut AnyConnection,
    backend: Backend,
    kind: Kind,
    namespace: Option<&str>,
    name: &str,
) -> Result<Option<Resource>, StoreError> {
    let columns = columns(kind, backend);
    let row = if kind.namespaced() {
        let sql = format!("SELECT {columns} FROM {kind} WHERE namespace = $1 AND name = $2");
        sqlx::query(&sql)
            .bind(namespace.unwrap_or(mesh_model::resource::DEFAULT_NAMESPACE))
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?
    } else {
        let sql = format!("SELECT {columns} FROM {kind} WHERE name = $1");
        sqlx::query(&sql)
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?
    };
    row.map(|row| from_row(kind, &row)).transpose()
}

/// Every resource of `kind`, in `namespace` or all, by namespace then name.
pub(super) async fn list(
    conn: &mut AnyConnection,
    backend: Backend,
    kind: Kind,
    namespace: Option<&str>,
) -> Result<Vec<Resource>, StoreError> {
    let columns = columns(kind, backend);
    let rows = match (kind.namespaced(), namespace) {
        (true, Some(namespace)) => {
            let sql = format!("SELECT {columns} FROM {kind} WHERE namespace = $1 ORDER BY name");
            sqlx::query(&sql)
                .bind(namespace)
                .fetch_all(&mut *conn)
                .await?
        }
        (true, None) => {
            let sql = format!("SELECT {columns} FROM {kind} ORDER BY namespace, name");
            sqlx::query(&sql).fetch_all(&mut *conn).await?
        }
        (false, _) => {
            let sql = format!("SELECT {columns} FROM {kind} ORDER BY name");
            sqlx::query(&sql).fetch_all(&mut *conn).await?
        }
    };
    rows.iter().map(|row| from_row(kind, row)).collect()
}

fn metadata(c: &Columns<'_>, namespaced: bool) -> Result<Metadata, StoreError> {
    Ok(Metadata {
        name: c.text("name")?,
        namespace: if namespaced {
            Some(c.text("namespace")?)
        } else {
            None
        },
        labels: c.json("labels")?,
        resource_version: Some(c.int("revision")?),
    })
}

fn from_row(kind: Kind, row: &AnyRow) -> Result<Resource, StoreError> {
    let name: String = sqlx::Row::try_get(row, "name").unwrap_or_default();
    let c = Columns::new(row, format!("{kind}/{name}"));
    let metadata = metadata(&c, kind.namespaced())?;
    Ok(match kind {
        Kind::Namespace => Resource::Namespace(Object {
            metadata,
            spec: NamespaceSpec {},
        }),
        Kind::Service => Resource::Service(Object {
            metadata,
            spec: ServiceSpec {
                ports: c.json("ports")?,
                load_balancer: serde_json::from_value(serde_json::Value::String(
                    c.text("load_balancer")?,
                ))
                .map_err(|e| corrupt(&c, "load_balancer", e))?,
                hash_header: c.opt_text("hash_header")?,
                vip: c.opt_parse("vip")?,
            },
        }),
        Kind::Workload => Resource::Workload(Object {
            metadata,
            spec: WorkloadSpec {
                service_account: c.text("service_account")?,
                node: c.text("node")?,
                ip: c.parse("pod_ip")?,
                services: c.json("services")?,
                version: c.text("version")?,
                capture: c.json("capture")?,
                pod_uid: c.opt_text("pod_uid")?,
            },
        }),
        Kind::ServicePolicy => Resource::ServicePolicy(Object {
            metadata,
            spec: ServicePolicySpec {
                retry_attempts: c.int32("retry_attempts")?,
                timeout_ms: c.int32("timeout_ms")?,
                cb_threshold: c.int32("cb_threshold")?,
                cb_window_sec: c.int32("cb_window_sec")?,
                cb_recovery_timeout_ms: c.int32("cb_recovery_timeout_ms")?,
                rate_limit: c.opt_json("rate_limit")?,
                retry: c.opt_json("retry")?,
            },
        }),
        Kind::TrafficSplit => Resource::TrafficSplit(Object {
            metadata,
            spec: split_spec(&c)?,
        }),
        Kind::AuthorizationPolicy => Resource::AuthorizationPolicy(Object {
            metadata,
            spec: AuthorizationPolicySpec {
                target: c.opt_text("target")?,
                action: match c.text("action")?.as_str() {
                    "allow" => Action::Allow,
                    "deny" => Action::Deny,
                    other => {
                        return Err(corrupt(&c, "action", format!("unknown action {other:?}")));
                    }
                },
                rules: c.json("rules")?,
            },
        }),
    })
}

fn split_spec(c: &Columns<'_>) -> Result<TrafficSplitSpec, StoreError> {
    Ok(TrafficSplitSpec {
        destination: short_name(&c.text("destination_service")?).to_owned(),
        source: c
            .opt_text("source_service")?
            .map(|s| short_name(&s).to_owned()),
        v1_weight: c.int32("v1_weight")?,
        v2_weight: c.int32("v2_weight")?,
        header_match: c.opt_json("header_match")?,
    })
}

fn corrupt(c: &Columns<'_>, column: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        reference: c.reference().to_owned(),
        message: format!("column {column}: {error}"),
    }
}

/// Creates or replaces the row of `resource` at `revision`.
pub(super) async fn write(
    conn: &mut AnyConnection,
    b: Backend,
    resource: &Resource,
    revision: i64,
) -> Result<(), StoreError> {
    let now = b.now();
    let labels = to_json(&resource.metadata().labels);
    let namespace = resource.namespace().unwrap_or_default().to_owned();
    let name = resource.name().to_owned();
    match resource {
        Resource::Namespace(o) => {
            let sql = format!(
                "INSERT INTO Namespace (name, capture, labels, revision, updated_at) \
                 VALUES ($1, $2, {}, $3, {now}) \
                 ON CONFLICT (name) DO UPDATE SET capture = excluded.capture, labels = excluded.labels, \
                 revision = excluded.revision, updated_at = excluded.updated_at",
                b.json_param("$4")
            );
            sqlx::query(&sql)
                .bind(name)
                .bind(captured(&o.metadata))
                .bind(revision)
                .bind(labels)
                .execute(&mut *conn)
                .await?;
        }
        Resource::Service(o) => {
            let sql = format!(
                "INSERT INTO Service (namespace, name, ports, load_balancer, hash_header, labels, revision, vip, updated_at) \
                 VALUES ($1, $2, {}, $4, $5, {}, $7, {}, {now}) \
                 ON CONFLICT (namespace, name) DO UPDATE SET ports = excluded.ports, \
                 load_balancer = excluded.load_balancer, hash_header = excluded.hash_header, \
                 labels = excluded.labels, revision = excluded.revision, vip = excluded.vip, \
                 updated_at = excluded.updated_at",
                b.json_param("$3"),
                b.json_param("$6"),
                b.inet_param("$8")
            );
            sqlx::query(&sql)
                .bind(namespace)
                .bind(name)
                .bind(to_json(&o.spec.ports))
                .bind(o.spec.load_balancer.as_str())
                .bind(o.spec.hash_header.clone())
                .bind(labels)
                .bind(revision)
                .bind(o.spec.vip.map(|vip| vip.to_string()))
                .execute(&mut *conn)
                .await?;
        }
        Resource::Workload(o) => {
            let sql = format!(
                "INSERT INTO Workload (namespace, name, service_account, node, pod_ip, version, services, labels, revision, capture, pod_uid, updated_at) \
                 VALUES ($1, $2, $3, $4, {}, $6, {}, {}, $9, {}, $11, {now}) \
                 ON CONFLICT (namespace, name) DO UPDATE SET service_account = excluded.service_account, \
                 node = excluded.node, pod_ip = excluded.pod_ip, version = excluded.version, \
                 services = excluded.services, labels = excluded.labels, revision = excluded.revision, \
                 capture = excluded.capture, pod_uid = excluded.pod_uid, updated_at = excluded.updated_at",
                b.inet_param("$5"),
                b.json_param("$7"),
                b.json_param("$8"),
                b.json_param("$10")
            );
            sqlx::query(&sql)
                .bind(namespace)
                .bind(name)
                .bind(o.spec.service_account.clone())
                .bind(o.spec.node.clone())
                .bind(o.spec.ip.to_string())
                .bind(o.spec.version.clone())
                .bind(to_json(&o.spec.services))
                .bind(labels)
                .bind(revision)
                .bind(to_json(&o.spec.capture))
                .bind(o.spec.pod_uid.clone())
                .execute(&mut *conn)
                .await?;
        }
        Resource::ServicePolicy(o) => {
            // The seed's apply_policy upsert, keyed by service_name.
            let sql = format!(
                "INSERT INTO ServicePolicy (service_name, retry_attempts, timeout_ms, cb_threshold, cb_window_sec, \
                 cb_recovery_timeout_ms, namespace, name, labels, revision, rate_limit, retry, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, {}, $10, {}, {}, {now}) \
                 ON CONFLICT (service_name) DO UPDATE SET retry_attempts = excluded.retry_attempts, \
                 timeout_ms = excluded.timeout_ms, cb_threshold = excluded.cb_threshold, \
                 cb_window_sec = excluded.cb_window_sec, cb_recovery_timeout_ms = excluded.cb_recovery_timeout_ms, \
                 labels = excluded.labels, revision = excluded.revision, rate_limit = excluded.rate_limit, \
                 retry = excluded.retry, updated_at = excluded.updated_at",
                b.json_param("$9"),
                b.json_param("$11"),
                b.json_param("$12")
            );
            sqlx::query(&sql)
                .bind(service_name(&namespace, &name))
                .bind(o.spec.retry_attempts)
                .bind(o.spec.timeout_ms)
                .bind(o.spec.cb_threshold)
                .bind(o.spec.cb_window_sec)
                .bind(o.spec.cb_recovery_timeout_ms)
                .bind(namespace)
                .bind(name)
                .bind(labels)
                .bind(revision)
                .bind(o.spec.rate_limit.as_ref().map(to_json))
                .bind(o.spec.retry.as_ref().map(to_json))
                .execute(&mut *conn)
                .await?;
        }
        Resource::TrafficSplit(o) => {
            let sql = format!(
                "INSERT INTO TrafficSplit (namespace, name, source_service, destination_service, v1_weight, v2_weight, \
                 header_match, labels, revision, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, {}, {}, $9, {now}) \
                 ON CONFLICT (namespace, name) DO UPDATE SET source_service = excluded.source_service, \
                 destination_service = excluded.destination_service, v1_weight = excluded.v1_weight, \
                 v2_weight = excluded.v2_weight, header_match = excluded.header_match, labels = excluded.labels, \
                 revision = excluded.revision, updated_at = excluded.updated_at",
                b.json_param("$7"),
                b.json_param("$8")
            );
            sqlx::query(&sql)
                .bind(namespace.clone())
                .bind(name)
                .bind(o.spec.source.as_ref().map(|s| service_name(&namespace, s)))
                .bind(service_name(&namespace, &o.spec.destination))
                .bind(o.spec.v1_weight)
                .bind(o.spec.v2_weight)
                .bind(o.spec.header_match.as_ref().map(to_json))
                .bind(labels)
                .bind(revision)
                .execute(&mut *conn)
                .await?;
        }
        Resource::AuthorizationPolicy(o) => {
            let sql = format!(
                "INSERT INTO AuthorizationPolicy (namespace, name, target, action, rules, labels, revision, updated_at) \
                 VALUES ($1, $2, $3, $4, {}, {}, $7, {now}) \
                 ON CONFLICT (namespace, name) DO UPDATE SET target = excluded.target, action = excluded.action, \
                 rules = excluded.rules, labels = excluded.labels, revision = excluded.revision, \
                 updated_at = excluded.updated_at",
                b.json_param("$5"),
                b.json_param("$6")
            );
            let action = match o.spec.action {
                Action::Allow => "allow",
                Action::Deny => "deny",
            };
            sqlx::query(&sql)
                .bind(namespace)
                .bind(name)
                .bind(o.spec.target.clone())
                .bind(action)
                .bind(to_json(&o.spec.rules))
                .bind(labels)
                .bind(revision)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

/// Deletes the row of one resource.
pub(super) async fn remove(
    conn: &mut AnyConnection,
    kind: Kind,
    namespace: Option<&str>,
    name: &str,
) -> Result<(), StoreError> {
    if kind.namespaced() {
        let sql = format!("DELETE FROM {kind} WHERE namespace = $1 AND name = $2");
        sqlx::query(&sql)
            .bind(namespace.unwrap_or(mesh_model::resource::DEFAULT_NAMESPACE))
            .bind(name)
            .execute(&mut *conn)
            .await?;
    } else {
        let sql = format!("DELETE FROM {kind} WHERE name = $1");
        sqlx::query(&sql).bind(name).execute(&mut *conn).await?;
    }
    Ok(())
}

/// How many namespaced resources `namespace` holds.
pub(super) async fn count_in_namespace(
    conn: &mut AnyConnection,
    namespace: &str,
) -> Result<i64, StoreError> {
    let mut total = 0;
    for kind in Kind::ALL.into_iter().filter(|k| k.namespaced()) {
        let sql = format!("SELECT COUNT(*) AS n FROM {kind} WHERE namespace = $1");
        let row = sqlx::query(&sql)
            .bind(namespace)
            .fetch_one(&mut *conn)
            .await?;
        total += sqlx::Row::try_get::<i64, _>(&row, "n")?;
    }
    Ok(total)
}

/// The seed's `SELECT ... FROM TrafficSplit WHERE destination_service = %s
/// ORDER BY updated_at DESC LIMIT 1`, optionally scoped to a caller.
pub(super) async fn latest_split(
    conn: &mut AnyConnection,
    backend: Backend,
    destination_service: &str,
    source_service: Option<&str>,
) -> Result<Option<StoredSplit>, StoreError> {
    let columns = columns(Kind::TrafficSplit, backend);
    let order = "ORDER BY updated_at DESC, id DESC LIMIT 1";
    let row = match source_service {
        None => {
            let sql = format!(
                "SELECT {columns} FROM TrafficSplit WHERE destination_service = $1 {order}"
            );
            sqlx::query(&sql)
                .bind(destination_service)
                .fetch_optional(&mut *conn)
                .await?
        }
        Some(source) => {
            let sql = format!(
                "SELECT {columns} FROM TrafficSplit WHERE destination_service = $1 \
                 AND (source_service IS NULL OR source_service = $2) {order}"
            );
            sqlx::query(&sql)
                .bind(destination_service)
                .bind(source)
                .fetch_optional(&mut *conn)
                .await?
        }
    };
    let Some(row) = row else { return Ok(None) };
    let c = Columns::new(&row, format!("TrafficSplit for {destination_service}"));
    Ok(Some(StoredSplit {
        id: c.int("id")?,
        namespace: c.text("namespace")?,
        name: c.text("name")?,
        spec: split_spec(&c)?,
        updated_at: c.text("updated_at")?,
    }))
}
