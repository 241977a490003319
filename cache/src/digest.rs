//! Typed blake3 digests: a blob's content digest is not an action key, and the types keep them apart.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! digest_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 32]);

        impl $name {
            pub fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            pub fn to_hex(&self) -> String {
                blake3::Hash::from_bytes(self.0).to_hex().to_string()
            }

            /// The first 12 hex digits, enough for a person to tell two apart.
            pub fn short(&self) -> String {
                self.to_hex()[..12].to_string()
            }
        }

        impl From<blake3::Hash> for $name {
            fn from(hash: blake3::Hash) -> Self {
                Self(*hash.as_bytes())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = DigestParseError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                blake3::Hash::from_hex(s)
                    .map(Self::from)
                    .map_err(|_| DigestParseError(s.chars().take(80).collect()))
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.to_hex())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = String::deserialize(deserializer)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

digest_type!(
    /// The blake3 of a blob's bytes (uncompressed), or of a canonical tree listing.
    ArtifactDigest
);
digest_type!(
    /// The blake3 of a stage's canonical key record: what names an entry of the action cache.
    ActionKey
);

#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a 64-digit blake3 hex digest")]
pub struct DigestParseError(String);

/// The digest of a directory tree: blake3 over its sorted (path, digest, executable) entries,
/// with a domain prefix so a tree never collides with a file of the same bytes.
pub fn tree_digest<'a>(
    entries: impl IntoIterator<Item = (&'a str, &'a ArtifactDigest, bool)>,
) -> ArtifactDigest {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"autoscale-tree-v1\n");
    for (path, digest, executable) in entries {
        hasher.update(path.as_bytes());
        hasher.update(b"\0");
        hasher.update(digest.as_bytes());
        hasher.update(if executable { b"x\n" } else { b"-\n" });
    }
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_rejects_garbage() {
        let d = ArtifactDigest::from(blake3::hash(b"hello"));
        let back: ArtifactDigest = d.to_hex().parse().unwrap();
        assert_eq!(d, back);
        assert!("not-hex".parse::<ArtifactDigest>().is_err());
        assert_eq!(d.short().len(), 12);
    }

    #[test]
    fn tree_digest_depends_on_path_and_mode() {
        let d = ArtifactDigest::from(blake3::hash(b"x"));
        let a = tree_digest([("a.txt", &d, false)]);
        let b = tree_digest([("b.txt", &d, false)]);
        let c = tree_digest([("a.txt", &d, true)]);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }
}
