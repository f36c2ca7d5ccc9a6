//! The connections of one pre-copy migration: one iteration's memory goes out on the
//! main connection or in chunks over the extra ones.

use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use vm_memory::GuestMemoryMmap;
use vm_migration::{MEMORY_CHUNK_SIZE, MemoryRangeTable, send_memory_table};

use super::steps::{answer_step, peer_error};
use super::{Error, Result, SendContext};
use crate::net::{Stream, is_timeout};
use crate::thread_priority::Boost;

/// Sends one Memory request (table, then the bytes) and waits for its Ok.
pub(super) fn send_memory(
    stream: &mut Stream,
    mem: &GuestMemoryMmap,
    table: &MemoryRangeTable,
    timeout: Duration,
) -> Result<()> {
    const WHAT: &str = "guest memory";
    if table.is_empty() {
        return Ok(());
    }
    send_memory_table(stream, table).map_err(|e| peer_error(timeout, WHAT, false, e))?;
    for r in table.iter() {
        stream
            .write_from_guest(mem, r.gpa, r.length as usize)
            .map_err(|source| {
                if is_timeout(&source) {
                    Error::Stalled {
                        what: WHAT,
                        answer: false,
                        timeout,
                    }
                } else {
                    Error::GuestMemory { gpa: r.gpa, source }
                }
            })?;
    }
    answer_step(stream, timeout, WHAT)
}

/// The connections of one migration: the main one, and the extra memory connections
/// an iteration spreads its chunks over.
pub(super) struct SendConnections<'a> {
    pub(super) main: Stream,
    pub(super) extra: Vec<Stream>,
    pub(super) ctx: &'a SendContext,
}

impl SendConnections<'_> {
    /// One iteration's memory: on the main connection, or cut into chunks spread over the
    /// extra connections, which all finish before this returns. Each connection takes the
    /// next chunk when it is done with its last, so a slower one does not hold up the end.
    pub(super) fn send_table(&mut self, table: &MemoryRangeTable) -> Result<()> {
        let mem = &self.ctx.memory;
        let timeout = self.ctx.params.io_timeout;
        if self.extra.is_empty() {
            send_memory(&mut self.main, mem, table, timeout)?;
        } else {
            let chunks = table.split_into_chunks(chunk_size(table.total_bytes(), self.extra.len()));
            let next = AtomicUsize::new(0);
            let failed = AtomicBool::new(false);
            let (chunks, next, failed) = (&chunks, &next, &failed);
            std::thread::scope(|s| {
                let workers: Vec<_> = self
                    .extra
                    .iter_mut()
                    .map(|stream| {
                        s.spawn(move || -> Result<()> {
                            let _boost = Boost::current_thread();
                            while !failed.load(Ordering::Relaxed) {
                                let Some(chunk) = chunks.get(next.fetch_add(1, Ordering::Relaxed))
                                else {
                                    break;
                                };
                                send_memory(stream, mem, chunk, timeout).inspect_err(|_| {
                                    failed.store(true, Ordering::Relaxed);
                                })?;
                            }
                            Ok(())
                        })
                    })
                    .collect();
                workers.into_iter().try_for_each(|w| {
                    w.join().unwrap_or_else(|_| {
                        Err(Error::MemoryConnection("a sender thread panicked".into()))
                    })
                })
            })?;
        }
        self.ctx
            .progress
            .bytes_sent
            .fetch_add(table.total_bytes(), Ordering::Relaxed);
        Ok(())
    }
}

/// Chunk size for an iteration of `bytes` over `connections`: about eight chunks per
/// connection, so the connections end close together, between 4 MiB (a request's round
/// trip stays small beside its data) and the protocol's 64 MiB.
pub(super) fn chunk_size(bytes: u64, connections: usize) -> NonZeroU64 {
    const MIN: u64 = 4 << 20;
    let per = bytes / (connections.max(1) as u64 * 8);
    let size = per
        .next_multiple_of(crate::sparse::PAGE_SIZE)
        .clamp(MIN, MEMORY_CHUNK_SIZE.get());
    NonZeroU64::new(size).unwrap_or(MEMORY_CHUNK_SIZE)
}

#[cfg(test)]
mod tests {
    use super::chunk_size;

    #[test]
    fn chunks_are_an_eighth_of_a_connections_share_within_bounds() {
        const MIB: u64 = 1 << 20;
        assert_eq!(chunk_size(1024 * MIB, 4).get(), 32 * MIB);
        assert_eq!(chunk_size(256 * MIB, 4).get(), 8 * MIB);
        assert_eq!(chunk_size(MIB, 4).get(), 4 * MIB);
        assert_eq!(chunk_size(0, 0).get(), 4 * MIB);
        assert_eq!(chunk_size(64 * 1024 * MIB, 2).get(), 64 * MIB);
        // Page multiples, so no page is cut between two connections.
        assert_eq!(chunk_size(1000 * MIB + 12345, 3).get() % 4096, 0);
    }
}
