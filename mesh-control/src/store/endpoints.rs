//! The seed's ServiceEndpoint table, derived from workloads: every workload
//! that serves a service contributes one endpoint per service port. The
//! `healthy` (the operator's marking) and `ready` (what the node running the
//! workload observed) are state of their own, kept across refreshes.

use std::{collections::BTreeMap, net::IpAddr};

use mesh_model::{Kind, Resource};
use serde::Serialize;
use sqlx::AnyConnection;

use super::{
    Backend, StoreError,
    kinds::{self, service_name},
    rows::Columns,
};

/// One endpoint of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub service_name: String,
    pub ip: IpAddr,
    pub port: u16,
    pub version: Option<String>,
    /// As marked through the API (an operator draining it).
    pub healthy: bool,
    /// As its node last observed it.
    pub ready: bool,
    pub workload: Option<String>,
}

/// The services (namespace, name) whose endpoints depend on `resource`:
/// a service's own, and those a workload serves.
pub fn affected(resource: Option<&Resource>) -> Vec<(String, String)> {
    match resource {
        Some(Resource::Service(o)) => vec![(o.namespace().to_owned(), o.name().to_owned())],
        Some(Resource::Workload(o)) => o
            .spec
            .services
            .iter()
            .map(|s| (o.namespace().to_owned(), s.clone()))
            .collect(),
        _ => Vec::new(),
    }
}

/// The endpoints of `service` (`name.namespace`), or of every service.
pub(super) async fn list(
    conn: &mut AnyConnection,
    backend: Backend,
    service: Option<&str>,
) -> Result<Vec<Endpoint>, StoreError> {
    let mut sql = format!(
        "SELECT service_name, {}, port, version, healthy, ready, workload FROM ServiceEndpoint",
        backend.inet_column("pod_ip")
    );
    let rows = match service {
        Some(service) => {
            sql.push_str(" WHERE service_name = $1");
            sqlx::query(&sql)
                .bind(service)
                .fetch_all(&mut *conn)
                .await?
        }
        None => sqlx::query(&sql).fetch_all(&mut *conn).await?,
    };
    let service = service.unwrap_or("every service");
    let mut endpoints = rows
        .iter()
        .map(|row| {
            let c = Columns::new(row, format!("ServiceEndpoint of {service}"));
            Ok(Endpoint {
                service_name: c.text("service_name")?,
                ip: c.parse("pod_ip")?,
                port: u16::try_from(c.int("port")?).map_err(|e| StoreError::Corrupt {
                    reference: c.reference().to_owned(),
                    message: format!("column port: {e}"),
                })?,
                version: c.opt_text("version")?,
                healthy: c.boolean("healthy")?,
                ready: c.boolean("ready")?,
                workload: c.opt_text("workload")?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    endpoints.sort_by(|a, b| (&a.service_name, a.ip, a.port).cmp(&(&b.service_name, b.ip, b.port)));
    Ok(endpoints)
}

/// Brings the endpoints of one service in line with its ports and the
/// workloads that serve it.
pub(super) async fn refresh(
    conn: &mut AnyConnection,
    backend: Backend,
    namespace: &str,
    service: &str,
    revision: i64,
) -> Result<(), StoreError> {
    let key = service_name(namespace, service);
    let mut desired: BTreeMap<(IpAddr, u16), (String, String)> = BTreeMap::new();
    if let Some(Resource::Service(svc)) =
        kinds::read(conn, backend, Kind::Service, Some(namespace), service).await?
    {
        for workload in kinds::list(conn, backend, Kind::Workload, Some(namespace)).await? {
            let Resource::Workload(w) = workload else {
                continue;
            };
            if !w.spec.services.iter().any(|s| s == service) {
                continue;
            }
            for port in &svc.spec.ports {
                desired.insert(
                    (w.spec.ip, port.workload_port()),
                    (w.spec.version.clone(), w.name().to_owned()),
                );
            }
        }
    }
    let existing = list(conn, backend, Some(&key)).await?;
    for endpoint in &existing {
        match desired.remove(&(endpoint.ip, endpoint.port)) {
            None => {
                let sql = format!(
                    "DELETE FROM ServiceEndpoint WHERE service_name = $1 AND pod_ip = {} AND port = $3",
                    backend.inet_param("$2")
                );
                sqlx::query(&sql)
                    .bind(key.clone())
                    .bind(endpoint.ip.to_string())
                    .bind(i32::from(endpoint.port))
                    .execute(&mut *conn)
                    .await?;
            }
            Some((version, workload)) => {
                if endpoint.version.as_deref() == Some(&version)
                    && endpoint.workload.as_deref() == Some(&workload)
                {
                    continue;
                }
                let sql = format!(
                    "UPDATE ServiceEndpoint SET version = $4, workload = $5, revision = $6 \
                     WHERE service_name = $1 AND pod_ip = {} AND port = $3",
                    backend.inet_param("$2")
                );
                sqlx::query(&sql)
                    .bind(key.clone())
                    .bind(endpoint.ip.to_string())
                    .bind(i32::from(endpoint.port))
                    .bind(version)
                    .bind(workload)
                    .bind(revision)
                    .execute(&mut *conn)
                    .await?;
            }
        }
    }
    for ((ip, port), (version, workload)) in desired {
        let sql = format!(
            "INSERT INTO ServiceEndpoint (service_name, pod_ip, port, version, healthy, workload, revision) \
             VALUES ($1, {}, $3, $4, $5, $6, $7)",
            backend.inet_param("$2")
        );
        sqlx::query(&sql)
            .bind(key.clone())
            .bind(ip.to_string())
            .bind(i32::from(port))
            .bind(version)
            .bind(true)
            .bind(workload)
            .bind(revision)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// An endpoint's state of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// The operator's marking.
    Healthy,
    /// What its node observed.
    Ready,
}

/// Sets `mark` on one endpoint; false when there is no such endpoint.
pub(super) async fn set_mark(
    conn: &mut AnyConnection,
    backend: Backend,
    service: &str,
    ip: IpAddr,
    port: u16,
    (mark, value): (Mark, bool),
    revision: i64,
) -> Result<bool, StoreError> {
    let column = match mark {
        Mark::Healthy => "healthy",
        Mark::Ready => "ready",
    };
    let sql = format!(
        "UPDATE ServiceEndpoint SET {column} = $4, revision = $5 \
         WHERE service_name = $1 AND pod_ip = {} AND port = $3",
        backend.inet_param("$2")
    );
    let done = sqlx::query(&sql)
        .bind(service)
        .bind(ip.to_string())
        .bind(i32::from(port))
        .bind(value)
        .bind(revision)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}
