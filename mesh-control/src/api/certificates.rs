//! The seed's server-side issuance (`issue_certificate(service, namespace,
//! service_account)`) for workloads outside the mesh — gateways, VMs — and
//! the list of what the CA issued. The key is generated here, returned to
//! the caller once, and stored only sealed under the KEK.

use std::sync::Arc;

use axum::{Json, extract::State};
use mesh_identity::SpiffeId;
use mesh_model::names::{check_dns_label, check_dns_subdomain};
use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{ApiError, AppState};
pub use crate::ca::Identity;
use crate::store::NewCertificate;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueRequest {
    pub namespace: String,
    pub service_account: String,
    /// The record's service name; default `<service_account>.<namespace>`.
    #[serde(default)]
    pub service_name: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct IssueResponse {
    pub spiffe_id: String,
    pub service_name: String,
    pub serial: String,
    pub not_after: String,
    pub cert_pem: String,
    /// Returned this once; the CA keeps it only sealed.
    pub key_pem: String,
    pub trust_bundle_pem: String,
}

/// The CA, or 503 when this control plane runs without one.
pub(super) fn identity(state: &AppState) -> Result<&Arc<Identity>, ApiError> {
    state
        .identity
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable("this control plane has no CA configured".into()))
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_else(|_| at.to_string())
}

pub async fn issue(
    State(state): State<AppState>,
    Json(request): Json<IssueRequest>,
) -> Result<Json<IssueResponse>, ApiError> {
    let identity = identity(&state)?;
    let mut problems = Vec::new();
    if let Err(why) = check_dns_label(&request.namespace) {
        problems.push(format!("namespace: {why}"));
    }
    if let Err(why) = check_dns_subdomain(&request.service_account) {
        problems.push(format!("service_account: {why}"));
    }
    let service_name = request
        .service_name
        .clone()
        .unwrap_or_else(|| format!("{}.{}", request.service_account, request.namespace));
    if service_name.is_empty() || service_name.len() > 128 {
        problems.push("service_name: must be 1 to 128 characters".into());
    }
    if !problems.is_empty() {
        return Err(ApiError::BadRequest(problems.join("; ")));
    }
    let ca = identity.ca();
    let spiffe_id = SpiffeId::parse(&format!(
        "spiffe://{}/ns/{}/sa/{}",
        ca.trust_domain(),
        request.namespace,
        request.service_account
    ))
    .map_err(ApiError::BadRequest)?;
    let now = OffsetDateTime::now_utc();
    let (cert, key_pem) = ca.issue_with_key(&spiffe_id, now).map_err(|e| {
        tracing::error!(error = %e, "issuing a certificate");
        ApiError::Internal
    })?;
    let sealed = identity
        .kek
        .seal(key_pem.as_bytes(), &service_name)
        .map_err(|e| {
            tracing::error!(error = %e, "sealing a private key");
            ApiError::Internal
        })?;
    state
        .store
        .record_certificate(&NewCertificate {
            service_name: &service_name,
            spiffe_id: &spiffe_id.to_string(),
            serial: &cert.serial,
            cert_pem: &cert.pem,
            sealed_key: Some(&sealed),
            node: None,
            issued_at: now,
            expiry: cert.not_after,
        })
        .await?;
    tracing::info!(%spiffe_id, serial = %cert.serial, "issued a certificate with a CA-generated key");
    Ok(Json(IssueResponse {
        spiffe_id: spiffe_id.to_string(),
        service_name,
        serial: cert.serial,
        not_after: rfc3339(cert.not_after),
        cert_pem: cert.pem,
        key_pem,
        trust_bundle_pem: ca.bundle_pem(),
    }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub service_name: Option<String>,
}

/// A recorded certificate, without its key.
#[derive(Debug, Serialize)]
pub struct CertificateSummary {
    pub service_name: String,
    pub spiffe_id: String,
    pub serial: String,
    pub issued_at: String,
    pub not_after: String,
    /// `valid` or `expired`.
    pub state: &'static str,
    /// Where the private key lives: `node` (CSR) or `ca` (sealed here).
    pub key: &'static str,
    pub node: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    super::ApiQuery(query): super::ApiQuery<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let now = OffsetDateTime::now_utc();
    let items: Vec<CertificateSummary> = state
        .store
        .certificates(query.service_name.as_deref())
        .await?
        .into_iter()
        .map(|row| {
            let expired = OffsetDateTime::parse(&row.expiry, &Rfc3339).is_ok_and(|at| at <= now);
            CertificateSummary {
                key: if row.private_key.is_empty() {
                    "node"
                } else {
                    "ca"
                },
                state: if expired { "expired" } else { "valid" },
                service_name: row.service_name,
                spiffe_id: row.spiffe_id,
                serial: row.serial,
                issued_at: row.issued_at,
                not_after: row.expiry,
                node: row.node,
            }
        })
        .collect();
    Ok(Json(serde_json::json!({ "items": items })))
}
