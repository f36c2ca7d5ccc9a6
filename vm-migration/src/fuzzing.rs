//! Decoder harness shared by the cargo-fuzz target (`fuzz/`) and this crate's own
//! pseudo-random test. Not a stable API: enabled by the `fuzzing` feature.
//!
//! [`decode_everything`] must never panic for any input except where one of its own
//! `assert!`s finds a broken round-trip property, which is a bug worth a crash.

use std::io::Cursor;
use std::num::NonZeroU64;

use crate::framing::{expect_ok, read_response};
use crate::memory::{MEMORY_RANGE_SIZE, MemoryRange, MemoryRangeTable};
use crate::page_fault::{
    PageDelivery, decode_page_fault, read_fault_request, read_page_fault_response,
};
use crate::protocol::{HEADER_SIZE, RequestHeader, ResponseHeader};
use crate::request::{Limits, read_request};
use crate::role::{ConnectionRole, read_role};

/// Small caps so a fuzzer cannot make the harness allocate much.
const LIMITS: Limits = Limits {
    max_json_payload: 1 << 16,
    max_range_table: 1 << 16,
    max_page_fault: 1 << 16,
};

fn first<const N: usize>(data: &[u8]) -> Option<[u8; N]> {
    data.get(..N).and_then(|s| s.try_into().ok())
}

/// Feeds `data` to every decoder of the crate and checks round-trip properties.
pub fn decode_everything(data: &[u8]) {
    if let Some(b) = first::<HEADER_SIZE>(data) {
        if let Ok(h) = RequestHeader::from_bytes(&b) {
            assert_eq!(RequestHeader::from_bytes(&h.to_bytes()).ok(), Some(h));
            // Only the ignored bytes may differ.
            assert_eq!(h.to_bytes()[..2], b[..2]);
            assert_eq!(h.to_bytes()[8..], b[8..]);
            if let Some(body) = data
                .get(HEADER_SIZE..HEADER_SIZE + MEMORY_RANGE_SIZE)
                .and_then(|s| <[u8; MEMORY_RANGE_SIZE]>::try_from(s).ok())
                && let Ok(r) = decode_page_fault(&h, &body, LIMITS.max_page_fault)
            {
                assert_eq!(r.to_bytes(), body);
            }
        }
        if let Ok(h) = ResponseHeader::from_bytes(&b) {
            assert_eq!(ResponseHeader::from_bytes(&h.to_bytes()).ok(), Some(h));
        }
    }
    if let Some(b) = first::<2>(data)
        && let Ok(role) = ConnectionRole::from_bytes(b)
    {
        assert_eq!(role.to_bytes(), b);
    }
    if let Some(b) = first::<MEMORY_RANGE_SIZE>(data)
        && let Ok(r) = MemoryRange::from_bytes(&b)
    {
        assert!(r.checked_end().is_some());
    }

    if let Ok(table) = MemoryRangeTable::from_bytes(data, LIMITS.max_range_table) {
        assert_eq!(table.to_bytes(), data);
        // Bound the chunk count (≈ 64 + ranges) so a huge range cannot make this slow.
        let chunk = NonZeroU64::new(table.total_bytes() / 64 + 1).unwrap_or(NonZeroU64::MIN);
        let chunks = table.split_into_chunks(chunk);
        let sum: u64 = chunks.iter().map(MemoryRangeTable::total_bytes).sum();
        assert_eq!(sum, table.total_bytes());
        assert!(chunks.iter().all(|c| c.total_bytes() <= chunk.get()));
    }

    // Stream decoders, each from the start of the input.
    let _ = read_request(&mut Cursor::new(data), &LIMITS);
    let _ = read_fault_request(&mut Cursor::new(data), LIMITS.max_page_fault);
    let _ = read_response(&mut Cursor::new(data));
    let _ = expect_ok(&mut Cursor::new(data));
    let _ = read_role(&mut Cursor::new(data));
    let mut page = [0u8; 4096];
    let _ = read_page_fault_response(&mut Cursor::new(data), PageDelivery::Inline, &mut page);
    let _ = read_page_fault_response(&mut Cursor::new(data), PageDelivery::SharedMemfd, &mut page);

    // A stream of requests, as a receiver loop would read them, until the first error.
    let mut r = Cursor::new(data);
    while read_request(&mut r, &LIMITS).is_ok() {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Command;

    /// xorshift64*: enough randomness to hit every decoder branch, no dependency.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn decoders_never_panic_on_random_input() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for i in 0..5000 {
            let len = (rng.next() % 96) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Half the time start with a plausible header so deeper paths are reached.
            if i % 2 == 0 && data.len() >= HEADER_SIZE {
                let cmd = (rng.next() % 11) as u16;
                data[0..2].copy_from_slice(&cmd.to_le_bytes());
                let small = rng.next() % 64;
                data[8..16].copy_from_slice(&small.to_le_bytes());
            }
            decode_everything(&data);
        }
    }

    #[test]
    fn decoders_accept_valid_streams() {
        let mut wire = RequestHeader::start().to_bytes().to_vec();
        wire.extend_from_slice(&RequestHeader::memory(32).to_bytes());
        wire.extend_from_slice(&MemoryRange::new(0x1000, 0x2000).to_bytes());
        wire.extend_from_slice(&MemoryRange::new(0x9000, 0x1000).to_bytes());
        wire.extend_from_slice(&RequestHeader::new(Command::Complete, 0).to_bytes());
        decode_everything(&wire);
        decode_everything(&[]);
    }
}
