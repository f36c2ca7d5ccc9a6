//! Helpers every integration test and benchmark uses. This crate drives the VMM only as
//! a user would: it spawns `cloud-hypervisor` and `ch-remote` processes, reads the
//! guest's serial log and talks REST on the API socket. It links the vmm crate only to
//! read and write snapshot files the way the VMM does (`damage`, `ch_daemon`: the
//! memory-piece sums, memfds, sparse extents); it never runs a VM in-process.
//!
//! - [`guest`]: the test guest ELF, built from source by this crate's build script.
//! - [`process`]: [`VmmBuilder`] / [`VmmProcess`] (own process group, killed on drop),
//!   waits on serial lines that fail fast when the VMM dies, REST and `ch-remote`.
//! - [`serial`]: [`SerialLog`], incremental reading of the serial file.
//! - [`lines`]: typed parsers for the guest's `TG ...` lines.
//! - [`tempdir`]: [`TempDir`], removed on drop.
//! - [`damage`]: damaging snapshot files on purpose.
//! - [`hostile`]: FIFOs, modes, huge sparse files, peak RSS of a finished process.
//! - [`wait`]: the one polling helper with a deadline.
//! - [`hostile_peer`]: a misbehaving migration sender, and what it costs the receiver.
//! - [`ch_daemon`]: Cloud Hypervisor's reference daemon's restore, as a stand-in for CI.

pub mod ch_daemon;
pub mod ch_wire;
pub mod cli_compat;
pub mod daemon;
pub mod damage;
pub mod guest;
pub mod hostile;
pub mod hostile_api;
pub mod hostile_peer;
pub mod lines;
pub mod migration;
pub mod old_formats;
pub mod process;
pub mod procfs;
pub mod seccomp;
pub mod serial;
pub mod tempdir;
pub mod wait;

pub use api_client;
pub use lines::{Boot, GuestError, GuestLine, Ready, Tick};
pub use process::{Binaries, Error, VmmBuilder, VmmProcess};
pub use serial::SerialLog;
pub use tempdir::TempDir;

/// Writes `err` and its `source()` chain as plain text. The error types here use it as
/// their `Debug`, because tests `unwrap()` them and the derived `Debug` would print a
/// serial tail as one long escaped string.
pub fn display_chain(
    err: &dyn std::error::Error,
    f: &mut std::fmt::Formatter<'_>,
) -> std::fmt::Result {
    write!(f, "{err}")?;
    let mut source = err.source();
    while let Some(e) = source {
        write!(f, "\n  caused by: {e}")?;
        source = e.source();
    }
    Ok(())
}
