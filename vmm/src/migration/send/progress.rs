//! What a running send shows in vm.info: live figures, updated by the worker as it goes.

use std::sync::atomic::{AtomicBool, AtomicU64};

use crate::migration::postcopy::ServeStats;

/// Live figures for vm.info.
#[derive(Debug, Default)]
pub struct SendProgress {
    /// 0 setup, 1 memory iterations, 2 paused (final iteration + state), 3 done, 4 failed.
    pub phase: AtomicU64,
    pub iteration: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Bytes the guest dirtied during the last iteration.
    pub last_dirty_bytes: AtomicU64,
    pub dirty_rate_bytes_per_s: AtomicU64,
    pub estimated_downtime_ms: AtomicU64,
    /// Time the VM was paused for the final iteration, state and Complete (the
    /// destination acknowledges Complete only once its vCPUs run).
    pub downtime_us: AtomicU64,
    /// From connecting to the destination's Complete acknowledgement (post-copy: to
    /// its confirmation that every page is in).
    pub total_ms: AtomicU64,
    /// Post-copy: the destination has Complete and may run; this VM must never resume
    /// on its own again.
    pub destination_running: AtomicBool,
    /// Post-copy: what the destination pulled.
    pub pulled: ServeStats,
    /// Why the migration failed (vm.info), once it has.
    pub error: std::sync::Mutex<Option<String>>,
}

pub const PHASE_SETUP: u64 = 0;
pub const PHASE_ITERATING: u64 = 1;
pub const PHASE_PAUSED: u64 = 2;
pub const PHASE_DONE: u64 = 3;
pub const PHASE_FAILED: u64 = 4;
/// Post-copy: the destination runs and pulls memory from this paused VM.
pub const PHASE_POSTCOPY: u64 = 5;
