//! The admin token: created once by `mesh-control init`, presented by
//! meshctl as `Authorization: Bearer <token>`.

use axum::{
    extract::{Request, State},
    http::header,
    middleware::Next,
    response::Response,
};

use super::{ApiError, AppState};
use mesh_identity::secret::{bearer_matches, random_hex};

/// Generates a new admin token: 32 random bytes, hex.
pub fn generate_token() -> std::io::Result<String> {
    random_hex(32).map_err(std::io::Error::other)
}

/// Refuses every request without the right bearer token.
pub async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    if bearer_matches(authorization, &state.token) {
        Ok(next.run(request).await)
    } else {
        Err(ApiError::Unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use mesh_identity::secret::constant_time_eq;

    use super::*;

    #[test]
    fn tokens_are_long_random_and_compare_exactly() {
        let a = generate_token().unwrap();
        let b = generate_token().unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(constant_time_eq(a.as_bytes(), a.as_bytes()));
        assert!(!constant_time_eq(a.as_bytes(), b.as_bytes()));
        assert!(!constant_time_eq(a.as_bytes(), &a.as_bytes()[..63]));
    }
}
