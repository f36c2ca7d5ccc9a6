//! Deliberate damage to snapshot directories, for tests that prove a restore refuses it
//! (or stops before the guest reads it).

use std::os::unix::fs::FileExt;
use std::path::Path;

/// Flips bits `mask` of the byte at `offset` of `path`.
pub fn flip_byte(path: &Path, offset: u64, mask: u8) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset)?;
    b[0] ^= mask;
    f.write_all_at(&b, offset)
}

/// The offset of the byte in the middle of the middle piece of a manifest's piece list
/// (`[{"offset", "len", ...}, ...]`): inside the data, far from the first pages.
pub fn middle_of_pieces(pieces: &serde_json::Value) -> Option<u64> {
    let pieces = pieces.as_array()?;
    let piece = pieces.get(pieces.len() / 2)?;
    Some(piece["offset"].as_u64()? + piece["len"].as_u64()? / 2)
}
