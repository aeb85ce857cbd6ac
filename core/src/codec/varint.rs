//! Message ids: LEB128-style varints, least significant 7-bit group first.

use crate::codec::DecodeError;

/// Appends `value` as a varint (at least one byte).
pub fn encode_varint(mut value: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Reads a varint from the front of `buf`; returns the value and the bytes used.
///
/// A varint that ends before its last group, or that does not fit in 64 bits, is an
/// invalid message (the Go implementation silently accepts both).
pub fn decode_varint(buf: &[u8]) -> Result<(u64, usize), DecodeError> {
    let mut value: u64 = 0;
    for (i, &byte) in buf.iter().enumerate() {
        let group = u64::from(byte & 0x7f);
        let shift = 7 * i as u32;
        if shift >= 64 || (shift == 63 && group > 1) {
            return Err(DecodeError::InvalidMessage("message id overflows 64 bits"));
        }
        value |= group << shift;
        if byte & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err(DecodeError::InvalidMessage("truncated message id"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(value: u64, hex: &str) {
        let mut out = Vec::new();
        encode_varint(value, &mut out);
        let got: String = out.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, hex, "encoding {value}");
        assert_eq!(decode_varint(&out).unwrap(), (value, out.len()));
    }

    #[test]
    fn spec_examples() {
        check(0, "00");
        check(127, "7f");
        check(128, "8001");
        check(129, "8101");
        check(300, "ac02");
        check(16384, "808001");
        check(0xFFFF_FFFF, "ffffffff0f");
        check(u64::MAX, "ffffffffffffffffff01");
    }

    #[test]
    fn rejects_truncated_and_overflow() {
        assert!(decode_varint(&[]).is_err());
        assert!(decode_varint(&[0x85, 0x85]).is_err());
        assert!(decode_varint(&[0xff; 9].iter().copied().chain([0x02]).collect::<Vec<_>>()).is_err());
        assert!(decode_varint(&[0xff; 11]).is_err());
    }
}
