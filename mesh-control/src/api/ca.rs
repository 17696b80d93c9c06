//! The CA's roots and their rotation: `GET /api/v1/ca`,
//! `POST /api/v1/ca/rotate-root` (stage, or with `activate` switch the
//! signing root), `POST /api/v1/ca/retire-root`.

use axum::{Json, extract::State};
use mesh_identity::{SpiffeVerifier, TrustBundle};
use rustls::pki_types::{CertificateDer, UnixTime, pem::PemObject as _};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{ApiError, AppState, certificates::identity};
use crate::ca::{CaFilesError, Identity, Root};

#[derive(Debug, Serialize)]
pub struct CaStatus {
    pub trust_domain: String,
    pub certificate_ttl_seconds: u64,
    /// Signing root first.
    pub roots: Vec<Root>,
}

fn rotation_error(error: CaFilesError) -> ApiError {
    match error {
        CaFilesError::Rotation(message) => ApiError::Conflict(message),
        other => {
            tracing::error!(error = %other, "root rotation failed");
            ApiError::Internal
        }
    }
}

fn status(identity: &Identity) -> Result<CaStatus, ApiError> {
    let ca = identity.ca();
    Ok(CaStatus {
        trust_domain: ca.trust_domain().to_owned(),
        certificate_ttl_seconds: ca.ttl().as_secs(),
        roots: identity.roots().map_err(rotation_error)?,
    })
}

pub async fn get(State(state): State<AppState>) -> Result<Json<CaStatus>, ApiError> {
    Ok(Json(status(identity(&state)?)?))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// Switch signing to the staged root (step 2) instead of staging one.
    #[serde(default)]
    pub activate: bool,
    /// Activate before a certificate lifetime has passed since staging.
    #[serde(default)]
    pub force: bool,
}

pub async fn rotate(
    State(state): State<AppState>,
    Json(request): Json<RotateRequest>,
) -> Result<Json<CaStatus>, ApiError> {
    let identity = identity(&state)?;
    let now = OffsetDateTime::now_utc();
    if request.activate {
        identity
            .activate_staged(now, request.force)
            .await
            .map_err(rotation_error)?;
    } else {
        if request.force {
            return Err(ApiError::BadRequest(
                "force: only applies with activate".into(),
            ));
        }
        identity.stage_root(now).await.map_err(rotation_error)?;
    }
    Ok(Json(status(identity)?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetireRequest {
    pub serial: String,
    /// Retire even though unexpired certificates chain to the root.
    #[serde(default)]
    pub force: bool,
}

pub async fn retire(
    State(state): State<AppState>,
    Json(request): Json<RetireRequest>,
) -> Result<Json<CaStatus>, ApiError> {
    let identity = identity(&state)?;
    let roots = identity.roots().map_err(rotation_error)?;
    let Some(root) = roots.iter().find(|r| r.serial == request.serial) else {
        let known: Vec<&str> = roots.iter().map(|r| r.serial.as_str()).collect();
        return Err(ApiError::NotFound(format!(
            "no root with serial {:?}; the roots are {known:?}",
            request.serial
        )));
    };
    let still_signed = still_signed_by(&state, identity, root).await?;
    identity
        .retire_root(&request.serial, still_signed, request.force)
        .await
        .map_err(rotation_error)?;
    Ok(Json(status(identity)?))
}

/// How many recorded, unexpired certificates chain to `root`.
async fn still_signed_by(
    state: &AppState,
    identity: &Identity,
    root: &Root,
) -> Result<usize, ApiError> {
    let der = CertificateDer::from_pem_slice(root.pem.as_bytes()).map_err(|e| {
        tracing::error!(error = %e, "a root's PEM");
        ApiError::Internal
    })?;
    let trust_domain = identity.ca().trust_domain().to_owned();
    let only_this = TrustBundle::new(&trust_domain, vec![der]).map_err(|e| {
        tracing::error!(error = %e, "a root as a bundle");
        ApiError::Internal
    })?;
    let verifier = SpiffeVerifier::new(only_this);
    let now = UnixTime::now();
    let records = state.store.certificates(None).await?;
    Ok(records
        .iter()
        .filter_map(|r| CertificateDer::from_pem_slice(r.cert_pem.as_bytes()).ok())
        .filter(|cert| {
            verifier
                .verify_peer(cert, &[], now, webpki::KeyUsage::client_auth())
                .is_ok()
        })
        .count())
}
