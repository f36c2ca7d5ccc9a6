//! The offload daemon's modules, as a library so that tests (the fuzz target of the
//! snapshot directory checks, `tests/fuzz_layout.rs`) reach them; `main.rs` is the
//! command line over them.

pub mod layout;
pub mod lock;
pub mod ondemand;
pub mod restore;
pub mod snapshot;
pub mod store;
pub mod store_cmd;
pub mod store_ondemand;

use std::time::Duration;

pub(crate) use vmm::net::is_timeout;

/// Sets both I/O deadlines of a connection to a peer.
pub(crate) fn set_io_timeout(
    conn: &std::os::unix::net::UnixStream,
    timeout: Duration,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))
}
