//! The snapshot store against the real VMM and test guest (2 vCPUs, shared memory):
//! snapshots into `--store file://...` and eager restores from it carry on with the
//! same nonce and a clean verifier (plain uncompressed, zstd, encrypted zstd); a second
//! generation writes only the chunks that changed; keys are checked before connecting;
//! damaged chunks and manifests are refused before the VM runs; list, delete and gc.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::{daemon_bin, s};
use test_infra::daemon::DaemonProcess;
use test_infra::{Binaries, TempDir, Tick, VmmBuilder, VmmProcess};

const BOOT_TIMEOUT: Duration = Duration::from_secs(20);
const TICK_TIMEOUT: Duration = Duration::from_secs(5);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
const MEMORY: &str = "size=256M,shared=on";
/// `fill`: the guest writes its 16 MiB once, then only verifies, so a later snapshot
/// differs from the first only where the guest's own state (stacks, counters) changed.
const CMDLINE: &str = "mem=16M tick=100 mode=fill";

fn bins() -> Binaries {
    Binaries::locate().unwrap()
}

fn show(out: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run_daemon(args: &[&str]) -> Output {
    std::process::Command::new(daemon_bin())
        .args(args)
        .output()
        .unwrap()
}

fn url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

fn last_tick(serial: &Path) -> Tick {
    std::fs::read_to_string(serial)
        .unwrap()
        .lines()
        .filter_map(|l| Tick::parse(l).ok())
        .next_back()
        .expect("no tick line yet")
}

fn boot_source(dir: &TempDir, name: &str) -> VmmProcess {
    boot_source_with(dir, name, CMDLINE)
}

fn boot_source_with(dir: &TempDir, name: &str, cmdline: &str) -> VmmProcess {
    let mut vmm = VmmBuilder::new(bins())
        .tmp_prefix(name)
        .test_guest()
        .cmdline(cmdline)
        .cpus(2)
        .memory(MEMORY)
        .serial_file(dir.join("serial.log"))
        .spawn()
        .unwrap();
    vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
    let (boot_idx, boot) = vmm.wait_boot(BOOT_TIMEOUT).unwrap();
    assert_eq!(boot.cpus, 2, "{boot:?}");
    let (ready_idx, _) = vmm.wait_ready(boot_idx + 1, BOOT_TIMEOUT).unwrap();
    vmm.wait_ticks(2, ready_idx + 1, TICK_TIMEOUT).unwrap();
    vmm
}

/// What the daemon's `stored: {...}` log line says about a snapshot.
#[derive(Debug)]
struct Stored {
    snapshot: String,
    written_chunks: u64,
    existing_chunks: u64,
    written_bytes: u64,
    data_bytes: u64,
}

fn parse_stored(log: &str) -> Stored {
    let line = log
        .lines()
        .find_map(|l| l.split_once("stored: ").map(|(_, j)| j))
        .unwrap_or_else(|| panic!("no stored: line in\n{log}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"));
    Stored {
        snapshot: v["snapshot"].as_str().unwrap().to_string(),
        written_chunks: n("written_chunks"),
        existing_chunks: n("existing_chunks"),
        written_bytes: n("written_bytes"),
        data_bytes: n("data_bytes"),
    }
}

/// Snapshots the VM of `vmm` through `offload_daemon snapshot --store ... extra`; checks
/// the daemon and the source VMM exited cleanly. Returns the last tick before and what
/// the daemon stored.
fn snapshot_into(
    dir: &TempDir,
    vmm: &mut VmmProcess,
    store: &Path,
    extra: &[&str],
    tag: &str,
) -> (Tick, Stored) {
    let sock = dir.join(format!("snap-{tag}.sock"));
    let store_url = url(store);
    let mut args = vec![
        "snapshot",
        "--socket",
        s(&sock),
        "--store",
        &store_url,
        "--name",
        "vm1",
    ];
    args.extend_from_slice(extra);
    let mut daemon =
        DaemonProcess::spawn(daemon_bin(), &args, &dir.join(format!("snap-{tag}.log"))).unwrap();
    let listen_url = format!("unix:{}", sock.display());
    let listening =
        test_infra::migration::wait_listening(&listen_url, Duration::from_secs(10)).unwrap();
    assert!(listening, "the daemon never listened: {}", daemon.output());
    vmm.serial().refresh().unwrap();
    let before = last_tick(vmm.serial().path());
    let started = Instant::now();
    let out = vmm
        .ch_remote([
            "send-migration",
            &format!("destination_url=unix:{},local=on", sock.display()),
        ])
        .unwrap();
    assert!(out.status.success(), "send-migration: {}", show(&out));
    let status = daemon.wait_exit(MIGRATION_TIMEOUT).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "daemon: {status:?}\n{}",
        daemon.output()
    );
    eprintln!(
        "snapshot {tag} into the store: {:?}\n{}",
        started.elapsed(),
        daemon.output()
    );
    let exit = vmm.expect_exit(MIGRATION_TIMEOUT).unwrap();
    assert!(exit.success(), "the source VMM exited with {exit}");
    (before, parse_stored(&daemon.output()))
}

/// A VMM without a VM, its serial output going to `serial`.
fn empty_vmm(name: &str, serial: &Path) -> VmmProcess {
    let mut vmm = VmmBuilder::new(bins())
        .tmp_prefix(name)
        .serial_file(serial)
        .spawn()
        .unwrap();
    vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
    vmm
}

/// Restores `name` from `store` into a new VMM and checks the guest carries on from
/// `before` (same nonce, later tick, no verification errors). Returns the running VMM.
fn restore_and_check(
    dir: &TempDir,
    store: &Path,
    name: &str,
    extra: &[&str],
    before: &Tick,
    tag: &str,
) -> VmmProcess {
    let mut dest = empty_vmm(&format!("store-dest-{tag}"), &dir.join("serial.log"));
    let sock = dir.join(format!("restore-{tag}.sock"));
    let receiver = test_infra::migration::receive_status_in_background(
        &dest,
        &format!("unix:{}", sock.display()),
        false,
        MIGRATION_TIMEOUT,
    );
    let store_url = url(store);
    let mut args = vec![
        "restore",
        "--socket",
        s(&sock),
        "--store",
        &store_url,
        "--name",
        name,
        "--resume",
    ];
    args.extend_from_slice(extra);
    let started = Instant::now();
    let out = run_daemon(&args);
    assert!(out.status.success(), "restore: {}", show(&out));
    eprintln!("restore {tag} from the store: {:?}", started.elapsed());
    let (status, body) = receiver.join().unwrap();
    assert_eq!(status, 204, "receive-migration: {body}");
    assert_eq!(dest.vm_state().unwrap(), "Running");
    dest.follow_serial(dir.join("serial.log"));
    dest.serial().refresh().unwrap();
    let from = dest.serial().len();
    let (_, after) = dest.wait_ticks(3, from, TICK_TIMEOUT).unwrap();
    assert_eq!(
        after[0].nonce, before.nonce,
        "the guest rebooted: {after:?}"
    );
    assert!(after[0].n > before.n, "{before:?} -> {after:?}");
    for t in &after {
        assert_eq!(t.errors, 0, "{t:?}");
        assert!(t.verified > 0, "{t:?}");
    }
    dest
}

/// Runs `restore --store` against a plain listener standing in for the VMM; expects
/// failure with `needle` in its message and no connection.
fn expect_refused(dir: &TempDir, store: &Path, name: &str, extra: &[&str], needle: &str) {
    let sock = dir.join(format!("fake-{}.sock", needle.len()));
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).unwrap();
    listener.set_nonblocking(true).unwrap();
    let store_url = url(store);
    let mut args = vec![
        "restore",
        "--socket",
        s(&sock),
        "--store",
        &store_url,
        "--name",
        name,
        "--resume",
    ];
    args.extend_from_slice(extra);
    let out = run_daemon(&args);
    assert!(!out.status.success(), "restore accepted: {}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(needle),
        "expected {needle:?}: {}",
        show(&out)
    );
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("restore connected before refusing: {other:?}"),
    }
}

fn write_key(dir: &TempDir, name: &str, byte: u8) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{}\n", format!("{byte:02x}").repeat(32))).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn list_json(store: &Path) -> Vec<serde_json::Value> {
    let out = run_daemon(&["list", "--store", &url(store), "--json"]);
    assert!(out.status.success(), "list: {}", show(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Plain, uncompressed first generation; a second one (zstd) of the restored VM writes
/// only what changed; both restore; list, delete and gc.
#[test]
fn plain_generations_restore_and_share_chunks() {
    let dir = TempDir::new("store-plain").unwrap();
    let store = dir.join("store");
    // Only snapshot creates a store.
    let out = run_daemon(&["list", "--store", &url(&dir.join("nothing"))]);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("there is no store at"));
    assert!(!dir.join("nothing").exists());
    let mut src = boot_source(&dir, "store-plain-src");
    let (before1, gen1) = snapshot_into(&dir, &mut src, &store, &["--compress", "none"], "g1");
    assert_eq!(gen1.snapshot, "vm1@1");
    assert!(
        gen1.written_chunks > 0 && gen1.existing_chunks == 0,
        "{gen1:?}"
    );
    // Uncompressed: at least the data itself was written.
    assert!(gen1.written_bytes >= gen1.data_bytes, "{gen1:?}");

    // Store files are the owner's only.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&store), 0o700);
    assert_eq!(mode(&store.join("manifests/vm1@1")), 0o600);

    // A key for a plain snapshot is refused before connecting.
    let key = write_key(&dir, "key", 0x11);
    expect_refused(
        &dir,
        &store,
        "vm1",
        &["--key-file", s(&key)],
        "is not encrypted",
    );

    let mut vm = restore_and_check(&dir, &store, "vm1", &[], &before1, "g1");
    // Second generation of the restored VM: the guest only verified since, so most
    // chunks are already stored.
    let (before2, gen2) = snapshot_into(&dir, &mut vm, &store, &[], "g2");
    assert_eq!(gen2.snapshot, "vm1@2");
    eprintln!("generation 1: {gen1:?}\ngeneration 2: {gen2:?}");
    assert!(
        gen2.existing_chunks > gen2.written_chunks,
        "the second generation rewrote most chunks: {gen2:?}"
    );
    assert!(
        gen2.written_bytes * 2 < gen1.written_bytes,
        "{gen2:?} vs {gen1:?}"
    );

    let rows = list_json(&store);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["snapshot"], "vm1@1");
    assert_eq!(rows[1]["snapshot"], "vm1@2");
    assert_eq!(rows[1]["ram_bytes"], 256u64 << 20);
    assert!(rows[1]["shared_bytes"].as_u64().unwrap() > 0, "{rows:?}");
    let table = run_daemon(&["list", "--store", &url(&store)]);
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("vm1@2"),
        "{}",
        show(&table)
    );

    // The latest generation restores by default.
    vm = restore_and_check(&dir, &store, "vm1", &[], &before2, "g2");
    vm.kill().unwrap();

    // Delete generation 1; gc removes only the chunks generation 2 does not use; the
    // older generation is gone, the newer one still restores.
    let out = run_daemon(&["delete", "--store", &url(&store), "--name", "vm1@1"]);
    assert!(out.status.success(), "delete: {}", show(&out));
    let bytes_before = chunk_bytes(&store);
    let out = run_daemon(&["gc", "--store", &url(&store)]);
    assert!(out.status.success(), "gc: {}", show(&out));
    eprintln!("gc: {}", String::from_utf8_lossy(&out.stdout));
    // Exactly generation 1's own chunks went: what list called stored but not shared.
    let own = rows[0]["stored_bytes"].as_u64().unwrap() - rows[0]["shared_bytes"].as_u64().unwrap();
    assert!(own > 0, "{rows:?}");
    assert_eq!(bytes_before - chunk_bytes(&store), own);
    assert_eq!(list_json(&store).len(), 1);
    expect_refused(&dir, &store, "vm1@1", &[], "no generation vm1@1");
    let vm = restore_and_check(&dir, &store, "vm1@2", &[], &before2, "g2-after-gc");
    drop(vm);
}

/// How many chunk objects the store has (0 before the first).
fn chunk_files(store: &Path) -> usize {
    std::fs::read_dir(store.join("chunks")).map_or(0, |d| {
        d.filter_map(|e| e.ok())
            .map(|e| std::fs::read_dir(e.path()).map_or(0, |f| f.count()))
            .sum()
    })
}

/// Bytes of all chunk objects in the store.
fn chunk_bytes(store: &Path) -> u64 {
    let mut n = 0;
    for d in std::fs::read_dir(store.join("chunks")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            n += f.unwrap().metadata().unwrap().len();
        }
    }
    n
}

/// Encrypted zstd: restores with the key; no key, a wrong key, a damaged chunk and a
/// damaged manifest are each refused before the daemon connects.
#[test]
fn encrypted_snapshot_refuses_bad_keys_and_damage() {
    let dir = TempDir::new("store-enc").unwrap();
    let store = dir.join("store");
    let key = write_key(&dir, "key", 0x42);
    let mut src = boot_source(&dir, "store-enc-src");
    let (before, stored) = snapshot_into(&dir, &mut src, &store, &["--key-file", s(&key)], "enc");
    assert_eq!(stored.snapshot, "vm1@1");

    expect_refused(
        &dir,
        &store,
        "vm1",
        &[],
        "is encrypted: give its --key-file",
    );
    let wrong = write_key(&dir, "wrong", 0x43);
    expect_refused(&dir, &store, "vm1", &["--key-file", s(&wrong)], "wrong key");
    let open = write_key(&dir, "open", 0x42);
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    expect_refused(
        &dir,
        &store,
        "vm1",
        &["--key-file", s(&open)],
        "readable or writable by group or others",
    );

    // One flipped byte in the largest chunk (guest memory, not a blob).
    let damaged = dir.join("damaged-chunk");
    copy_dir(&store, &damaged);
    let chunk = largest_chunk(&damaged);
    flip(&chunk);
    expect_refused(
        &dir,
        &damaged,
        "vm1",
        &["--key-file", s(&key)],
        "authentication failed",
    );
    // The chunk gone.
    std::fs::remove_file(&chunk).unwrap();
    expect_refused(
        &dir,
        &damaged,
        "vm1",
        &["--key-file", s(&key)],
        "is missing",
    );

    // One flipped byte in the manifest's encrypted part; and the manifest cut short.
    let bad_manifest = dir.join("damaged-manifest");
    copy_dir(&store, &bad_manifest);
    let manifest = bad_manifest.join("manifests/vm1@1");
    flip(&manifest);
    expect_refused(
        &dir,
        &bad_manifest,
        "vm1",
        &["--key-file", s(&key)],
        "authentication failed (tampered)",
    );
    let bytes = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, &bytes[..bytes.len() - 20]).unwrap();
    expect_refused(
        &dir,
        &bad_manifest,
        "vm1",
        &["--key-file", s(&key)],
        "manifest",
    );

    let rows = list_json(&store);
    assert_eq!(rows[0]["encrypted"], true, "{rows:?}");
    let vm = restore_and_check(
        &dir,
        &store,
        "vm1",
        &["--key-file", s(&key)],
        &before,
        "enc",
    );
    drop(vm);
}

/// Plain zstd (the default) restores too, and a damaged plain chunk is refused.
#[test]
fn zstd_snapshot_restores_and_refuses_damage() {
    let dir = TempDir::new("store-zstd").unwrap();
    let store = dir.join("store");
    let mut src = boot_source(&dir, "store-zstd-src");
    let (before, stored) = snapshot_into(&dir, &mut src, &store, &[], "zstd");
    eprintln!("zstd: {stored:?}");

    let damaged = dir.join("damaged");
    copy_dir(&store, &damaged);
    flip(&largest_chunk(&damaged));
    expect_refused(&dir, &damaged, "vm1", &[], "chunk");
    let bad_manifest = dir.join("damaged-manifest");
    copy_dir(&store, &bad_manifest);
    flip(&bad_manifest.join("manifests/vm1@1"));
    expect_refused(&dir, &bad_manifest, "vm1", &[], "manifest");

    let vm = restore_and_check(&dir, &store, "vm1", &[], &before, "zstd");
    drop(vm);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

fn largest_chunk(store: &Path) -> std::path::PathBuf {
    let mut best = (0, None);
    for d in std::fs::read_dir(store.join("chunks")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            let f = f.unwrap();
            let len = f.metadata().unwrap().len();
            if len > best.0 {
                best = (len, Some(f.path()));
            }
        }
    }
    best.1.expect("no chunk in the store")
}

/// Flips one bit in the middle of `path`.
fn flip(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x08;
    std::fs::write(path, &bytes).unwrap();
}

// ---- on demand -------------------------------------------------------------------------

/// Starts `restore --store ... --ondemand` into a VMM receiving with postcopy=on;
/// returns the VMM (running) and the daemon (serving).
fn ondemand_restore(
    dir: &TempDir,
    store: &Path,
    extra: &[&str],
    tag: &str,
) -> (VmmProcess, DaemonProcess) {
    let dest = empty_vmm(&format!("store-od-{tag}"), &dir.join("serial.log"));
    let sock = dir.join(format!("od-{tag}.sock"));
    let receiver = test_infra::migration::receive_status_in_background(
        &dest,
        &format!("unix:{}", sock.display()),
        true,
        MIGRATION_TIMEOUT,
    );
    let store_url = url(store);
    let mut args = vec![
        "restore",
        "--socket",
        s(&sock),
        "--store",
        &store_url,
        "--name",
        "vm1",
        "--resume",
        "--ondemand",
    ];
    args.extend_from_slice(extra);
    let daemon =
        DaemonProcess::spawn(daemon_bin(), &args, &dir.join(format!("od-{tag}.log"))).unwrap();
    let (status, body) = receiver.join().unwrap();
    assert_eq!(
        status,
        204,
        "receive-migration: {body}\n{}",
        daemon.output()
    );
    (dest, daemon)
}

/// Encrypted zstd restored on demand: the guest runs at once, carries on with the same
/// nonce and no verification errors, and the daemon exits 0 once the VMM has every page.
/// A damaged chunk restored on demand stops the VM before the guest reads it.
#[test]
fn ondemand_restore_from_the_store() {
    let dir = TempDir::new("store-od").unwrap();
    let store = dir.join("store");
    let key = write_key(&dir, "key", 0x24);
    let mut src = boot_source(&dir, "store-od-src");
    let (before, _) = snapshot_into(&dir, &mut src, &store, &["--key-file", s(&key)], "od");

    // Key checks come before connecting, on demand too.
    expect_refused(&dir, &store, "vm1", &["--ondemand"], "is encrypted");

    let damaged = dir.join("damaged");
    copy_dir(&store, &damaged);
    flip(&largest_chunk(&damaged));

    let (mut dest, mut daemon) = ondemand_restore(&dir, &store, &["--key-file", s(&key)], "ok");
    assert_eq!(dest.vm_state().unwrap(), "Running");
    dest.follow_serial(dir.join("serial.log"));
    dest.serial().refresh().unwrap();
    let from = dest.serial().len();
    let (_, after) = dest.wait_ticks(2, from, TICK_TIMEOUT).unwrap();
    assert_eq!(
        after[0].nonce, before.nonce,
        "the guest rebooted: {after:?}"
    );
    assert!(after[0].n > before.n, "{before:?} -> {after:?}");
    let status = daemon.wait_exit(MIGRATION_TIMEOUT).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "daemon: {status:?}\n{}",
        daemon.output()
    );
    let from = dest.serial().len();
    let (_, later) = dest.wait_ticks(3, from, TICK_TIMEOUT).unwrap();
    for t in later.iter().chain(&after) {
        assert_eq!(t.errors, 0, "{t:?}");
    }
    dest.kill().unwrap();

    let serial = dir.join("serial.log");
    let len_before = std::fs::read_to_string(&serial).unwrap().len();
    let (mut dest, mut daemon) =
        ondemand_restore(&dir, &damaged, &["--key-file", s(&key)], "damaged");
    let exit = dest.expect_exit(MIGRATION_TIMEOUT).unwrap();
    assert!(!exit.success(), "the VMM ran on: {exit}");
    assert!(
        dest.stderr().contains("guest memory could not be restored"),
        "{}",
        dest.stderr()
    );
    let status = daemon.wait_exit(MIGRATION_TIMEOUT).unwrap();
    assert!(status.is_some_and(|s| !s.success()), "{}", daemon.output());
    assert!(
        daemon.output().contains("authentication failed"),
        "{}",
        daemon.output()
    );
    let log = std::fs::read_to_string(&serial).unwrap();
    assert!(
        !log[len_before..].contains("TG error"),
        "the guest read damaged memory: {}",
        &log[len_before..]
    );
}

/// The daemon dies (SIGKILL) while it writes chunks, after `Complete`: no generation
/// appears, the source VMM still has its VM (paused, since it cannot tell a dead daemon
/// from one that runs the VM: docs/live_migration.md) and resumes it, and gc reclaims
/// the chunks the dead snapshot wrote.
#[test]
fn daemon_killed_while_writing_leaves_no_generation() {
    let dir = TempDir::new("store-killed").unwrap();
    let store = dir.join("store");
    let key = write_key(&dir, "key", 0x33);
    let mut src = boot_source(&dir, "store-killed-src");
    let sock = dir.join("snap.sock");
    let store_url = url(&store);
    let mut daemon = DaemonProcess::spawn(
        daemon_bin(),
        [
            "snapshot",
            "--socket",
            s(&sock),
            "--store",
            &store_url,
            "--name",
            "vm1",
            "--key-file",
            s(&key),
            // Small chunks: the first appears early, long before the manifest.
            "--chunk-size",
            "1",
        ],
        &dir.join("killed.log"),
    )
    .unwrap();
    let listening = test_infra::migration::wait_listening(
        &format!("unix:{}", sock.display()),
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(listening, "{}", daemon.output());
    let out = src
        .ch_remote([
            "send-migration",
            &format!("destination_url=unix:{},local=on", sock.display()),
        ])
        .unwrap();
    assert!(out.status.success(), "send-migration: {}", show(&out));
    // The first memory chunk on disk (the config and state blobs come first): kill.
    let deadline = test_infra::wait::deadline(MIGRATION_TIMEOUT);
    let seen = test_infra::wait::poll_until(deadline, || {
        Ok::<_, ()>((chunk_files(&store) >= 3).then_some(()))
    })
    .unwrap();
    assert!(seen.is_some(), "no chunk appeared: {}", daemon.output());
    daemon.kill().unwrap();
    assert!(
        !store.join("manifests/vm1@1").exists(),
        "the snapshot completed before the kill: {}",
        daemon.output()
    );

    // The source VMM keeps its VM.
    let failed =
        test_infra::wait::poll_until(test_infra::wait::deadline(MIGRATION_TIMEOUT), || {
            let info = src.vm_info()?;
            Ok::<_, test_infra::Error>((info["migration"]["phase"] == "failed").then_some(info))
        })
        .unwrap();
    let info = failed.expect("the source never reported the migration as failed");
    eprintln!(
        "killed after {} chunk files; source VM {}\n{}",
        chunk_files(&store),
        info["state"],
        daemon.output()
    );
    if info["state"] == "Paused" {
        src.api_ok("PUT", "vm.resume", None).unwrap();
    }
    src.serial().refresh().unwrap();
    let from = src.serial().len();
    let (_, ticks) = src.wait_ticks(3, from, TICK_TIMEOUT).unwrap();
    for t in &ticks {
        assert_eq!(t.errors, 0, "{t:?}");
    }

    // No generation; gc reclaims the orphans and the dead lease.
    assert!(list_json(&store).is_empty());
    assert!(chunk_bytes(&store) > 0);
    let out = run_daemon(&["gc", "--store", &store_url]);
    assert!(out.status.success(), "gc: {}", show(&out));
    assert_eq!(chunk_bytes(&store), 0);
    assert_eq!(std::fs::read_dir(store.join("leases")).unwrap().count(), 0);
}

/// Signals our own child `pid`.
fn signal(pid: u32, sig: libc::c_int) {
    let pid = i32::try_from(pid).unwrap();
    // SAFETY: kill(2) has no memory effects; the pid is our unreaped child.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

fn lease_lines(store: &Path) -> usize {
    std::fs::read_dir(store.join("leases")).map_or(0, |d| {
        d.filter_map(|e| e.ok())
            .map(|e| std::fs::read_to_string(e.path()).map_or(0, |t| t.lines().count()))
            .sum()
    })
}

/// gc while a snapshot is in progress: generation 1 is deleted, so its chunks are
/// referenced by no manifest, and the next snapshot of the same (restored) guest finds
/// most of them already stored and relies on them. gc runs while that snapshot is
/// stopped half-way (SIGSTOP) and must keep every chunk its lease names; the snapshot
/// then completes and restores.
#[test]
fn gc_during_a_snapshot_keeps_what_it_needs() {
    let dir = TempDir::new("store-gc-race").unwrap();
    let store = dir.join("store");
    let store_url = url(&store);
    let mut src = boot_source(&dir, "store-gc-src");
    // Encrypted, so that (debug build) writing takes long enough to stop it half-way.
    let key = write_key(&dir, "key", 0x55);
    let k = ["--key-file", s(&key)];
    let (before1, _) = snapshot_into(&dir, &mut src, &store, &k, "g1");
    let mut vm = restore_and_check(&dir, &store, "vm1", &k, &before1, "g1");
    let out = run_daemon(&["delete", "--store", &store_url, "--name", "vm1@1"]);
    assert!(out.status.success(), "delete: {}", show(&out));

    let sock = dir.join("snap-g2.sock");
    let mut daemon = DaemonProcess::spawn(
        daemon_bin(),
        [
            "snapshot",
            "--socket",
            s(&sock),
            "--store",
            &store_url,
            "--name",
            "vm1",
            "--key-file",
            s(&key),
        ],
        &dir.join("g2.log"),
    )
    .unwrap();
    let listening = test_infra::migration::wait_listening(
        &format!("unix:{}", sock.display()),
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(listening, "{}", daemon.output());
    vm.serial().refresh().unwrap();
    let before2 = last_tick(vm.serial().path());
    let out = vm
        .ch_remote([
            "send-migration",
            &format!("destination_url=unix:{},local=on", sock.display()),
        ])
        .unwrap();
    assert!(out.status.success(), "send-migration: {}", show(&out));
    // Config, state and a few memory chunks recorded in the lease: stop it there.
    let deadline = test_infra::wait::deadline(MIGRATION_TIMEOUT);
    let seen = test_infra::wait::poll_until(deadline, || {
        Ok::<_, ()>((lease_lines(&store) >= 4).then_some(()))
    })
    .unwrap();
    assert!(seen.is_some(), "no lease: {}", daemon.output());
    signal(daemon.pid(), libc::SIGSTOP);
    assert!(
        !store.join("manifests/vm1@2").exists(),
        "{}",
        daemon.output()
    );

    // gc waits for the stopped snapshot if it holds gc.lock's shared side this instant.
    let mut gc = DaemonProcess::spawn(
        daemon_bin(),
        ["gc", "--store", &store_url],
        &dir.join("gc.log"),
    )
    .unwrap();
    if gc.wait_exit(Duration::from_secs(3)).unwrap().is_none() {
        signal(daemon.pid(), libc::SIGCONT);
    }
    let status = gc.wait_exit(MIGRATION_TIMEOUT).unwrap();
    assert!(status.is_some_and(|s| s.success()), "gc: {}", gc.output());
    eprintln!("gc during the snapshot: {}", gc.output());
    signal(daemon.pid(), libc::SIGCONT);

    let status = daemon.wait_exit(MIGRATION_TIMEOUT).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "daemon: {status:?}\n{}",
        daemon.output()
    );
    let stored = parse_stored(&daemon.output());
    assert_eq!(stored.snapshot, "vm1@2");
    assert!(stored.existing_chunks > 0, "{stored:?}");
    vm.expect_exit(MIGRATION_TIMEOUT).unwrap();
    // Every chunk generation 2 relied on survived gc.
    let vm = restore_and_check(&dir, &store, "vm1", &k, &before2, "g2");
    drop(vm);
}

/// The test guest with `compress=75` (three quarters of each page body one repeated
/// word): its memory compresses, zstd stores a fraction of it, and it restores with
/// every page verified.
#[test]
fn compressible_guest_compresses_and_restores() {
    let dir = TempDir::new("store-compress").unwrap();
    let store = dir.join("store");
    let mut src = boot_source_with(
        &dir,
        "store-compress-src",
        "mem=64M tick=100 mode=fill compress=75",
    );
    let (before, zstd) = snapshot_into(&dir, &mut src, &store, &[], "zstd");
    let ratio = zstd.data_bytes as f64 / zstd.written_bytes as f64;
    eprintln!("compress=75, zstd: {zstd:?}, ratio {ratio:.2}");
    assert!(ratio > 2.0, "{zstd:?}");
    let vm = restore_and_check(&dir, &store, "vm1", &[], &before, "zstd");
    drop(vm);
}
