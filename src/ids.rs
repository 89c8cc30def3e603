//! Identifiers shared by the client, the server and the crypto format.
//!
//! Every vault, record and file is named by 128 random bits. They are unguessable
//! (so an id in a URL grants nothing by itself) and globally unique (so the crypto
//! format can bind ciphertext to "this file in this record in this vault" without
//! any coordination). Ids are not secret: the server stores and indexes them.

use std::fmt;
use std::str::FromStr;

/// Length in bytes of every id.
pub const ID_LEN: usize = 16;

/// Error for an id that is not 32 lowercase or uppercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid id {0:?}: expected 32 hex digits")]
pub struct ParseIdError(pub String);

macro_rules! define_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; ID_LEN]);

        impl $name {
            /// A fresh id from the operating system's CSPRNG.
            pub fn random() -> Result<Self, getrandom::Error> {
                let mut bytes = [0u8; ID_LEN];
                getrandom::getrandom(&mut bytes)?;
                Ok($name(bytes))
            }

            /// The raw bytes, as bound into ciphertext.
            pub fn as_bytes(&self) -> &[u8; ID_LEN] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex_encode(&self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), hex_encode(&self.0))
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&hex_encode(&self.0))
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex_array(s).map($name).ok_or_else(|| ParseIdError(s.to_owned()))
            }
        }
    };
}

define_id!(
    /// A vault: the unit of membership and of key management.
    VaultId
);
define_id!(
    /// A record inside a vault; records nest and hold files.
    RecordId
);
define_id!(
    /// A file linked to a record.
    FileId
);
define_id!(
    /// One mount's name as a holder of locks: random per mount, so the
    /// server can tell its locks from another mount's of the same user.
    HolderId
);

/// Lowercase hex of `bytes`.
pub fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    s
}

/// Decodes hex (either case) into bytes; `None` on odd length or a non-hex digit.
pub fn hex_decode(s: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let bytes = s.as_bytes();
    if bytes.len() % 2 != 0 {
        return None;
    }
    bytes.chunks_exact(2).map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?)).collect()
}

/// Decodes exactly `N` bytes of hex.
pub fn parse_hex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    hex_decode(s)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_round_trips_through_display_and_parse() {
        let id = FileId([0xab; ID_LEN]);
        let text = id.to_string();
        assert_eq!(text, "ab".repeat(16));
        assert_eq!(text.parse::<FileId>().unwrap(), id);
        assert_eq!(format!("{id:?}"), format!("FileId({text})"));
    }

    #[test]
    fn bad_ids_are_rejected() {
        for bad in ["", "abc", &"zz".repeat(16), &"ab".repeat(17)] {
            assert!(bad.parse::<VaultId>().is_err(), "{bad:?} parsed");
        }
        assert!("AB".repeat(16).parse::<RecordId>().is_ok());
    }

    #[test]
    fn hex_round_trip() {
        let data: Vec<u8> = (0..=255).collect();
        assert_eq!(hex_decode(&hex_encode(&data)).unwrap(), data);
        assert_eq!(hex_decode("0g"), None);
        assert_eq!(hex_decode("0"), None);
    }
}
