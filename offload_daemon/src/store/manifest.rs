//! A generation's manifest: what `restore` needs (config and state blobs, every memory
//! region's chunk map) and what `list` and `gc` need without the key (name, generation,
//! time, sizes, the set of chunk ids). One object, `manifests/<name>@<generation>`:
//!
//! ```text
//! 0   4  magic "OSM1"
//! 4   1  mode: 0 plain, 1 encrypted
//! 5   3  0
//! 8   4  length P of the public JSON, u32 LE
//! 12  4  0
//! 16  P  public JSON (Public): readable without the key
//! then, plain:     the private JSON (Private), then SHA-256(object key ‖ every byte
//!                  before this digest), 32 bytes
//!       encrypted: 12-byte random nonce, then AES-256-GCM(private JSON) with its 16-byte
//!                  tag; associated data = object key ‖ bytes 0..16+P
//! ```
//! The object key (`manifests/vm1@3`) is inside the digest or the associated data, so a
//! manifest renamed to another name or generation is refused, as is any change to the
//! public part. Without a key the digest only detects damage (anyone who can write the
//! store can write a matching one); with a key the GCM tag authenticates.

use aes_gcm::aead::{AeadCore, AeadInPlace, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Nonce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vmm::snapshot_format::{FileDigest, GuestRamMapping};

use super::codec::Compression;
use super::ids::{ChunkId, Keys};
use super::names::GenName;

pub const MAGIC: &[u8; 4] = b"OSM1";
pub const FORMAT: u32 = 1;
const HEADER_LEN: usize = 16;
/// Far above any real manifest (64 GiB of RAM in 2 MiB chunks is about 4 MiB).
pub const MAX_MANIFEST: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("manifest {0}: not a manifest (bad magic or header)")]
    Header(String),
    #[error("manifest {0}: truncated")]
    Truncated(String),
    #[error("manifest {0}: damaged (digest mismatch)")]
    Digest(String),
    #[error("manifest {0}: JSON")]
    Json(String, #[source] serde_json::Error),
    #[error("manifest {0}: format {1} is not supported (this daemon reads format {FORMAT})")]
    Format(String, u32),
    #[error("snapshot {0} is encrypted: give its --key-file (key fingerprint {1})")]
    NeedKey(String, String),
    #[error("snapshot {0} is not encrypted: drop --key-file")]
    Unencrypted(String),
    #[error(
        "wrong key for snapshot {name}: it was written with key fingerprint {want}, \
         --key-file has {got}"
    )]
    WrongKey {
        name: String,
        want: String,
        got: String,
    },
    #[error("manifest {0}: authentication failed (tampered)")]
    Auth(String),
    #[error("manifest {0}: inconsistent ({1})")]
    Inconsistent(String, &'static str),
    #[error("encrypting the manifest failed")]
    Encrypt,
}

/// The part of a manifest `list` and `gc` read without the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Public {
    pub format: u32,
    pub name: String,
    pub generation: u64,
    /// Seconds since the epoch when the snapshot was committed.
    pub created: u64,
    /// Guest RAM, all regions.
    pub ram_bytes: u64,
    pub chunk_size: u64,
    pub compression: Compression,
    /// Hex fingerprint of the key (HKDF of it, `ids::Keys`), absent when plain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_fingerprint: Option<String>,
    /// Every chunk object the generation needs (memory, config, state), sorted, unique.
    pub chunks: Vec<ChunkId>,
}

/// A stored blob (the Config or State payload), byte for byte: one chunk object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Blob {
    pub id: ChunkId,
    /// Length and CRC32, as the directory snapshots' manifest has them.
    pub digest: FileDigest,
}

/// One memory region: the mapping and, per chunk of `chunk_size` bytes from its start
/// (the last one may be shorter), the chunk's id or `null` for all zeros.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub mapping: GuestRamMapping,
    pub chunks: Vec<Option<ChunkId>>,
}

/// What restore needs; encrypted with a key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Private {
    pub name: String,
    pub generation: u64,
    pub config: Blob,
    pub state: Blob,
    pub regions: Vec<Region>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub public: Public,
    pub private: Private,
}

impl Manifest {
    /// Sorted unique ids of everything the private part references.
    pub fn referenced(private: &Private) -> Vec<ChunkId> {
        let mut ids: Vec<ChunkId> = private
            .regions
            .iter()
            .flat_map(|r| r.chunks.iter().flatten().copied())
            .chain([private.config.id, private.state.id])
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The object bytes for key `which.key()`.
    pub fn encode(&self, which: &GenName, keys: Option<&Keys>) -> Result<Vec<u8>, Error> {
        let key = which.key();
        let public = serde_json::to_vec(&self.public).map_err(|e| Error::Json(key.clone(), e))?;
        let private = serde_json::to_vec(&self.private).map_err(|e| Error::Json(key.clone(), e))?;
        let plen = u32::try_from(public.len()).map_err(|_| Error::Encrypt)?;
        let mut out = Vec::with_capacity(HEADER_LEN + public.len() + private.len() + 64);
        out.extend_from_slice(MAGIC);
        out.push(u8::from(keys.is_some()));
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&plen.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&public);
        match keys {
            None => {
                out.extend_from_slice(&private);
                let digest = plain_digest(&key, &out);
                out.extend_from_slice(&digest);
            }
            Some(k) => {
                let cipher = Aes256Gcm::new(&k.enc.into());
                let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
                let mut aad = key.into_bytes();
                aad.extend_from_slice(&out);
                out.extend_from_slice(&nonce);
                let start = out.len();
                out.extend_from_slice(&private);
                let tag = cipher
                    .encrypt_in_place_detached(&nonce, &aad, &mut out[start..])
                    .map_err(|_| Error::Encrypt)?;
                out.extend_from_slice(&tag);
            }
        }
        Ok(out)
    }

    /// Decodes and checks object `bytes` read from `which.key()`, with `keys` as given on
    /// the command line: a missing, wrong or superfluous key is named as such.
    pub fn decode(which: &GenName, bytes: &[u8], keys: Option<&Keys>) -> Result<Manifest, Error> {
        let key = which.key();
        let (public, mode, body_at) = split_public(&key, bytes)?;
        check_public(&key, which, &public, mode)?;
        let body = &bytes[body_at..];
        let private_json: Vec<u8> = match (mode, keys) {
            (0, Some(_)) => return Err(Error::Unencrypted(which.to_string())),
            (1, None) => {
                return Err(Error::NeedKey(
                    which.to_string(),
                    public.key_fingerprint.clone().unwrap_or_default(),
                ));
            }
            (_, None) => {
                if body.len() < 32 {
                    return Err(Error::Truncated(key));
                }
                let (json, digest) = body.split_at(body.len() - 32);
                if plain_digest(&key, &bytes[..bytes.len() - 32]) != digest {
                    return Err(Error::Digest(key));
                }
                json.to_vec()
            }
            (_, Some(k)) => {
                let got = ChunkId(k.fingerprint).to_string();
                let want = public.key_fingerprint.clone().unwrap_or_default();
                if got != want {
                    return Err(Error::WrongKey {
                        name: which.to_string(),
                        want,
                        got,
                    });
                }
                if body.len() < 12 + 16 {
                    return Err(Error::Truncated(key));
                }
                let (nonce, sealed) = body.split_at(12);
                let (ct, tag) = sealed.split_at(sealed.len() - 16);
                let mut aad = key.clone().into_bytes();
                aad.extend_from_slice(&bytes[..body_at]);
                let mut buf = ct.to_vec();
                Aes256Gcm::new(&k.enc.into())
                    .decrypt_in_place_detached(
                        Nonce::from_slice(nonce),
                        &aad,
                        &mut buf,
                        aes_gcm::Tag::from_slice(tag),
                    )
                    .map_err(|_| Error::Auth(key.clone()))?;
                buf
            }
        };
        let private: Private =
            serde_json::from_slice(&private_json).map_err(|e| Error::Json(key.clone(), e))?;
        if private.name != which.name || private.generation != which.generation {
            return Err(Error::Inconsistent(key, "name or generation"));
        }
        if Manifest::referenced(&private) != public.chunks {
            return Err(Error::Inconsistent(key, "chunk list"));
        }
        let ram: u64 = private.regions.iter().map(|r| r.mapping.size).sum();
        if ram != public.ram_bytes {
            return Err(Error::Inconsistent(key, "RAM size"));
        }
        for r in &private.regions {
            if r.chunks.len() as u64 != r.mapping.size.div_ceil(public.chunk_size) {
                return Err(Error::Inconsistent(key, "chunk count of a region"));
            }
        }
        Ok(Manifest { public, private })
    }

    /// Only the public part (for `list` and `gc`), checked as far as possible without
    /// the key: header, JSON, name and generation; the digest too when plain.
    pub fn decode_public(which: &GenName, bytes: &[u8]) -> Result<Public, Error> {
        let key = which.key();
        let (public, mode, _) = split_public(&key, bytes)?;
        check_public(&key, which, &public, mode)?;
        if mode == 0
            && (bytes.len() < 32
                || plain_digest(&key, &bytes[..bytes.len() - 32]) != bytes[bytes.len() - 32..])
        {
            return Err(Error::Digest(key));
        }
        Ok(public)
    }
}

fn plain_digest(key: &str, bytes: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(key.as_bytes());
    h.update(bytes);
    h.finalize().into()
}

/// The public JSON, the mode byte and where the body starts.
fn split_public(key: &str, bytes: &[u8]) -> Result<(Public, u8, usize), Error> {
    let header = bytes
        .get(..HEADER_LEN)
        .ok_or_else(|| Error::Truncated(key.to_string()))?;
    if &header[..4] != MAGIC || header[5..8] != [0; 3] || header[12..16] != [0; 4] || header[4] > 1
    {
        return Err(Error::Header(key.to_string()));
    }
    let plen = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    let end = HEADER_LEN
        .checked_add(plen)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| Error::Truncated(key.to_string()))?;
    let public: Public = serde_json::from_slice(&bytes[HEADER_LEN..end])
        .map_err(|e| Error::Json(key.to_string(), e))?;
    Ok((public, header[4], end))
}

fn check_public(key: &str, which: &GenName, public: &Public, mode: u8) -> Result<(), Error> {
    if public.format != FORMAT {
        return Err(Error::Format(key.to_string(), public.format));
    }
    if public.name != which.name || public.generation != which.generation {
        return Err(Error::Inconsistent(key.to_string(), "name or generation"));
    }
    if (mode == 1) != public.key_fingerprint.is_some() {
        return Err(Error::Inconsistent(key.to_string(), "encryption flag"));
    }
    if public.chunk_size == 0 || public.chunk_size > super::MAX_CHUNK {
        return Err(Error::Inconsistent(key.to_string(), "chunk size"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ids::chunk_id;

    fn sample(which: &GenName, keys: Option<&Keys>) -> Manifest {
        let a = chunk_id(None, b"a");
        let b = chunk_id(None, b"b");
        let private = Private {
            name: which.name.clone(),
            generation: which.generation,
            config: Blob {
                id: a,
                digest: FileDigest::of(b"a"),
            },
            state: Blob {
                id: b,
                digest: FileDigest::of(b"b"),
            },
            regions: vec![Region {
                mapping: GuestRamMapping {
                    slot: 0,
                    gpa: 0,
                    size: 5 << 20,
                    file_offset: 0,
                },
                chunks: vec![Some(a), None, Some(b)],
            }],
        };
        Manifest {
            public: Public {
                format: FORMAT,
                name: which.name.clone(),
                generation: which.generation,
                created: 1,
                ram_bytes: 5 << 20,
                chunk_size: 2 << 20,
                compression: Compression::Zstd,
                key_fingerprint: keys.map(|k| ChunkId(k.fingerprint).to_string()),
                chunks: Manifest::referenced(&private),
            },
            private,
        }
    }

    #[test]
    fn plain_and_encrypted_round_trip_and_refuse_damage() {
        let which: GenName = "vm1@3".parse().unwrap();
        let key = Keys::derive(&[9; 32]);
        for keys in [None, Some(&key)] {
            let m = sample(&which, keys);
            let bytes = m.encode(&which, keys).unwrap();
            assert_eq!(Manifest::decode(&which, &bytes, keys).unwrap(), m);
            assert_eq!(Manifest::decode_public(&which, &bytes).unwrap(), m.public);
            for at in [0, 4, 8, 20, bytes.len() / 2, bytes.len() - 1] {
                let mut bad = bytes.clone();
                bad[at] ^= 1;
                assert!(
                    Manifest::decode(&which, &bad, keys).is_err(),
                    "flip at {at}"
                );
            }
            for len in [0, 10, bytes.len() - 1] {
                assert!(Manifest::decode(&which, &bytes[..len], keys).is_err());
            }
            // Renamed to another generation.
            let other: GenName = "vm1@4".parse().unwrap();
            assert!(Manifest::decode(&other, &bytes, keys).is_err());
        }
    }

    #[test]
    fn keys_are_checked_first() {
        let which: GenName = "vm1@1".parse().unwrap();
        let key = Keys::derive(&[9; 32]);
        let plain = sample(&which, None).encode(&which, None).unwrap();
        let enc = sample(&which, Some(&key))
            .encode(&which, Some(&key))
            .unwrap();
        let e = Manifest::decode(&which, &plain, Some(&key)).unwrap_err();
        assert!(matches!(e, Error::Unencrypted(_)), "{e}");
        let e = Manifest::decode(&which, &enc, None).unwrap_err();
        assert!(matches!(e, Error::NeedKey(..)), "{e}");
        let wrong = Keys::derive(&[8; 32]);
        let e = Manifest::decode(&which, &enc, Some(&wrong)).unwrap_err();
        assert!(matches!(e, Error::WrongKey { .. }), "{e}");
    }
}
