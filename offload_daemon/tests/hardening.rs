//! The offload daemon against hostile files, hostile and silent peers, and other local
//! users (issue 13, classes 8-11): each test plays the attack against the real binary
//! and checks the refusal (a clear error, a non-zero exit, nothing harmed), with bounded
//! time and memory.
//!
//! Most tests need no VM: the snapshot directory is crafted here (the daemon's own
//! format, with a valid manifest), and the VMM is played by a hand-written peer that
//! speaks the migration protocol.

mod common;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{daemon_bin, s};
use test_infra::daemon::DaemonProcess;
use test_infra::hostile::{self, Measured};
use test_infra::{Binaries, TempDir, VmmBuilder};
use vm_migration::{ConnectionRole, Limits, MemoryRange, Request, Status};

const PAGE: u64 = 4096;
/// Every refusal here comes well within this; a hang is a failure, not a long wait.
const QUICK: Duration = Duration::from_secs(20);
const BOOT_TIMEOUT: Duration = Duration::from_secs(20);

fn daemon(args: &[&str]) -> Measured {
    hostile::run_measured(Command::new(daemon_bin()).args(args), QUICK).unwrap()
}

fn restore_args<'a>(sock: &'a Path, dir: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["restore", "--socket", s(sock), "--input-dir", s(dir)];
    args.extend_from_slice(extra);
    args
}

/// Asserts a finished daemon failed and said `needle`.
fn expect_failed(m: &Measured, needle: &str, what: &str) {
    assert!(!m.status.success(), "{what}: the daemon succeeded: {m:?}");
    assert!(
        m.stderr.contains(needle),
        "{what}: expected {needle:?} in: {}",
        m.stderr
    );
}

// ---- crafted snapshot directories ------------------------------------------------------

const CONFIG_FILE: &str = "migration_config.json";
const STATE_FILE: &str = "state.json";
const MANIFEST_FILE: &str = "manifest.json";

fn file_sum(bytes: &[u8]) -> serde_json::Value {
    serde_json::json!({"len": bytes.len(), "crc32": crc32fast::hash(bytes)})
}

/// Writes a daemon snapshot directory by hand: one slot of `size` bytes at gpa 0 holding
/// `data` (offset, bytes; page-aligned, sorted), everything else a hole, with its
/// `.sums` and a valid manifest.
fn craft(dir: &Path, size: u64, data: &[(u64, Vec<u8>)]) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({"memory_manager_data": {"guest_ram_mappings": [
        {"slot": 0, "gpa": 0, "size": size, "file_offset": 0}
    ]}})
    .to_string();
    let state = br#"{"crafted":true}"#;
    std::fs::write(dir.join(CONFIG_FILE), &config).unwrap();
    std::fs::write(dir.join(STATE_FILE), state).unwrap();
    let mem = std::fs::File::create(dir.join("memory-0")).unwrap();
    mem.set_len(size).unwrap();
    let mut pieces = Vec::new();
    for (offset, bytes) in data {
        mem.write_all_at(bytes, *offset).unwrap();
        pieces.extend(vmm::memsum::sum_pieces(*offset, bytes));
    }
    let sums = vmm::memsum::encode(&pieces).unwrap();
    std::fs::write(dir.join("memory-0.sums"), &sums).unwrap();
    write_manifest(dir, config.as_bytes(), state, size, &sums);
}

fn write_manifest(dir: &Path, config: &[u8], state: &[u8], size: u64, sums: &[u8]) {
    let manifest = serde_json::json!({
        "version": 3,
        "config": file_sum(config),
        "state": file_sum(state),
        "memory": [{"slot": 0, "size": size, "sums": file_sum(sums)}],
    });
    std::fs::write(dir.join(MANIFEST_FILE), manifest.to_string()).unwrap();
}

/// A listener standing in for the VMM that must never see a connection.
struct NoConnect(UnixListener);

impl NoConnect {
    fn bind(path: &Path) -> Self {
        let l = UnixListener::bind(path).unwrap();
        l.set_nonblocking(true).unwrap();
        NoConnect(l)
    }

    fn assert_untouched(&self, what: &str) {
        match self.0.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("{what}: the daemon connected before refusing: {other:?}"),
        }
    }
}

// ---- class 9: hostile files in the snapshot directory ----------------------------------

/// Symlinks and FIFOs in place of the directory's files are refused at once (no
/// blocking open, nothing followed), before the daemon connects to the VMM.
#[test]
fn symlinked_and_fifo_snapshot_files_are_refused_before_connecting() {
    let dir = TempDir::new("odh-files").unwrap();
    let good = dir.join("good");
    craft(&good, 1 << 20, &[(0, vec![7u8; 8192])]);
    // The files a symlink may point at: another user's secret, here a copy of the real one.
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    for name in [
        CONFIG_FILE,
        STATE_FILE,
        MANIFEST_FILE,
        "memory-0",
        "memory-0.sums",
    ] {
        for kind in ["symlink", "fifo"] {
            let case = dir.join(format!("{kind}-{name}"));
            test_infra::damage::copy_snapshot(&good, &case).unwrap();
            let needle = hostile::replace_with_special(kind, &case, name, &elsewhere).unwrap();
            // On demand, config and state are read before connecting, the rest beside
            // it (checked before State is sent, see daemon.rs): there the fake VMM's
            // silence ends the wait after --io-timeout.
            let early = name == CONFIG_FILE || name == STATE_FILE;
            let ondemand = ["--ondemand", "--io-timeout", "1"];
            let modes: &[&[&str]] = if early { &[&[], &ondemand] } else { &[&[]] };
            for mode in modes {
                let sock = dir.join("vmm.sock");
                let _ = std::fs::remove_file(&sock);
                let vmm = NoConnect::bind(&sock);
                let what = format!("{kind} {name} {mode:?}");
                let m = daemon(&restore_args(&sock, &case, mode));
                expect_failed(&m, needle, &what);
                assert!(m.stderr.contains(name), "{what}: {}", m.stderr);
                assert!(m.elapsed < Duration::from_secs(5), "{what}: {m:?}");
                vmm.assert_untouched(&what);
            }
        }
    }
}

/// A directory without manifest.json is refused unless the user says
/// `--allow-unverified`; with it, the daemon goes on (connects to the VMM).
#[test]
fn missing_manifest_needs_allow_unverified() {
    let dir = TempDir::new("odh-unverified").unwrap();
    let snap = dir.join("snap");
    craft(&snap, 1 << 20, &[(0, vec![7u8; 8192])]);
    std::fs::remove_file(snap.join(MANIFEST_FILE)).unwrap();
    // Damage it: without a manifest nothing can tell.
    test_infra::damage::flip_byte(&snap.join("memory-0"), 100, 1).unwrap();
    for mode in [&[][..], &["--ondemand", "--io-timeout", "1"][..]] {
        let sock = dir.join("vmm.sock");
        let _ = std::fs::remove_file(&sock);
        let vmm = NoConnect::bind(&sock);
        let m = daemon(&restore_args(&sock, &snap, mode));
        expect_failed(&m, "manifest.json is missing", "no flag");
        expect_failed(&m, "--allow-unverified", "no flag");
        if mode.is_empty() {
            vmm.assert_untouched("no flag");
        }
    }
    let sock = dir.join("vmm2.sock");
    let vmm = UnixListener::bind(&sock).unwrap();
    let args = restore_args(&sock, &snap, &["--allow-unverified"]);
    let mut d = DaemonProcess::spawn(daemon_bin(), &args, &dir.join("d.log")).unwrap();
    // The fake VMM hangs up at once: the daemon fails on Start, after connecting.
    drop(vmm.accept().unwrap());
    let st = d.wait_exit(QUICK).unwrap();
    assert!(st.is_some_and(|s| !s.success()), "{}", d.output());
    assert!(d.output().contains("cannot be verified"), "{}", d.output());
}

/// A 64 GiB sparse snapshot whose `.sums` file is 256 MiB of zeros, its manifest digest
/// updated to match: refused on the first record, with the daemon's peak RSS a few MiB
/// (before: the file read whole and decoded, about 640 MiB).
#[test]
fn huge_zero_sums_file_is_refused_with_bounded_memory() {
    let dir = TempDir::new("odh-sums").unwrap();
    let snap = dir.join("snap");
    let size = 64u64 << 30;
    craft(&snap, size, &[(0, vec![7u8; 8192])]);
    // The largest .sums a 64 GiB file may have: one record per page.
    let len = size / PAGE * 16;
    hostile::sparse_zeros(&snap.join("memory-0.sums"), len).unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut h = crc32fast::Hasher::new();
    for _ in 0..len / (1 << 20) {
        h.update(&zeros);
    }
    let sums = serde_json::json!({"len": len, "crc32": h.finalize()});
    let path = snap.join(MANIFEST_FILE);
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    manifest["memory"][0]["sums"] = sums;
    std::fs::write(&path, manifest.to_string()).unwrap();

    let sock = dir.join("vmm.sock");
    let vmm = NoConnect::bind(&sock);
    let m = daemon(&restore_args(&sock, &snap, &[]));
    eprintln!(
        "daemon refused a {len}-byte zero .sums in {:?}, peak RSS {} KiB",
        m.elapsed, m.peak_rss_kib
    );
    expect_failed(&m, "memory piece 0+0", "zero sums");
    vmm.assert_untouched("zero sums");
    assert!(
        m.peak_rss_kib < 32 << 10,
        "peak RSS {} KiB reading a zero .sums file",
        m.peak_rss_kib
    );
}

// ---- class 9: the socket path and the lock file -----------------------------------------

fn snapshot_args<'a>(sock: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec!["snapshot", "--socket", s(sock), "--output-dir", s(out)]
}

/// Only a stale UNIX socket is removed at `--socket`: a regular file, a symlink or a
/// socket somebody listens on is refused and left as it was.
#[test]
fn socket_path_that_is_not_a_stale_socket_is_left_alone() {
    let dir = TempDir::new("odh-socket").unwrap();
    let out = dir.join("out");

    let file = dir.join("precious");
    std::fs::write(&file, b"keep me").unwrap();
    let m = daemon(&snapshot_args(&file, &out));
    expect_failed(&m, "is not a socket: refusing to remove it", "regular file");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    let link = dir.join("link.sock");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    let m = daemon(&snapshot_args(&link, &out));
    expect_failed(&m, "is not a socket", "symlink");
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    // A live socket of another program (it holds no daemon lock).
    let live = dir.join("live.sock");
    let listener = UnixListener::bind(&live).unwrap();
    let m = daemon(&snapshot_args(&live, &out));
    expect_failed(&m, "something is listening", "live socket");
    UnixStream::connect(&live).expect("the other program's socket was taken over");
    drop(listener);
    assert!(!out.exists());
}

/// The lock file is never followed through a symlink (which would create or lock a file
/// anywhere), and a FIFO there does not block the daemon.
#[test]
fn symlinked_or_fifo_lock_file_is_refused() {
    let dir = TempDir::new("odh-lock").unwrap();
    let out = dir.join("out");
    let sock = dir.join("d.sock");
    let victim = dir.join("victim");
    std::os::unix::fs::symlink(&victim, dir.join("d.sock.lock")).unwrap();
    let m = daemon(&snapshot_args(&sock, &out));
    expect_failed(&m, "is a symbolic link", "symlinked lock");
    assert!(!victim.exists(), "the daemon created the symlink's target");

    let sock2 = dir.join("e.sock");
    hostile::mkfifo(&dir.join("e.sock.lock")).unwrap();
    let m = daemon(&snapshot_args(&sock2, &out));
    assert!(m.elapsed < Duration::from_secs(5), "{m:?}");
    expect_failed(&m, "cannot open lock file", "fifo lock");
    assert!(!sock2.exists());
}

// ---- the VMM side of a restore, played by hand -----------------------------------------

/// A hand-written receiver standing in for the VMM in `receive-migration`.
struct FakeVmm {
    listener: UnixListener,
}

/// The main connection after Config, with the memfd the daemon sent for slot 0.
struct Handshake {
    main: UnixStream,
    memfd: std::fs::File,
}

impl FakeVmm {
    fn bind(path: &Path) -> Self {
        FakeVmm {
            listener: UnixListener::bind(path).unwrap(),
        }
    }

    fn accept(&self) -> UnixStream {
        let (conn, _) = self.listener.accept().unwrap();
        // The test must not hang on a daemon that misbehaves.
        conn.set_read_timeout(Some(QUICK)).unwrap();
        conn
    }

    /// Answers Start, MemoryFd and Config; `answer_memory_fd: false` goes silent after
    /// reading the MemoryFd instead.
    fn handshake(&self, answer_memory_fd: bool) -> Handshake {
        let main = self.accept();
        let limits = Limits::default();
        let mut memfd = None;
        loop {
            let req = vm_migration::read_request(&mut &main, &limits).unwrap();
            match req {
                Request::Start { .. } => {}
                Request::MemoryFd => {
                    let (slot, file) = vm_migration::recv_memory_fd_payload(&main).unwrap();
                    assert_eq!(slot, 0);
                    memfd = Some(file);
                    if !answer_memory_fd {
                        return Handshake {
                            main,
                            memfd: memfd.unwrap(),
                        };
                    }
                }
                Request::Config(_) => {
                    vm_migration::send_response(&mut &main, Status::Ok, &[]).unwrap();
                    return Handshake {
                        main,
                        memfd: memfd.expect("Config before any MemoryFd"),
                    };
                }
                other => panic!("unexpected {:?}", other.command()),
            }
            vm_migration::send_response(&mut &main, Status::Ok, &[]).unwrap();
        }
    }

    /// On demand: accepts the fault connection, then answers State and Complete.
    fn complete_ondemand(&self, h: &Handshake) -> UnixStream {
        let mut fault = self.accept();
        assert_eq!(
            vm_migration::read_role(&mut fault).unwrap(),
            ConnectionRole::Fault
        );
        for expected in ["State", "Complete"] {
            let req = vm_migration::read_request(&mut &h.main, &Limits::default()).unwrap();
            let got = req.command().to_string();
            assert!(got.starts_with(expected), "{got}, expected {expected}");
            vm_migration::send_response(&mut &h.main, Status::Ok, &[]).unwrap();
        }
        fault
    }
}

fn page_fault(fault: &mut UnixStream, gpa: u64, len: u64) -> Status {
    vm_migration::page_fault::send_page_fault(fault, MemoryRange::new(gpa, len)).unwrap();
    let resp = vm_migration::read_response(fault).unwrap();
    assert_eq!(resp.length, 0);
    resp.status
}

fn read_page(memfd: &std::fs::File, page: u64) -> Vec<u8> {
    let mut buf = vec![0u8; PAGE as usize];
    memfd.read_exact_at(&mut buf, page * PAGE).unwrap();
    buf
}

// ---- class 10: unaligned page requests -------------------------------------------------

/// A hostile VMM asks for a range that starts mid-page and runs into a page the guest
/// already wrote. The daemon answers Error, writes nothing (the guest's page keeps every
/// byte), keeps serving aligned requests, and logs why.
#[test]
fn unaligned_page_fault_is_refused_and_guest_data_kept() {
    let dir = TempDir::new("odh-unaligned").unwrap();
    let snap = dir.join("snap");
    // Data in pages 0-1; pages 9-11 are holes in the snapshot.
    craft(&snap, 1 << 20, &[(0, vec![0x5a; 2 * PAGE as usize])]);
    let sock = dir.join("vmm.sock");
    let vmm = FakeVmm::bind(&sock);
    let args = restore_args(&sock, &snap, &["--resume", "--ondemand"]);
    let mut d = DaemonProcess::spawn(daemon_bin(), &args, &dir.join("d.log")).unwrap();
    let h = vmm.handshake(true);
    let mut fault = vmm.complete_ondemand(&h);

    // The guest touches page 10 (a hole: the daemon gives it a zero page), then writes it.
    assert_eq!(page_fault(&mut fault, 10 * PAGE, PAGE), Status::Ok);
    let guest = vec![0xab; PAGE as usize];
    h.memfd.write_all_at(&guest, 10 * PAGE).unwrap();

    for (gpa, len) in [
        (9 * PAGE + 2048, PAGE),
        (10 * PAGE + 2048, 2048),
        (11 * PAGE - 1, 1),
        (9 * PAGE, PAGE + 100),
    ] {
        assert_eq!(
            page_fault(&mut fault, gpa, len),
            Status::Error,
            "{gpa:#x}+{len}"
        );
        assert_eq!(
            read_page(&h.memfd, 10),
            guest,
            "{gpa:#x}+{len} wrote page 10"
        );
    }
    // Aligned requests are still served: the data page and the hole next to page 10.
    assert_eq!(page_fault(&mut fault, 0, PAGE), Status::Ok);
    assert_eq!(read_page(&h.memfd, 0), vec![0x5a; PAGE as usize]);
    assert_eq!(page_fault(&mut fault, 9 * PAGE, PAGE), Status::Ok);
    assert_eq!(read_page(&h.memfd, 10), guest);
    drop(fault);
    let st = d.wait_exit(QUICK).unwrap();
    assert!(st.is_some_and(|s| s.success()), "{}", d.output());
    assert!(
        d.output().contains("requests must be whole"),
        "{}",
        d.output()
    );
}

// ---- class 11: peers that go silent -----------------------------------------------------

/// The VMM stops answering mid-restore (after reading the memory fd): the daemon gives
/// up after `--io-timeout` with a message naming the step, and exits non-zero.
#[test]
fn silent_vmm_ends_an_eager_restore_after_the_io_timeout() {
    let dir = TempDir::new("odh-silent").unwrap();
    let snap = dir.join("snap");
    craft(&snap, 1 << 20, &[(0, vec![1u8; 8192])]);
    let sock = dir.join("vmm.sock");
    let vmm = FakeVmm::bind(&sock);
    let started = Instant::now();
    let args = restore_args(&sock, &snap, &["--io-timeout", "1"]);
    let mut d = DaemonProcess::spawn(daemon_bin(), &args, &dir.join("d.log")).unwrap();
    let _silent = vmm.handshake(false);
    let st = d.wait_exit(QUICK).unwrap();
    let took = started.elapsed();
    assert!(st.is_some_and(|s| !s.success()), "{st:?}: {}", d.output());
    assert!(
        d.output()
            .contains("did not answer the MemoryFd command within 1 s"),
        "{}",
        d.output()
    );
    eprintln!("silent VMM: the daemon gave up after {took:?}");
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(10));
}

/// On demand, a VMM that goes quiet between page requests is served when it asks again;
/// one that stops in the middle of a request ends the restore after `--io-timeout`.
#[test]
fn silent_vmm_ends_an_ondemand_restore_after_the_io_timeout() {
    let dir = TempDir::new("odh-silent-od").unwrap();
    let snap = dir.join("snap");
    craft(&snap, 1 << 20, &[(0, vec![1u8; 8192])]);
    let sock = dir.join("vmm.sock");
    let vmm = FakeVmm::bind(&sock);
    let args = restore_args(&sock, &snap, &["--ondemand", "--io-timeout", "1"]);
    let mut d = DaemonProcess::spawn(daemon_bin(), &args, &dir.join("d.log")).unwrap();
    let h = vmm.handshake(true);
    let mut fault = vmm.complete_ondemand(&h);

    // A VMM that asks for nothing for longer than --io-timeout is not dead (a paused or
    // idle guest): the daemon keeps serving it.
    let idle = d.wait_exit(Duration::from_secs(3)).unwrap();
    assert!(idle.is_none(), "{idle:?}: {}", d.output());
    assert_eq!(
        page_fault(&mut fault, 0, PAGE),
        Status::Ok,
        "{}",
        d.output()
    );

    // One that stops in the middle of a request is.
    let mut header = Vec::new();
    vm_migration::page_fault::send_page_fault(&mut header, MemoryRange::new(0, PAGE)).unwrap();
    fault.write_all(&header[..header.len() / 2]).unwrap();
    let started = Instant::now();
    let st = d.wait_exit(QUICK).unwrap();
    assert!(st.is_some_and(|s| !s.success()), "{st:?}: {}", d.output());
    assert!(
        d.output().contains("in the middle of a page request"),
        "{}",
        d.output()
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A sender that connects to `snapshot`, sends Start and goes silent: the daemon gives
/// up after `--io-timeout`, leaves no snapshot, and the socket is free for the next
/// daemon at once.
#[test]
fn silent_sender_ends_a_snapshot_and_the_socket_stays_usable() {
    let dir = TempDir::new("odh-silent-snap").unwrap();
    let sock = dir.join("d.sock");
    let out = dir.join("out");
    let mut args = snapshot_args(&sock, &out);
    args.extend(["--io-timeout", "1"]);
    let mut d = DaemonProcess::spawn(daemon_bin(), &args, &dir.join("d.log")).unwrap();
    let url = format!("unix:{}", sock.display());
    assert!(test_infra::migration::wait_listening(&url, QUICK).unwrap());
    let mut conn = UnixStream::connect(&sock).unwrap();
    conn.set_read_timeout(Some(QUICK)).unwrap();
    vm_migration::send_request(&mut conn, &vm_migration::RequestHeader::start(), &[]).unwrap();
    vm_migration::expect_ok(&mut conn).unwrap();
    let st = d.wait_exit(QUICK).unwrap();
    assert!(st.is_some_and(|s| !s.success()), "{st:?}: {}", d.output());
    assert!(d.output().contains("sent nothing"), "{}", d.output());
    assert!(!out.exists());

    let mut next = DaemonProcess::spawn(
        daemon_bin(),
        snapshot_args(&sock, &out),
        &dir.join("next.log"),
    )
    .unwrap();
    assert!(test_infra::migration::wait_listening(&url, QUICK).unwrap());
    assert_eq!(next.try_status().unwrap(), None, "{}", next.output());
    drop(conn);
}

// ---- class 8: other local users ---------------------------------------------------------

/// A snapshot through the daemon is readable by its owner only: the directory 0700,
/// every file 0600 (the lock file too).
#[test]
fn daemon_snapshot_is_private() {
    let dir = TempDir::new("odh-private").unwrap();
    let mut src = VmmBuilder::new(Binaries::locate().unwrap())
        .tmp_prefix("odh-private-src")
        .test_guest()
        .cmdline("mem=4M tick=100")
        .memory("size=128M,shared=on")
        .serial_file(dir.join("serial.log"))
        .spawn()
        .unwrap();
    src.wait_api_ready(BOOT_TIMEOUT).unwrap();
    let (boot, _) = src.wait_boot(BOOT_TIMEOUT).unwrap();
    src.wait_ready(boot + 1, BOOT_TIMEOUT).unwrap();
    let sock = dir.join("snap.sock");
    let snap = dir.join("snap");
    let mut d = DaemonProcess::spawn(
        daemon_bin(),
        snapshot_args(&sock, &snap),
        &dir.join("d.log"),
    )
    .unwrap();
    let url = format!("unix:{}", sock.display());
    assert!(test_infra::migration::wait_listening(&url, QUICK).unwrap());
    let lock_mode = hostile::mode(&dir.join("snap.sock.lock")).unwrap();
    let out = src
        .ch_remote(["send-migration", &format!("destination_url={url},local=on")])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let st = d.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(st.is_some_and(|s| s.success()), "{}", d.output());

    assert_eq!(hostile::mode(&snap).unwrap(), 0o700);
    let mut names: Vec<PathBuf> = std::fs::read_dir(&snap)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    assert_eq!(names.len(), 5, "{names:?}");
    for f in &names {
        assert_eq!(hostile::mode(f).unwrap(), 0o600, "{}", f.display());
    }
    assert_eq!(lock_mode, 0o600);
    assert_eq!(
        hostile::group_or_world_accessible(&snap).unwrap(),
        vec![],
        "guest RAM readable by other users"
    );
}
