//! urlsafe-base64 decoding: DeepSpeed accepts a whole config passed that way on the command line.

/// Decodes urlsafe (`-_`) or standard (`+/`) base64, padding optional. `None` if not base64.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim().trim_end_matches('=');
    if text.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A single leftover sextet cannot come from any byte string.
    (bits < 6).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::decode;

    #[test]
    fn decodes_urlsafe_and_standard() {
        assert_eq!(decode("eyJhIjogMX0=").unwrap(), b"{\"a\": 1}");
        assert_eq!(decode("eyJhIjogMX0").unwrap(), b"{\"a\": 1}");
        assert_eq!(decode("Pz8-").unwrap(), b"??>");
        assert_eq!(decode("Pz8+").unwrap(), b"??>");
        assert!(decode("not base64!").is_none());
        assert!(decode("").is_none());
    }
}
