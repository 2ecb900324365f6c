//! Reading the bearer token from an `Authorization` header (RFC 6750).

use super::AuthnError;

/// The largest `Authorization` value accepted, in bytes.
///
/// Real access tokens are a few KiB at most; anything larger is refused
/// before any decoding work is spent on it.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Extracts the token from an `Authorization` header value.
///
/// The scheme is matched case-insensitively. Envoy joins repeated headers with
/// a comma before Check sees them, and a token never contains one, so a comma
/// means the client sent more than one `Authorization` header.
///
/// # Errors
///
/// [`AuthnError::Missing`] without a header, [`AuthnError::Malformed`] for
/// anything that is not exactly one well-formed bearer token.
pub fn parse(header: Option<&str>, max_bytes: usize) -> Result<&str, AuthnError> {
    let Some(value) = header else {
        return Err(AuthnError::Missing);
    };

    if value.len() > max_bytes {
        return Err(AuthnError::Malformed("token is too large"));
    }
    if value.contains(',') {
        return Err(AuthnError::Malformed("more than one authorization header"));
    }

    let Some((scheme, token)) = value.trim().split_once(' ') else {
        return Err(AuthnError::Malformed(
            "authorization header is not 'Bearer <token>'",
        ));
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthnError::Malformed("authorization scheme is not Bearer"));
    }

    let token = token.trim_start_matches(' ');
    if token.is_empty() {
        return Err(AuthnError::Malformed("bearer token is empty"));
    }
    if !is_token68(token) {
        return Err(AuthnError::Malformed("bearer token has invalid characters"));
    }

    Ok(token)
}

/// RFC 6750's b64token: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_token68(token: &str) -> bool {
    let body = token.trim_end_matches('=');

    !body.is_empty()
        && body.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = DEFAULT_MAX_TOKEN_BYTES;

    #[test]
    fn accepts_bearer_in_any_case() {
        for header in [
            "Bearer abc.def.ghi",
            "bearer abc.def.ghi",
            "BEARER  abc.def.ghi",
        ] {
            assert_eq!(
                parse(Some(header), MAX).ok(),
                Some("abc.def.ghi"),
                "{header}"
            );
        }
    }

    #[test]
    fn missing_header_is_missing() {
        assert!(matches!(parse(None, MAX), Err(AuthnError::Missing)));
    }

    #[test]
    fn refuses_malformed_headers() {
        for header in [
            "",
            "Bearer",
            "Bearer ",
            "Basic dXNlcjpwYXNz",
            "Bearerabc",
            "Bearer a b",
            "Bearer abc, Bearer def",
            "Bearer abc\u{0}",
            "Bearer ===",
            "Bearer ab=c",
        ] {
            assert!(
                matches!(parse(Some(header), MAX), Err(AuthnError::Malformed(_))),
                "{header:?} was accepted"
            );
        }
    }

    #[test]
    fn refuses_oversized_tokens() {
        let header = format!("Bearer {}", "a".repeat(MAX));

        assert!(matches!(
            parse(Some(&header), MAX),
            Err(AuthnError::Malformed(_))
        ));
    }

    #[test]
    fn keeps_padding() {
        assert_eq!(parse(Some("Bearer abc=="), MAX).ok(), Some("abc=="));
    }
}
