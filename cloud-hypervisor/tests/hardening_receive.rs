//! The receiving VMM against hostile, stalled and dead migration senders (issue 13,
//! classes 2-6): a sender that never comes or goes silent, one that announces memory it
//! never sends or opens connections it never uses, one that attaches extra fds, one that
//! names host files in its Config, and a local-migration peer that pulls guest memory
//! away. Each time the VMM answers its API within a second, ends the receive with a
//! clear error, keeps its memory, threads and fds bounded, and never lets the peer choose
//! a host file; a VM whose memory is pulled away stops with a failure exit naming why.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::migration::*;
use common::*;
use test_infra::TempDir;
use test_infra::hostile_peer::{self as hostile, FakeSender, PeerPaths, config_json};
use test_infra::wait::{deadline, poll_until};
use vm_migration::{MemoryRange, MemoryRangeTable, RequestHeader, Status};

/// What "answers within a second" means.
const LIVE: Duration = Duration::from_secs(1);

/// `vm.receive-migration` with extra JSON fields (e.g. `,"idle_timeout_s":2`), in a
/// thread; returns once the receiver listens. The thread yields status, body and how
/// long the call took.
fn receive_with(dest: &test_infra::VmmProcess, url: &str, fields: &str) -> Receiving {
    let socket = dest.api_socket().unwrap().to_path_buf();
    let body = format!(r#"{{"receiver_url":"{url}"{fields}}}"#);
    let handle = std::thread::spawn(move || {
        let t = Instant::now();
        let resp = test_infra::api_client::api_command(
            &socket,
            "PUT",
            "vm.receive-migration",
            Some(&body),
            Some(MIGRATION_TIMEOUT),
        )
        .unwrap();
        (resp.status, resp.body, t.elapsed())
    });
    assert!(
        test_infra::migration::wait_listening(url, Duration::from_secs(10)).unwrap(),
        "the receiver never listened on {url}"
    );
    handle
}

type Receiving = JoinHandle<(u16, String, Duration)>;

/// Asserts that `vmm.ping` and `vm.info` are answered within a second; returns vm.info.
fn api_is_live(vmm: &test_infra::VmmProcess) -> (u16, String) {
    let t = Instant::now();
    vmm.api_ok("GET", "vmm.ping", None).unwrap();
    let info = vmm.api("GET", "vm.info", None).unwrap();
    assert!(t.elapsed() < 2 * LIVE, "the API took {:?}", t.elapsed());
    (info.status, info.body)
}

fn unix_url(dir: &TempDir, name: &str) -> (String, PathBuf) {
    let path = dir.join(name);
    (format!("unix:{}", path.display()), path)
}

// ---- class 2: a sender that never comes, goes silent, or outlives the VMM -------------

/// No sender at all: the API answers while the receive waits (vm.info says what is
/// going on), and the receive gives up after connect_timeout_s with a reason.
#[test]
fn no_sender_the_api_stays_live_and_the_receive_times_out() {
    let dir = TempDir::new("hr-nosender").unwrap();
    let dest = empty_vmm("hr-nosender");
    let (url, sock) = unix_url(&dir, "mig.sock");
    let receiving = receive_with(&dest, &url, r#","connect_timeout_s":2"#);
    let (status, body) = api_is_live(&dest);
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("receiving one on unix:") && body.contains("waiting for the sender"),
        "{body}"
    );
    let (status, body, took) = receiving.join().unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("no sender connected within 2s"), "{body}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "{took:?}"
    );
    assert!(!sock.exists(), "the receiver left its socket behind");
    let (status, body) = api_is_live(&dest);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no VM has been created"), "{body}");
}

/// A sender that goes silent after Start, and one that stops in the middle of a
/// message: the API answers meanwhile, and each receive ends after idle_timeout_s.
#[test]
fn a_silent_sender_times_out_while_the_api_answers() {
    let dir = TempDir::new("hr-silent").unwrap();
    let dest = empty_vmm("hr-silent");
    let (url, sock) = unix_url(&dir, "mig.sock");

    let receiving = receive_with(&dest, &url, r#","idle_timeout_s":2"#);
    let mut sender = FakeSender::connect(&sock).unwrap();
    sender.start().unwrap();
    let (status, body) = api_is_live(&dest);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("waiting for the VM's config"), "{body}");
    let (status, body, took) = receiving.join().unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("the sender sent nothing for 2s"), "{body}");
    assert!(took < Duration::from_secs(10), "{took:?}");

    // Config announced, a tenth of it sent.
    let receiving = receive_with(&dest, &url, r#","idle_timeout_s":2"#);
    let mut sender = FakeSender::connect(&sock).unwrap();
    sender.start().unwrap();
    let header = RequestHeader::config(1000).to_bytes();
    sender.conn.write_all(&header).unwrap();
    sender.conn.write_all(&[b' '; 100]).unwrap();
    let (status, _) = api_is_live(&dest);
    assert_eq!(status, 409);
    let (status, body, _) = receiving.join().unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("stopped in the middle of a message for 2s"),
        "{body}"
    );
    assert_eq!(sender.status().unwrap(), Status::Error);
    api_is_live(&dest);
}

/// vmm.shutdown while a sender is connected: the receive ends at once with a reason,
/// the sender sees the connection close, and the VMM exits cleanly.
#[test]
fn shutdown_ends_a_receive_in_progress() {
    let dir = TempDir::new("hr-shutdown").unwrap();
    let mut dest = empty_vmm("hr-shutdown");
    let (url, sock) = unix_url(&dir, "mig.sock");
    let receiving = receive_with(&dest, &url, "");
    let mut sender = FakeSender::connect(&sock).unwrap();
    sender.start().unwrap();
    let t = Instant::now();
    dest.api_ok("PUT", "vmm.shutdown", None).unwrap();
    assert!(t.elapsed() < 2 * LIVE, "shutdown took {:?}", t.elapsed());
    let (status, body, _) = receiving.join().unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("cancelled"), "{body}");
    let mut rest = Vec::new();
    assert_eq!(sender.conn.read_to_end(&mut rest).unwrap_or(0), 0);
    let exit = dest.expect_exit(EXIT_TIMEOUT).unwrap();
    assert!(exit.success(), "{exit}");
    assert!(!sock.exists());
}

// ---- class 3: memory announced and not sent, connections opened and not used ---------

/// 2 GiB of page data announced, 1 MiB sent: the receiver allocates as the data comes
/// (at most 32 MiB ahead of it), never by the announcement, and gives up on the silent
/// sender after idle_timeout_s. A range outside the guest RAM of the sender's own Config
/// and an oversized range table are refused before any data is read.
#[test]
fn announced_memory_that_never_comes_costs_nothing() {
    const GIB: u64 = 1 << 30;
    let dir = TempDir::new("hr-announce").unwrap();
    let dest = empty_vmm("hr-announce");
    let pid = dest.pid();
    let (url, sock) = unix_url(&dir, "mig.sock");
    let config = config_json(2 * GIB, &PeerPaths::default());

    // A receive, and a sender that got as far as its Config.
    let configured = |config: &str, fields: &str| {
        let receiving = receive_with(&dest, &url, fields);
        let mut sender = FakeSender::connect(&sock).unwrap();
        sender.start().unwrap();
        sender.config(config).unwrap();
        (receiving, sender)
    };

    let (receiving, mut sender) = configured(&config, r#","idle_timeout_s":3"#);
    let before = hostile::status_field(pid, "VmRSS").unwrap();
    let table = MemoryRangeTable::from_ranges([MemoryRange::new(0, 2 * GIB)]).unwrap();
    vm_migration::send_memory_table(&mut sender.conn, &table).unwrap();
    sender.conn.write_all(&vec![0x5a; 1 << 20]).unwrap();
    // Until the receiver gives up, its resident memory stays near what it was.
    let mut peak = before;
    let gave_up = poll_until(deadline(MIGRATION_TIMEOUT), || {
        peak = peak.max(hostile::status_field(pid, "VmRSS").unwrap());
        Ok::<_, ()>(receiving.is_finished().then_some(()))
    })
    .unwrap();
    assert!(gave_up.is_some());
    eprintln!("VmRSS {before} KiB before the announcement, peak {peak} KiB");
    assert!(
        peak < before + 96 * 1024,
        "RSS grew from {before} to {peak} KiB for 1 MiB of data"
    );
    let (status, body, _) = receiving.join().unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("stopped in the middle of a message"),
        "{body}"
    );

    // A range beyond the 64 MiB VM the Config describes.
    let (receiving, mut sender) = configured(&config_json(64 << 20, &PeerPaths::default()), "");
    let table = MemoryRangeTable::from_ranges([MemoryRange::new(60 << 20, 8 << 20)]).unwrap();
    vm_migration::send_memory_table(&mut sender.conn, &table).unwrap();
    assert_eq!(sender.status().unwrap(), Status::Error);
    let (status, body, _) = receiving.join().unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("at 0x3c00000 (+0x800000 bytes), outside the guest RAM"),
        "{body}"
    );

    // A range table of 4 Mi ranges for a 64 MiB VM (16 Ki pages).
    let (receiving, mut sender) = configured(&config_json(64 << 20, &PeerPaths::default()), "");
    sender
        .conn
        .write_all(&RequestHeader::memory(64 << 20).to_bytes())
        .unwrap();
    assert_eq!(sender.status().unwrap(), Status::Error);
    let (status, body, _) = receiving.join().unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("range table of 67108864 bytes exceeds"),
        "{body}"
    );
    api_is_live(&dest);
}

/// Extra connections that never say what they are for do not hold up State (it is
/// answered within the short grace they get), and a sender opening 100 connections hits
/// max_connections at once: the receive fails saying so, with the VMM's thread count
/// bounded throughout and back to where it was afterwards.
#[test]
fn idle_extra_connections_are_capped_and_do_not_hold_up_state() {
    let dir = TempDir::new("hr-conns").unwrap();
    let dest = empty_vmm("hr-conns");
    let pid = dest.pid();
    let (url, sock) = unix_url(&dir, "mig.sock");
    let config = config_json(64 << 20, &PeerPaths::default());
    let baseline = hostile::threads(pid).unwrap();

    let receiving = receive_with(&dest, &url, "");
    let mut sender = FakeSender::connect(&sock).unwrap();
    sender.start().unwrap();
    sender.config(&config).unwrap();
    let idle: Vec<UnixStream> = (0..5)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let t = Instant::now();
    let status = sender.request(&RequestHeader::state(2), b"{}").unwrap();
    let took = t.elapsed();
    assert_eq!(status, Status::Error);
    assert!(
        took < Duration::from_secs(3),
        "State waited {took:?} for idle connections"
    );
    let (status, body, _) = receiving.join().unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("not a valid state tree"), "{body}");
    drop(idle);

    let receiving = receive_with(&dest, &url, "");
    let mut sender = FakeSender::connect(&sock).unwrap();
    sender.start().unwrap();
    sender.config(&config).unwrap();
    let mut most = 0;
    let mut conns = Vec::new();
    for _ in 0..100 {
        let Ok(mut c) = UnixStream::connect(&sock) else {
            break; // the receive already ended
        };
        let _ = c.write_all(&1u16.to_le_bytes()); // PrecopyMemory, then nothing
        conns.push(c);
        most = most.max(hostile::threads(pid).unwrap());
    }
    // Until the receive has failed, sample how many threads the connections cost.
    poll_until(deadline(MIGRATION_TIMEOUT), || {
        most = most.max(hostile::threads(pid).unwrap());
        Ok::<_, ()>(receiving.is_finished().then_some(()))
    })
    .unwrap();
    let (status, body, took) = receiving.join().unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("more than 16 extra connections at once"),
        "{body}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    eprintln!("threads: {baseline} before, at most {most} with 100 connections");
    // The receive worker, the acceptor and one per admitted connection, plus slack for
    // the HTTP server's.
    assert!(
        most <= baseline + 16 + 6,
        "{most} threads (baseline {baseline})"
    );
    let back = poll_until(deadline(EXIT_TIMEOUT), || {
        let n = hostile::threads(pid).unwrap();
        Ok::<_, ()>((n <= baseline + 1).then_some(n))
    })
    .unwrap();
    assert!(back.is_some(), "threads did not go back to {baseline}");
    api_is_live(&dest);
}

// ---- class 4: fds a sender attaches beyond the one MemoryFd carries -------------------

/// MemoryFd with 2, 3 and 20 fds attached: refused, and none of them stays open in the
/// VMM; a proper MemoryFd's fd is closed again when the migration is abandoned.
#[test]
fn extra_fds_with_memory_fd_are_closed() {
    let dir = TempDir::new("hr-fds").unwrap();
    let dest = empty_vmm("hr-fds");
    let pid = dest.pid();
    let (url, sock) = unix_url(&dir, "mig.sock");
    let bait = File::create(dir.join("bait")).unwrap();
    let target = hostile::own_fd_target(&bait).unwrap();
    let fds_before = hostile::fd_count(pid).unwrap();
    let raw = [bait.as_raw_fd(); 20];

    for count in [2, 3, 20] {
        let receiving = receive_with(&dest, &url, "");
        let mut sender = FakeSender::connect(&sock).unwrap();
        sender.start().unwrap();
        sender
            .conn
            .write_all(&RequestHeader::memory_fd().to_bytes())
            .unwrap();
        vmm_sys_util_send(&sender.conn, &raw[..count]);
        assert_eq!(sender.status().unwrap(), Status::Error, "{count} fds");
        let (status, body, _) = receiving.join().unwrap();
        assert_eq!(status, 500, "{body}");
        assert!(body.contains("more than one file descriptor"), "{body}");
        assert_eq!(
            hostile::fds_to(pid, &target).unwrap(),
            0,
            "{count} fds sent"
        );
    }

    let receiving = receive_with(&dest, &url, "");
    let mut sender = FakeSender::connect(&sock).unwrap();
    sender.start().unwrap();
    vm_migration::send_memory_fd(&sender.conn, 0, &bait).unwrap();
    assert_eq!(sender.status().unwrap(), Status::Ok);
    assert_eq!(hostile::fds_to(pid, &target).unwrap(), 1);
    assert_eq!(
        sender.request(&RequestHeader::abandon(), &[]).unwrap(),
        Status::Ok
    );
    let (status, body, _) = receiving.join().unwrap();
    assert_eq!(status, 500, "{body}");
    assert_eq!(hostile::fds_to(pid, &target).unwrap(), 0);
    let fds_after = hostile::fd_count(pid).unwrap();
    eprintln!("VMM fds: {fds_before} before, {fds_after} after 4 hostile receives");
    assert!(fds_after <= fds_before + 1, "{fds_before} -> {fds_after}");
}

/// The 4-byte slot id with `fds` attached, in one sendmsg.
fn vmm_sys_util_send(conn: &UnixStream, fds: &[i32]) {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    conn.send_with_fds(&[&0u32.to_le_bytes()[..]], fds).unwrap();
}

// ---- class 5: host paths in the sender's Config ---------------------------------------

/// A Config naming a serial file, a console file and a kernel: the receiving VMM
/// creates and opens none of them (they would be created as root).
#[test]
fn a_sender_cannot_choose_host_files() {
    let dir = TempDir::new("hr-paths").unwrap();
    let dest = empty_vmm("hr-paths");
    let (url, sock) = unix_url(&dir, "mig.sock");
    let paths = PeerPaths {
        serial: Some(dir.join("peer-serial")),
        console: Some(dir.join("peer-console")),
        kernel: Some(dir.join("peer-kernel")),
    };
    let receiving = receive_with(&dest, &url, "");
    let mut sender = FakeSender::connect(&sock).unwrap();
    sender.start().unwrap();
    sender.config(&config_json(64 << 20, &paths)).unwrap();
    assert_eq!(
        sender.request(&RequestHeader::abandon(), &[]).unwrap(),
        Status::Ok
    );
    let (status, body, _) = receiving.join().unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("abandoned"), "{body}");
    for p in [&paths.serial, &paths.console] {
        let p = p.as_ref().unwrap();
        assert!(!p.exists(), "the receiver created {}", p.display());
    }
}

/// A real migration: the guest's serial output continues in the destination's own
/// --serial file, not in the file the source's config names, and vm.info says so.
#[test]
fn a_received_vm_writes_where_the_destination_says() {
    let dir = TempDir::new("hr-serial").unwrap();
    let mut src = boot_source(&dir, "hr-serial", "size=256M", "");
    let own = dir.join("dest-serial.log");
    let mut dest = empty_vmm_with_serial("hr-serial-dest", &own);
    let (url, _) = unix_url(&dir, "mig.sock");
    let receiving = receive_in_background(&dest, &url, false);
    let out = src
        .vmm
        .ch_remote(["send-migration", &format!("destination_url={url}")])
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let (status, body) = receiving.join().unwrap();
    assert_eq!(status, 204, "{body}");
    let exit = src.vmm.expect_exit(MIGRATION_TIMEOUT).unwrap();
    assert!(exit.success(), "{exit}");
    let source_log = std::fs::metadata(&src.serial).unwrap().len();
    let (_, after) = ticks(&mut dest, 3, 0);
    assert!(after.iter().all(|t| t.errors == 0), "{after:?}");
    assert_eq!(
        std::fs::metadata(&src.serial).unwrap().len(),
        source_log,
        "the destination wrote into the source's serial file"
    );
    let info = dest.vm_info().unwrap();
    assert_eq!(info["config"]["serial"]["file"], own.display().to_string());
    assert!(info["config"]["payload"]["kernel"].is_null(), "{info}");
}

// ---- class 6: a local-migration peer that pulls guest memory away ---------------------

/// Sits between a local-migration source and the destination and hands the destination
/// memfds the test keeps a copy of: the source's own (`unsealable` false), or, like a
/// peer that created its memfds without MFD_ALLOW_SEALING (Cloud Hypervisor's may be), a
/// copy made once the source has paused, which cannot be sealed. Then relays the rest.
/// Yields the memfds the destination got.
fn memfd_proxy(listen: &Path, to: PathBuf, unsealable: bool) -> JoinHandle<Vec<File>> {
    let listener = UnixListener::bind(listen).unwrap();
    std::thread::spawn(move || {
        let (source, _) = listener.accept().unwrap();
        let ok = vm_migration::ResponseHeader::ok().to_bytes();
        // Start, MemoryFd* and Config from the source, each acknowledged here; the
        // destination gets them once the source sends State (its VM is paused then).
        let mut fds = Vec::new();
        let config = loop {
            let header = vm_migration::read_request_header(&mut &source).unwrap();
            match header.command() {
                vm_migration::Command::Start => {}
                vm_migration::Command::MemoryFd => {
                    fds.push(vm_migration::recv_memory_fd_payload(&source).unwrap());
                }
                vm_migration::Command::Config => {
                    break vm_migration::read_payload(&mut &source, header.length(), 1 << 20)
                        .unwrap();
                }
                other => panic!("unexpected {other} before Config"),
            }
            (&source).write_all(&ok).unwrap();
        };
        (&source).write_all(&ok).unwrap();
        let state = vm_migration::read_request_header(&mut &source).unwrap();
        assert_eq!(state.command(), vm_migration::Command::State);
        let mut dest = UnixStream::connect(&to).unwrap();
        vm_migration::send_request(&mut dest, &RequestHeader::start(), &[]).unwrap();
        vm_migration::expect_ok(&mut dest).unwrap();
        let mut kept = Vec::new();
        for (slot, file) in fds {
            let file = if unsealable {
                unsealable_copy(&file)
            } else {
                file
            };
            vm_migration::send_memory_fd(&dest, slot, &file).unwrap();
            vm_migration::expect_ok(&mut dest).unwrap();
            kept.push(file);
        }
        let header = RequestHeader::config(config.len() as u64);
        vm_migration::send_request(&mut dest, &header, &config).unwrap();
        vm_migration::expect_ok(&mut dest).unwrap();
        (&dest).write_all(&state.to_bytes()).unwrap();
        // From State's payload on: plain bytes both ways.
        let (mut s2, mut d2) = (source.try_clone().unwrap(), dest.try_clone().unwrap());
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut d2, &mut s2);
            let _ = s2.shutdown(std::net::Shutdown::Both);
        });
        let _ = std::io::copy(&mut &source, &mut &dest);
        let _ = dest.shutdown(std::net::Shutdown::Write);
        back.join().unwrap();
        kept
    })
}

/// A memfd created without MFD_ALLOW_SEALING holding `file`'s data (holes stay holes).
fn unsealable_copy(file: &File) -> File {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::FileExt;
    // SAFETY: a valid NUL-terminated name; the fd is checked and then owned.
    let fd = unsafe { libc::memfd_create(c"peer-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let copy = unsafe { File::from_raw_fd(fd) };
    let len = file.metadata().unwrap().len();
    copy.set_len(len).unwrap();
    let seek = |off: u64, whence| {
        // SAFETY: lseek on an fd we own has no memory effects.
        let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, whence) };
        u64::try_from(r).ok()
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while let Some(start) = seek(at, libc::SEEK_DATA).filter(|&s| s < len) {
        let end = seek(start, libc::SEEK_HOLE).unwrap_or(len).min(len);
        let mut off = start;
        while off < end {
            let n = buf.len().min((end - off) as usize);
            file.read_exact_at(&mut buf[..n], off).unwrap();
            copy.write_all_at(&buf[..n], off).unwrap();
            off += n as u64;
        }
        at = end;
    }
    copy
}

/// Local migration through the proxy; returns the destination (running) and the memfds.
fn migrate_through_proxy(
    dir: &TempDir,
    name: &str,
    unsealable: bool,
) -> (test_infra::VmmProcess, Vec<File>) {
    let src = boot_source(dir, name, "size=256M,shared=on", "");
    let mut dest = empty_vmm_with_serial(&format!("{name}-dest"), &src.serial);
    let (url, sock) = unix_url(dir, "mig.sock");
    let receiving = receive_in_background(&dest, &url, false);
    let proxy_sock = dir.join("proxy.sock");
    let proxy = memfd_proxy(&proxy_sock, sock, unsealable);
    send_over_unix(&src, &proxy_sock, r#","local":true"#);
    let (status, body) = receiving.join().unwrap();
    assert_eq!(status, 204, "{body}");
    let memfds = proxy.join().unwrap();
    assert!(!memfds.is_empty());
    let mut src = src;
    let exit = src.vmm.expect_exit(MIGRATION_TIMEOUT).unwrap();
    assert!(exit.success(), "{exit}");
    dest.serial().refresh().unwrap();
    let from = dest.serial().len();
    ticks(&mut dest, 2, from);
    (dest, memfds)
}

/// Our memfds are sealable and the destination seals them: the peer's shrink after
/// Complete is refused by the kernel, and the guest carries on.
#[test]
fn a_received_memfd_cannot_be_shrunk() {
    let dir = TempDir::new("hr-sealed").unwrap();
    let (mut dest, memfds) = migrate_through_proxy(&dir, "hr-sealed", false);
    for f in &memfds {
        let e = f.set_len(1 << 20).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    }
    dest.serial().refresh().unwrap();
    let from = dest.serial().len();
    let (_, after) = ticks(&mut dest, 3, from);
    assert!(after.iter().all(|t| t.errors == 0), "{after:?}");
}

/// A peer memfd that cannot be sealed is still used (with a warning); when the peer
/// shrinks it, the VM stops and the VMM exits non-zero saying what happened.
#[test]
fn an_unsealable_memfd_shrunk_is_a_failure_exit_naming_the_cause() {
    let dir = TempDir::new("hr-unsealed").unwrap();
    let (mut dest, memfds) = migrate_through_proxy(&dir, "hr-unsealed", true);
    assert!(
        dest.stderr().contains("cannot be sealed against shrinking"),
        "{}",
        dest.stderr()
    );
    for f in &memfds {
        f.set_len(1 << 20).unwrap();
    }
    let exit = dest.expect_exit(EXIT_TIMEOUT).unwrap();
    let stderr = dest.stderr();
    assert!(!exit.success(), "the VMM exited cleanly: {stderr}");
    assert!(
        stderr.contains("lost guest memory") && stderr.contains("truncated it"),
        "{stderr}"
    );
}
