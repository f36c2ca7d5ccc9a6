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
