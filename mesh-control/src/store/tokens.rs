//! Node bootstrap tokens: `<id>.<secret>`, 48 bits of id to look the token
//! up by and 128 bits of secret of which only a SHA-256 is stored. A token
//! may be bound to one node and always expires.

use ring::digest;
use serde::Serialize;
use sqlx::AnyConnection;
use time::{Duration, OffsetDateTime, format_description::well_known::Rfc3339};

use super::{
    Backend, StoreError,
    rows::{self, Columns},
};
use mesh_identity::secret;

/// The longest a bootstrap token may live.
pub const MAX_TOKEN_TTL: Duration = Duration::days(365);

/// A token just made: the only time its secret is seen.
#[derive(Clone, Debug, Serialize)]
pub struct NewToken {
    pub token: String,
    pub id: String,
    pub node: Option<String>,
    pub expires_at: String,
}

/// A stored token, without its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TokenInfo {
    pub id: String,
    pub node: Option<String>,
    pub description: String,
    pub created_at: String,
    pub expires_at: String,
}

/// Why a token was refused. Callers should not tell the client which.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejected {
    #[error("not of the form <id>.<secret>")]
    Malformed,
    #[error("unknown token id")]
    Unknown,
    #[error("wrong secret")]
    WrongSecret,
    #[error("expired at {0}")]
    Expired(String),
    #[error("bound to node {bound:?}, not {asked:?}")]
    OtherNode { bound: String, asked: String },
}

fn random_hex(bytes: usize) -> Result<String, StoreError> {
    secret::random_hex(bytes).map_err(|e| StoreError::Corrupt {
        reference: "bootstrap token".into(),
        message: format!("no randomness: {e}"),
    })
}

fn sha256_hex(secret: &str) -> String {
    digest::digest(&digest::SHA256, secret.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn rfc3339(at: OffsetDateTime) -> Result<String, StoreError> {
    rows::rfc3339(at, "bootstrap token time")
}

/// Splits `<id>.<secret>` where both halves are lowercase hex of the
/// expected lengths.
fn parse(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.split_once('.')?;
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (hex(id, 12) && hex(secret, 32)).then_some((id, secret))
}

pub(super) async fn create(
    conn: &mut AnyConnection,
    b: Backend,
    node: Option<&str>,
    description: &str,
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<NewToken, StoreError> {
    let id = random_hex(6)?;
    let secret = random_hex(16)?;
    let expires_at = now + ttl;
    let sql = format!(
        "INSERT INTO NodeBootstrapToken (token_id, secret_sha256, node, description, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, {}, {})",
        b.time_param("$5"),
        b.time_param("$6")
    );
    sqlx::query(&sql)
        .bind(&id)
        .bind(sha256_hex(&secret))
        .bind(node)
        .bind(description)
        .bind(rfc3339(now)?)
        .bind(rfc3339(expires_at)?)
        .execute(&mut *conn)
        .await?;
    Ok(NewToken {
        token: format!("{id}.{secret}"),
        id,
        node: node.map(str::to_owned),
        expires_at: rfc3339(expires_at)?,
    })
}

fn columns(b: Backend) -> String {
    format!(
        "token_id, secret_sha256, node, description, {}, {}",
        b.time_column("created_at"),
        b.time_column("expires_at")
    )
}

fn info(c: &Columns<'_>) -> Result<TokenInfo, StoreError> {
    Ok(TokenInfo {
        id: c.text("token_id")?,
        node: c.opt_text("node")?,
        description: c.text("description")?,
        created_at: c.text("created_at")?,
        expires_at: c.text("expires_at")?,
    })
}

pub(super) async fn list(
    conn: &mut AnyConnection,
    b: Backend,
) -> Result<Vec<TokenInfo>, StoreError> {
    let sql = format!(
        "SELECT {} FROM NodeBootstrapToken ORDER BY expires_at, token_id",
        columns(b)
    );
    let rows = sqlx::query(&sql).fetch_all(&mut *conn).await?;
    rows.iter()
        .map(|row| info(&Columns::new(row, "NodeBootstrapToken".into())))
        .collect()
}

/// Deletes token `id`; whether it existed.
pub(super) async fn delete(conn: &mut AnyConnection, id: &str) -> Result<bool, StoreError> {
    let done = sqlx::query("DELETE FROM NodeBootstrapToken WHERE token_id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Checks `token` for joining as `node` at `now`.
pub(super) async fn check(
    conn: &mut AnyConnection,
    b: Backend,
    token: &str,
    node: &str,
    now: OffsetDateTime,
) -> Result<Result<TokenInfo, TokenRejected>, StoreError> {
    let Some((id, secret)) = parse(token) else {
        return Ok(Err(TokenRejected::Malformed));
    };
    let sql = format!(
        "SELECT {} FROM NodeBootstrapToken WHERE token_id = $1",
        columns(b)
    );
    let Some(row) = sqlx::query(&sql)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(Err(TokenRejected::Unknown));
    };
    let c = Columns::new(&row, format!("NodeBootstrapToken/{id}"));
    let stored = c.text("secret_sha256")?;
    if !secret::constant_time_eq(stored.as_bytes(), sha256_hex(secret).as_bytes()) {
        return Ok(Err(TokenRejected::WrongSecret));
    }
    let token = info(&c)?;
    let expires_at =
        OffsetDateTime::parse(&token.expires_at, &Rfc3339).map_err(|e| StoreError::Corrupt {
            reference: c.reference().to_owned(),
            message: format!("expires_at: {e}"),
        })?;
    if expires_at <= now {
        return Ok(Err(TokenRejected::Expired(token.expires_at)));
    }
    if let Some(bound) = &token.node
        && bound != node
    {
        return Ok(Err(TokenRejected::OtherNode {
            bound: bound.clone(),
            asked: node.to_owned(),
        }));
    }
    Ok(Ok(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_strictly() {
        let good = format!("{}.{}", "a1".repeat(6), "0f".repeat(16));
        assert!(parse(&good).is_some());
        for bad in [
            "",
            ".",
            "abc.def",
            &format!("{}.{}", "A1".repeat(6), "0f".repeat(16)),
            &format!("{}.{}.", "a1".repeat(6), "0f".repeat(16)),
            &format!("{}{}", "a1".repeat(6), "0f".repeat(16)),
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
    }
}
