//! The store end to end without a VMM: memfds → writer → store → reader → memfds,
//! generations, dedup, damage, list and gc.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use vmm::snapshot_format::GuestRamMapping;

use super::catalog::Store;
use super::codec::{Codec, Compression};
use super::ids::Keys;
use super::reader;
use super::writer::{self, Input};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 2 * MIB;

struct Tmp(PathBuf);
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn store(name: &str) -> (Tmp, Store) {
    let dir = std::env::temp_dir().join(format!("store-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let s = Store::open(&format!("file://{}", dir.display())).unwrap();
    (Tmp(dir), s)
}

fn config(size: u64) -> Vec<u8> {
    format!(
        r#"{{"vm_config":{{}},"memory_manager_data":{{"guest_ram_mappings":[{{"slot":0,"gpa":0,"size":{size},"file_offset":0}}]}}}}"#
    )
    .into_bytes()
}

fn memfd(size: u64) -> std::fs::File {
    vmm::memory_manager::create_memfd(size).unwrap()
}

/// 9 MiB of RAM (the last chunk short), data in chunks 0, 1 and 4 (chunk 3 written
/// but all zeros).
fn guest(size: u64) -> std::fs::File {
    let f = memfd(size);
    let page: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    for off in (0..2 * CHUNK).step_by(4096) {
        let mut p = page.clone();
        p[..8].copy_from_slice(&off.to_le_bytes());
        f.write_all_at(&p, off).unwrap();
    }
    f.write_all_at(&[0; 4096], 3 * CHUNK).unwrap();
    f.write_all_at(b"last", 4 * CHUNK + 5).unwrap();
    f
}

fn snap(s: &Store, codec: &Codec, name: &str, fd: &std::fs::File, size: u64) -> writer::Stats {
    let cfg = config(size);
    let input = Input {
        name,
        config: &cfg,
        state: b"{\"state\":1}",
        regions: vec![(
            GuestRamMapping {
                slot: 0,
                gpa: 0,
                size,
                file_offset: 0,
            },
            fd,
        )],
        chunk_size: CHUNK,
        workers: 2,
    };
    writer::write(s, codec, &input).unwrap()
}

fn read_all(f: &std::fs::File, size: u64) -> Vec<u8> {
    let mut v = vec![0; size as usize];
    f.read_exact_at(&mut v, 0).unwrap();
    v
}

fn key() -> Keys {
    Keys::derive(&[5; 32])
}

#[test]
fn round_trip_generations_and_dedup() {
    let size = 9 * MIB;
    for (c, k) in [
        (Compression::None, None),
        (Compression::Zstd, None),
        (Compression::Lz4, Some(key())),
        (Compression::Zstd, Some(key())),
    ] {
        let encrypted = k.is_some();
        let (_t, s) = store(&format!("rt-{c:?}-{encrypted}"));
        let codec = Codec::new(c, k);
        let fd = guest(size);
        let st = snap(&s, &codec, "vm1", &fd, size);
        assert_eq!(st.snapshot, "vm1@1");
        // chunks 0, 1, 4 and the two blobs
        assert_eq!((st.chunks, st.zero_chunks), (5, 2), "{st:?}");
        assert_eq!(st.written_chunks, 5, "{st:?}");

        let keys = encrypted.then(key);
        let (which, m) = reader::open_manifest(&s, "vm1", keys.as_ref()).unwrap();
        let loaded = reader::load(&s, which, &m, keys, 2).unwrap();
        assert_eq!(loaded.state, b"{\"state\":1}");
        assert_eq!(read_all(&loaded.memfds[0].1, size), read_all(&fd, size));

        // Second generation: one chunk changed, only it is written.
        fd.write_all_at(b"changed", CHUNK + 100).unwrap();
        let st2 = snap(&s, &codec, "vm1", &fd, size);
        assert_eq!(st2.snapshot, "vm1@2");
        assert_eq!((st2.written_chunks, st2.existing_chunks), (1, 4), "{st2:?}");
        let keys = encrypted.then(key);
        let (which, m) = reader::open_manifest(&s, "vm1", keys.as_ref()).unwrap();
        assert_eq!(which.generation, 2);
        let loaded = reader::load(&s, which, &m, keys, 2).unwrap();
        assert_eq!(read_all(&loaded.memfds[0].1, size), read_all(&fd, size));
        let list = s.list().unwrap();
        assert_eq!(list.len(), 2);
        assert!(list[1].shared_bytes > 0 && list[1].shared_bytes < list[1].stored_bytes);
    }
}

#[test]
fn damage_is_refused_and_gc_keeps_what_is_referenced() {
    let size = 9 * MIB;
    let (t, s) = store("damage");
    let codec = Codec::new(Compression::Zstd, Some(key()));
    let fd = guest(size);
    snap(&s, &codec, "vm1", &fd, size);
    fd.write_all_at(b"changed", 100).unwrap();
    snap(&s, &codec, "vm1", &fd, size);

    // Wrong key, no key, before any chunk is read.
    let e = reader::open_manifest(&s, "vm1@1", Some(&Keys::derive(&[6; 32]))).unwrap_err();
    assert!(e.to_string().contains("wrong key"), "{e}");
    let e = reader::open_manifest(&s, "vm1@1", None).unwrap_err();
    assert!(e.to_string().contains("is encrypted"), "{e}");

    // A flipped byte in one chunk of generation 1.
    let (which, m) = reader::open_manifest(&s, "vm1@1", Some(&key())).unwrap();
    let id = m.private.regions[0].chunks[0].unwrap();
    let path = t.0.join(id.key());
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let e = reader::load(&s, which.clone(), &m, Some(key()), 2).unwrap_err();
    assert!(
        vmm::errors::error_chain(&e).contains("authentication failed"),
        "{}",
        vmm::errors::error_chain(&e)
    );
    // Missing.
    std::fs::remove_file(&path).unwrap();
    let e = reader::load(&s, which, &m, Some(key()), 2).unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");

    // gc: delete generation 1; its own chunk goes, the shared ones stay.
    let before = s.backend.list("chunks/").unwrap().len();
    s.delete(&"vm1@1".parse().unwrap()).unwrap();
    let report = s.gc().unwrap();
    // Generation 2 still references all but chunk 0 of generation 1 (already removed
    // above): nothing else of generation 1 was its own.
    assert_eq!(report.removed_chunks, 0, "{report:?}");
    assert_eq!(report.kept_chunks, before);
    let (which, m) = reader::open_manifest(&s, "vm1", Some(&key())).unwrap();
    let loaded = reader::load(&s, which, &m, Some(key()), 2).unwrap();
    assert_eq!(read_all(&loaded.memfds[0].1, size), read_all(&fd, size));
    s.delete(&"vm1@2".parse().unwrap()).unwrap();
    let report = s.gc().unwrap();
    assert_eq!(report.kept_chunks, 0, "{report:?}");
    assert!(s.backend.list("chunks/").unwrap().is_empty());
}

#[test]
fn gc_keeps_chunks_a_lease_holds() {
    let (_t, s) = store("lease");
    let codec = Codec::new(Compression::None, None);
    let id = codec.id(b"x");
    let mut obj = Vec::new();
    codec
        .encode(&id, b"x", &mut Default::default(), &mut obj)
        .unwrap();
    s.backend.put_if_absent(&id.key(), &obj).unwrap();
    let lease = super::lease::Lease::take(&s.root).unwrap();
    lease.hold(&[id], || ()).unwrap();
    assert_eq!(s.gc().unwrap().removed_chunks, 0);
    drop(lease);
    assert_eq!(s.gc().unwrap().removed_chunks, 1);
}

#[test]
fn deleted_generation_numbers_are_not_reused() {
    let size = 9 * MIB;
    let (_t, s) = store("tombstone");
    let codec = Codec::new(Compression::Lz4, None);
    let fd = guest(size);
    assert_eq!(snap(&s, &codec, "vm1", &fd, size).snapshot, "vm1@1");
    assert_eq!(snap(&s, &codec, "vm1", &fd, size).snapshot, "vm1@2");
    s.delete(&"vm1@2".parse().unwrap()).unwrap();
    assert!(s.delete(&"vm1@2".parse().unwrap()).is_err());
    assert_eq!(snap(&s, &codec, "vm1", &fd, size).snapshot, "vm1@3");
    assert_eq!(snap(&s, &codec, "other", &fd, size).snapshot, "other@1");
}

#[test]
fn concurrent_snapshots_get_distinct_generations() {
    let size = 9 * MIB;
    let (_t, s) = store("concurrent");
    let codec = Codec::new(Compression::Lz4, None);
    let fd = guest(size);
    let names: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..4)
            .map(|_| sc.spawn(|| snap(&s, &codec, "vm1", &fd, size).snapshot))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut names = names;
    names.sort();
    assert_eq!(names, ["vm1@1", "vm1@2", "vm1@3", "vm1@4"]);
}

/// A snapshot that fails half-way (here: the memfd is shorter than its mapping, as if
/// the source died) leaves no generation; gc then reclaims what it had written.
#[test]
fn failed_snapshot_leaves_no_generation() {
    let size = 9 * MIB;
    let (t, s) = store("failed");
    let codec = Codec::new(Compression::Zstd, None);
    // memfds are sealed against shrinking: a plain file stands in.
    let fd = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(t.0.join("short"))
        .unwrap();
    fd.write_all_at(&vec![7u8; 3 * MIB as usize], 0).unwrap();
    let cfg = config(size);
    let input = Input {
        name: "vm1",
        config: &cfg,
        state: b"{}",
        regions: vec![(
            GuestRamMapping {
                slot: 0,
                gpa: 0,
                size,
                file_offset: 0,
            },
            &fd,
        )],
        chunk_size: CHUNK,
        workers: 2,
    };
    let e = writer::write(&s, &codec, &input).unwrap_err();
    assert!(e.to_string().contains("reading guest memory"), "{e}");
    assert!(s.generations().unwrap().is_empty());
    assert!(s.list().unwrap().is_empty());
    assert!(!s.backend.list("chunks/").unwrap().is_empty());
    assert!(s.gc().unwrap().removed_chunks > 0);
    assert!(s.backend.list("chunks/").unwrap().is_empty());
}

/// Figures for docs/offload_daemon.md (run with `--release -- --ignored --nocapture`):
/// write speed and stored bytes per chunk size and codec on 256 MiB of incompressible
/// and of guest-like data, and what a second generation writes after 5% of the memory
/// changed in 64 KiB runs.
#[test]
#[ignore]
fn measure_chunk_sizes_and_codecs() {
    let size = 256 * MIB;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let words: Vec<&[u8]> = [
        "the ", "of ", "and ", "vm ", "page ", "struct ", "0x0000 ", "return ", "int ", "{\n",
        "}\n", "error ", "data ", "self ", "    ", "null ",
    ]
    .iter()
    .map(|w| w.as_bytes())
    .collect();
    let random = memfd(size);
    let mixed = memfd(size);
    let mut page = vec![0u8; 4096];
    for p in 0..size / 4096 {
        for w in page.chunks_mut(8) {
            w.copy_from_slice(&rnd().to_le_bytes());
        }
        random.write_all_at(&page, p * 4096).unwrap();
        match rnd() % 20 {
            // zero pages inside data chunks (25%)
            0..5 => page.fill(0),
            // text-like (35%)
            5..12 => {
                let mut at = 0;
                while at < 4096 {
                    let w = words[(rnd() % words.len() as u64) as usize];
                    let n = w.len().min(4096 - at);
                    page[at..at + n].copy_from_slice(&w[..n]);
                    at += n;
                }
            }
            // tables of small integers and pointers (20%)
            12..16 => {
                let base = rnd() & 0xffff_f000;
                for (i, w) in page.chunks_mut(8).enumerate() {
                    let v = if i % 2 == 0 {
                        base + i as u64 * 64
                    } else {
                        rnd() % 256
                    };
                    w.copy_from_slice(&v.to_le_bytes());
                }
            }
            // random (20%): keys, compressed or encrypted data
            _ => {}
        }
        mixed.write_all_at(&page, p * 4096).unwrap();
    }
    println!(
        "| data | chunk | codec | key | MiB/s | stored MiB | gen 2 written MiB (5% changed) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (label, fd) in [("random", &random), ("guest-like", &mixed)] {
        for chunk_mib in [1u64, 2, 4] {
            for (c, keyed) in [
                (Compression::None, false),
                (Compression::Lz4, false),
                (Compression::Zstd, false),
                (Compression::Zstd, true),
            ] {
                if chunk_mib != 2 && (c != Compression::Zstd || !keyed) && label == "random" {
                    continue;
                }
                let (_t, s) = store(&format!("measure-{label}-{chunk_mib}-{c:?}-{keyed}"));
                let codec = Codec::new(c, keyed.then(key));
                let cfg = config(size);
                let mapping = GuestRamMapping {
                    slot: 0,
                    gpa: 0,
                    size,
                    file_offset: 0,
                };
                let input = Input {
                    name: "m",
                    config: &cfg,
                    state: b"{}",
                    regions: vec![(mapping, fd)],
                    chunk_size: chunk_mib * MIB,
                    workers: 2,
                };
                let st = writer::write(&s, &codec, &input).unwrap();
                // Gen 2: 5% of the memory rewritten in 64 KiB runs at random places,
                // on a copy so every configuration sees the same change.
                let copy = memfd(size);
                let mut buf = vec![0u8; size as usize];
                fd.read_exact_at(&mut buf, 0).unwrap();
                let runs = size / 20 / (64 << 10);
                let mut z = 12345u64;
                for _ in 0..runs {
                    z = z
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let at = ((z >> 20) % (size / (64 << 10))) * (64 << 10);
                    buf[at as usize] ^= 0xff;
                    buf[at as usize + 40000] ^= 0xff;
                }
                copy.write_all_at(&buf, 0).unwrap();
                let input2 = Input {
                    regions: vec![(mapping, &copy)],
                    ..input
                };
                let st2 = writer::write(&s, &codec, &input2).unwrap();
                println!(
                    "| {label} | {chunk_mib} MiB | {c:?} | {} | {:.0} | {:.1} | {:.1} |",
                    if keyed { "yes" } else { "no" },
                    st.data_bytes as f64 / MIB as f64 / st.seconds,
                    st.written_bytes as f64 / MIB as f64,
                    st2.written_bytes as f64 / MIB as f64,
                );
                // Reading it back, for the restore figure.
                if chunk_mib == 2 {
                    let t = std::time::Instant::now();
                    let keys = keyed.then(key);
                    let (which, m) = reader::open_manifest(&s, "m@1", keys.as_ref()).unwrap();
                    reader::load(&s, which, &m, keys, 2).unwrap();
                    println!(
                        "|   read back | | | | {:.0} | | |",
                        size as f64 / MIB as f64 / t.elapsed().as_secs_f64()
                    );
                }
            }
        }
    }
}
