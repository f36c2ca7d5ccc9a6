//! Helpers for tests and benchmarks that migrate VMs between VMM processes.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::wait::poll_until;

/// A free TCP port on loopback (bound, then released: another process could take it in
/// between, which on a test machine does not happen in practice).
pub fn free_tcp_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until a receiver listens on `url` (`unix:<path>` or `tcp:<host>:<port>`). It
/// cannot be asked: its control loop is busy receiving, and a probe connection would
/// become its main connection. So this watches the kernel's tables of listening sockets
/// (the socket file alone is not enough: bind creates it before listen, and a connect in
/// between is refused).
pub fn wait_listening(url: &str, timeout: Duration) -> std::io::Result<bool> {
    let found = poll_until(
        Instant::now() + timeout,
        || -> std::io::Result<Option<()>> {
            Ok(match url.strip_prefix("unix:") {
                Some(path) => unix_listening(Path::new(path))?.then_some(()),
                None => {
                    let port: u16 = url
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(0);
                    let needle = format!(":{port:04X} ");
                    let table = std::fs::read_to_string("/proc/net/tcp")?;
                    // Column 4 is the state; 0A is LISTEN.
                    table
                        .lines()
                        .any(|l| l.contains(&needle) && l.split_whitespace().nth(3) == Some("0A"))
                        .then_some(())
                }
            })
        },
    )?;
    Ok(found.is_some())
}

/// Whether a UNIX stream socket bound to `path` is listening (`/proc/net/unix`: the
/// flags column has `__SO_ACCEPTCON`, 0x10000, once listen() ran).
fn unix_listening(path: &Path) -> std::io::Result<bool> {
    const SO_ACCEPTCON: u32 = 1 << 16;
    let table = std::fs::read_to_string("/proc/net/unix")?;
    let wanted = path.to_string_lossy();
    Ok(table.lines().skip(1).any(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.len() >= 8
            && cols[7] == wanted
            && u32::from_str_radix(cols[3], 16).is_ok_and(|f| f & SO_ACCEPTCON != 0)
    }))
}

/// Runs `vm.receive-migration` for `url` on the VMM behind `api_socket` in a thread (the
/// call blocks until the VM has arrived) and returns once the receiver listens. The
/// thread yields the HTTP answer.
pub fn receive_in_background(
    api_socket: &Path,
    url: &str,
    postcopy: bool,
    timeout: Duration,
) -> std::io::Result<std::thread::JoinHandle<Result<api_client::Response, api_client::Error>>> {
    let socket = api_socket.to_path_buf();
    let body = format!(r#"{{"receiver_url":"{url}","postcopy":{postcopy}}}"#);
    let handle = std::thread::spawn(move || {
        api_client::api_command(
            &socket,
            "PUT",
            "vm.receive-migration",
            Some(&body),
            Some(timeout),
        )
    });
    if !wait_listening(url, Duration::from_secs(10))? {
        return Err(std::io::Error::other(format!(
            "the receiver never listened on {url}"
        )));
    }
    Ok(handle)
}

/// [`receive_in_background`] for a test: the thread yields the HTTP status and body, and
/// panics (failing the test that joins it) if the API could not be reached at all.
pub fn receive_status_in_background(
    dest: &crate::VmmProcess,
    url: &str,
    postcopy: bool,
    timeout: Duration,
) -> std::thread::JoinHandle<(u16, String)> {
    let socket = dest
        .api_socket()
        .expect("the destination VMM has an API socket");
    let receiving = receive_in_background(socket, url, postcopy, timeout)
        .unwrap_or_else(|e| panic!("receive-migration on {url}: {e}"));
    std::thread::spawn(move || {
        let resp = receiving
            .join()
            .expect("the receive thread panicked")
            .unwrap_or_else(|e| panic!("receive-migration: {e}"));
        (resp.status, resp.body)
    })
}
