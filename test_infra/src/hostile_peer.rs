//! A migration sender that misbehaves on purpose, written with the `vm-migration` wire
//! types, and the `/proc` readings that show what it cost the receiving VMM (resident
//! memory, threads, fds).

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vm_migration::{RequestHeader, ResponseHeader, Status};

/// One connection to a receiver, driven message by message.
pub struct FakeSender {
    pub conn: UnixStream,
}

impl FakeSender {
    /// Connects to the receiver's UNIX socket. Reads time out after 20 s, so a test whose
    /// receiver never answers fails instead of hanging.
    pub fn connect(path: &Path) -> io::Result<FakeSender> {
        let conn = UnixStream::connect(path)?;
        conn.set_read_timeout(Some(Duration::from_secs(20)))?;
        Ok(FakeSender { conn })
    }

    /// Sends a request (header and payload) and reads the answer's status.
    pub fn request(&mut self, header: &RequestHeader, payload: &[u8]) -> io::Result<Status> {
        vm_migration::send_request(&mut self.conn, header, payload).map_err(io::Error::other)?;
        self.status()
    }

    /// Reads one response and returns its status.
    pub fn status(&mut self) -> io::Result<Status> {
        let h: ResponseHeader =
            vm_migration::read_response(&mut self.conn).map_err(io::Error::other)?;
        Ok(h.status)
    }

    /// `Start`, answered Ok.
    pub fn start(&mut self) -> io::Result<()> {
        expect_ok(self.request(&RequestHeader::start(), &[])?, "Start")
    }

    /// `Config` with `json`, answered Ok.
    pub fn config(&mut self, json: &str) -> io::Result<()> {
        let header = RequestHeader::config(json.len() as u64);
        expect_ok(self.request(&header, json.as_bytes())?, "Config")
    }
}

fn expect_ok(status: Status, what: &str) -> io::Result<()> {
    if status == Status::Ok {
        Ok(())
    } else {
        Err(io::Error::other(format!("{what} answered {status}")))
    }
}

/// Host paths a sender's Config may name (all `None`: no file).
#[derive(Debug, Default, Clone)]
pub struct PeerPaths {
    pub serial: Option<PathBuf>,
    pub console: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
}

/// A Config payload the receiver accepts: a 1-vCPU VM of `size` bytes (at most 3 GiB,
/// so it is one RAM slot at gpa 0) of private memory, with `paths` named in it.
pub fn config_json(size: u64, paths: &PeerPaths) -> String {
    let console = |p: &Option<PathBuf>, off: &str| match p {
        Some(p) => serde_json::json!({"file": p, "mode": "File"}),
        None => serde_json::json!({"file": null, "mode": off}),
    };
    serde_json::json!({
        "vm_config": {
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
            "memory": {"size": size, "shared": false},
            "payload": {"kernel": paths.kernel, "cmdline": "x", "initramfs": null},
            "serial": console(&paths.serial, "Null"),
            "console": console(&paths.console, "Off"),
        },
        "memory_manager_data": {
            "guest_ram_mappings": [
                {"slot": 0, "gpa": 0, "size": size, "zone_id": "mem0", "virtio_mem": false,
                 "file_offset": 0}
            ]
        }
    })
    .to_string()
}

/// A `Status:` field of `/proc/<pid>/status` as a number (`VmRSS` in KiB, `Threads`).
pub fn status_field(pid: u32, field: &str) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no {field} in /proc/{pid}/status")))
}

/// Threads of process `pid`.
pub fn threads(pid: u32) -> io::Result<u64> {
    status_field(pid, "Threads")
}

/// Open fds of process `pid`.
pub fn fd_count(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// How many fds of process `pid` refer to the file `target` (compared by the link
/// `/proc/<pid>/fd/N` shows, e.g. a path or `/memfd:name (deleted)`).
pub fn fds_to(pid: u32, target: &Path) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t == target)
        .count())
}

/// What `/proc/self/fd/<fd>` points at, for [`fds_to`].
pub fn own_fd_target(fd: &impl std::os::fd::AsRawFd) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}
