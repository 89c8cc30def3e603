//! Crockford's base 32, for what people read aloud, write down or type:
//! fingerprints ([`super::share::Fingerprint`]) and recovery keys
//! ([`super::recovery::RecoveryKey`]). Digits and lower-case letters without
//! i, l, o and u; when reading, any case, dashes and spaces are accepted, and
//! the look-alikes `o` (for 0) and `i`, `l` (for 1).

const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// The first `chars` characters of the bit string `bytes` (most significant
/// bit first; bits past the end are zero), a dash after every `group`.
pub(super) fn encode(bytes: &[u8], chars: usize, group: usize) -> String {
    let mut out = String::with_capacity(chars + chars / group);
    let bit = |i: usize| bytes.get(i / 8).map_or(0, |b| (b >> (7 - i % 8)) & 1);
    for n in 0..chars {
        if n > 0 && n % group == 0 {
            out.push('-');
        }
        let v = (0..5).fold(0usize, |acc, k| (acc << 1) | usize::from(bit(n * 5 + k)));
        out.push(ALPHABET[v] as char);
    }
    out
}

/// Reads text as people type it: returns the bits packed most significant
/// first (the last byte padded with zero bits) and how many characters there
/// were, or the first character that is not base 32.
pub(super) fn decode(text: &str) -> Result<(Vec<u8>, usize), char> {
    let mut out = Vec::with_capacity(text.len() * 5 / 8 + 1);
    let mut acc: u32 = 0;
    let mut bits = 0;
    let mut chars = 0;
    for c in text.chars().filter(|c| !matches!(c, '-' | ' ')) {
        let v = match c.to_ascii_lowercase() {
            'o' => 0,
            'i' | 'l' => 1,
            lower => ALPHABET.iter().position(|&b| b as char == lower).ok_or(c)? as u32,
        };
        acc = (acc << 5) | v;
        bits += 5;
        chars += 1;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    if bits > 0 {
        out.push((acc << (8 - bits)) as u8);
    }
    Ok((out, chars))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_whole_and_partial_bytes() {
        assert_eq!(encode(&[0xff; 15], 24, 4), "zzzz-zzzz-zzzz-zzzz-zzzz-zzzz");
        assert_eq!(encode(&[0; 2], 4, 4), "0000");
        // 0b10000_11111_00000_1(0000) : 'g', 'z', '0', 'g'
        assert_eq!(encode(&[0b1000_0111, 0b1100_0001], 4, 2), "gz-0g");
        let (bytes, n) = decode("GZ-0G").unwrap();
        assert_eq!((bytes, n), (vec![0b1000_0111, 0b1100_0001, 0], 4));
        assert_eq!(decode("o I l").unwrap().0, decode("011").unwrap().0);
        assert_eq!(decode("abu"), Err('u'));
        for len in [1usize, 7, 15, 16, 18] {
            let data: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
            let chars = len * 8 / 5;
            let (back, n) = decode(&encode(&data, chars, 4)).unwrap();
            assert_eq!(n, chars);
            let whole = chars * 5 / 8;
            assert_eq!(back[..whole], data[..whole], "{len} bytes");
        }
    }
}
