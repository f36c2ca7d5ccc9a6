//! Hostile files for tests that prove the VMM and the daemon refuse them: FIFOs, modes,
//! huge sparse files, and the peak memory of a process that read them.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

/// Creates a FIFO at `path`: opening it for reading blocks until a writer comes.
pub fn mkfifo(path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a valid NUL-terminated path; mkfifo reads it and has no other memory effects.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The permission bits of `path` (not following a symlink).
pub fn mode(path: &Path) -> io::Result<u32> {
    Ok(std::fs::symlink_metadata(path)?.permissions().mode() & 0o7777)
}

/// Every entry of `dir` (recursively, `dir` included) whose permission bits give anything
/// to group or others, with its mode.
pub fn group_or_world_accessible(dir: &Path) -> io::Result<Vec<(std::path::PathBuf, u32)>> {
    let mut open = Vec::new();
    let m = mode(dir)?;
    if m & 0o077 != 0 {
        open.push((dir.to_path_buf(), m));
    }
    if std::fs::symlink_metadata(dir)?.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            open.extend(group_or_world_accessible(&entry?.path())?);
        }
    }
    Ok(open)
}

/// A sparse file of `len` bytes of zeros: costs no disk.
pub fn sparse_zeros(path: &Path, len: u64) -> io::Result<()> {
    std::fs::File::create(path)?.set_len(len)
}

/// What [`run_measured`] reports of a finished process.
#[derive(Debug)]
pub struct Measured {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// Peak resident set (`ru_maxrss`: VmHWM at exit), in KiB.
    pub peak_rss_kib: u64,
    pub elapsed: std::time::Duration,
}

/// Runs `cmd` to completion (killed after `timeout`, which is then an error) and
/// reports its output and its peak RSS, taken from `wait4(2)`'s rusage (the process is
/// gone before /proc could be read).
pub fn run_measured(cmd: &mut Command, timeout: std::time::Duration) -> io::Result<Measured> {
    let dir = crate::TempDir::new("measured")?;
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let started = std::time::Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::fs::File::create(&err)?)
        .spawn()?;
    let pid = libc::pid_t::try_from(child.id()).map_err(io::Error::other)?;
    // SAFETY: all-zero bytes are a valid rusage (plain integers).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut reap = |flags| -> io::Result<Option<i32>> {
        let mut status = 0;
        // SAFETY: `status` and `usage` are live and writable; the pid is our unreaped
        // child (reaped at most once: the loop ends when it is).
        let rc = unsafe { libc::wait4(pid, &mut status, flags, &mut usage) };
        match rc {
            0 => Ok(None),
            rc if rc == pid => Ok(Some(status)),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    };
    let done = crate::wait::poll_until(crate::wait::deadline(timeout), || reap(libc::WNOHANG))?;
    let status = match done {
        Some(status) => status,
        None => {
            // SAFETY: kill(2) has no memory effects; the pid is our unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = reap(0);
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{cmd:?} still ran after {timeout:?} (killed); stderr: {}",
                    std::fs::read_to_string(&err).unwrap_or_default()
                ),
            ));
        }
    };
    // Reaped by wait4 above: dropping the Child does not wait again.
    drop(child);
    Ok(Measured {
        status: std::os::unix::process::ExitStatusExt::from_raw(status),
        stdout: std::fs::read_to_string(&out)?,
        stderr: std::fs::read_to_string(&err)?,
        peak_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
        elapsed: started.elapsed(),
    })
}

/// Moves `dir/name` into `elsewhere` and puts in its place a symlink to it (`kind`
/// "symlink") or a FIFO ("fifo"). Returns what a refusal of it should say.
pub fn replace_with_special(
    kind: &str,
    dir: &Path,
    name: &str,
    elsewhere: &Path,
) -> io::Result<&'static str> {
    let target = elsewhere.join(format!("{kind}-{name}"));
    std::fs::rename(dir.join(name), &target)?;
    match kind {
        "symlink" => {
            std::os::unix::fs::symlink(&target, dir.join(name))?;
            Ok("is a symbolic link")
        }
        "fifo" => {
            mkfifo(&dir.join(name))?;
            Ok("is a FIFO, not a regular file")
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("no special file of kind {other:?}"),
        )),
    }
}
