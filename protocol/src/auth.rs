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

#[cfg(test)]
mod tests {
    use super::token_matches;

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
}
