//! zlib (RFC 1950) body compression behind the 0x10 message flag, which Pitaya and Pomelo
//! call "gzip".

use std::io::{Read, Write};

use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use flate2::Compression;

use crate::codec::DecodeError;

/// Deflates `data` into a zlib stream at the default level.
pub fn deflate(data: &[u8]) -> Vec<u8> {
    let mut enc = ZlibEncoder::new(Vec::with_capacity(data.len() / 2 + 16), Compression::default());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(data);
    enc.finish().unwrap_or_default()
}

/// Deflates `data` and returns the result only when it is strictly shorter, as Pitaya does.
pub fn deflate_if_smaller(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < 8 {
        // A zlib stream has 6 bytes of framing; nothing this short can shrink.
        return None;
    }
    let z = deflate(data);
    (z.len() < data.len()).then_some(z)
}

/// Inflates a zlib stream, refusing output larger than `max` bytes (no zip bombs).
pub fn inflate(data: &[u8], max: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity((data.len() * 4).min(max));
    let mut dec = ZlibDecoder::new(data).take(max as u64 + 1);
    if let Err(e) = dec.read_to_end(&mut out) {
        return Err(DecodeError::InflateFailed(e.to_string()));
    }
    if out.len() > max {
        return Err(DecodeError::InflatedTooLarge { max });
    }
    Ok(out)
}

/// True when `body` starts like a zlib (`78 01|5e|9c|da`) or gzip (`1f 8b`) stream; the
/// client-side sniff for handshake bodies that Pitaya compresses without a flag.
pub fn looks_compressed(body: &[u8]) -> bool {
    matches!(body, [0x78, 0x01 | 0x5e | 0x9c | 0xda, ..] | [0x1f, 0x8b, ..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let data = b"blablablablablablablablablablablablabla".repeat(10);
        let z = deflate_if_smaller(&data).unwrap();
        assert!(looks_compressed(&z));
        assert_eq!(inflate(&z, data.len()).unwrap(), data);
        assert_eq!(inflate(&z, data.len() - 1), Err(DecodeError::InflatedTooLarge { max: data.len() - 1 }));
        assert!(matches!(inflate(b"not zlib", 100), Err(DecodeError::InflateFailed(_))));
        assert_eq!(deflate_if_smaller(b"\x01"), None);
    }

    #[test]
    fn zip_bomb_is_bounded() {
        let bomb = deflate(&vec![0u8; 50 << 20]);
        assert!(bomb.len() < 100 << 10);
        assert_eq!(inflate(&bomb, 1 << 20), Err(DecodeError::InflatedTooLarge { max: 1 << 20 }));
    }
}
