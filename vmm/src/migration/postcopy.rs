//! Post-copy pieces both ends share: the `postcopy` component the source adds to the
//! state it sends, and the source's PageFault server.
//!
//! The component carries what the wire protocol has no message for: which guest-physical
//! ranges hold data (the destination never asks for the rest, which stays unallocated),
//! and that this source wants a Complete on the fault connection once every page is in.
//! Without that confirmation a destination that finished and one that died look the same
//! to the source (EOF), and only the first may let the source discard its copy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;
use vm_migration::page_fault::read_fault_request;
use vm_migration::{FaultRequest, MAX_PAGE_FAULT_LENGTH, ResponseHeader, Status};

use crate::net::{Stream, is_timeout};

/// Key of the component in the state tree.
pub const STATE_ID: &str = "postcopy";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostcopyState {
    /// `[gpa, length]` of every range that holds data on the source.
    pub data_ranges: Vec<[u64; 2]>,
    /// The source waits for Complete on the fault connection before it lets go.
    pub confirm_complete: bool,
}

impl PostcopyState {
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.data_ranges.iter().map(|r| (r[0], r[1])).collect()
    }
}

/// Answers up to this size are copied out and sent with their header in one write.
const SMALL_ANSWER: u64 = 64 << 10;

/// How a fault connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The destination confirmed that every page is in place.
    Confirmed,
    /// The destination closed the connection without a word.
    Closed,
    /// The destination gave up (Abandon).
    Abandoned,
}

/// Source-side counters of the pull.
#[derive(Debug, Default)]
pub struct ServeStats {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
}

/// When the fault connections of one migration last carried a request. A healthy
/// destination pulls without pause until it confirms; any one connection may sit idle
/// meanwhile (the first waits for vCPU faults), so only all of them idle for `limit`
/// means it stalled.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    limit: Duration,
}

impl Activity {
    pub fn new(limit: Duration) -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            limit,
        }
    }

    fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(now, Ordering::Relaxed);
    }

    fn idle_too_long(&self) -> bool {
        let now = self.start.elapsed().as_millis() as u64;
        let idle = now.saturating_sub(self.last_ms.load(Ordering::Relaxed));
        idle >= self.limit.as_millis() as u64
    }
}

/// Counts the bytes read through it: a read timeout before the first byte of a request
/// leaves the connection usable, one in the middle of it does not.
struct Counting<'a> {
    inner: &'a mut Stream,
    read: u64,
}

impl std::io::Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "the destination made no PageFault request on any fault connection for {0:?} \
         (io_timeout_s) and never confirmed that every page arrived"
    )]
    Stalled(Duration),
    #[error("the fault connection")]
    Protocol(#[source] vm_migration::Error),
    #[error("writing a PageFault answer")]
    Write(#[source] std::io::Error),
    #[error("sending {len} bytes of guest memory at {gpa:#x}")]
    GuestMemory {
        gpa: u64,
        len: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Answers PageFault requests on one fault connection from the (paused) guest memory,
/// bytes inline, until the destination confirms, abandons or closes it, or stalls (no
/// request on any connection of `activity` for its limit; the stream's read timeout
/// sets how often that is looked at). A request for memory the VM does not have gets an
/// Error response and serving goes on: the destination decides what that means for it.
pub fn serve(
    stream: &mut Stream,
    mem: &GuestMemoryMmap,
    stats: &ServeStats,
    activity: &Activity,
) -> Result<Ended, ServeError> {
    use std::io::Write;
    use vm_memory::{Bytes, GuestMemoryBackend};
    let mut small = Vec::with_capacity(SMALL_ANSWER as usize + 16);
    loop {
        let mut counting = Counting {
            inner: stream,
            read: 0,
        };
        let request = match read_fault_request(&mut counting, MAX_PAGE_FAULT_LENGTH) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(Ended::Closed),
            Err(e) if e.is_closed_between_messages() => return Ok(Ended::Closed),
            Err(e) if is_timeout(&e) && counting.read == 0 => {
                if activity.idle_too_long() {
                    return Err(ServeError::Stalled(activity.limit));
                }
                continue;
            }
            Err(e) => return Err(ServeError::Protocol(e)),
        };
        activity.touch();
        let range = match request {
            FaultRequest::PageFault(range) => range,
            FaultRequest::Complete | FaultRequest::Abandon => {
                vm_migration::send_response(stream, Status::Ok, &[])
                    .map_err(ServeError::Protocol)?;
                return Ok(if request == FaultRequest::Complete {
                    Ended::Confirmed
                } else {
                    Ended::Abandoned
                });
            }
        };
        let inside = usize::try_from(range.length)
            .is_ok_and(|len| mem.check_range(vm_memory::GuestAddress(range.gpa), len));
        if !inside {
            log::warn!(
                "post-copy: the destination asked for {} bytes at {:#x}, outside guest RAM",
                range.length,
                range.gpa
            );
            vm_migration::send_response(stream, Status::Error, &[])
                .map_err(ServeError::Protocol)?;
            continue;
        }
        let header = ResponseHeader {
            status: Status::Ok,
            length: range.length,
        }
        .to_bytes();
        let memory_error = |source| ServeError::GuestMemory {
            gpa: range.gpa,
            len: range.length,
            source,
        };
        if range.length <= SMALL_ANSWER {
            // One write, so header and page leave in one segment: a vCPU waits on it.
            small.clear();
            small.extend_from_slice(&header);
            small.resize(header.len() + range.length as usize, 0);
            mem.read_slice(
                &mut small[header.len()..],
                vm_memory::GuestAddress(range.gpa),
            )
            .map_err(memory_error)?;
            stream.write_all(&small).map_err(ServeError::Write)?;
        } else {
            stream.write_all(&header).map_err(ServeError::Write)?;
            stream
                .write_from_guest(mem, range.gpa, range.length as usize)
                .map_err(memory_error)?;
        }
        stats.requests.fetch_add(1, Ordering::Relaxed);
        stats.bytes.fetch_add(range.length, Ordering::Relaxed);
    }
}
