//! Where a store's objects live. A backend knows only whole objects named by keys
//! (`chunks/ab/ab12…`, `manifests/vm1@3`): put one if absent, get, list, delete, and make
//! what was put durable. That is all an object store (S3, issue 18) offers too, so the
//! store above never needs more.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store URL {0:?} is not supported (use file:///absolute/path)")]
    Url(String),
    #[error("invalid object key {0:?}")]
    Key(String),
    #[error("{step} {key}")]
    Io {
        step: &'static str,
        key: String,
        #[source]
        source: io::Error,
    },
    #[error("object {key} is larger than {limit} bytes")]
    TooLarge { key: String, limit: u64 },
}

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// Last modification, seconds since the epoch (0 when the backend cannot tell).
    pub modified: u64,
}

/// Whole-object storage by key. Keys are `/`-separated, each part of
/// `[A-Za-z0-9._@-]`, not starting with `.`: checked by [`check_key`].
pub trait Backend: Send + Sync {
    /// Stores `data` under `key` unless an object is already there: `Ok(true)` if this
    /// call wrote it, `Ok(false)` if it was present (its contents are left alone). Never
    /// leaves a partial object visible under `key`.
    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool, Error>;
    /// The object's bytes, `None` if absent; refused above `limit` bytes.
    fn get(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>, Error>;
    /// Whether `key` exists.
    fn exists(&self, key: &str) -> Result<bool, Error>;
    /// Every object whose key starts with `prefix` (a folder such as `chunks/`).
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, Error>;
    /// Removes `key`; absent is not an error.
    fn delete(&self, key: &str) -> Result<(), Error>;
    /// Makes every object put so far durable (a crash after this keeps them).
    fn sync(&self) -> Result<(), Error>;
}

/// Refuses keys that could escape the store or name hidden temp files.
pub fn check_key(key: &str) -> Result<(), Error> {
    let ok = !key.is_empty()
        && key.split('/').all(|part| {
            !part.is_empty()
                && !part.starts_with('.')
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(Error::Key(key.to_string()))
    }
}

/// Opens the backend a store URL names.
pub fn open(url: &str) -> Result<Box<dyn Backend>, Error> {
    match url.strip_prefix("file://") {
        Some(path) if path.starts_with('/') => Ok(Box::new(super::file::FileBackend::open(
            std::path::Path::new(path),
        )?)),
        _ => Err(Error::Url(url.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for good in ["chunks/ab/ab12", "manifests/vm1@3", "a", "x-y_z.1"] {
            check_key(good).unwrap();
        }
        for bad in [
            "", "/a", "a/", "a//b", "../a", "a/../b", ".tmp", "a b", "a\\b",
        ] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn urls() {
        assert!(matches!(open("s3://bucket"), Err(Error::Url(_))));
        assert!(matches!(open("file://relative"), Err(Error::Url(_))));
    }
}
