//! Nix's base32: the 32-letter alphabet without e, o, u, t, printed least significant
//! digit last. Knows nothing of hash algorithms or store paths.

/// The alphabet, in digit order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Number of characters needed for `len` bytes.
pub const fn encoded_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        (len * 8 - 1) / 5 + 1
    }
}

/// Encodes bytes the way Nix prints hashes and store path hash parts.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let lo = (bytes[i] as u16) >> j;
        let hi = if i + 1 < bytes.len() {
            (bytes[i + 1] as u16) << (8 - j)
        } else {
            0
        };
        out.push(ALPHABET[((lo | hi) & 0x1f) as usize] as char);
    }
    out
}

/// Digit value of each byte, 0xff for bytes outside the alphabet.
const DIGITS: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 32 {
        t[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    t
};

fn digit(c: u8) -> Option<u8> {
    match DIGITS[c as usize] {
        0xff => None,
        d => Some(d),
    }
}

/// Decodes a Nix base32 string into exactly `len` bytes; `None` when a character is not in
/// the alphabet, the length is wrong or bits beyond `len` bytes are set.
pub fn decode(s: &[u8], len: usize) -> Option<Vec<u8>> {
    if s.len() != encoded_len(len) {
        return None;
    }
    let mut out = vec![0u8; len];
    for (n, &c) in s.iter().rev().enumerate() {
        let d = digit(c)? as u16;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= (d << j) as u8;
        let carry = d >> (8 - j);
        if i + 1 < len {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return None;
        }
    }
    Some(out)
}

/// True when every byte is a digit of the alphabet (used by store path parsing).
pub fn is_valid(s: &[u8]) -> bool {
    s.iter().all(|&c| digit(c).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_known_value() {
        // sha256 of the empty string, as `nix-hash --type sha256 --flat --base32 /dev/null`.
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let bytes: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let s = encode(&bytes);
        assert_eq!(s, "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        assert_eq!(decode(s.as_bytes(), 32).unwrap(), bytes);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(decode(b"e", 1).is_none());
        assert!(decode(b"00", 2).is_none());
        // 2 chars carry 10 bits: for one byte the top two must be zero.
        assert!(decode(b"z0", 1).is_none());
        assert_eq!(decode(b"07", 1).unwrap(), vec![7]);
    }
}
