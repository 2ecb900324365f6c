//! Content encodings of response bodies: gzip is decoded with a bound, so a
//! small compression bomb cannot expand without limit, and encoded again
//! after reshaping.

use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;

/// Why a gzip body could not be decoded; the original passes unchanged.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The decoded body would be larger than the limit.
    #[error("decoded body is larger than {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The bytes are not a gzip stream.
    #[error("body is not valid gzip")]
    Corrupt(#[source] std::io::Error),
}

/// Decodes a gzip body, stopping as soon as the output passes `limit`.
///
/// A gzip body may hold several members one after the other (RFC 1952,
/// section 2.2), as `cat a.gz b.gz` makes; all are decoded, as `gunzip`
/// does. Bytes after the last member that are not another member are an
/// error, not something to drop quietly.
///
/// # Errors
///
/// [`DecodeError::TooLarge`] past the limit, [`DecodeError::Corrupt`] for
/// anything that is not gzip.
pub fn gunzip_bounded(bytes: &[u8], limit: u64) -> Result<Vec<u8>, DecodeError> {
    let mut decoded = Vec::new();
    let mut reader = MultiGzDecoder::new(bytes).take(limit.saturating_add(1));
    reader
        .read_to_end(&mut decoded)
        .map_err(DecodeError::Corrupt)?;

    if decoded.len() as u64 > limit {
        return Err(DecodeError::TooLarge { limit });
    }
    Ok(decoded)
}

/// Encodes a body with gzip at the default level.
///
/// # Errors
///
/// Only if writing to memory fails, which it does not in practice.
pub fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(bytes)?;
    encoder.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_within_the_limit() {
        let body = br#"{"id":"v-1"}"#;
        let encoded = gzip(body).expect("gzip");

        assert_eq!(gunzip_bounded(&encoded, 1024).expect("decode"), body);
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let zeros = vec![b'0'; 10 * 1024 * 1024];
        let bomb = gzip(&zeros).expect("gzip");
        assert!(bomb.len() < 64 * 1024, "compresses well: {}", bomb.len());

        let err = gunzip_bounded(&bomb, 1024 * 1024).expect_err("too large");
        assert!(matches!(err, DecodeError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn every_member_is_decoded() {
        let mut two = gzip(br#"{"items":[1,"#).expect("gzip");
        two.extend(gzip(br#"2,3]}"#).expect("gzip"));

        assert_eq!(
            gunzip_bounded(&two, 1024).expect("decode"),
            br#"{"items":[1,2,3]}"#
        );
    }

    #[test]
    fn the_limit_counts_every_member() {
        let member = gzip(&[b' '; 600]).expect("gzip");
        let two = [member.clone(), member].concat();

        assert_eq!(gunzip_bounded(&two, 1200).expect("decode").len(), 1200);
        let err = gunzip_bounded(&two, 1000).expect_err("too large");
        assert!(matches!(err, DecodeError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn bytes_after_the_last_member_are_corrupt() {
        let mut body = gzip(br#"{"id":"v-1"}"#).expect("gzip");
        body.extend_from_slice(b"trailing garbage");

        let err = gunzip_bounded(&body, 1024).expect_err("corrupt");
        assert!(matches!(err, DecodeError::Corrupt(_)), "{err}");
    }

    #[test]
    fn garbage_is_corrupt_not_a_panic() {
        let err = gunzip_bounded(b"not gzip at all", 1024).expect_err("corrupt");
        assert!(matches!(err, DecodeError::Corrupt(_)), "{err}");
    }
}
