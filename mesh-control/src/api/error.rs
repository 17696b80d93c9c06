//! Every refusal of the admin API as a status code and a JSON body that
//! says what went wrong and, where it can, which field.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use mesh_model::ParseError;
use serde::Serialize;

use crate::store::StoreError;

/// An API error.
#[derive(Debug)]
pub enum ApiError {
    /// 400: the documents are invalid; every problem of every document.
    Invalid(Vec<ParseError>),
    /// 400: the request itself is malformed (not the documents).
    BadRequest(String),
    /// 401: no or wrong bearer token.
    Unauthorized,
    /// 404.
    NotFound(String),
    /// 409: the change conflicts with the stored state.
    Conflict(String),
    /// 413: the body is over the limit.
    TooLarge(usize),
    /// 415.
    UnsupportedMediaType(String),
    /// 503: a part of the control plane this request needs is missing.
    Unavailable(String),
    /// 503: the database did not answer; retry later.
    StoreUnavailable(String),
    /// 500: details go to the log, not to the caller.
    Internal,
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    problems: Vec<ParseError>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = matches!(self, ApiError::StoreUnavailable(_));
        let (status, error, message, problems) = match self {
            ApiError::Invalid(problems) => (
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("{} document(s) are invalid; nothing was applied", problems.len()),
                problems,
            ),
            ApiError::BadRequest(message) => (StatusCode::BAD_REQUEST, "bad_request", message, vec![]),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong bearer token: pass the admin token created by `mesh-control init`".into(),
                vec![],
            ),
            ApiError::NotFound(message) => (StatusCode::NOT_FOUND, "not_found", message, vec![]),
            ApiError::Conflict(message) => (StatusCode::CONFLICT, "conflict", message, vec![]),
            ApiError::TooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the request body is over the {limit}-byte limit; split the file"),
                vec![],
            ),
            ApiError::UnsupportedMediaType(got) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("send application/yaml or application/json (got {got})"),
                vec![],
            ),
            ApiError::Unavailable(message) | ApiError::StoreUnavailable(message) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                message,
                vec![],
            ),
            ApiError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the control plane failed; its log has the details".into(),
                vec![],
            ),
        };
        let mut response = (
            status,
            Json(Body {
                error,
                message,
                problems,
            }),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        response
    }
}

/// A query string that does not parse (an unknown or malformed parameter)
/// gets the API's JSON error, not axum's plain text.
impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::BadRequest(rejection.body_text())
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(what) => ApiError::NotFound(format!("{what} not found")),
            error @ StoreError::Conflict { .. } => ApiError::Conflict(error.to_string()),
            error if error.is_unavailable() => {
                tracing::warn!(error = %DisplayChain(&error), "the database is unavailable");
                ApiError::StoreUnavailable(format!(
                    "the database is unavailable ({}); retry once it answers \
                     (an apply is one transaction: unless the database went away \
                     while it committed, a refused one changed nothing)",
                    DisplayChain(&error)
                ))
            }
            error => {
                tracing::error!(error = %DisplayChain(&error), "store operation failed");
                ApiError::Internal
            }
        }
    }
}

/// Displays an error with its sources.
#[derive(Debug)]
pub struct DisplayChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}
