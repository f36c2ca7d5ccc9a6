//! What reading, checking or writing a snapshot directory can fail with. Each message
//! names the file; the VMM and the daemon wrap these in their own errors.

use std::path::PathBuf;

use super::digest::DigestMismatch;
use super::manifest::{OLDEST_VERSION, VERSION};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{} is missing", .0.display())]
    Missing(PathBuf),
    #[error("{step} {}", path.display())]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot destination {} exists and is not an empty directory", .0.display())]
    NotEmpty(PathBuf),
    #[error("snapshot destination {} names no directory (give its path)", .0.display())]
    NoName(PathBuf),
    #[error("{} is not a valid {what}", path.display())]
    Decode {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode {0}")]
    Encode(&'static str, #[source] serde_json::Error),
    #[error(
        "snapshot format version {0} is not supported (this build reads versions \
         {OLDEST_VERSION} to {VERSION})"
    )]
    Version(u32),
    #[error("{} does not match the manifest: {mismatch}", path.display())]
    Digest {
        path: PathBuf,
        mismatch: DigestMismatch,
    },
    #[error("{} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("{} has {len} bytes, expected exactly {expected} (truncated?)", path.display())]
    MemorySize {
        path: PathBuf,
        len: u64,
        expected: u64,
    },
    #[error("checksum file {}", .0.display())]
    Sums(PathBuf, #[source] crate::memsum::SumsError),
    #[error(
        "a version {version} manifest lists the memory checksums of slot {slot} in the \
         wrong form"
    )]
    SumsForm { version: u32, slot: u32 },
    #[error(
        "memory piece {offset}+{len} of slot {slot} is empty, out of order, crosses the \
         {} KiB checksum grid or lies outside the slot's {size} bytes",
        crate::memsum::GRID >> 10
    )]
    PieceLayout {
        slot: u32,
        offset: u64,
        len: u64,
        size: u64,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

pub fn io(
    step: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> Error + use<> {
    let path = path.to_path_buf();
    move |source| Error::Io { step, path, source }
}
