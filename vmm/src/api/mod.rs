//! The REST API: request/response types shared by the HTTP server (`http`) and the VMM
//! control loop, which alone owns the VM.

pub mod http;
pub mod parser;
pub mod routes;

pub use crate::vm::VmState;
pub use http::Reply;

use serde::{Deserialize, Serialize};

use std::path::PathBuf;

use crate::config::{RestoreParams, VmConfig};

/// One API action, already parsed and validated against its JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    VmmPing,
    VmInfo,
    VmPause,
    VmResume,
    VmShutdown,
    VmmShutdown,
    /// Write a snapshot of the paused VM into this directory.
    VmSnapshot {
        destination: PathBuf,
    },
    /// Build a VM from a snapshot directory (only when there is no VM yet).
    VmRestore(RestoreParams),
    /// Start sending the VM to another VMM (returns once the worker runs).
    VmSendMigration(Box<crate::config::migration_params::SendParams>),
    /// Receive a VM (answered when it has arrived; the VMM serves other requests
    /// meanwhile).
    VmReceiveMigration(crate::config::migration_params::ReceiveParams),
    /// End the running send-migration (Cloud Hypervisor's `vm.cancel-migration`).
    VmCancelMigration,
}

/// A request on its way to the control loop, with where its single answer goes.
#[derive(Debug)]
pub struct ApiCall {
    pub request: ApiRequest,
    pub reply: Reply,
}

impl ApiRequest {
    /// Whether the answer takes as long as the data does (snapshot, restore): the HTTP
    /// layer then waits for it however long it takes instead of answering 504 while the
    /// work goes on.
    pub fn is_long_running(&self) -> bool {
        matches!(
            self,
            ApiRequest::VmSnapshot { .. }
                | ApiRequest::VmRestore(_)
                | ApiRequest::VmReceiveMigration(_)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    pub build_version: String,
    pub version: String,
    pub pid: i64,
    pub features: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfoResponse {
    pub config: VmConfig,
    pub state: VmState,
    pub memory_actual_size: u64,
    /// Present while (and after) guest RAM is restored on demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_restore: Option<MemoryRestoreProgress>,
    /// Present during and after an outgoing migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationProgress>,
}

/// An outgoing migration's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationProgress {
    /// setup, iterating, paused, postcopy (the destination runs and pulls memory),
    /// completed or failed.
    pub phase: String,
    pub iteration: u64,
    pub bytes_sent: u64,
    /// Bytes the guest dirtied during the last iteration, and that per second.
    pub last_dirty_bytes: u64,
    pub dirty_rate_bytes_per_s: u64,
    pub estimated_downtime_ms: u64,
    /// How long the VM was paused (final iteration, state, Complete).
    pub downtime_ms: u64,
    /// Post-copy: PageFault requests the destination made of this VM.
    pub postcopy_requests: u64,
    /// Why the migration failed (with `phase` "failed").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How far an on-demand restore has filled guest RAM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRestoreProgress {
    /// Data pages of the snapshot now in guest RAM.
    pub resident_pages: u64,
    /// Data pages in the snapshot (never-written pages are not counted: they stay holes).
    pub total_pages: u64,
    /// Faults the handler resolved.
    pub faults: u64,
    /// Mean, median and 99th percentile time to resolve one fault, in microseconds
    /// (from reading the fault event to the page being in place).
    pub mean_fault_us: u64,
    pub fault_p50_us: u64,
    pub fault_p99_us: u64,
    pub complete: bool,
    /// Milliseconds from the start of the restore until every page was in (0 until then).
    pub completed_after_ms: u64,
    /// Bytes read from the source: the snapshot files, or pulled from a post-copy
    /// migration source.
    pub bytes_fetched: u64,
}

/// A successful answer; `Empty` becomes HTTP 204.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiResponse {
    Empty,
    Ping(VmmPingResponse),
    Info(Box<VmInfoResponse>),
}

/// An error's message and its sources' messages, outermost first: what an error answer's
/// JSON array holds (Cloud Hypervisor's shape), and what logs print joined by ": ".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason(Vec<String>);

impl Reason {
    /// `error`'s Display followed by each source's. A source whose text the message
    /// already ends with (a Display that repeats its source) is not repeated.
    pub fn of(error: &dyn std::error::Error) -> Self {
        Reason(crate::errors::chain_parts(error))
    }

    pub fn messages(&self) -> &[String] {
        &self.0
    }
}

impl From<String> for Reason {
    fn from(message: String) -> Self {
        Reason(vec![message])
    }
}

impl From<&str> for Reason {
    fn from(message: &str) -> Self {
        Reason(vec![message.to_string()])
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(": "))
    }
}

/// Why an API action failed. `status()` in `http` maps each kind to an HTTP status, and
/// [`ApiError::chain`] gives the messages of the answer's body.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request itself is malformed (bad JSON, unknown field, bad value, a field this
    /// VMM cannot honour).
    #[error("bad request: {0}")]
    BadRequest(Reason),
    /// The action does not fit the VM's current state (e.g. pause a paused VM).
    #[error("cannot {action} a VM that is {state:?}")]
    InvalidState {
        action: &'static str,
        state: VmState,
    },
    /// The request conflicts with work in progress (e.g. an on-demand restore).
    #[error("{0}")]
    Conflict(Reason),
    /// There is no VM to act on.
    #[error("no VM has been created")]
    NoVm,
    /// The VMM tried and failed; the reason carries the error chain.
    #[error("{action} failed: {reason}")]
    Internal {
        action: &'static str,
        reason: Reason,
    },
    /// The VMM control loop is gone (shutting down).
    #[error("the VMM is shutting down")]
    VmmGone,
}

impl ApiError {
    /// The messages of the error answer, outermost first: what failed, then why.
    pub fn chain(&self) -> Vec<String> {
        match self {
            ApiError::BadRequest(reason) => prefixed("bad request: ", reason),
            ApiError::Conflict(reason) => reason.messages().to_vec(),
            ApiError::Internal { action, reason } => std::iter::once(format!("{action} failed"))
                .chain(reason.messages().iter().cloned())
                .collect(),
            other => vec![other.to_string()],
        }
    }

    pub fn bad_request(error: &dyn std::error::Error) -> Self {
        ApiError::BadRequest(Reason::of(error))
    }

    pub fn conflict(error: &dyn std::error::Error) -> Self {
        ApiError::Conflict(Reason::of(error))
    }

    pub fn internal(action: &'static str, error: &dyn std::error::Error) -> Self {
        ApiError::Internal {
            action,
            reason: Reason::of(error),
        }
    }
}

/// The reason's messages with `prefix` on the first.
fn prefixed(prefix: &str, reason: &Reason) -> Vec<String> {
    let mut chain = reason.messages().to_vec();
    match chain.first_mut() {
        Some(first) => first.insert_str(0, prefix),
        None => chain.push(prefix.trim_end_matches([':', ' ']).to_string()),
    }
    chain
}

pub type ApiResult = Result<ApiResponse, ApiError>;
