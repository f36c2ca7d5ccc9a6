//! On-demand guest memory through userfaultfd. `UffdMemorySource` says where page contents
//! come from (a snapshot file today; a migration peer later); `handler` owns the
//! userfaultfd, serves faults and prefetches everything else in the background.

pub mod file;
pub mod handler;
pub mod peer;
pub mod remote;

use std::io;

use crate::sparse::Extent;

pub use handler::{OnDemandMemory, Progress};
pub use peer::PeerFilledMemory;

/// Guest RAM being filled on demand: copied in from a `UffdMemorySource` (a snapshot
/// file, or a post-copy migration source), or written into shared memfds by a peer.
pub enum OnDemand {
    Copied(OnDemandMemory),
    Peer(PeerFilledMemory),
}

impl OnDemand {
    pub fn progress(&self) -> std::sync::Arc<Progress> {
        match self {
            OnDemand::Copied(m) => m.progress(),
            OnDemand::Peer(m) => m.progress(),
        }
    }

    pub fn is_complete(&self) -> bool {
        match self {
            OnDemand::Copied(m) => m.is_complete(),
            OnDemand::Peer(m) => m.is_complete(),
        }
    }
}

/// Where the contents of guest RAM come from during an on-demand restore. Mappings are
/// numbered as in `MemoryManager::mappings()`; offsets are relative to a mapping's start.
pub trait UffdMemorySource: Send + Sync {
    /// The parts of mapping `index` that hold data; every other page is zero.
    fn extents(&self, index: usize) -> &[Extent];
    /// Fills `buf` with mapping `index`'s bytes at `offset`; the range lies inside one
    /// extent. Used by the background prefetch.
    fn read(&self, index: usize, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// The same for a vCPU waiting on a fault: a source with a separate low-latency path
    /// (a post-copy fault connection) serves it there, never behind a bulk read.
    fn read_for_fault(&self, index: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read(index, offset, buf)
    }
    /// Bytes per background read.
    fn prefetch_chunk(&self) -> u64 {
        handler::PREFETCH_CHUNK
    }
    /// Every data page is in place and guest RAM is unregistered: a peer that wants to
    /// know is told here.
    fn finished(&self) -> io::Result<()> {
        Ok(())
    }
    /// The restore is being torn down: unblock any read waiting on a silent peer.
    fn stop(&self) {}
    /// Where the memory comes from, for logs ("from ...").
    fn origin(&self) -> &'static str {
        "from the snapshot"
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create a userfaultfd (is vm.unprivileged_userfaultfd set, or are we root?)")]
    Create(#[source] userfaultfd::Error),
    #[error("cannot register guest RAM at {host:#x} ({size} bytes) with userfaultfd")]
    Register {
        host: u64,
        size: u64,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
    #[error("cannot spawn the {0} thread")]
    Spawn(&'static str, #[source] io::Error),
    #[error("the memory source has {got} mappings, guest RAM has {want}")]
    MappingCount { got: usize, want: usize },
}
