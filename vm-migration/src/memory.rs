//! Guest memory ranges and the range table of a `Memory` request (spec §2.4).
//!
//! A table is N consecutive 16-byte [`MemoryRange`]s. Its length comes from the peer, so
//! decoding checks the shape and a cap before allocating anything.

use std::io::{Read, Write};
use std::num::NonZeroU64;

use crate::error::{Error, Result};
use crate::framing::read_payload;

/// Size of one encoded [`MemoryRange`].
pub const MEMORY_RANGE_SIZE: usize = 16;

/// Default cap on the byte length of a received range table: 64 MiB, i.e. 4 Mi ranges,
/// enough for the dirty log of a very fragmented 32 GiB guest sent unchunked.
pub const DEFAULT_MAX_RANGE_TABLE_BYTES: u64 = 64 << 20;

/// The most page data one chunk carries when a sender spreads an iteration over
/// PrecopyMemory connections (spec §3.2, §10).
pub const MEMORY_CHUNK_SIZE: NonZeroU64 = match NonZeroU64::new(64 << 20) {
    Some(v) => v,
    None => unreachable!(),
};

/// A guest-physical range: `gpa` u64 LE, then `length` u64 LE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MemoryRange {
    /// Guest-physical start address.
    pub gpa: u64,
    /// Length in bytes.
    pub length: u64,
}

impl MemoryRange {
    /// The range `[gpa, gpa + length)`.
    pub fn new(gpa: u64, length: u64) -> Self {
        MemoryRange { gpa, length }
    }

    /// One past the last byte, or `None` if that does not fit in a u64.
    pub fn checked_end(&self) -> Option<u64> {
        self.gpa.checked_add(self.length)
    }

    /// Returns an error if the range runs past the end of the 64-bit address space.
    pub fn validate(&self) -> Result<()> {
        match self.checked_end() {
            Some(_) => Ok(()),
            None => Err(Error::RangeOverflow {
                gpa: self.gpa,
                length: self.length,
            }),
        }
    }

    /// Encodes the range.
    pub fn to_bytes(&self) -> [u8; MEMORY_RANGE_SIZE] {
        let mut b = [0u8; MEMORY_RANGE_SIZE];
        b[0..8].copy_from_slice(&self.gpa.to_le_bytes());
        b[8..16].copy_from_slice(&self.length.to_le_bytes());
        b
    }

    /// Decodes a range; fails if it overflows the address space.
    pub fn from_bytes(b: &[u8; MEMORY_RANGE_SIZE]) -> Result<Self> {
        let (gpa, length) = b.split_at(8);
        let range = MemoryRange {
            gpa: u64::from_le_bytes(to_8(gpa)),
            length: u64::from_le_bytes(to_8(length)),
        };
        range.validate()?;
        Ok(range)
    }
}

fn to_8(s: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    a
}

/// An ordered list of ranges. Ranges may overlap or repeat (the receiver applies them in
/// order, later writes win); every range is valid and their lengths sum to at most
/// `u64::MAX`, so [`MemoryRangeTable::total_bytes`] cannot overflow.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemoryRangeTable {
    ranges: Vec<MemoryRange>,
    total: u64,
}

impl MemoryRangeTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a table, validating every range and the total.
    pub fn from_ranges(ranges: impl IntoIterator<Item = MemoryRange>) -> Result<Self> {
        let mut table = Self::new();
        for r in ranges {
            table.push(r)?;
        }
        Ok(table)
    }

    /// Appends a range.
    pub fn push(&mut self, range: MemoryRange) -> Result<()> {
        range.validate()?;
        self.total = self
            .total
            .checked_add(range.length)
            .ok_or(Error::RangeTableTotalOverflow)?;
        self.ranges.push(range);
        Ok(())
    }

    /// The ranges, in order.
    pub fn ranges(&self) -> &[MemoryRange] {
        &self.ranges
    }

    /// Iterates over the ranges in order.
    pub fn iter(&self) -> std::slice::Iter<'_, MemoryRange> {
        self.ranges.iter()
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// True if there is no range.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Sum of the range lengths: the page data that follows the table of a `Memory`
    /// request.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Length of the encoded table, i.e. the header `length` of a `Memory` request.
    pub fn encoded_len(&self) -> u64 {
        // A Vec never holds more than isize::MAX bytes, so 16 * len fits in a u64.
        (self.ranges.len() as u64).saturating_mul(MEMORY_RANGE_SIZE as u64)
    }

    /// Encodes the table.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.ranges.iter().flat_map(|r| r.to_bytes()).collect()
    }

    /// Writes the encoded table (not the header, not the page data).
    pub fn write_to<W: Write>(&self, w: &mut W) -> Result<()> {
        w.write_all(&self.to_bytes())
            .map_err(Error::io("writing a range table"))
    }

    /// Decodes a table. `max_table_bytes` bounds `bytes.len()`
    /// ([`DEFAULT_MAX_RANGE_TABLE_BYTES`] is a sane value).
    pub fn from_bytes(bytes: &[u8], max_table_bytes: u64) -> Result<Self> {
        let len = bytes.len() as u64;
        check_table_len(len, max_table_bytes)?;
        let mut table = MemoryRangeTable {
            ranges: Vec::with_capacity(bytes.len() / MEMORY_RANGE_SIZE),
            total: 0,
        };
        for chunk in bytes.chunks_exact(MEMORY_RANGE_SIZE) {
            let mut entry = [0u8; MEMORY_RANGE_SIZE];
            entry.copy_from_slice(chunk);
            table.push(MemoryRange::from_bytes(&entry)?)?;
        }
        Ok(table)
    }

    /// Reads a table of `table_len` bytes (the `Memory` header's `length`). The length is
    /// checked against the 16-byte granularity and `max_table_bytes` before any allocation.
    pub fn read_from<R: Read>(r: &mut R, table_len: u64, max_table_bytes: u64) -> Result<Self> {
        check_table_len(table_len, max_table_bytes)?;
        let bytes = read_payload(r, table_len, max_table_bytes)?;
        Self::from_bytes(&bytes, max_table_bytes)
    }

    /// Splits the table into tables of at most `max_chunk_bytes` of page data each, in
    /// order, cutting ranges where needed; zero-length ranges are dropped. Used to spread
    /// an iteration over PrecopyMemory connections ([`MEMORY_CHUNK_SIZE`]).
    pub fn split_into_chunks(&self, max_chunk_bytes: NonZeroU64) -> Vec<MemoryRangeTable> {
        let max = max_chunk_bytes.get();
        let mut chunks = Vec::new();
        let mut current = MemoryRangeTable::new();
        for range in &self.ranges {
            let (mut gpa, mut left) = (range.gpa, range.length);
            while left > 0 {
                let room = max - current.total;
                let take = left.min(room);
                // Sub-ranges of a valid range are valid and the chunk total stays <= max,
                // so these pushes cannot fail; the fields are set directly.
                current.ranges.push(MemoryRange::new(gpa, take));
                current.total += take;
                gpa += take;
                left -= take;
                if current.total == max {
                    chunks.push(std::mem::take(&mut current));
                }
            }
        }
        if !current.is_empty() {
            chunks.push(current);
        }
        chunks
    }
}

fn check_table_len(len: u64, max_table_bytes: u64) -> Result<()> {
    if !len.is_multiple_of(MEMORY_RANGE_SIZE as u64) {
        return Err(Error::RangeTableLength(len));
    }
    if len > max_table_bytes {
        return Err(Error::TooLarge {
            what: "range table",
            length: len,
            limit: max_table_bytes,
        });
    }
    Ok(())
}

impl<'a> IntoIterator for &'a MemoryRangeTable {
    type Item = &'a MemoryRange;
    type IntoIter = std::slice::Iter<'a, MemoryRange>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn two_ranges() -> MemoryRangeTable {
        MemoryRangeTable::from_ranges([
            MemoryRange::new(0x1000, 0x2000),
            MemoryRange::new(0x9000, 0x1000),
        ])
        .unwrap()
    }

    #[test]
    fn spec_two_range_table_bytes() {
        let t = two_ranges();
        let want: Vec<u8> = [
            [0x00, 0x10, 0, 0, 0, 0, 0, 0],
            [0x00, 0x20, 0, 0, 0, 0, 0, 0],
            [0x00, 0x90, 0, 0, 0, 0, 0, 0],
            [0x00, 0x10, 0, 0, 0, 0, 0, 0],
        ]
        .concat();
        assert_eq!(t.to_bytes(), want);
        assert_eq!(t.encoded_len(), 0x20);
        assert_eq!(t.total_bytes(), 0x3000);
        assert_eq!(
            MemoryRangeTable::from_bytes(&want, DEFAULT_MAX_RANGE_TABLE_BYTES).unwrap(),
            t
        );
    }

    #[test]
    fn spec_page_fault_body() {
        let r = MemoryRange::new(0x4000, 0x1000);
        assert_eq!(
            r.to_bytes(),
            [0, 0x40, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(MemoryRange::from_bytes(&r.to_bytes()).unwrap(), r);
    }

    #[test]
    fn table_length_must_be_a_multiple_of_16() {
        for len in [1usize, 15, 17, 31, 33] {
            let bytes = vec![0u8; len];
            assert!(matches!(
                MemoryRangeTable::from_bytes(&bytes, DEFAULT_MAX_RANGE_TABLE_BYTES),
                Err(Error::RangeTableLength(l)) if l == len as u64
            ));
            assert!(matches!(
                MemoryRangeTable::read_from(
                    &mut Cursor::new(bytes),
                    len as u64,
                    DEFAULT_MAX_RANGE_TABLE_BYTES
                ),
                Err(Error::RangeTableLength(_))
            ));
        }
    }

    #[test]
    fn absurd_table_length_is_rejected_before_reading() {
        // The reader is empty: an attempt to read or allocate would show up as a different
        // error (or an abort), not TooLarge.
        let mut r = Cursor::new(Vec::new());
        let e = MemoryRangeTable::read_from(&mut r, u64::MAX - 15, DEFAULT_MAX_RANGE_TABLE_BYTES)
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::TooLarge {
                    what: "range table",
                    ..
                }
            ),
            "{e}"
        );
        let e = MemoryRangeTable::read_from(&mut r, 32, 16).unwrap_err();
        assert!(matches!(
            e,
            Error::TooLarge {
                length: 32,
                limit: 16,
                ..
            }
        ));
    }

    #[test]
    fn truncated_table_is_an_error() {
        let bytes = two_ranges().to_bytes();
        for cut in 0..bytes.len() {
            let mut r = Cursor::new(bytes[..cut].to_vec());
            let e =
                MemoryRangeTable::read_from(&mut r, 32, DEFAULT_MAX_RANGE_TABLE_BYTES).unwrap_err();
            assert!(
                matches!(e, Error::Truncated { .. } | Error::ConnectionClosed { .. }),
                "{e}"
            );
        }
    }

    #[test]
    fn overflowing_ranges_are_rejected() {
        let bad = MemoryRange::new(u64::MAX - 0xfff, 0x1000);
        assert!(matches!(
            MemoryRange::from_bytes(&bad.to_bytes()),
            Err(Error::RangeOverflow { .. })
        ));
        let mut bytes = two_ranges().to_bytes();
        bytes.extend_from_slice(&bad.to_bytes());
        assert!(matches!(
            MemoryRangeTable::from_bytes(&bytes, DEFAULT_MAX_RANGE_TABLE_BYTES),
            Err(Error::RangeOverflow { .. })
        ));
        // Each range fine, but the data would exceed u64::MAX bytes.
        let half = MemoryRange::new(0, 1 << 63);
        let bytes = [half.to_bytes(), half.to_bytes()].concat();
        assert!(matches!(
            MemoryRangeTable::from_bytes(&bytes, DEFAULT_MAX_RANGE_TABLE_BYTES),
            Err(Error::RangeTableTotalOverflow)
        ));
    }

    #[test]
    fn round_trip_through_reader_and_writer() {
        let t = two_ranges();
        let mut wire = Vec::new();
        t.write_to(&mut wire).unwrap();
        let got = MemoryRangeTable::read_from(
            &mut Cursor::new(wire),
            t.encoded_len(),
            DEFAULT_MAX_RANGE_TABLE_BYTES,
        )
        .unwrap();
        assert_eq!(got, t);
        assert_eq!(got.iter().count(), 2);
        assert_eq!((&got).into_iter().map(|r| r.length).sum::<u64>(), 0x3000);
        let empty = MemoryRangeTable::from_bytes(&[], 0).unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.total_bytes(), 0);
    }

    fn nz(v: u64) -> NonZeroU64 {
        NonZeroU64::new(v).unwrap()
    }

    #[test]
    fn chunks_cover_the_table_in_order() {
        let t = MemoryRangeTable::from_ranges([
            MemoryRange::new(0, 100 * MIB),
            MemoryRange::new(0x1_0000_0000, 0),
            MemoryRange::new(0x2_0000_0000, 10 * MIB),
            MemoryRange::new(0x3_0000_0000, 60 * MIB),
        ])
        .unwrap();
        let chunks = t.split_into_chunks(MEMORY_CHUNK_SIZE);
        assert!(chunks.iter().all(|c| c.total_bytes() <= 64 * MIB));
        let sizes: Vec<u64> = chunks.iter().map(|c| c.total_bytes() / MIB).collect();
        assert_eq!(sizes, [64, 64, 42]);
        // Concatenating the chunks gives back the non-empty bytes in order.
        let flat: Vec<MemoryRange> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(
            flat,
            [
                MemoryRange::new(0, 64 * MIB),
                MemoryRange::new(64 * MIB, 36 * MIB),
                MemoryRange::new(0x2_0000_0000, 10 * MIB),
                MemoryRange::new(0x3_0000_0000, 18 * MIB),
                MemoryRange::new(0x3_0000_0000 + 18 * MIB, 42 * MIB),
            ]
        );
    }

    #[test]
    fn chunk_edge_cases() {
        assert!(MemoryRangeTable::new().split_into_chunks(nz(1)).is_empty());
        let t = MemoryRangeTable::from_ranges([MemoryRange::new(10, 3)]).unwrap();
        let chunks = t.split_into_chunks(nz(1));
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[2].ranges(), [MemoryRange::new(12, 1)]);
        let huge = MemoryRangeTable::from_ranges([MemoryRange::new(0, u64::MAX)]).unwrap();
        let chunks = huge.split_into_chunks(nz(u64::MAX));
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].total_bytes(), u64::MAX);
    }
}
