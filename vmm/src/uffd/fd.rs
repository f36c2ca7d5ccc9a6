//! The userfaultfd itself: creating and registering it, reading its fault events,
//! waiting on it, and letting guest RAM go.

use std::os::fd::AsRawFd;

use userfaultfd::{Event, EventBuffer, RegisterMode, Uffd, UffdBuilder};
use vmm_sys_util::eventfd::EventFd;

use super::Error;

/// Waits until `uffd` or `stop` is readable; false if the wait itself failed.
pub(super) fn wait_readable(uffd: &Uffd, stop: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call;
    // both fds are borrowed from their owners for it.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
    n >= 0 || std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
}

/// The addresses of the page faults pending on `uffd` now (it is non-blocking).
pub(super) fn pending_faults(
    uffd: &Uffd,
    buf: &mut EventBuffer,
) -> Result<Vec<u64>, userfaultfd::Error> {
    let events = uffd.read_events(buf)?;
    Ok(events
        .filter_map(|e| match e {
            Ok(Event::Pagefault { addr, .. }) => Some(addr as u64),
            _ => None,
        })
        .collect())
}

/// A userfaultfd with every `(host, size)` range registered in `mode`. Faults come from
/// KVM inside the kernel, so it is not user-mode only.
pub(super) fn registered_uffd(
    regions: impl Iterator<Item = (u64, u64)>,
    mode: RegisterMode,
) -> Result<Uffd, Error> {
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .create()
        .map_err(Error::Create)?;
    for (host, size) in regions {
        uffd.register_with_mode(host as *mut libc::c_void, size as usize, mode)
            .map_err(|source| Error::Register { host, size, source })?;
    }
    Ok(uffd)
}

/// Takes guest RAM out of userfaultfd's hands once every page that matters is in.
pub(super) fn unregister_all(uffd: &Uffd, regions: impl Iterator<Item = (u64, u64)>) {
    for (host, size) in regions {
        if let Err(e) = uffd.unregister(host as *mut libc::c_void, size as usize) {
            log::warn!("unregistering guest RAM from userfaultfd: {e}");
        }
    }
}
