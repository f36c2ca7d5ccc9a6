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

/// The data pieces of `memory-<slot>` in a snapshot directory (`vm.snapshot`'s or the
/// offload daemon's, which name their files alike), from its checksums file.
pub fn memory_pieces(dir: &Path, slot: u32) -> std::io::Result<Vec<vmm::memsum::PieceSum>> {
    let name = vmm::snapshot_format::sums_file_name(slot);
    let sums = std::fs::read(dir.join(&name))?;
    vmm::memsum::decode(&sums).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{name} is not a whole number of records"),
        )
    })
}

/// The offset of the byte in the middle of the middle data piece of `memory-<slot>`:
/// inside the data, far from the first pages.
pub fn middle_of_pieces(dir: &Path, slot: u32) -> std::io::Result<u64> {
    let pieces = memory_pieces(dir, slot)?;
    let piece = pieces
        .get(pieces.len() / 2)
        .ok_or_else(|| std::io::Error::other(format!("memory-{slot} holds no data")))?;
    Ok(piece.offset + piece.len / 2)
}

/// Copies a snapshot directory keeping its holes (`cp -r --sparse=always`), so each damage
/// case starts from a good copy without costing the disk the guest RAM size.
pub fn copy_snapshot(from: &Path, to: &Path) -> std::io::Result<()> {
    let out = std::process::Command::new("cp")
        .args(["-r", "--sparse=always"])
        .arg(from)
        .arg(to)
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "cp -r {} {}: {}",
            from.display(),
            to.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}
