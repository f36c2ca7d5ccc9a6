//! Scheduling precedence for the threads that move guest memory.
//!
//! A migration competes for CPU with the guest it moves: a busy guest's vCPU threads are
//! always runnable, and on a host with few cores they take an equal share from the threads
//! that copy memory, so the transfer (and the time under dirty logging) stretches out
//! (docs/live_migration.md has figures). Raising the movers instead of lowering the vCPUs
//! leaves the guest as it was if the migration fails, and needs nothing undone when a
//! mover thread ends.
//!
//! Raising a priority needs CAP_SYS_NICE (or an RLIMIT_NICE that allows it); without it
//! the threads run at their normal priority and the migration is only slower.

/// Nice value for memory movers. Against vCPUs at nice 0 this gives the movers about nine
/// tenths of a contended core; the guest still runs, only slower, for the length of the
/// transfer.
pub const MOVER_NICE: i32 = -10;

/// Raises the calling thread to [`MOVER_NICE`] until dropped, then puts back the nice value
/// it had. Does nothing when the thread already runs at that priority or higher, or when
/// the process may not raise priorities. A thread started meanwhile inherits the raised
/// priority for good: hold a `Boost` only where no long-lived thread (a vCPU, a device or
/// memory handler) is started.
pub struct Boost {
    tid: libc::id_t,
    previous: Option<i32>,
}

impl Boost {
    pub fn current_thread() -> Boost {
        // SAFETY: gettid takes no arguments and cannot fail.
        let tid = unsafe { libc::gettid() } as libc::id_t;
        let previous = nice_of(tid).filter(|&n| n > MOVER_NICE).and_then(|n| {
            match set_nice(tid, MOVER_NICE) {
                Ok(()) => Some(n),
                Err(e) => {
                    log::debug!("running memory movers at normal priority: {e}");
                    None
                }
            }
        });
        Boost { tid, previous }
    }

    /// Whether the thread runs raised (the process was allowed to raise it).
    pub fn raised(&self) -> bool {
        self.previous.is_some()
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        if let Some(n) = self.previous
            && let Err(e) = set_nice(self.tid, n)
        {
            log::warn!("restoring thread {} to nice {n}: {e}", self.tid);
        }
    }
}

fn nice_of(tid: libc::id_t) -> Option<i32> {
    // getpriority returns the nice value, which may be -1, so errno tells failure apart.
    // SAFETY: clearing errno and calling getpriority touch no memory of ours.
    unsafe {
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, tid);
        (n != -1 || *libc::__errno_location() == 0).then_some(n)
    }
}

fn set_nice(tid: libc::id_t, nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority on one of our own threads reads and writes no memory of ours.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::{Boost, MOVER_NICE, nice_of};

    #[test]
    fn a_boost_ends_with_the_nice_value_the_thread_had() {
        std::thread::spawn(|| {
            // SAFETY: as in Boost::current_thread.
            let tid = unsafe { libc::gettid() } as libc::id_t;
            let before = nice_of(tid);
            {
                let boost = Boost::current_thread();
                if boost.raised() {
                    assert_eq!(nice_of(tid), Some(MOVER_NICE));
                } else {
                    assert_eq!(nice_of(tid), before);
                }
            }
            assert_eq!(nice_of(tid), before);
        })
        .join()
        .unwrap();
    }
}
