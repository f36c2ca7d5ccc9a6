//! Checksums of guest memory data, in pieces cut on a fixed grid, so that any part of a
//! snapshot can be checked on its own before it is used: a restore that reads everything
//! checks every piece before the VM runs, an on-demand restore checks each piece before
//! the first of its pages reaches the guest. Snapshot directories of `vm.snapshot` and
//! of the offload daemon both use it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

use crate::sparse::{BulkFile, Extent};

/// A piece never crosses a multiple of this: small enough that checking the piece of a
/// faulting page costs little, large enough that the sums stay small (4 KiB per 64 MiB
/// of data).
pub const GRID: u64 = 256 << 10;

/// One piece of data and the CRC32 of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PieceSum {
    pub offset: u64,
    pub len: u64,
    pub crc32: u32,
}

impl PieceSum {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }

    pub fn extent(&self) -> Extent {
        Extent {
            offset: self.offset,
            len: self.len,
        }
    }
}

/// `extents` cut on [`GRID`].
pub fn pieces(extents: &[Extent]) -> Vec<Extent> {
    crate::sparse::cut(extents, GRID)
}

/// The sums of the pieces of `data`, which sits at `offset` inside one extent.
pub fn sum_pieces(offset: u64, data: &[u8]) -> Vec<PieceSum> {
    pieces(&[Extent {
        offset,
        len: data.len() as u64,
    }])
    .into_iter()
    .map(|p| {
        let lo = (p.offset - offset) as usize;
        PieceSum {
            offset: p.offset,
            len: p.len,
            crc32: crc32fast::hash(&data[lo..lo + p.len as usize]),
        }
    })
    .collect()
}

/// The sums of chunks of data summed on several threads, in any order.
#[derive(Default)]
pub struct PieceSums(std::sync::Mutex<Vec<PieceSum>>);

impl PieceSums {
    /// Adds the sums of the pieces of `data`, which sits at `offset` inside one extent.
    pub fn add(&self, offset: u64, data: &[u8]) {
        let got = sum_pieces(offset, data);
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend(got);
    }

    /// Every sum added, in offset order.
    pub fn into_sorted(self) -> Vec<PieceSum> {
        let mut sums = self.0.into_inner().unwrap_or_else(|e| e.into_inner());
        sums.sort_unstable_by_key(|p| p.offset);
        sums
    }
}

/// Writes the data of `candidates` of `region` to `file` (see `sparse::write_data`) and
/// returns the extents written with the sums of their pieces, in order.
pub fn write_summed(
    region: &[u8],
    candidates: &[Extent],
    file: &File,
    threads: usize,
) -> io::Result<(Vec<Extent>, Vec<PieceSum>)> {
    let sums = PieceSums::default();
    let extents = crate::sparse::write_data(region, candidates, file, threads, |offset, run| {
        sums.add(offset, run)
    })?;
    Ok((extents, sums.into_sorted()))
}

/// Reads `extents` of `file` into `region` (same offsets, see `sparse::read_extents`) and
/// returns the sums of their pieces, in order, each computed right after its bytes landed
/// while other reads are in flight.
pub fn read_summed(
    file: &BulkFile,
    region: &mut [u8],
    extents: &[Extent],
) -> io::Result<Vec<PieceSum>> {
    let sums = PieceSums::default();
    crate::sparse::read_extents(
        file,
        region,
        extents,
        crate::sparse::READ_THREADS,
        |offset, chunk| sums.add(offset, chunk),
    )?;
    Ok(sums.into_sorted())
}

/// Where the sums of data as read differ from a manifest's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    pub offset: u64,
    pub len: u64,
    pub got: u32,
    pub want: u32,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checksum mismatch at bytes {}..{}: crc32 {:08x}, manifest {:08x}",
            self.offset,
            self.offset + self.len,
            self.got,
            self.want
        )
    }
}

/// The first piece whose sum differs between `got` and `want` (or where the lists
/// differ in shape; a missing sum counts as 0).
pub fn first_mismatch(got: &[PieceSum], want: &[PieceSum]) -> Option<Mismatch> {
    let at = |p: &PieceSum, got, want| Mismatch {
        offset: p.offset,
        len: p.len,
        got,
        want,
    };
    for (g, w) in got.iter().zip(want) {
        if g != w {
            return Some(at(w, g.crc32, w.crc32));
        }
    }
    match got.len().cmp(&want.len()) {
        std::cmp::Ordering::Equal => None,
        std::cmp::Ordering::Less => want.get(got.len()).map(|w| at(w, 0, w.crc32)),
        std::cmp::Ordering::Greater => got.get(want.len()).map(|g| at(g, g.crc32, 0)),
    }
}

/// Bytes per piece in the binary form of a piece list: offset (u64), length (u32) and
/// CRC32 (u32), little-endian.
pub const RECORD_LEN: usize = 16;

/// The binary form of a piece list, as snapshot directories store it: at 6 GiB of data
/// 400 KB that decode in a fraction of a millisecond, where the same list as JSON objects
/// (1.3 MB) took several milliseconds to parse on the way to resuming a restored VM.
pub fn encode(pieces: &[PieceSum]) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(pieces.len() * RECORD_LEN);
    for p in pieces {
        let len = u32::try_from(p.len).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "memory piece at {} of {} bytes is too long",
                    p.offset, p.len
                ),
            )
        })?;
        out.extend_from_slice(&p.offset.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&p.crc32.to_le_bytes());
    }
    Ok(out)
}

/// The largest encoded list a mapping of `size` bytes can have (one piece per page), so
/// a reader can refuse an absurd file before reading it.
pub fn encoded_limit(size: u64) -> u64 {
    (size / crate::sparse::PAGE_SIZE + 1).saturating_mul(RECORD_LEN as u64)
}

/// Reads back what [`encode`] wrote; `None` if `bytes` is not a whole number of records.
/// The layout still needs [`check_layout`].
pub fn decode(bytes: &[u8]) -> Option<Vec<PieceSum>> {
    if !bytes.len().is_multiple_of(RECORD_LEN) {
        return None;
    }
    bytes
        .chunks_exact(RECORD_LEN)
        .map(|r| {
            let (offset, r) = r.split_first_chunk::<8>()?;
            let (len, r) = r.split_first_chunk::<4>()?;
            let (crc32, _) = r.split_first_chunk::<4>()?;
            Some(PieceSum {
                offset: u64::from_le_bytes(*offset),
                len: u32::from_le_bytes(*len).into(),
                crc32: u32::from_le_bytes(*crc32),
            })
        })
        .collect()
}

/// Checks that a manifest's pieces are sane for a region of `size` bytes: non-empty, in
/// order, not overlapping, each inside one grid cell and inside the region.
pub fn check_layout(pieces: &[PieceSum], size: u64) -> Result<(), PieceSum> {
    let mut prev_end = 0;
    for p in pieces {
        if !piece_fits(p, prev_end, size) {
            return Err(*p);
        }
        prev_end = p.offset + p.len;
    }
    Ok(())
}

/// Whether `p` may follow a piece ending at `prev_end` in a region of `size` bytes.
fn piece_fits(p: &PieceSum, prev_end: u64, size: u64) -> bool {
    p.len > 0
        && p.offset >= prev_end
        && p.offset.checked_add(p.len).is_some_and(|end| end <= size)
        && p.offset / GRID == (p.offset + p.len - 1) / GRID
}

/// Why a `.sums` file was refused by [`read_sums`].
#[derive(Debug, thiserror::Error)]
pub enum SumsError {
    #[error("does not match the manifest: {got} bytes, expected {want}")]
    Size { got: u64, want: u64 },
    #[error(
        "is {len} bytes, more than the {limit} a {size}-byte memory file can need \
         (one record per page)"
    )]
    TooLarge { len: u64, limit: u64, size: u64 },
    #[error("{0} bytes is not a whole number of {RECORD_LEN}-byte records (truncated?)")]
    Records(u64),
    #[error("does not match the manifest: CRC32 {got:08x}, expected {want:08x}")]
    Crc { got: u32, want: u32 },
    #[error(
        "memory piece {}+{} is empty, out of order, crosses the {} KiB checksum grid or \
         lies outside the {size}-byte memory file",
        .piece.offset, .piece.len, GRID >> 10
    )]
    Layout { piece: PieceSum, size: u64 },
    #[error("cannot read it")]
    Io(#[from] io::Error),
}

/// Bytes of a `.sums` file read at a time: what [`read_sums`] holds beside the pieces.
const SUMS_READ_CHUNK: usize = 4096 * RECORD_LEN;

/// Reads, checks and decodes a `.sums` file whose manifest entry says `want_len` bytes
/// with CRC32 `want_crc`, for a memory file of `size` bytes.
///
/// The file comes from disk and is not trusted: its length is checked against the
/// manifest and against what `size` can need before anything is read, and it is read in
/// small chunks, each record checked ([`check_layout`]) as it is decoded. So memory grows
/// only with records that make sense; a large file of zeros or garbage costs one chunk,
/// not the file's size plus its decoded list. A file that fails both checks is reported
/// by its CRC32 (damage is reported as damage).
pub fn read_sums(
    file: &File,
    want_len: u64,
    want_crc: u32,
    size: u64,
) -> Result<Vec<PieceSum>, SumsError> {
    let len = file.metadata()?.len();
    if len != want_len {
        return Err(SumsError::Size {
            got: len,
            want: want_len,
        });
    }
    let limit = encoded_limit(size);
    if len > limit {
        return Err(SumsError::TooLarge { len, limit, size });
    }
    if !len.is_multiple_of(RECORD_LEN as u64) {
        return Err(SumsError::Records(len));
    }
    let mut hasher = crc32fast::Hasher::new();
    let mut pieces = Vec::new();
    let mut bad = None;
    let mut prev_end = 0;
    let mut buf = vec![0u8; SUMS_READ_CHUNK];
    let mut pos = 0u64;
    while pos < len {
        // Bounded by SUMS_READ_CHUNK, so the cast cannot truncate.
        let n = (len - pos).min(SUMS_READ_CHUNK as u64) as usize;
        let chunk = &mut buf[..n];
        file.read_exact_at(chunk, pos)?;
        hasher.update(chunk);
        if bad.is_none() {
            for r in chunk.chunks_exact(RECORD_LEN) {
                let p = decode_record(r);
                if !piece_fits(&p, prev_end, size) {
                    bad = Some(p);
                    // Only the CRC32 is still needed.
                    pieces = Vec::new();
                    break;
                }
                prev_end = p.end();
                pieces.push(p);
            }
        }
        pos += n as u64;
    }
    let got = hasher.finalize();
    if got != want_crc {
        return Err(SumsError::Crc {
            got,
            want: want_crc,
        });
    }
    match bad {
        Some(piece) => Err(SumsError::Layout { piece, size }),
        None => Ok(pieces),
    }
}

/// One record of the binary form (exactly [`RECORD_LEN`] bytes).
fn decode_record(r: &[u8]) -> PieceSum {
    let word = |at: usize, n: usize| {
        let mut raw = [0u8; 8];
        raw[..n].copy_from_slice(&r[at..at + n]);
        u64::from_le_bytes(raw)
    };
    PieceSum {
        offset: word(0, 8),
        len: word(8, 4),
        // Four bytes: fits.
        crc32: word(12, 4) as u32,
    }
}

/// Adjacent pieces joined back into extents: what a bulk copy reads.
pub fn joined(pieces: &[PieceSum]) -> Vec<Extent> {
    crate::sparse::merged(pieces.iter().map(PieceSum::extent).collect())
}

/// Reads piece `p` of `file` into `buf` and checks it against its sum.
pub fn read_checked(file: &File, p: &PieceSum, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.resize(p.len as usize, 0);
    file.read_exact_at(buf, p.offset)?;
    check(p, buf)
}

/// Checks `data`, the bytes of piece `p`, against its sum.
pub fn verify(p: &PieceSum, data: &[u8]) -> Result<(), Mismatch> {
    let got = crc32fast::hash(data);
    if got != p.crc32 {
        return Err(Mismatch {
            offset: p.offset,
            len: p.len,
            got,
            want: p.crc32,
        });
    }
    Ok(())
}

/// [`verify`], for callers that report through `io::Error`.
pub fn check(p: &PieceSum, data: &[u8]) -> io::Result<()> {
    verify(p, data).map_err(|m| io::Error::new(io::ErrorKind::InvalidData, m.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_stay_in_one_grid_cell() {
        let e = [Extent {
            offset: GRID - 4096,
            len: 2 * GRID + 8192,
        }];
        let p = pieces(&e);
        assert_eq!(
            p.iter().map(|x| (x.offset, x.len)).collect::<Vec<_>>(),
            vec![
                (GRID - 4096, 4096),
                (GRID, GRID),
                (2 * GRID, GRID),
                (3 * GRID, 4096)
            ]
        );
    }

    /// Written and read back across several I/O chunks: the sums are those of the grid
    /// pieces of the data actually written (zero pages dropped), both ways, and a flipped
    /// byte shows up in exactly its piece.
    #[test]
    fn written_and_read_sums_match_piece_sums_and_spot_a_flip() {
        const MIB: u64 = 1 << 20;
        let mut region: Vec<u8> = (0..20 * MIB).map(|i| (i * 7 % 251) as u8 | 1).collect();
        // A zero page inside a candidate extent is dropped from what is written.
        region[(9 * MIB) as usize..(9 * MIB + 4096) as usize].fill(0);
        let candidates = [
            Extent {
                offset: 4096,
                len: GRID,
            },
            Extent {
                offset: 2 * MIB,
                len: 15 * MIB + 4096,
            },
        ];
        let data = [
            candidates[0],
            Extent {
                offset: 2 * MIB,
                len: 7 * MIB,
            },
            Extent {
                offset: 9 * MIB + 4096,
                len: 8 * MIB,
            },
        ];
        let by_piece: Vec<PieceSum> = data
            .iter()
            .flat_map(|e| sum_pieces(e.offset, &region[e.offset as usize..e.end() as usize]))
            .collect();
        let dir = std::env::temp_dir().join(format!("memsum-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |region: &[u8], name: &str| {
            let file = File::create_new(dir.join(name)).unwrap();
            write_summed(region, &candidates, &file, 3).unwrap()
        };
        let (extents, sums) = write(&region, "a");
        assert_eq!(extents, data.to_vec());
        assert_eq!(sums, by_piece);
        assert!(check_layout(&sums, region.len() as u64).is_ok());
        assert_eq!(joined(&sums), extents);

        let file = BulkFile::new(File::open(dir.join("a")).unwrap());
        let mut back = vec![0u8; region.len()];
        assert_eq!(read_summed(&file, &mut back, &extents).unwrap(), sums);

        region[(2 * MIB + 5) as usize] ^= 2;
        let (_, again) = write(&region, "b");
        let bad = first_mismatch(&again, &sums).unwrap();
        assert_eq!((bad.offset, bad.len), (2 * MIB, GRID));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn binary_sums_round_trip() {
        let list = [
            PieceSum {
                offset: 0,
                len: 4096,
                crc32: 0xdead_beef,
            },
            PieceSum {
                offset: (5 << 30) + GRID,
                len: GRID,
                crc32: 7,
            },
        ];
        let bytes = encode(&list).unwrap();
        assert_eq!(bytes.len(), 2 * RECORD_LEN);
        assert_eq!(
            &bytes[..16],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0xef, 0xbe, 0xad, 0xde]
        );
        assert_eq!(decode(&bytes).unwrap(), list);
        assert_eq!(decode(&[]).unwrap(), vec![]);
        assert!(decode(&bytes[..17]).is_none());
        let too_long = PieceSum {
            offset: 0,
            len: 1 << 32,
            crc32: 0,
        };
        assert!(encode(&[too_long]).is_err());
        // A mapping of two pages holds at most two pieces.
        assert_eq!(encoded_limit(8192), 3 * RECORD_LEN as u64);
    }

    #[test]
    fn sums_files_are_checked_before_and_while_reading() {
        let dir = std::env::temp_dir().join(format!("memsum-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let list: Vec<PieceSum> = (0..3 * 4096u64)
            .map(|i| PieceSum {
                offset: i * 2 * 4096,
                len: 4096,
                crc32: i as u32,
            })
            .collect();
        let size = 3 * 4096 * 2 * 4096;
        let bytes = encode(&list).unwrap();
        let crc = crc32fast::hash(&bytes);
        std::fs::write(&path, &bytes).unwrap();
        let f = File::open(&path).unwrap();
        let n = bytes.len() as u64;
        assert_eq!(read_sums(&f, n, crc, size).unwrap(), list);
        assert!(matches!(
            read_sums(&f, n + 16, crc, size),
            Err(SumsError::Size { .. })
        ));
        assert!(matches!(
            read_sums(&f, n, crc ^ 1, size),
            Err(SumsError::Crc { .. })
        ));
        assert!(matches!(
            read_sums(&f, n, crc, 4096),
            Err(SumsError::TooLarge { .. })
        ));
        // Zeros with a matching digest: refused on the first record.
        let zeros = vec![0u8; bytes.len()];
        std::fs::write(&path, &zeros).unwrap();
        let f = File::open(&path).unwrap();
        let e = read_sums(&f, n, crc32fast::hash(&zeros), size).unwrap_err();
        assert!(e.to_string().contains("memory piece 0+0"), "{e}");
        std::fs::write(&path, &bytes[..20]).unwrap();
        let f = File::open(&path).unwrap();
        assert!(matches!(
            read_sums(&f, 20, 0, size),
            Err(SumsError::Records(20))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_layouts_are_caught() {
        let p = |offset, len| PieceSum {
            offset,
            len,
            crc32: 0,
        };
        assert!(check_layout(&[p(0, 0)], GRID).is_err());
        assert!(check_layout(&[p(GRID - 4096, 8192)], 4 * GRID).is_err());
        assert!(check_layout(&[p(8192, 4096), p(0, 4096)], GRID).is_err());
        assert!(check_layout(&[p(GRID, 4096)], GRID).is_err());
        assert!(check_layout(&[p(u64::MAX - 10, 20)], u64::MAX).is_err());
        assert!(check_layout(&[p(0, 4096), p(4096, 4096)], GRID).is_ok());
    }
}
