//! The request path an authorization rule is matched against, normalised
//! so that spellings of one path cannot slip past a rule written for
//! another (`/admin/../admin`, `/%61dmin`, `//admin`).
//!
//! In order: the query is set aside; `%XX` escapes must be well formed,
//! and those of unreserved characters (RFC 3986 §2.3) are decoded while
//! the others stay encoded with upper-case digits, and raw non-ASCII bytes
//! are encoded the same way (so `/café` and `/caf%C3%A9` are one path); an
//! encoded `/` or `\` is refused (whether it separates segments is for the
//! application to say, so no rule can be sure), as are a raw `\`, a `;`
//! (path parameters, which some servers strip before routing: `/a;x/b`
//! and `/public/..;/admin`), control characters and a path not starting
//! with `/`; `.` and `..` segments are resolved as RFC 3986 §5.2.4 does
//! (an empty segment counts: `/a//../b` is `/a/b`, never above the root);
//! then runs of `/` merge. Envoy's `normalize_path`, `merge_slashes` and
//! `REJECT_REQUEST` for escaped slashes, together. The HTTP path sends the
//! normalised path on, so the application reads the path that was
//! authorized.

/// Why a path was refused (the request gets 400).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with '/'")]
    NotAbsolute,
    #[error("the path has a malformed percent-escape")]
    BadEscape,
    #[error("the path has an encoded '/' or '\\'")]
    EncodedSeparator,
    #[error("the path has a '\\'")]
    Backslash,
    #[error("the path has a control character")]
    Control,
    #[error("the path has a ';' (path parameters are not accepted)")]
    Parameters,
}

/// The normalised form of `target`'s path (its query, if any, dropped).
pub fn normalize(target: &str) -> Result<String, PathError> {
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        match byte {
            b'%' => {
                let value = match bytes.get(i + 1..i + 3) {
                    Some(&[high, low]) if high.is_ascii_hexdigit() && low.is_ascii_hexdigit() => {
                        hex_value(high) << 4 | hex_value(low)
                    }
                    _ => return Err(PathError::BadEscape),
                };
                match value {
                    b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                    v if unreserved(v) => decoded.push(char::from(v)),
                    v => {
                        decoded.push('%');
                        decoded.push_str(&format!("{v:02X}"));
                    }
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            b';' => return Err(PathError::Parameters),
            b if b < 0x20 || b == 0x7f => return Err(PathError::Control),
            b if b >= 0x80 => {
                decoded.push_str(&format!("%{b:02X}"));
                i += 1;
            }
            b => {
                decoded.push(char::from(b));
                i += 1;
            }
        }
    }
    Ok(resolve(&decoded))
}

fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        _ => digit - b'A' + 10,
    }
}

fn unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// Resolves dot segments of an absolute path (RFC 3986 §5.2.4: an empty
/// segment is a segment), then merges runs of slashes.
fn resolve(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing = false;
    for segment in path.split('/').skip(1) {
        trailing = false;
        match segment {
            "." => trailing = true,
            ".." => {
                segments.pop();
                trailing = true;
            }
            other => segments.push(other),
        }
    }
    // `/a/` ends in an empty segment: the trailing slash it stands for.
    if segments.last() == Some(&"") {
        trailing = true;
    }
    let mut out = String::with_capacity(path.len());
    for segment in segments.iter().filter(|s| !s.is_empty()) {
        out.push('/');
        out.push_str(segment);
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    out
}

/// Whether normalised `path` matches a rule's `pattern`: exact (`/a/b`),
/// prefix (`/a/*`: `/a/` and below; `/a*` any path starting `/a`), suffix
/// (`*.css`), or `*` for any path.
pub fn matches(pattern: &str, path: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return path.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        // `/db.bak/` is `/db.bak` to most servers.
        return path.trim_end_matches('/').ends_with(suffix) || path.ends_with(suffix);
    }
    pattern == path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_path_normalise_to_it() {
        for (raw, normal) in [
            ("/admin", "/admin"),
            ("/admin?x=1", "/admin"),
            ("/admin/../admin", "/admin"),
            ("/public/../admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/%41DMIN", "/ADMIN"),
            ("//admin", "/admin"),
            ("/./admin", "/admin"),
            ("/admin/.", "/admin/"),
            ("/admin/", "/admin/"),
            ("/a/b/../../admin", "/admin"),
            ("/../../admin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/%2E/admin", "/admin"),
            ("/", "/"),
            ("/..", "/"),
            ("/a/b/..", "/a/"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
            ("/caf\u{e9}", "/caf%C3%A9"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/admin//../secrets", "/admin/secrets"),
            ("/a/b//../c", "/a/b/c"),
            ("/a//b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("/%7euser", "/~user"),
        ] {
            assert_eq!(normalize(raw).as_deref(), Ok(normal), "{raw}");
        }
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for (raw, why) in [
            ("/admin%2fsecrets", PathError::EncodedSeparator),
            ("/admin%2Fsecrets", PathError::EncodedSeparator),
            ("/admin%5csecrets", PathError::EncodedSeparator),
            ("/admin\\secrets", PathError::Backslash),
            ("/admin%", PathError::BadEscape),
            ("/admin%4", PathError::BadEscape),
            ("/admin%zz", PathError::BadEscape),
            ("/admin%+1", PathError::BadEscape),
            ("/admin\u{0}", PathError::Control),
            ("/public/..;/admin", PathError::Parameters),
            ("/admin;x/users", PathError::Parameters),
            ("/admin\t", PathError::Control),
            ("admin", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
        ] {
            assert_eq!(normalize(raw), Err(why), "{raw:?}");
        }
    }

    #[test]
    fn rule_forms() {
        assert!(matches("/reviews", "/reviews"));
        assert!(!matches("/reviews", "/reviews/1"));
        assert!(matches("/reviews/*", "/reviews/1"));
        assert!(matches("/reviews/*", "/reviews/"));
        assert!(!matches("/reviews/*", "/reviews"));
        assert!(!matches("/reviews/*", "/reviewsx/1"));
        assert!(matches("*.css", "/static/site.css"));
        assert!(!matches("*.css", "/static/site.css.map"));
        assert!(matches("*.bak", "/db.bak/"));
        assert!(matches("*", "/anything"));
        // A rule on the normal form catches every spelling of it.
        let deny = "/admin/*";
        for raw in ["/admin/x", "/public/../admin/x", "//admin//x", "/%61dmin/x"] {
            assert!(matches(deny, &normalize(raw).unwrap()), "{raw}");
        }
    }
}
