//! Snapshot directories in the formats older builds wrote, made from a current one, so
//! tests prove they still restore. Both kinds (`vm.snapshot`'s and the offload
//! daemon's) are recognised by their manifest's name.

use std::fs;
use std::io;
use std::path::Path;

use serde_json::{Value, json};

/// Rewrites the version 3 snapshot directory `dir` in format version 2: the piece sums
/// inline in the manifest (`snapshot.json`: a `memory` list of lists instead of
/// `memory_sums`; `manifest.json`: `extents` in each memory entry instead of `sums`),
/// and no `.sums` files.
pub fn to_version_2(dir: &Path) -> io::Result<()> {
    let vmm = dir.join("snapshot.json");
    let (path, is_vmm) = if vmm.exists() {
        (vmm, true)
    } else {
        (dir.join("manifest.json"), false)
    };
    let mut manifest: Value = serde_json::from_slice(&fs::read(&path)?)?;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let pieces_json = |slot: u64| -> io::Result<Value> {
        let slot = u32::try_from(slot).map_err(|_| bad("slot out of range"))?;
        let pieces = crate::damage::memory_pieces(dir, slot)?;
        fs::remove_file(dir.join(format!("memory-{slot}.sums")))?;
        Ok(pieces
            .iter()
            .map(|p| json!({"offset": p.offset, "len": p.len, "crc32": p.crc32}))
            .collect())
    };
    let m = manifest
        .as_object_mut()
        .ok_or_else(|| bad("not an object"))?;
    if is_vmm {
        let slots: Vec<u64> = m["mappings"]
            .as_array()
            .ok_or_else(|| bad("no mappings"))?
            .iter()
            .filter_map(|e| e["slot"].as_u64())
            .collect();
        let lists = slots
            .into_iter()
            .map(pieces_json)
            .collect::<io::Result<Vec<_>>>()?;
        m.remove("memory_sums");
        m.insert("memory".into(), lists.into());
    } else {
        let entries = m["memory"]
            .as_array_mut()
            .ok_or_else(|| bad("no memory entries"))?;
        for e in entries {
            let slot = e["slot"]
                .as_u64()
                .ok_or_else(|| bad("entry without slot"))?;
            let entry = e
                .as_object_mut()
                .ok_or_else(|| bad("entry not an object"))?;
            entry.remove("sums");
            entry.insert("extents".into(), pieces_json(slot)?);
        }
    }
    m.insert("version".into(), 2.into());
    fs::write(&path, serde_json::to_vec(&manifest)?)
}
