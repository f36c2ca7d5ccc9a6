//! One chunk object: a 16-byte header, then the (compressed) bytes, AES-256-GCM
//! encrypted when the store has a key. Decoding checks everything a reader can: the
//! header, the AEAD tag (whose associated data is the header and the chunk id, so an
//! object moved to another id fails), the decompressed length, and finally that the
//! plaintext hashes to the id the manifest asked for.
//!
//! ```text
//! 0   4  magic "OSC1"
//! 4   1  compression: 0 none, 1 zstd, 2 lz4 (lz4_flex block format)
//! 5   1  flags: bit 0 encrypted; other bits 0
//! 6   2  0
//! 8   4  plaintext length, u32 LE
//! 12  4  0
//! 16     plain:     the compressed bytes
//!        encrypted: 12-byte random nonce, then ciphertext with its 16-byte GCM tag;
//!                   associated data = bytes 0..16 of this header ‖ the 32-byte chunk id
//! ```
//! Data that does not shrink is stored with compression 0.

use aes_gcm::aead::{AeadCore, AeadInPlace, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Nonce};

use super::ids::{self, ChunkId, Keys};

pub const MAGIC: &[u8; 4] = b"OSC1";
pub const HEADER_LEN: usize = 16;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// zstd's level: 1 is its fastest standard level, and on guest memory it compresses
/// nearly as well as 3 at about twice the speed (docs/offload_daemon.md).
pub const ZSTD_LEVEL: i32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Zstd,
    Lz4,
}

impl Compression {
    fn code(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Zstd => 1,
            Compression::Lz4 => 2,
        }
    }
    fn from_code(c: u8) -> Option<Compression> {
        Some(match c {
            0 => Compression::None,
            1 => Compression::Zstd,
            2 => Compression::Lz4,
            _ => return None,
        })
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Compression, String> {
        match s {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd),
            "lz4" => Ok(Compression::Lz4),
            _ => Err(format!("{s:?}: expected zstd, lz4 or none")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("chunk {0}: not a chunk object (bad magic or header)")]
    Header(ChunkId),
    #[error("chunk {0}: truncated")]
    Truncated(ChunkId),
    #[error("chunk {id}: unknown compression {code}")]
    UnknownCompression { id: ChunkId, code: u8 },
    #[error("chunk {0} is encrypted but no --key-file was given")]
    NeedKey(ChunkId),
    #[error("chunk {0} is not encrypted but the snapshot is")]
    NotEncrypted(ChunkId),
    #[error("chunk {0}: authentication failed (tampered, moved, or another key)")]
    Auth(ChunkId),
    #[error("chunk {0}: decompression failed")]
    Decompress(ChunkId, #[source] std::io::Error),
    #[error("chunk {id}: holds {got} bytes, the manifest says {expected}")]
    Length {
        id: ChunkId,
        got: u64,
        expected: u64,
    },
    #[error("chunk {0}: contents do not match its id (tampered or swapped)")]
    Mismatch(ChunkId),
    #[error("compressing a chunk failed")]
    Compress(#[source] std::io::Error),
    #[error("a chunk of {0} bytes is too large")]
    TooLarge(usize),
    #[error("encrypting a chunk failed")]
    Encrypt,
}

/// How chunks are written and read: the compression, and the key if any.
pub struct Codec {
    pub compression: Compression,
    keys: Option<Keys>,
    cipher: Option<Aes256Gcm>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("compression", &self.compression)
            .field("keys", &self.keys)
            .finish()
    }
}

/// Per-thread buffers and compression contexts, reused from chunk to chunk.
#[derive(Default)]
pub struct Scratch {
    zc: Option<zstd::bulk::Compressor<'static>>,
    zd: Option<zstd::bulk::Decompressor<'static>>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scratch({} bytes)", self.buf.capacity())
    }
}

impl Codec {
    pub fn new(compression: Compression, keys: Option<Keys>) -> Codec {
        let cipher = keys.as_ref().map(|k| Aes256Gcm::new(&k.enc.into()));
        Codec {
            compression,
            keys,
            cipher,
        }
    }

    pub fn keys(&self) -> Option<&Keys> {
        self.keys.as_ref()
    }

    /// The id of `plain` under this codec's key (or none).
    pub fn id(&self, plain: &[u8]) -> ChunkId {
        ids::chunk_id(self.keys.as_ref(), plain)
    }

    /// The object for `plain`, whose id is `id`, into `out` (cleared first).
    pub fn encode(
        &self,
        id: &ChunkId,
        plain: &[u8],
        scratch: &mut Scratch,
        out: &mut Vec<u8>,
    ) -> Result<(), Error> {
        let plain_len = u32::try_from(plain.len()).map_err(|_| Error::TooLarge(plain.len()))?;
        let body = &mut scratch.buf;
        body.clear();
        let mut compression = self.compression;
        match compression {
            Compression::None => {}
            Compression::Zstd => {
                let zc = match &mut scratch.zc {
                    Some(z) => z,
                    none => none
                        .insert(zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(Error::Compress)?),
                };
                body.reserve(zstd::zstd_safe::compress_bound(plain.len()));
                zc.compress_to_buffer(plain, body)
                    .map_err(Error::Compress)?;
            }
            Compression::Lz4 => {
                body.resize(lz4_flex::block::get_maximum_output_size(plain.len()), 0);
                let n = lz4_flex::block::compress_into(plain, body)
                    .map_err(|e| Error::Compress(std::io::Error::other(e)))?;
                body.truncate(n);
            }
        }
        if compression != Compression::None && body.len() >= plain.len() {
            compression = Compression::None;
        }
        let payload: &[u8] = if compression == Compression::None {
            plain
        } else {
            body
        };
        out.clear();
        out.extend_from_slice(MAGIC);
        out.push(compression.code());
        out.push(u8::from(self.cipher.is_some()));
        out.extend_from_slice(&[0; 2]);
        out.extend_from_slice(&plain_len.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        match &self.cipher {
            None => out.extend_from_slice(payload),
            Some(cipher) => {
                let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
                let mut aad = [0u8; HEADER_LEN + 32];
                aad[..HEADER_LEN].copy_from_slice(&out[..HEADER_LEN]);
                aad[HEADER_LEN..].copy_from_slice(&id.0);
                out.extend_from_slice(&nonce);
                let start = out.len();
                out.extend_from_slice(payload);
                let tag = cipher
                    .encrypt_in_place_detached(&nonce, &aad, &mut out[start..])
                    .map_err(|_| Error::Encrypt)?;
                out.extend_from_slice(&tag);
            }
        }
        Ok(())
    }

    /// Decodes `object`, which the manifest says is chunk `id`, into `out` (exactly the
    /// chunk's length), checking it throughout.
    pub fn decode(
        &self,
        id: &ChunkId,
        object: &[u8],
        scratch: &mut Scratch,
        out: &mut [u8],
    ) -> Result<(), Error> {
        let header: &[u8; HEADER_LEN] = object
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(Error::Truncated(*id))?;
        if &header[..4] != MAGIC || header[6..8] != [0, 0] || header[12..16] != [0; 4] {
            return Err(Error::Header(*id));
        }
        let compression = Compression::from_code(header[4]).ok_or(Error::UnknownCompression {
            id: *id,
            code: header[4],
        })?;
        let plain_len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        if u64::from(plain_len) != out.len() as u64 {
            return Err(Error::Length {
                id: *id,
                got: u64::from(plain_len),
                expected: out.len() as u64,
            });
        }
        let rest = &object[HEADER_LEN..];
        let payload: &[u8] = match (header[5], &self.cipher) {
            (0, None) => rest,
            (1, Some(cipher)) => {
                if rest.len() < NONCE_LEN + TAG_LEN {
                    return Err(Error::Truncated(*id));
                }
                let (nonce, sealed) = rest.split_at(NONCE_LEN);
                let (ct, tag) = sealed.split_at(sealed.len() - TAG_LEN);
                let mut aad = [0u8; HEADER_LEN + 32];
                aad[..HEADER_LEN].copy_from_slice(header);
                aad[HEADER_LEN..].copy_from_slice(&id.0);
                scratch.buf.clear();
                scratch.buf.extend_from_slice(ct);
                cipher
                    .decrypt_in_place_detached(
                        Nonce::from_slice(nonce),
                        &aad,
                        &mut scratch.buf,
                        aes_gcm::Tag::from_slice(tag),
                    )
                    .map_err(|_| Error::Auth(*id))?;
                &scratch.buf
            }
            (1, None) => return Err(Error::NeedKey(*id)),
            (0, Some(_)) => return Err(Error::NotEncrypted(*id)),
            _ => return Err(Error::Header(*id)),
        };
        let got = match compression {
            Compression::None => {
                if payload.len() != out.len() {
                    return Err(Error::Truncated(*id));
                }
                out.copy_from_slice(payload);
                out.len()
            }
            Compression::Zstd => {
                let zd = match &mut scratch.zd {
                    Some(z) => z,
                    none => none.insert(
                        zstd::bulk::Decompressor::new().map_err(|e| Error::Decompress(*id, e))?,
                    ),
                };
                zd.decompress_to_buffer(payload, out)
                    .map_err(|e| Error::Decompress(*id, e))?
            }
            Compression::Lz4 => lz4_flex::block::decompress_into(payload, out)
                .map_err(|e| Error::Decompress(*id, std::io::Error::other(e)))?,
        };
        if got != out.len() {
            return Err(Error::Length {
                id: *id,
                got: got as u64,
                expected: out.len() as u64,
            });
        }
        if self.id(out) != *id {
            return Err(Error::Mismatch(*id));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest-like data: runs of repeated words with some noise.
    fn sample(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| {
                if i % 4096 < 1024 {
                    (i / 7) as u8
                } else {
                    (i % 13) as u8
                }
            })
            .collect()
    }

    fn round_trip(c: Compression, keys: Option<Keys>) {
        let codec = Codec::new(c, keys);
        let plain = sample(1 << 20);
        let id = codec.id(&plain);
        let mut s = Scratch::default();
        let mut obj = Vec::new();
        codec.encode(&id, &plain, &mut s, &mut obj).unwrap();
        if c != Compression::None {
            assert!(obj.len() < plain.len() / 2, "{c:?}: {}", obj.len());
        }
        let mut back = vec![0; plain.len()];
        codec.decode(&id, &obj, &mut s, &mut back).unwrap();
        assert_eq!(back, plain);

        // Every single flipped byte is caught.
        for at in [0, 5, 9, HEADER_LEN, obj.len() / 2, obj.len() - 1] {
            let mut bad = obj.clone();
            bad[at] ^= 0x10;
            assert!(
                codec.decode(&id, &bad, &mut s, &mut back).is_err(),
                "{c:?}: flip at {at} accepted"
            );
        }
        // Truncation, and another chunk's id.
        assert!(
            codec
                .decode(&id, &obj[..obj.len() - 1], &mut s, &mut back)
                .is_err()
        );
        let other = codec.id(b"other");
        assert!(codec.decode(&other, &obj, &mut s, &mut back).is_err());
    }

    #[test]
    fn round_trips_and_detects_damage() {
        for c in [Compression::None, Compression::Zstd, Compression::Lz4] {
            round_trip(c, None);
            round_trip(c, Some(Keys::derive(&[3; 32])));
        }
    }

    #[test]
    fn keys_must_match() {
        let plain = sample(8192);
        let enc = Codec::new(Compression::Zstd, Some(Keys::derive(&[1; 32])));
        let id = enc.id(&plain);
        let mut s = Scratch::default();
        let mut obj = Vec::new();
        enc.encode(&id, &plain, &mut s, &mut obj).unwrap();
        let mut back = vec![0; plain.len()];
        let wrong = Codec::new(Compression::Zstd, Some(Keys::derive(&[2; 32])));
        assert!(matches!(
            wrong.decode(&id, &obj, &mut s, &mut back),
            Err(Error::Auth(_))
        ));
        let none = Codec::new(Compression::Zstd, None);
        assert!(matches!(
            none.decode(&id, &obj, &mut s, &mut back),
            Err(Error::NeedKey(_))
        ));
        let pid = none.id(&plain);
        none.encode(&pid, &plain, &mut s, &mut obj).unwrap();
        assert!(matches!(
            enc.decode(&pid, &obj, &mut s, &mut back),
            Err(Error::NotEncrypted(_))
        ));
    }

    #[test]
    fn incompressible_data_is_stored_raw() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let plain: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let codec = Codec::new(Compression::Zstd, None);
        let id = codec.id(&plain);
        let mut obj = Vec::new();
        codec
            .encode(&id, &plain, &mut Scratch::default(), &mut obj)
            .unwrap();
        assert_eq!(obj[4], 0);
        assert_eq!(obj.len(), HEADER_LEN + plain.len());
    }
}
