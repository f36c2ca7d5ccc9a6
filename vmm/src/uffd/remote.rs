//! `UffdMemorySource` for post-copy migration: page contents are pulled from the source
//! VMM with PageFault requests it answers inline (the destination has no memfds of the
//! source's, so the bytes travel on the socket and go in with UFFDIO_COPY).
//!
//! Two fault connections when the source opens two: the first carries only vCPU faults,
//! the second the background pull in large chunks, so a fault never queues behind a bulk
//! transfer. A source that opens one (the protocol's minimum) gets both on it, with the
//! bulk chunks cut small enough that a fault waits at most one of them.
//!
//! Every pull waits at most [`RemotePeer::timeout`] for the source: a source that goes
//! silent ends the restore with an error naming the page, instead of vCPUs frozen on
//! it for good.

use std::io;
use std::sync::Mutex;
use std::time::Duration;

use vm_migration::page_fault::{read_page_fault_response, send_fault_complete, send_page_fault};
use vm_migration::{MemoryRange, PageDelivery};

use super::UffdMemorySource;
use crate::net::MigrationUrl;
use crate::net::{Stream, is_timeout};
use crate::snapshot_format::GuestRamMapping;
use crate::sparse::Extent;

/// Background chunk with a connection of its own: large enough that the per-request
/// round trip is noise next to the transfer.
const BULK_CHUNK: u64 = 1 << 20;
/// Background chunk sharing the fault connection: about 100 µs of loopback transfer, the
/// most a fault may wait behind it.
const SHARED_CHUNK: u64 = 128 << 10;

/// Who serves the pages, for errors, and how long one answer may take.
#[derive(Clone, Debug)]
pub struct RemotePeer {
    pub url: MigrationUrl,
    pub timeout: Duration,
}

pub struct RemoteSource {
    peer: RemotePeer,
    /// "at ADDR (connected on URL)": who the source is, as far as we know.
    peer_name: String,
    regions: Vec<GuestRamMapping>,
    extents: Vec<Vec<Extent>>,
    fault: Mutex<Stream>,
    bulk: Option<Mutex<Stream>>,
    /// Handles to shut the connections down from outside a blocked read.
    handles: Vec<Stream>,
    /// The source asked to be told when every page is in (our own VMM does).
    confirm: bool,
}

impl RemoteSource {
    /// `data`: the guest-physical ranges that hold data on the source (everything else
    /// is zero and never asked for); `None` means every page of RAM.
    pub fn new(
        regions: Vec<GuestRamMapping>,
        data: Option<&[(u64, u64)]>,
        mut connections: Vec<Stream>,
        confirm: bool,
        peer: RemotePeer,
    ) -> io::Result<Self> {
        if connections.is_empty() {
            return Err(io::Error::other("no fault connection"));
        }
        for c in &connections {
            c.set_io_timeout(Some(peer.timeout))?;
        }
        let extents = regions
            .iter()
            .map(|r| match data {
                Some(ranges) => extents_in(r, ranges),
                None => vec![Extent {
                    offset: 0,
                    len: r.size,
                }],
            })
            .collect();
        let handles = connections
            .iter()
            .map(Stream::try_clone)
            .collect::<io::Result<Vec<_>>>()?;
        // More than two: the extra ones are a peer's business; they close when dropped.
        connections.truncate(2);
        let bulk = (connections.len() == 2).then(|| connections.remove(1));
        let fault = connections.remove(0);
        let peer_name = match connections.first().and_then(Stream::peer_name) {
            Some(addr) => format!("at {addr} (connected on {})", peer.url),
            None => format!("connected on {}", peer.url),
        };
        Ok(RemoteSource {
            peer,
            peer_name,
            regions,
            extents,
            fault: Mutex::new(fault),
            bulk: bulk.map(Mutex::new),
            handles,
            confirm,
        })
    }

    fn pull(
        &self,
        stream: &Mutex<Stream>,
        index: usize,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let region = self.regions.get(index).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("no mapping {index}"))
        })?;
        let range = MemoryRange::new(region.gpa + offset, buf.len() as u64);
        let mut s = stream.lock().unwrap_or_else(|e| e.into_inner());
        send_page_fault(&mut *s, range)
            .and_then(|()| read_page_fault_response(&mut *s, PageDelivery::Inline, buf))
            .map_err(|e| {
                if is_timeout(&e) {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the migration source {} did not answer within {:?} \
                             (page_timeout_s) for {} bytes at gpa {:#x}",
                            self.peer_name, self.peer.timeout, range.length, range.gpa
                        ),
                    )
                } else {
                    io::Error::other(PullFailed {
                        length: range.length,
                        gpa: range.gpa,
                        peer: self.peer_name.clone(),
                        source: e,
                    })
                }
            })
    }
}

/// A pull that failed for another reason than the source's silence; the cause stays
/// its source, for whoever prints the chain.
#[derive(Debug, thiserror::Error)]
#[error("pulling {length} bytes at gpa {gpa:#x} from the migration source {peer}")]
struct PullFailed {
    length: u64,
    gpa: u64,
    peer: String,
    #[source]
    source: vm_migration::Error,
}

/// The parts of `ranges` (guest-physical, sorted or not) inside `region`, as sorted,
/// merged extents relative to the region's start.
fn extents_in(region: &GuestRamMapping, ranges: &[(u64, u64)]) -> Vec<Extent> {
    let end = region.gpa + region.size;
    crate::sparse::merged(
        ranges
            .iter()
            .filter_map(|&(gpa, len)| {
                let s = gpa.max(region.gpa);
                let e = gpa.saturating_add(len).min(end);
                (s < e).then(|| Extent {
                    offset: s - region.gpa,
                    len: e - s,
                })
            })
            .collect(),
    )
}

impl UffdMemorySource for RemoteSource {
    fn extents(&self, index: usize) -> &[Extent] {
        self.extents.get(index).map_or(&[], Vec::as_slice)
    }

    fn read(&self, index: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.pull(
            self.bulk.as_ref().unwrap_or(&self.fault),
            index,
            offset,
            buf,
        )
    }

    fn read_for_fault(&self, index: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.pull(&self.fault, index, offset, buf)
    }

    fn prefetch_chunk(&self) -> u64 {
        if self.bulk.is_some() {
            BULK_CHUNK
        } else {
            SHARED_CHUNK
        }
    }

    fn finished(&self) -> io::Result<()> {
        let result = if self.confirm {
            let mut s = self.fault.lock().unwrap_or_else(|e| e.into_inner());
            send_fault_complete(&mut *s).map_err(io::Error::other)
        } else {
            Ok(())
        };
        // Closing is how a source that did not ask for Complete learns we are done.
        self.stop();
        result
    }

    fn stop(&self) {
        for h in &self.handles {
            h.shutdown();
        }
    }

    fn origin(&self) -> &'static str {
        "from the migration source"
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::migration::postcopy::{self, Ended, ServeStats};

    const GPA: u64 = 0x10_0000;
    const SIZE: u64 = 1 << 20;

    /// Source RAM with a recognizable byte per offset.
    fn source_memory() -> GuestMemoryMmap {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(GPA), SIZE as usize)]).unwrap();
        let pattern: Vec<u8> = (0..SIZE).map(|i| (i * 13 % 251) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(GPA)).unwrap();
        mem
    }

    fn peer(timeout: Duration) -> RemotePeer {
        RemotePeer {
            url: MigrationUrl::Unix("/test/source.sock".into()),
            timeout,
        }
    }

    fn expected(offset: u64, len: usize) -> Vec<u8> {
        (offset..offset + len as u64)
            .map(|i| (i * 13 % 251) as u8)
            .collect()
    }

    /// The real source server on one end of each socket pair, this source on the other:
    /// pages come back right over one connection (a peer that opens one) or two, and the
    /// confirmation ends the source's serving.
    #[test]
    fn pulls_over_one_or_two_connections_and_confirms() {
        for connections in [1usize, 2] {
            let mem = source_memory();
            let stats = ServeStats::default();
            let activity = postcopy::Activity::new(Duration::from_secs(60));
            let (ours, theirs): (Vec<Stream>, Vec<Stream>) = (0..connections)
                .map(|_| {
                    let (a, b) = UnixStream::pair().unwrap();
                    (Stream::Unix(a), Stream::Unix(b))
                })
                .unzip();
            let ends = std::thread::scope(|s| {
                let servers: Vec<_> = theirs
                    .into_iter()
                    .map(|mut stream| {
                        let (mem, stats, activity) = (&mem, &stats, &activity);
                        s.spawn(move || postcopy::serve(&mut stream, mem, stats, activity).unwrap())
                    })
                    .collect();
                let source = RemoteSource::new(
                    vec![GuestRamMapping {
                        slot: 0,
                        gpa: GPA,
                        size: SIZE,
                        file_offset: 0,
                    }],
                    Some(&[(GPA + 0x2000, 0x3000)]),
                    ours,
                    true,
                    peer(Duration::from_secs(60)),
                )
                .unwrap();
                assert_eq!(
                    source.extents(0),
                    &[Extent {
                        offset: 0x2000,
                        len: 0x3000
                    }]
                );
                let want_chunk = if connections == 2 {
                    BULK_CHUNK
                } else {
                    SHARED_CHUNK
                };
                assert_eq!(source.prefetch_chunk(), want_chunk);
                let mut bulk = vec![0u8; 0x3000];
                source.read(0, 0x2000, &mut bulk).unwrap();
                assert_eq!(bulk, expected(0x2000, 0x3000));
                let mut page = vec![0u8; 4096];
                source.read_for_fault(0, 0x3000, &mut page).unwrap();
                assert_eq!(page, expected(0x3000, 4096));
                source.finished().unwrap();
                servers
                    .into_iter()
                    .map(|t| t.join().unwrap())
                    .collect::<Vec<_>>()
            });
            // The first connection carried the confirmation; a second one just closed.
            assert_eq!(ends[0], Ended::Confirmed, "{connections} connections");
            if connections == 2 {
                assert_eq!(ends[1], Ended::Closed);
            }
            assert_eq!(
                stats.bytes.load(std::sync::atomic::Ordering::Relaxed),
                0x3000 + 4096
            );
        }
    }

    /// A source that answers for memory outside its RAM gets an error answer, which the
    /// pull reports instead of handing out wrong bytes.
    #[test]
    fn a_refused_pull_is_an_error() {
        let mem = source_memory();
        let stats = ServeStats::default();
        let activity = postcopy::Activity::new(Duration::from_secs(60));
        let (a, b) = UnixStream::pair().unwrap();
        std::thread::scope(|s| {
            let server = s.spawn(|| postcopy::serve(&mut Stream::Unix(b), &mem, &stats, &activity));
            let source = RemoteSource::new(
                vec![GuestRamMapping {
                    slot: 0,
                    gpa: GPA + SIZE,
                    size: SIZE,
                    file_offset: 0,
                }],
                None,
                vec![Stream::Unix(a)],
                false,
                peer(Duration::from_secs(60)),
            )
            .unwrap();
            let mut page = vec![0u8; 4096];
            let e = source.read_for_fault(0, 0, &mut page).unwrap_err();
            assert!(e.to_string().contains("migration source"), "{e}");
            source.stop();
            assert_eq!(server.join().unwrap().unwrap(), Ended::Closed);
        });
    }

    /// A source that reads the request and never answers: the pull fails after the
    /// timeout, naming the page, the source and the option.
    #[test]
    fn a_silent_source_times_out() {
        let (a, _silent) = UnixStream::pair().unwrap();
        let source = RemoteSource::new(
            vec![GuestRamMapping {
                slot: 0,
                gpa: GPA,
                size: SIZE,
                file_offset: 0,
            }],
            None,
            vec![Stream::Unix(a)],
            false,
            peer(Duration::from_millis(200)),
        )
        .unwrap();
        let mut page = vec![0u8; 4096];
        let started = std::time::Instant::now();
        let e = source.read_for_fault(0, 0x5000, &mut page).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "{e}");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        let text = e.to_string();
        for part in [
            "unix:/test/source.sock",
            "0x105000",
            "page_timeout_s",
            "200ms",
        ] {
            assert!(text.contains(part), "{part} missing: {text}");
        }
    }

    #[test]
    fn extents_are_clipped_sorted_and_merged() {
        let r = GuestRamMapping {
            slot: 0,
            gpa: 0x10_0000,
            size: 0x10_0000,
            file_offset: 0,
        };
        let ranges = [
            (0x1c_0000, 0x10000),
            (0x0, 0x10_1000),
            (0x10_8000, 0x1000),
            (0x10_9000, 0x1000),
            (0x1f_f000, 0x8000),
            (0x30_0000, 0x1000),
        ];
        let e = extents_in(&r, &ranges);
        assert_eq!(
            e,
            vec![
                Extent {
                    offset: 0,
                    len: 0x1000
                },
                Extent {
                    offset: 0x8000,
                    len: 0x2000
                },
                Extent {
                    offset: 0xc_0000,
                    len: 0x10000
                },
                Extent {
                    offset: 0xf_f000,
                    len: 0x1000
                },
            ]
        );
    }
}
