//! Node bootstrap tokens: made here (shown once), listed without their
//! secret, revoked by id.

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use mesh_model::names::check_dns_subdomain;
use serde::Deserialize;
use time::OffsetDateTime;

use super::{ApiError, AppState};
use crate::store::{MAX_TOKEN_TTL, NewToken, TokenInfo};

/// Default lifetime of a bootstrap token.
const DEFAULT_TTL_SECONDS: i64 = 24 * 3600;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Bind the token to one node; any node when absent.
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub ttl_seconds: Option<i64>,
    #[serde(default)]
    pub description: String,
}

pub async fn create(
    State(state): State<AppState>,
    Json(request): Json<CreateToken>,
) -> Result<(StatusCode, Json<NewToken>), ApiError> {
    let mut problems = Vec::new();
    if let Some(node) = &request.node
        && let Err(why) = check_dns_subdomain(node)
    {
        problems.push(format!("node: {why}"));
    }
    let ttl = request.ttl_seconds.unwrap_or(DEFAULT_TTL_SECONDS);
    if ttl < 60 || ttl > MAX_TOKEN_TTL.whole_seconds() {
        problems.push(format!(
            "ttl_seconds: must be 60 to {} (got {ttl})",
            MAX_TOKEN_TTL.whole_seconds()
        ));
    }
    if request.description.chars().count() > 256 {
        problems.push("description: at most 256 characters".into());
    }
    if !problems.is_empty() {
        return Err(ApiError::BadRequest(problems.join("; ")));
    }
    let made = state
        .store
        .create_bootstrap_token(
            request.node.as_deref(),
            &request.description,
            time::Duration::seconds(ttl),
            OffsetDateTime::now_utc(),
        )
        .await?;
    tracing::info!(id = made.id, node = ?made.node, expires_at = made.expires_at, "made a node bootstrap token");
    Ok((StatusCode::CREATED, Json(made)))
}

pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    Ok(Json(state.store.bootstrap_tokens().await?))
}

pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state.store.delete_bootstrap_token(&id).await? {
        tracing::info!(id, "revoked a node bootstrap token");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!(
            "bootstrap token {id:?} not found"
        )))
    }
}
