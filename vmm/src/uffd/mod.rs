//! On-demand guest memory through userfaultfd. `UffdMemorySource` says where page contents
//! come from (`file`: a snapshot's memory file; `remote`: a post-copy migration source,
//! pulled over the socket); `handler` owns the userfaultfd, serves faults and prefetches
//! everything else in the background. `peer` is the other way round: a peer (the offload
//! daemon, a post-copy sender's memfds) writes the pages itself and this VMM only waits.

mod fd;
pub mod file;
pub mod handler;
pub mod metrics;
pub mod peer;
pub mod remote;

use std::io;

use crate::sparse::Extent;

pub use handler::OnDemandMemory;
pub use metrics::FillProgress;
pub use peer::PeerFilledMemory;

/// Guest RAM being filled on demand: copied in from a `UffdMemorySource` (a snapshot
/// file, or a post-copy migration source), or written into shared memfds by a peer.
pub enum OnDemand {
    Copied(OnDemandMemory),
    Peer(PeerFilledMemory),
}

impl OnDemand {
    pub fn progress(&self) -> std::sync::Arc<FillProgress> {
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
/// No method has a default body: each backend says what it does for each (a default
/// would be one backend's behaviour the others inherit without noticing).
pub trait UffdMemorySource: Send + Sync {
    /// The parts of mapping `index` that hold data; every other page is zero.
    fn extents(&self, index: usize) -> &[Extent];
    /// Fills `buf` with mapping `index`'s bytes at `offset`; the range lies inside one
    /// extent. Used by the background prefetch.
    fn read(&self, index: usize, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// The same for a vCPU waiting on a fault: a source with a separate low-latency path
    /// (a post-copy fault connection) serves it there, never behind a bulk read.
    fn read_for_fault(&self, index: usize, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Bytes per background read.
    fn prefetch_chunk(&self) -> u64;
    /// Every data page is in place and guest RAM is unregistered: a peer that wants to
    /// know is told here.
    fn finished(&self) -> io::Result<()>;
    /// The restore is being torn down: unblock any read waiting on a silent peer.
    fn stop(&self);
    /// Where the memory comes from, for logs ("from ...").
    fn origin(&self) -> &'static str;
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
