//! Reading the bearer token from an `Authorization` header (RFC 6750), or
//! from the `access_token` query parameter where that is enabled.

use std::borrow::Cow;

use super::AuthnError;

/// The query parameter RFC 6750 section 2.3 names.
pub const QUERY_PARAMETER: &str = "access_token";

/// The request's one bearer token, from the header or, when `allow_query`,
/// the query string.
///
/// A token in the query string ends up in logs and browser histories, so it
/// is refused unless enabled; a request that sends a token both ways is
/// refused too (RFC 6750 section 2: one method per request).
///
/// # Errors
///
/// As for [`parse`], and [`AuthnError::Malformed`] for a query token that is
/// not allowed or not well formed.
pub fn extract<'a>(
    header: Option<&'a str>,
    path: &str,
    max_bytes: usize,
    allow_query: bool,
) -> Result<Cow<'a, str>, AuthnError> {
    let query = query_token(path);

    match (header, query) {
        (Some(_), Some(_)) => Err(AuthnError::Malformed(
            "token sent in both the header and the query string",
        )),
        (None, Some(_)) if !allow_query => Err(AuthnError::Malformed(
            "a token in the query string is not accepted",
        )),
        (None, Some(token)) => {
            if token.len() > max_bytes {
                return Err(AuthnError::Malformed("token is too large"));
            }
            if !is_token68(&token) {
                return Err(AuthnError::Malformed("bearer token has invalid characters"));
            }
            Ok(Cow::Owned(token))
        }
        (header, None) => parse(header, max_bytes).map(Cow::Borrowed),
    }
}

/// The decoded `access_token` query parameter, if the path has one.
fn query_token(path: &str) -> Option<String> {
    let (_, query) = path.split_once('?')?;
    let url = reqwest::Url::parse(&format!("http://query.invalid/?{query}")).ok()?;

    url.query_pairs()
        .find(|(name, _)| name == QUERY_PARAMETER)
        .map(|(_, value)| value.into_owned())
}

/// Extracts the token from an `Authorization` header value.
///
/// A value over `max_bytes` is refused before any decoding work is spent on
/// it; real access tokens are a few KiB at most.
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

    const MAX: usize = 8 * 1024;

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
    fn query_tokens_only_when_allowed_and_never_with_a_header() {
        let path = "/v?x=1&access_token=abc.def";

        assert!(matches!(
            extract(None, path, MAX, false),
            Err(AuthnError::Malformed(_))
        ));
        assert_eq!(
            extract(None, path, MAX, true).ok().as_deref(),
            Some("abc.def")
        );
        assert!(extract(Some("Bearer abc"), path, MAX, true).is_err());
        assert_eq!(
            extract(Some("Bearer abc"), "/v?x=1", MAX, false)
                .ok()
                .as_deref(),
            Some("abc")
        );
        assert!(matches!(
            extract(None, "/v", MAX, false),
            Err(AuthnError::Missing)
        ));
    }

    #[test]
    fn keeps_padding() {
        assert_eq!(parse(Some("Bearer abc=="), MAX).ok(), Some("abc=="));
    }
}
