//! Small helpers for secrets: tokens made and compared.

/// `bytes` random bytes as lowercase hex.
pub fn random_hex(bytes: usize) -> Result<String, getrandom::Error> {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares without an early exit, so timing does not reveal how much of
/// a guess was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether an `Authorization` header value presents `token` as a bearer
/// token (compared in constant time).
pub fn bearer_matches(authorization: Option<&str>, token: &str) -> bool {
    authorization
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .is_some_and(|presented| constant_time_eq(presented.as_bytes(), token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bearer_token_matches_only_itself_after_bearer() {
        let token = "0123456789abcdef";
        assert!(bearer_matches(Some("Bearer 0123456789abcdef"), token));
        assert!(bearer_matches(Some("Bearer 0123456789abcdef "), token));
        for wrong in [
            None,
            Some(""),
            Some("0123456789abcdef"),
            Some("Basic 0123456789abcdef"),
            Some("Bearer 0123456789abcde"),
            Some("Bearer 0123456789abcdefg"),
        ] {
            assert!(!bearer_matches(wrong, token), "{wrong:?}");
        }
    }
}
