//! Content addresses and keys. Without a key a chunk's id is the SHA-256 of its
//! plaintext. With a key it is HMAC-SHA256 of the plaintext under a MAC subkey, so the
//! store never shows a plaintext hash (which would let anyone holding a guess of a page's
//! contents check it). The key file holds 32 bytes, raw or as 64 hex characters; HKDF-
//! SHA256 derives separate subkeys from it for chunk encryption, chunk addresses and a
//! public key fingerprint (which tells a wrong key from a tampered manifest).

use std::fmt;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read key file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "key file {} is readable or writable by group or others (mode {mode:03o}): \
         refusing it; chmod 600 it",
        path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {} is not a regular file", .0.display())]
    NotAFile(PathBuf),
    #[error(
        "key file {} must hold exactly 32 bytes, or 64 hex characters (it has {len} bytes)",
        path.display()
    )]
    Format { path: PathBuf, len: usize },
    #[error("{0:?} is not a chunk id (64 lowercase hex characters)")]
    BadId(String),
}

/// A chunk's address: 32 bytes, shown as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

impl std::str::FromStr for ChunkId {
    type Err = Error;
    fn from_str(s: &str) -> Result<ChunkId, Error> {
        let bytes = decode_hex(s).ok_or_else(|| Error::BadId(s.to_string()))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| Error::BadId(s.to_string()))?;
        if s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(Error::BadId(s.to_string()));
        }
        Ok(ChunkId(arr))
    }
}

impl serde::Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ChunkId, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl ChunkId {
    /// The backend key of the chunk object: `chunks/<first 2 hex>/<64 hex>`.
    pub fn key(&self) -> String {
        let hex = self.to_string();
        format!("chunks/{}/{hex}", &hex[..2])
    }
}

pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16);
    s.as_bytes()
        .chunks(2)
        .map(|p| u8::try_from(digit(p[0])? * 16 + digit(p[1])?).ok())
        .collect()
}

/// The subkeys of one key file. Never printed.
pub struct Keys {
    /// AES-256-GCM key of chunks and manifests.
    pub enc: [u8; 32],
    /// HMAC-SHA256 key of chunk ids.
    mac: [u8; 32],
    /// Public: stored in encrypted manifests so a wrong key is named as such.
    pub fingerprint: [u8; 32],
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keys(fingerprint {})", ChunkId(self.fingerprint))
    }
}

/// HKDF salt: names this use of the key, so the same key file used elsewhere yields
/// unrelated subkeys.
const HKDF_SALT: &[u8] = b"offload_daemon snapshot store v1";

impl Keys {
    /// Derives the subkeys from the 32-byte master key.
    pub fn derive(master: &[u8; 32]) -> Keys {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(HKDF_SALT), master);
        let out = |info: &[u8]| {
            let mut k = [0u8; 32];
            // 32 bytes is far below HKDF-SHA256's limit of 255 * 32.
            if hk.expand(info, &mut k).is_err() {
                unreachable!("HKDF output length 32 is valid");
            }
            k
        };
        Keys {
            enc: out(b"encrypt"),
            mac: out(b"chunk-id"),
            fingerprint: out(b"fingerprint"),
        }
    }

    /// Reads a key file: 32 raw bytes, or 64 hex characters (whitespace around them
    /// ignored). Refuses a file that group or others may read or write.
    pub fn from_file(path: &Path) -> Result<Keys, Error> {
        let read_err = |source| Error::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(read_err)?;
        let meta = f.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(Error::NotAFile(path.to_path_buf()));
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(Error::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut raw = Vec::new();
        (&mut f)
            .take(4096)
            .read_to_end(&mut raw)
            .map_err(read_err)?;
        let master = parse_key(&raw).ok_or(Error::Format {
            path: path.to_path_buf(),
            len: raw.len(),
        })?;
        Ok(Keys::derive(&master))
    }

    /// The keyed chunk id of `plain`.
    pub fn chunk_id(&self, plain: &[u8]) -> ChunkId {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.mac) else {
            unreachable!("HMAC takes keys of any length");
        };
        mac.update(plain);
        ChunkId(mac.finalize().into_bytes().into())
    }
}

fn parse_key(raw: &[u8]) -> Option<[u8; 32]> {
    if raw.len() == 32 {
        return raw.try_into().ok();
    }
    let text = std::str::from_utf8(raw).ok()?.trim();
    if text.len() == 64 {
        return decode_hex(text)?.try_into().ok();
    }
    None
}

/// The id of `plain`: keyed with `keys`, else its SHA-256.
pub fn chunk_id(keys: Option<&Keys>, plain: &[u8]) -> ChunkId {
    match keys {
        Some(k) => k.chunk_id(plain),
        None => ChunkId(Sha256::digest(plain).into()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn plain_id_is_sha256() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(
            chunk_id(None, b"abc").to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn keyed_ids_depend_on_the_key_and_hide_the_hash() {
        let a = Keys::derive(&[1; 32]);
        let b = Keys::derive(&[2; 32]);
        let x = a.chunk_id(b"page");
        assert_eq!(x, a.chunk_id(b"page"));
        assert_ne!(x, b.chunk_id(b"page"));
        assert_ne!(x, chunk_id(None, b"page"));
        assert_ne!(a.enc, a.fingerprint);
        assert_ne!(a.enc, a.mac);
        assert_ne!(a.fingerprint, b.fingerprint);
    }

    #[test]
    fn ids_round_trip() {
        let id = chunk_id(None, b"x");
        assert_eq!(id.to_string().parse::<ChunkId>().unwrap(), id);
        assert!(
            id.key()
                .starts_with(&format!("chunks/{}/", &id.to_string()[..2]))
        );
        assert!("zz".parse::<ChunkId>().is_err());
        assert!(id.to_string().to_uppercase().parse::<ChunkId>().is_err());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<ChunkId>(&json).unwrap(), id);
    }

    #[test]
    fn key_files() {
        let dir = std::env::temp_dir().join(format!("store-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, data: &[u8], mode: u32| {
            let p = dir.join(name);
            std::fs::write(&p, data).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let raw = Keys::from_file(&write("raw", &[7; 32], 0o600)).unwrap();
        let hex = Keys::from_file(&write(
            "hex",
            format!("{}\n", "07".repeat(32)).as_bytes(),
            0o400,
        ))
        .unwrap();
        assert_eq!(raw.fingerprint, hex.fingerprint);
        let open = Keys::from_file(&write("open", &[7; 32], 0o640)).unwrap_err();
        assert!(open.to_string().contains("mode 640"), "{open}");
        assert!(matches!(
            Keys::from_file(&write("short", &[7; 31], 0o600)),
            Err(Error::Format { len: 31, .. })
        ));
        assert!(matches!(
            Keys::from_file(&dir.join("absent")),
            Err(Error::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
