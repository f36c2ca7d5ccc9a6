//! A whole small file's size and CRC32, as the manifests record it.

use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};

/// Size and CRC32 of a file (or of a payload). `snapshot.json` names the size `size`,
/// `manifest.json` names it `len` ([`len_key`]); either is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    #[serde(alias = "len")]
    pub size: u64,
    pub crc32: u32,
}

/// Bytes that do not match their [`FileDigest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", describe(.got, .want))]
pub struct DigestMismatch {
    pub got: FileDigest,
    pub want: FileDigest,
}

fn describe(got: &FileDigest, want: &FileDigest) -> String {
    if got.size != want.size {
        format!("{} bytes, the manifest says {}", got.size, want.size)
    } else {
        format!(
            "CRC32 {:08x}, the manifest says {:08x}",
            got.crc32, want.crc32
        )
    }
}

impl FileDigest {
    pub fn of(bytes: &[u8]) -> Self {
        FileDigest {
            size: bytes.len() as u64,
            crc32: crc32fast::hash(bytes),
        }
    }

    /// Checks `bytes` against this digest.
    pub fn check(&self, bytes: &[u8]) -> Result<(), DigestMismatch> {
        let got = FileDigest::of(bytes);
        if got == *self {
            Ok(())
        } else {
            Err(DigestMismatch { got, want: *self })
        }
    }
}

/// `#[serde(with)]` for a digest written as `{"len", "crc32"}` (the daemon's manifest).
pub mod len_key {
    use super::*;

    pub(crate) struct LenKey<'a>(pub &'a FileDigest);

    impl Serialize for LenKey<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut st = s.serialize_struct("FileDigest", 2)?;
            st.serialize_field("len", &self.0.size)?;
            st.serialize_field("crc32", &self.0.crc32)?;
            st.end()
        }
    }

    pub fn serialize<S: Serializer>(d: &FileDigest, s: S) -> Result<S::Ok, S::Error> {
        LenKey(d).serialize(s)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<FileDigest, D::Error> {
        FileDigest::deserialize(d)
    }

    /// The same for an optional digest.
    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(d: &Option<FileDigest>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_some(&LenKey(d)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> Result<Option<FileDigest>, D::Error> {
            Option::<FileDigest>::deserialize(d)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_key_names_and_checks_bytes() {
        let d = FileDigest::of(b"abc");
        let vmm = serde_json::to_string(&d).unwrap();
        assert_eq!(vmm, format!(r#"{{"size":3,"crc32":{}}}"#, d.crc32));
        let mut daemon = Vec::new();
        len_key::serialize(&d, &mut serde_json::Serializer::new(&mut daemon)).unwrap();
        let daemon = String::from_utf8(daemon).unwrap();
        assert_eq!(daemon, format!(r#"{{"len":3,"crc32":{}}}"#, d.crc32));
        for json in [vmm, daemon] {
            assert_eq!(serde_json::from_str::<FileDigest>(&json).unwrap(), d);
        }
        assert!(serde_json::from_str::<FileDigest>(r#"{"size":3,"crc32":1,"x":0}"#).is_err());
        assert!(d.check(b"abc").is_ok());
        assert!(d.check(b"abd").unwrap_err().to_string().contains("CRC32"));
        assert!(d.check(b"ab").unwrap_err().to_string().contains("2 bytes"));
    }
}
