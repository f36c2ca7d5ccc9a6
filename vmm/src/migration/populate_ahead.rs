//! Allocating a Memory request's destination pages on a second thread while the receiving
//! thread reads the data into them.
//!
//! A receiver writes into fresh memory, and on hosts that hand freed memory back to their
//! hypervisor, allocating a fresh page costs more than copying 4 KiB into it (see the
//! README). One thread doing both leaves the other core to the sender alone; with the
//! allocation on a thread of its own the two overlap.
//!
//! The request's data is cut into pieces. Whoever gets to a piece first allocates it: the
//! helper walks ahead from the front, the reader claims the piece it is about to read if the
//! helper has not, and the helper skips what the reader has passed. So each piece is
//! allocated once, in one call (MADV_POPULATE_WRITE), and the reader never waits on the
//! helper.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use vm_memory::GuestMemoryMmap;
use vm_migration::MemoryRangeTable;

use crate::memory_manager::populate_for_write;

/// Piece size: big enough that one call allocates many pages, small enough that the
/// helper gets ahead of the reader soon after a request starts.
const PIECE: u64 = 2 << 20;

/// The pieces of one Memory request's data, in the order the data arrives.
pub struct Pieces {
    pieces: Vec<(u64, u64)>,
    claimed: Vec<AtomicBool>,
    /// The piece the reader is in.
    reader_at: AtomicUsize,
}

impl Pieces {
    pub fn of(table: &MemoryRangeTable) -> Pieces {
        let pieces: Vec<(u64, u64)> = table
            .iter()
            .flat_map(|r| {
                let end = r.gpa + r.length;
                (r.gpa..end)
                    .step_by(PIECE as usize)
                    .map(move |gpa| (gpa, PIECE.min(end - gpa)))
            })
            .collect();
        Pieces {
            claimed: pieces.iter().map(|_| AtomicBool::new(false)).collect(),
            pieces,
            reader_at: AtomicUsize::new(0),
        }
    }

    /// `(gpa, len)` of each piece, in arrival order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
        self.pieces
            .iter()
            .enumerate()
            .map(|(i, &(gpa, len))| (i, gpa, len))
    }

    /// Called by the reader before it reads piece `i`: allocates it unless the helper
    /// has claimed it already.
    pub fn reader_enters(&self, mem: &GuestMemoryMmap, i: usize) {
        self.reader_at.store(i, Ordering::SeqCst);
        self.populate(mem, i);
    }

    /// The helper's walk: every piece the reader has not reached and nobody claimed,
    /// until `stop` is set or the pieces run out.
    pub fn populate_ahead(&self, mem: &GuestMemoryMmap, stop: &AtomicBool) {
        for i in 0..self.pieces.len() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if i > self.reader_at.load(Ordering::SeqCst) {
                self.populate(mem, i);
            }
        }
    }

    fn populate(&self, mem: &GuestMemoryMmap, i: usize) {
        if let Some((gpa, len)) = self.claim(i) {
            populate_for_write(mem, gpa, len as usize);
        }
    }

    /// Piece `i`, for the one caller that claims it first.
    fn claim(&self, i: usize) -> Option<(u64, u64)> {
        (!self.claimed[i].swap(true, Ordering::SeqCst)).then(|| self.pieces[i])
    }
}

#[cfg(test)]
mod tests {
    use super::{PIECE, Pieces};
    use std::sync::atomic::{AtomicBool, Ordering};
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vm_migration::{MemoryRange, MemoryRangeTable};

    fn table(pieces: u64) -> MemoryRangeTable {
        MemoryRangeTable::from_ranges([MemoryRange::new(0, pieces * PIECE)]).unwrap()
    }

    #[test]
    fn racing_claims_win_each_piece_once() {
        let pieces = Pieces::of(&table(64));
        let won = |p: &Pieces| (0..64).filter(|&i| p.claim(i).is_some()).count();
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| won(&pieces));
            let b = s.spawn(|| won(&pieces));
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_eq!(a + b, 64);
    }

    #[test]
    fn the_helper_leaves_what_the_reader_has_reached() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), (8 * PIECE) as usize)]).unwrap();
        let pieces = Pieces::of(&table(8));
        pieces.reader_enters(&mem, 3);
        pieces.populate_ahead(&mem, &AtomicBool::new(false));
        let claimed: Vec<bool> = pieces
            .claimed
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .collect();
        // The reader took piece 3; the helper took every later one and none before.
        assert_eq!(claimed, [false, false, false, true, true, true, true, true]);
        let stopped = Pieces::of(&table(8));
        stopped.populate_ahead(&mem, &AtomicBool::new(true));
        assert!(stopped.iter().all(|(i, _, _)| stopped.claim(i).is_some()));
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
}
