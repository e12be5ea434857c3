//! The bearer-token check every authenticated HTTP endpoint uses (the admin API, the
//! Stalwart MTA hook).

use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;

/// Whether `headers` carry `Authorization: Bearer <token>`. Compares SHA-256 digests in
/// constant time, so neither the content nor the length of the token leaks through timing.
/// Always false for an empty `token`.
pub fn authorized(headers: &HeaderMap, token: &str) -> bool {
    if token.is_empty() {
        return false;
    }
    let Some(value) = headers.get(AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let Some((scheme, given)) = value.split_at_checked(7) else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return false;
    }
    let given = given.trim_ascii();
    let a = ring::digest::digest(&ring::digest::SHA256, given);
    let b = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn bearer_token_check() {
        assert!(authorized(&headers("Bearer s3cret"), "s3cret"));
        assert!(authorized(&headers("bearer  s3cret "), "s3cret"));
        assert!(!authorized(&headers("Bearer s3cre"), "s3cret"));
        assert!(!authorized(&headers("Bearer s3cret2"), "s3cret"));
        assert!(!authorized(&headers("Basic s3cret"), "s3cret"));
        assert!(!authorized(&headers("s3cret"), "s3cret"));
        assert!(!authorized(&headers("Bearer "), ""));
        assert!(!authorized(&HeaderMap::new(), "s3cret"));
    }
}
