//! Allocating a Memory request's destination pages on a second thread while the receiving
//! thread reads the data into them.
//!
//! A receiver writes into fresh memory, and on hosts that hand freed memory back to their
//! hypervisor, allocating a fresh page costs more than copying 4 KiB into it (see the
//! README). One thread doing both leaves the other core to the sender alone; with the
//! allocation on a thread of its own the two overlap.
//!
//! The request's data is cut into pieces, in arrival order. Whoever gets to a piece first
//! allocates it: the helper takes the next unclaimed piece, and the reader, as it comes to
//! a piece, claims it and everything before it, so the helper skips what the reader has
//! reached. Each piece is allocated once, in one call (MADV_POPULATE_WRITE), and the
//! reader never waits for the helper. Pieces are worked out as they are needed, and the
//! helper stays at most [`MAX_AHEAD`] pieces ahead of the reader, so a table that claims
//! absurd amounts of data costs nothing until the data comes.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::Thread;
use std::time::Duration;

use vm_memory::GuestMemoryMmap;
use vm_migration::MemoryRangeTable;

use crate::memory_manager::populate_for_write;

/// Piece size: big enough that one call allocates many pages, small enough that the
/// helper gets ahead of the reader soon after a request starts.
const PIECE: u64 = 2 << 20;
/// How many pieces (32 MiB) the helper may allocate beyond the reader: enough to stay
/// ahead of it, while a sender that announces gigabytes and sends nothing makes the
/// receiver allocate no more than this.
pub const MAX_AHEAD: u64 = 16;

/// The pieces of one Memory request's data, in the order the data arrives.
pub struct Pieces<'a> {
    table: &'a MemoryRangeTable,
    /// Every piece before this one has been claimed (or passed by the reader).
    next_unclaimed: AtomicU64,
    /// The piece the reader is in.
    reader_at: AtomicU64,
    /// The helper, parked while it is [`MAX_AHEAD`] pieces ahead.
    helper: OnceLock<Thread>,
}

impl<'a> Pieces<'a> {
    pub fn of(table: &'a MemoryRangeTable) -> Pieces<'a> {
        Pieces {
            table,
            next_unclaimed: AtomicU64::new(0),
            reader_at: AtomicU64::new(0),
            helper: OnceLock::new(),
        }
    }

    /// Whether the request is big enough for a helper to get ahead of the reader. Small
    /// ones (the last pass, with the VM paused) are not worth starting a thread for.
    pub fn worth_a_helper(&self) -> bool {
        self.table.total_bytes() > 4 * PIECE
    }

    /// `(index, gpa, len)` of each piece, in arrival order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, u64)> + 'a {
        self.table
            .iter()
            .flat_map(|r| {
                let end = r.gpa + r.length;
                (r.gpa..end)
                    .step_by(PIECE as usize)
                    .map(move |gpa| (gpa, PIECE.min(end - gpa)))
            })
            .zip(0u64..)
            .map(|((gpa, len), i)| (i, gpa, len))
    }

    /// Called by the reader before it reads piece `i` at `gpa`: allocates it unless the
    /// helper has claimed it already.
    pub fn reader_enters(&self, mem: &GuestMemoryMmap, i: u64, gpa: u64, len: u64) {
        self.reader_at.store(i, Ordering::Release);
        if let Some(helper) = self.helper.get() {
            helper.unpark();
        }
        if self.reader_claims(i) {
            populate_for_write(mem, gpa, len as usize);
        }
    }

    /// Tells the helper to stop, and wakes it if it waits for the reader.
    pub fn stop_helper(&self, stop: &AtomicBool) {
        stop.store(true, Ordering::Release);
        if let Some(helper) = self.helper.get() {
            helper.unpark();
        }
    }

    /// The helper's walk: the next unclaimed piece, until `stop` is set or the pieces run
    /// out.
    pub fn populate_ahead(&self, mem: &GuestMemoryMmap, stop: &AtomicBool) {
        let _ = self.helper.set(std::thread::current());
        let mut pieces = self.iter();
        let mut at = 0u64; // the index `pieces` yields next
        while !stop.load(Ordering::Acquire) {
            if self.next_unclaimed.load(Ordering::SeqCst)
                >= self.reader_at.load(Ordering::Acquire) + MAX_AHEAD
            {
                // The reader unparks us as it moves on (and at the stop); the timeout
                // only covers a wake-up that came before we parked.
                std::thread::park_timeout(Duration::from_millis(20));
                continue;
            }
            let i = self.helper_claims();
            let Some((_, gpa, len)) = pieces.nth((i - at) as usize) else {
                return;
            };
            at = i + 1;
            populate_for_write(mem, gpa, len as usize);
        }
    }

    /// The reader comes to piece `i` (in order): true if it is the one to allocate it.
    fn reader_claims(&self, i: u64) -> bool {
        self.next_unclaimed.fetch_max(i + 1, Ordering::SeqCst) <= i
    }

    /// The index of the piece the helper allocates next.
    fn helper_claims(&self) -> u64 {
        self.next_unclaimed.fetch_add(1, Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::{PIECE, Pieces};
    use std::sync::atomic::AtomicBool;
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vm_migration::{MemoryRange, MemoryRangeTable};

    fn table(pieces: u64) -> MemoryRangeTable {
        MemoryRangeTable::from_ranges([MemoryRange::new(0, pieces * PIECE)]).unwrap()
    }

    #[test]
    fn only_requests_of_several_pieces_get_a_helper() {
        assert!(!Pieces::of(&table(4)).worth_a_helper());
        assert!(Pieces::of(&table(5)).worth_a_helper());
    }

    #[test]
    fn pieces_follow_the_table_and_cut_long_ranges() {
        let table = MemoryRangeTable::from_ranges([
            MemoryRange::new(0x10_0000, 0x1000),
            MemoryRange::new(0x4000_0000, 2 * PIECE + 0x3000),
        ])
        .unwrap();
        let pieces: Vec<_> = Pieces::of(&table).iter().collect();
        assert_eq!(
            pieces,
            vec![
                (0, 0x10_0000, 0x1000),
                (1, 0x4000_0000, PIECE),
                (2, 0x4000_0000 + PIECE, PIECE),
                (3, 0x4000_0000 + 2 * PIECE, 0x3000),
            ]
        );
    }

    #[test]
    fn reader_and_helper_each_claim_a_piece_exactly_once() {
        const N: u64 = 10_000;
        let t = table(1);
        let pieces = Pieces::of(&t);
        let (read, helped) = std::thread::scope(|s| {
            let reader = s.spawn(|| (0..N).filter(|&i| pieces.reader_claims(i)).collect());
            let helper = s.spawn(|| {
                let mut got = Vec::new();
                loop {
                    let i = pieces.helper_claims();
                    if i >= N {
                        return got;
                    }
                    got.push(i);
                }
            });
            let read: Vec<u64> = reader.join().unwrap();
            (read, helper.join().unwrap())
        });
        let mut all: Vec<u64> = read.iter().chain(&helped).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..N).collect::<Vec<_>>());
    }

    #[test]
    fn the_helper_skips_what_the_reader_has_reached_and_stops_when_told() {
        let t = table(8);
        let pieces = Pieces::of(&t);
        assert!(pieces.reader_claims(3));
        assert_eq!(pieces.helper_claims(), 4);
        assert!(!pieces.reader_claims(4));
        assert!(pieces.reader_claims(5));
        assert_eq!(pieces.helper_claims(), 6);

        // On real memory: the helper walks to the end and leaves nothing unclaimed...
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), (8 * PIECE) as usize)]).unwrap();
        let walked = Pieces::of(&t);
        walked.populate_ahead(&mem, &AtomicBool::new(false));
        assert!(!walked.reader_claims(7));
        // ...and does nothing once stopped.
        let stopped = Pieces::of(&t);
        stopped.populate_ahead(&mem, &AtomicBool::new(true));
        assert!(stopped.reader_claims(0));
    }

    /// With no reader progress, the helper allocates MAX_AHEAD pieces and then waits;
    /// it goes on as the reader moves, and stops when told.
    #[test]
    fn the_helper_stays_within_reach_of_the_reader() {
        use super::MAX_AHEAD;
        let t = table(MAX_AHEAD * 4);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(
            GuestAddress(0),
            (MAX_AHEAD * 4 * PIECE) as usize,
        )])
        .unwrap();
        let pieces = Pieces::of(&t);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| pieces.populate_ahead(&mem, &stop));
            let claimed = || {
                pieces
                    .next_unclaimed
                    .load(std::sync::atomic::Ordering::SeqCst)
            };
            let settle = |want: u64| {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while claimed() < want && std::time::Instant::now() < deadline {
                    std::thread::yield_now();
                }
            };
            settle(MAX_AHEAD);
            assert_eq!(claimed(), MAX_AHEAD);
            pieces.reader_enters(&mem, 10, 10 * PIECE, PIECE);
            settle(10 + MAX_AHEAD);
            assert_eq!(claimed(), 10 + MAX_AHEAD);
            pieces.stop_helper(&stop);
        });
    }

    #[test]
    fn an_absurd_table_costs_nothing_up_front() {
        let huge =
            MemoryRangeTable::from_ranges((0..1000).map(|_| MemoryRange::new(0, u64::MAX / 2000)))
                .unwrap();
        let pieces = Pieces::of(&huge);
        assert_eq!(pieces.iter().nth(5).map(|p| p.0), Some(5));
    }
}
