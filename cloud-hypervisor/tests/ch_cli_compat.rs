//! A Cloud Hypervisor command line works here: each option a migration user sets is
//! accepted and does what it says there (inherited API and event fds, `--log-file`, a
//! serial socket or pty, prefaulted or mergeable RAM, `max=` equal to `boot=`, toggles in
//! any case), or is refused with a message naming it. And the events: the same names,
//! order and property shapes as Cloud Hypervisor v54 for boot, pause, resume, snapshot,
//! restore, pre-copy and post-copy migration (the fixtures below are what its VMM wrote
//! for the same steps on the same guest, by hand; see docs/events.md).

mod common;

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};

use common::migration::*;
use common::*;
use test_infra::cli_compat::{check_sequence, inheritable, mapping_flags, read_ticks};
use test_infra::procfs::rss_kib;
use test_infra::{TempDir, VmmBuilder, VmmProcess};

/// Runs `cloud-hypervisor <args>` (relative paths land in its temp dir) and returns its
/// exit code and stderr once it exits, as a usage error must at once.
fn refused(args: &[&str]) -> (i32, String) {
    let mut vmm = VmmBuilder::new(bins())
        .tmp_prefix("cli-refused")
        .raw_args(args.iter().map(OsString::from))
        .spawn()
        .unwrap();
    let status = vmm.expect_exit(EXIT_TIMEOUT).unwrap();
    (status.code().unwrap_or(-1), vmm.stderr())
}

/// The test guest with exactly `args` after the kernel and cmdline, its API socket
/// `api.sock` and events `events.json` in the VMM's temp dir (its working directory),
/// so `VmmProcess` finds them. `serial` is the `--serial` value.
fn guest_with(name: &str, cpus: &str, memory: &str, serial: &str, extra: &[&str]) -> VmmProcess {
    let mut args: Vec<OsString> = vec![
        "--kernel".into(),
        test_infra::guest::elf_path().into(),
        "--cmdline".into(),
        guest_cmdline("").into(),
        "--cpus".into(),
        cpus.into(),
        "--memory".into(),
        memory.into(),
        "--serial".into(),
        serial.into(),
        "--api-socket".into(),
        "api.sock".into(),
        "--event-monitor".into(),
        "path=events.json".into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    let mut vmm = VmmBuilder::new(bins())
        .tmp_prefix(name)
        .raw_args(args)
        .spawn()
        .unwrap();
    vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
    vmm
}

/// A VMM runs as a Cloud Hypervisor orchestrator starts it: the API on a listening
/// socket it inherited, events into an inherited fd, log lines into `--log-file`.
#[test]
fn api_socket_and_event_monitor_from_inherited_fds() {
    let dir = TempDir::new("cli-fds").unwrap();
    let api_path = dir.join("orchestrator-api.sock");
    let listener = UnixListener::bind(&api_path).unwrap();
    let events_path = dir.join("events-by-fd.json");
    let events = File::create(&events_path).unwrap();
    inheritable(&listener).unwrap();
    inheritable(&events).unwrap();
    let log = dir.join("vmm.log");
    let mut vmm = guest_builder("cli-fds", 1, "")
        .no_api_socket()
        .no_event_monitor()
        .arg("--api-socket")
        .arg(format!("fd={}", listener.as_raw_fd()))
        .arg("--event-monitor")
        .arg(format!("fd={}", events.as_raw_fd()))
        .arg("--log-file")
        .arg(&log)
        .arg("-v")
        .spawn()
        .unwrap();
    drop((listener, events));
    let (boot_idx, _) = vmm.wait_boot(BOOT_TIMEOUT).unwrap();
    vmm.wait_ready(boot_idx + 1, READY_TIMEOUT).unwrap();

    // The API answers on the inherited socket.
    let api = |method, path| {
        api_client::api_command(&api_path, method, path, None, Some(EXIT_TIMEOUT)).unwrap()
    };
    let info = api("GET", "vm.info");
    assert_eq!(info.status, 200, "{}", info.body);
    assert!(info.body.contains("\"state\":\"Running\""), "{}", info.body);

    // Events went into the inherited fd, in Cloud Hypervisor's layout.
    let text = std::fs::read_to_string(&events_path).unwrap();
    let parsed: Vec<serde_json::Value> = text
        .trim()
        .split("\n\n")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let names: Vec<&str> = parsed.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(names, ["starting", "booting", "booted"], "{text}");

    // Log lines went to the file, not to stderr.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("INFO:cloud_hypervisor -- cloud-hypervisor"),
        "{logged}"
    );
    assert!(!vmm.stderr().contains("INFO:"), "{}", vmm.stderr());

    assert_eq!(api("PUT", "vmm.shutdown").status, 204);
    assert!(vmm.expect_exit(EXIT_TIMEOUT).unwrap().success());
    // The inherited socket belongs to whoever made it: its file stays.
    assert!(api_path.exists());
}

#[test]
fn inherited_fds_of_the_wrong_kind_are_refused() {
    let dir = TempDir::new("cli-bad-fds").unwrap();
    let file = File::create(dir.join("plain")).unwrap();
    let read_only = File::open(dir.join("plain")).unwrap();
    inheritable(&file).unwrap();
    inheritable(&read_only).unwrap();
    let (a, _b) = UnixStream::pair().unwrap();
    inheritable(&a).unwrap();
    let file_fd = file.as_raw_fd();
    for (args, message) in [
        (
            vec!["--api-socket".to_string(), format!("fd={file_fd}")],
            format!("error: --api-socket fd={file_fd}: fd {file_fd} is not a socket"),
        ),
        (
            vec!["--api-socket".to_string(), format!("fd={}", a.as_raw_fd())],
            format!("fd {} is not a listening socket", a.as_raw_fd()),
        ),
        (
            vec!["--api-socket".to_string(), "fd=987".to_string()],
            "error: --api-socket fd=987: fd 987 is not open in this process".to_string(),
        ),
        (
            vec![
                "--api-socket".to_string(),
                "api.sock".to_string(),
                "--event-monitor".to_string(),
                format!("fd={}", read_only.as_raw_fd()),
            ],
            format!("fd {} is not open for writing", read_only.as_raw_fd()),
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stderr) = refused(&args);
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(stderr.contains(&message), "{args:?}: {stderr}");
    }
}

/// Every Cloud Hypervisor key this VMM cannot honour fails at once, naming itself.
#[test]
fn unsupported_keys_are_refused_by_name() {
    for (option, value, message) in [
        (
            "--cpus",
            "boot=2,max=4",
            "--cpus: invalid value \"4\" for `max`: must equal `boot` (2): this VMM has no CPU \
             hotplug, so `max` above `boot` is not supported here",
        ),
        (
            "--cpus",
            "boot=1,topology=1:1:1:1",
            "--cpus: `topology` is not supported here",
        ),
        (
            "--cpus",
            "boot=1,max_phys_bits=46",
            "--cpus: `max_phys_bits` is not supported here",
        ),
        (
            "--memory",
            "size=256M,hotplug_size=1G",
            "--memory: `hotplug_size` is not supported here: there is no memory hotplug",
        ),
        (
            "--memory",
            "size=256M,hotplug_method=virtio-mem",
            "--memory: `hotplug_method` is not supported here",
        ),
        (
            "--memory",
            "size=256M,shared=on,mergeable=on",
            "cannot be combined with shared=on",
        ),
        (
            "--console",
            "tty",
            "--console: `tty` is not supported here: this VMM has no virtio-console device",
        ),
        ("--console", "pty", "--console: `pty` is not supported here"),
        // Not a Cloud Hypervisor key either: the plain unknown-key message.
        (
            "--memory",
            "size=256M,bogus=on",
            "--memory: unknown key `bogus` (accepted keys: size=, shared=, thp=, prefault=",
        ),
        (
            "--memory",
            "size=256M,prefault=maybe",
            "--memory: invalid value \"maybe\" for `prefault`: expected on, off, true or false",
        ),
    ] {
        let (code, stderr) = refused(&["--api-socket", "api.sock", option, value]);
        assert_eq!(code, 2, "{option} {value}: {stderr}");
        assert!(stderr.contains(message), "{option} {value}: {stderr}");
    }
}

/// `--serial socket=`: a client that connects gets the guest's output, including what
/// was printed before it came; a second client takes over from the first.
#[test]
fn serial_socket_gives_guest_output_to_a_client() {
    let vmm = guest_with(
        "cli-serial-sock",
        "boot=1",
        VM_MEMORY,
        "socket=serial.sock",
        &[],
    );
    let path = vmm.tmp_dir().join("serial.sock");
    let first = UnixStream::connect(&path).unwrap();
    first.set_read_timeout(Some(TICK_TIMEOUT)).unwrap();
    let (lines, ticks) = read_ticks(&first, 2, BOOT_TIMEOUT + READY_TIMEOUT).unwrap();
    assert!(
        lines.iter().any(|l| l.starts_with("TG boot")),
        "the output from before the client came was not replayed: {lines:?}"
    );
    assert!(ticks.iter().all(|t| t.errors == 0), "{ticks:?}");

    let second = UnixStream::connect(&path).unwrap();
    second.set_read_timeout(Some(TICK_TIMEOUT)).unwrap();
    let (_, later) = read_ticks(&second, 2, TICK_TIMEOUT * 2).unwrap();
    assert!(later[0].n > ticks[1].n, "{ticks:?} then {later:?}");
    // The first client was let go.
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut &first, &mut rest).unwrap();
    let info = vmm.vm_info().unwrap();
    assert_eq!(info["config"]["serial"]["mode"], "Socket", "{info}");
}

/// A migrated VM's serial socket is the destination's own choice: the sender's socket
/// path is never bound by the receiver.
#[test]
fn a_received_vm_does_not_take_the_senders_serial_socket() {
    let dir = TempDir::new("cli-serial-mig").unwrap();
    let src_socket = dir.join("source-serial.sock");
    let mut src = guest_with(
        "cli-serial-mig-src",
        "boot=1",
        VM_MEMORY,
        &format!("socket={}", src_socket.display()),
        &[],
    );
    let client = UnixStream::connect(&src_socket).unwrap();
    client.set_read_timeout(Some(TICK_TIMEOUT)).unwrap();
    read_ticks(&client, 1, BOOT_TIMEOUT + READY_TIMEOUT).unwrap();
    let serial = dir.join("dest-serial.log");
    let mut dest = empty_vmm_with_serial("cli-serial-mig-dest", &serial);
    let url = format!("unix:{}", dir.join("mig.sock").display());
    let receiver = receive_in_background(&dest, &url, false);
    let out = src
        .ch_remote(["send-migration", &format!("destination_url={url}")])
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let (status, body) = receiver.join().unwrap();
    assert_eq!(status, 204, "{body}");
    assert!(src.expect_exit(MIGRATION_TIMEOUT).unwrap().success());
    let info = dest.vm_info().unwrap();
    assert_eq!(info["config"]["serial"]["mode"], "File", "{info}");
    assert!(info["config"]["serial"].get("socket").is_none(), "{info}");
    // The source removed its socket on exit; nobody made it again.
    assert!(
        !src_socket.exists(),
        "the destination bound the sender's socket path"
    );
    dest.follow_serial(&serial);
    let (_, after) = ticks(&mut dest, 2, 0);
    assert!(after.iter().all(|t| t.errors == 0), "{after:?}");
}

/// `--serial pty`: the pty's path is in vm.info (`config.serial.file`, as Cloud
/// Hypervisor reports it) and carries the guest's output. The same VM checks `max=` equal
/// to `boot=` and toggles in any case.
#[test]
fn serial_pty_cpus_max_and_toggles() {
    let vmm = guest_with(
        "cli-serial-pty",
        "boot=2,max=2",
        "size=256M,shared=ON,thp=Off",
        "pty",
        &[],
    );
    let info = vmm.vm_info().unwrap();
    let config = &info["config"];
    assert_eq!(config["serial"]["mode"], "Pty", "{info}");
    let pty = config["serial"]["file"].as_str().unwrap().to_string();
    assert!(pty.starts_with("/dev/pts/"), "{info}");
    assert_eq!(config["cpus"]["max_vcpus"], 2, "{info}");
    assert_eq!(config["memory"]["shared"], true, "{info}");
    assert_eq!(config["memory"]["thp"], false, "{info}");

    let reader = File::open(&pty).unwrap();
    // The pty was opened non-blocking by nobody; a blocking read with the deadline in
    // read_ticks is bounded by the guest ticking every TICK_MS.
    let (lines, ticks) = read_ticks(reader, 3, BOOT_TIMEOUT + READY_TIMEOUT).unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("TG boot") && l.contains("cpus=2")),
        "{lines:?}"
    );
    assert!(ticks.iter().all(|t| t.errors == 0), "{ticks:?}");
}

/// `prefault=on` allocates all guest RAM at boot (RSS about the RAM size although the
/// guest touches 16 MiB); `mergeable=on` marks it for KSM (`mg` in smaps). The same VMM
/// without the options is the baseline.
#[test]
fn memory_prefault_and_mergeable() {
    const RAM_KIB: u64 = 256 << 10;
    let mut with = guest_with(
        "cli-mem-on",
        "boot=1",
        "size=256M,prefault=ON,mergeable=on",
        "file=serial.log",
        &[],
    );
    with.follow_serial(with.tmp_dir().join("serial.log"));
    let (boot, _) = with.wait_boot(BOOT_TIMEOUT).unwrap();
    with.wait_ready(boot + 1, READY_TIMEOUT).unwrap();
    let rss = rss_kib(with.pid()).unwrap();
    assert!(
        rss >= RAM_KIB,
        "prefault=on: RSS {rss} KiB < RAM {RAM_KIB} KiB"
    );
    let (flags, _) = mapping_flags(with.pid(), RAM_KIB)
        .unwrap()
        .expect("no guest RAM mapping");
    assert!(flags.iter().any(|f| f == "mg"), "mergeable=on: {flags:?}");
    drop(with);

    let mut without = guest_with("cli-mem-off", "boot=1", VM_MEMORY, "file=serial.log", &[]);
    without.follow_serial(without.tmp_dir().join("serial.log"));
    let (boot, _) = without.wait_boot(BOOT_TIMEOUT).unwrap();
    without.wait_ready(boot + 1, READY_TIMEOUT).unwrap();
    let rss = rss_kib(without.pid()).unwrap();
    assert!(rss < RAM_KIB / 2, "without prefault: RSS {rss} KiB");
    let (flags, _) = mapping_flags(without.pid(), RAM_KIB)
        .unwrap()
        .expect("no guest RAM mapping");
    assert!(!flags.iter().any(|f| f == "mg"), "{flags:?}");
}

/// `hugepages=on` needs huge pages reserved on the host. Without enough free ones it is
/// refused with the numbers and how to reserve them; with them, guest RAM is hugetlb.
#[test]
fn hugepages_use_host_huge_pages_or_say_what_is_missing() {
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .map(|t| t.trim().parse().unwrap_or(0))
            .unwrap_or(0);
    let needed = 128; // 256 MiB of 2 MiB pages
    if free < needed {
        let mut vmm = guest_builder("cli-huge", 1, "")
            .memory("size=256M,hugepages=on,hugepage_size=2M")
            .spawn()
            .unwrap();
        let status = vmm.expect_exit(EXIT_TIMEOUT).unwrap();
        assert_eq!(status.code(), Some(1));
        let stderr = vmm.stderr();
        assert!(
            stderr.contains(&format!(
                "hugepages=on needs {needed} free huge pages of 2048 KiB; this host has {free}"
            )) && stderr.contains("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"),
            "{stderr}"
        );
    } else {
        let (vmm, _) = {
            let mut vmm = guest_builder("cli-huge", 1, "")
                .memory("size=256M,hugepages=on,hugepage_size=2M")
                .spawn()
                .unwrap();
            vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
            let (boot, _) = vmm.wait_boot(BOOT_TIMEOUT).unwrap();
            let (ready, _) = vmm.wait_ready(boot + 1, READY_TIMEOUT).unwrap();
            (vmm, ready)
        };
        let (flags, page_kib) = mapping_flags(vmm.pid(), 256 << 10)
            .unwrap()
            .expect("no guest RAM");
        assert!(flags.iter().any(|f| f == "ht"), "{flags:?}");
        assert_eq!(page_kib, 2048);
    }
}

// ---- events --------------------------------------------------------------------------

/// What Cloud Hypervisor v54 (ae44c2971) wrote, by hand on the test guest, for:
/// boot, pause, resume, pause, snapshot, resume, shutdown-vmm.
const CH_BOOT_PAUSE_SNAPSHOT: &str = "
    vmm starting
    vm booting
    vm booted
    vm pausing
    vm paused
    vm resuming
    vm resumed
    vm pausing
    vm paused
    vm snapshotting
    vm snapshotted
    vm resuming
    vm resumed
    vm shutdown
    vm deleted
    vmm shutdown
";

/// A VMM started with only an API socket: restore (resume=true), then send a pre-copy
/// migration. Cloud Hypervisor numbered its two memory iterations 0 and 1.
const CH_RESTORE_PRECOPY: &str = "
    vmm starting
    vm restoring
    vm restored
    vm resuming
    vm resumed
    vm migration-started
    vm migration-memory-iteration+
    vm pausing
    vm paused
    vm snapshotting
    vm snapshotted
    vm migration-finished
    vm deleted
    vmm shutdown
";

/// Receive the pre-copy migration, then send a post-copy one.
const CH_RECEIVE_POSTCOPY: &str = "
    vmm starting
    vm migration-receive-ready
    vm migration-receive-started
    vm restoring
    vm restored
    vm resuming
    vm resumed
    vm migration-receive-finished
    vm migration-started
    vm pausing
    vm paused
    vm snapshotting
    vm snapshotted
    vm postcopy-migration-completed
    vm migration-finished
    vm deleted
    vmm shutdown
";

/// Receive the post-copy migration, then shutdown-vmm.
const CH_RECEIVE_SHUTDOWN: &str = "
    vmm starting
    vm migration-receive-ready
    vm migration-receive-started
    vm restoring
    vm restored
    vm resuming
    vm resumed
    vm migration-receive-finished
    vm shutdown
    vm deleted
    vmm shutdown
";

/// Events only this VMM emits (docs/events.md lists them); they do not clash with any of
/// Cloud Hypervisor's.
const OUR_EXTRAS: &[&str] = &["migration-postcopy-started", "restore-memory-complete"];
/// Events whose properties here are a superset of Cloud Hypervisor's `null`.
const OUR_PROPERTIES: &[&str] = &["migration-finished"];

fn check(vmm: &VmmProcess, fixture: &str, last: &str) {
    vmm.wait_event(last, EXIT_TIMEOUT).unwrap();
    if let Err(e) = check_sequence(&vmm.events(), fixture, OUR_EXTRAS, OUR_PROPERTIES) {
        panic!("events differ from Cloud Hypervisor's: {e}");
    }
}

fn wait_for_shutdown_event(vmm: &mut VmmProcess) {
    assert!(
        vmm.expect_exit(MIGRATION_TIMEOUT).unwrap().success(),
        "{}",
        vmm.stderr()
    );
}

#[test]
fn events_match_cloud_hypervisor_through_snapshot_restore_and_migrations() {
    let dir = TempDir::new("cli-events").unwrap();
    let serial = dir.join("serial.log");
    let snapshot = dir.join("snap");

    // A: boot, pause, resume, pause, snapshot, resume, shut down.
    let mut a = boot_source(&dir, "cli-events-a", VM_MEMORY, "rate=32").vmm;
    for action in ["pause", "resume", "pause"] {
        a.api_ok("PUT", &format!("vm.{action}"), None).unwrap();
    }
    std::fs::create_dir(&snapshot).unwrap();
    let body = format!(r#"{{"destination_url":"file://{}"}}"#, snapshot.display());
    a.api_ok("PUT", "vm.snapshot", Some(&body)).unwrap();
    a.api_ok("PUT", "vm.resume", None).unwrap();
    a.api_ok("PUT", "vmm.shutdown", None).unwrap();
    wait_for_shutdown_event(&mut a);
    check(&a, CH_BOOT_PAUSE_SNAPSHOT, "shutdown");

    // B: restore and resume, then pre-copy to C.
    let mut b = empty_vmm_with_serial("cli-events-b", &serial);
    let body = format!(
        r#"{{"source_url":"file://{}","resume":true}}"#,
        snapshot.display()
    );
    b.api_ok("PUT", "vm.restore", Some(&body)).unwrap();
    b.follow_serial(&serial);
    b.serial().refresh().unwrap();
    let from = b.serial().len();
    ticks(&mut b, 2, from);
    let mut c = empty_vmm_with_serial("cli-events-c", &serial);
    let url = format!("unix:{}", dir.join("pre.sock").display());
    let receiver = receive_in_background(&c, &url, false);
    let out = b
        .ch_remote(["send-migration", &format!("destination_url={url}")])
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let (status, body) = receiver.join().unwrap();
    assert_eq!(status, 204, "{body}");
    wait_for_shutdown_event(&mut b);
    check(&b, CH_RESTORE_PRECOPY, "shutdown");

    // C: post-copy to D.
    c.follow_serial(&serial);
    c.serial().refresh().unwrap();
    let from = c.serial().len();
    ticks(&mut c, 2, from);
    let mut d = empty_vmm_with_serial("cli-events-d", &serial);
    let url = format!("unix:{}", dir.join("post.sock").display());
    let receiver = receive_in_background(&d, &url, true);
    let out = c
        .ch_remote([
            "send-migration",
            &format!("destination_url={url},postcopy=on"),
        ])
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let (status, body) = receiver.join().unwrap();
    assert_eq!(status, 204, "{body}");
    wait_for_shutdown_event(&mut c);
    check(&c, CH_RECEIVE_POSTCOPY, "shutdown");

    // D: runs the guest, then shutdown-vmm.
    d.follow_serial(&serial);
    d.serial().refresh().unwrap();
    let from = d.serial().len();
    ticks(&mut d, 2, from);
    d.api_ok("PUT", "vmm.shutdown", None).unwrap();
    wait_for_shutdown_event(&mut d);
    check(&d, CH_RECEIVE_SHUTDOWN, "shutdown");
    let iterations: Vec<serde_json::Value> = b
        .events()
        .into_iter()
        .filter(|e| e["event"] == "migration-memory-iteration")
        .collect();
    assert!(!iterations.is_empty());
}
