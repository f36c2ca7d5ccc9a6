//! [`DaemonProcess`]: a helper process under test (e.g. `offload_daemon`) in its own
//! process group, SIGKILLed with its children on drop, with stderr kept in a file so a
//! failing test can show it.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::wait::{deadline, poll_until};

#[derive(Debug)]
pub struct DaemonProcess {
    child: Child,
    status: Option<ExitStatus>,
    stderr_path: PathBuf,
}

impl DaemonProcess {
    /// Starts `program args...` with stdout and stderr appended to `log` (stdout first
    /// goes there too: a daemon's story is one stream).
    pub fn spawn<I, S>(program: &Path, args: I, log: &Path) -> io::Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = File::create(log)?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        // Own process group: Drop kills the daemon and anything it started at once.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        crate::process::die_with_parent(&mut cmd);
        Ok(DaemonProcess {
            child: cmd.spawn()?,
            status: None,
            stderr_path: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the daemon logged so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The exit status if it has exited (reaps it), without waiting.
    pub fn try_status(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the daemon to exit; `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        poll_until(deadline(timeout), || self.try_status())
    }

    /// SIGKILLs the process group and reaps the daemon. Idempotent.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.try_status()? {
            return Ok(status);
        }
        self.kill_group();
        let status = self.child.wait()?;
        self.status = Some(status);
        Ok(status)
    }

    fn kill_group(&self) {
        // Only while unreaped: until then the pid, and so the group id, cannot be reused.
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) has no memory effects; the group is the daemon's own.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.kill_group();
            // Reap it so no zombie outlives the test; nothing useful to do on error.
            let _ = self.child.wait();
        }
    }
}
