//! Token checks that take the same time whatever the guess.

/// Compares a presented token with the expected one in time that depends only on
/// the expected token's length, so a stranger cannot learn it byte by byte. Used
/// by the broker (`hello`, `register`) and the MCP gateway (bearer tokens).
pub fn token_matches(given: Option<&str>, expected: &str) -> bool {
    let given = given.unwrap_or("").as_bytes();
    let expected = expected.as_bytes();
    let mut diff = (given.len() ^ expected.len()) as u64;
    for (i, e) in expected.iter().enumerate() {
        let g = given.get(i).copied().unwrap_or(0);
        diff |= (e ^ g) as u64;
    }
    std::hint::black_box(diff) == 0
}

/// The credentials of an `Authorization: Bearer <token>` header value; the
/// scheme name is case-insensitive (RFC 9110 §11.1). Used by the MCP gateway and
/// the dashboard.
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_matches(' '))
}

#[cfg(test)]
mod tests {
    use super::{bearer_token, token_matches};

    #[test]
    fn only_the_exact_token_matches() {
        assert!(token_matches(Some("s3cret"), "s3cret"));
        for wrong in [
            None,
            Some(""),
            Some("s3cre"),
            Some("s3cret!"),
            Some("S3cret"),
        ] {
            assert!(!token_matches(wrong, "s3cret"), "{wrong:?}");
        }
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for h in ["Bearer t0k", "bearer t0k", "BEARER t0k", "BeArEr  t0k"] {
            assert_eq!(bearer_token(h), Some("t0k"), "{h}");
        }
        assert_eq!(bearer_token("Basic t0k"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }
}
