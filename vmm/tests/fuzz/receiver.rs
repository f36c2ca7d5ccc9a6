//! The migration receiver's state machine (`vmm::migration::receive::receive`, the entry
//! point `vm.receive-migration` runs) driven over a real UNIX socket by arbitrary
//! sequences of well-formed and malformed requests: Start with any version, Config with
//! a valid, mutated or arbitrary JSON payload (a valid one builds a real KVM VM), Memory
//! with arbitrary range tables and less or more data than announced, MemoryFd with a
//! real memfd attached (or none), State, Complete, Abandon, raw headers with any command
//! and length, and garbage. The sender then closes its side. Every sequence ends in an
//! error or a VM, never a panic or a hang, and no allocation of the receiving thread
//! follows a length the sender merely announced.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fuzz_harness::proptest::prelude::*;
use fuzz_harness::{Peak, measure, report};
use serde_json::Value;
use vm_migration::memory::MemoryRange;
use vm_migration::protocol::{CURRENT_PROTOCOL_VERSION, Command, RequestHeader};
use vmm::config::migration_params::ReceiveParams;
use vmm::config::{ConsoleConfig, ConsoleOutputMode};
use vmm::memory_manager::GuestRamMapping;
use vmm::migration::config::VmMigrationConfig;
use vmm::migration::receive::{self, LocalDevices};
use vmm::migration::watch::Watch;
use vmm::net::MigrationUrl;

use crate::strategies;

const IDLE: Duration = Duration::from_secs(1);

const CAP: &str = "4 x bytes sent + 1 MiB";

fn cap(sent: usize) -> usize {
    4 * sent + (1 << 20)
}

/// Guest RAM of the valid Config: small, so building the VM costs little.
const RAM: u64 = 4 << 20;

fn off() -> ConsoleConfig {
    ConsoleConfig::mode(ConsoleOutputMode::Off)
}

fn valid_config() -> Value {
    let config = crate::strategies::vm_config(1, RAM, None);
    let mappings = [GuestRamMapping {
        slot: 0,
        gpa: 0,
        size: RAM,
        file_offset: 0,
    }];
    serde_json::to_value(VmMigrationConfig::new(&config, &mappings)).unwrap()
}

/// One thing the sender does.
#[derive(Clone, Debug)]
enum Msg {
    Start(u16),
    /// `None`: the valid Config; else one value replaced, or arbitrary JSON.
    Config(Option<(usize, Value)>, bool),
    /// Ranges (gpa, length), then `data` bytes of page data.
    Memory(Vec<(u64, u64)>, usize),
    /// With a memfd of this size for this slot, or (`None`) the header alone.
    MemoryFd(u32, Option<u64>),
    State(Value),
    Complete,
    CompletePaused,
    Abandon,
    /// Any command number and length, then `payload` bytes.
    Raw(u16, u64, Vec<u8>),
    Garbage(Vec<u8>),
}

fn msg() -> impl Strategy<Value = Msg> {
    let gpa = prop_oneof![0..RAM + 8192, any::<u64>(), Just(RAM - 4096)];
    let len = prop_oneof![0..16384u64, any::<u64>(), Just(4096u64)];
    prop_oneof![
        3 => prop_oneof![Just(CURRENT_PROTOCOL_VERSION), any::<u16>()].prop_map(Msg::Start),
        3 => (prop::option::of((any::<usize>(), strategies::json())), any::<bool>())
            .prop_map(|(m, raw)| Msg::Config(m, raw)),
        3 => (prop::collection::vec((gpa, len), 0..6), 0..20000usize)
            .prop_map(|(r, d)| Msg::Memory(r, d)),
        1 => (0..3u32, prop::option::of(prop_oneof![Just(RAM), 0..2 * RAM])).prop_map(|(s, f)| Msg::MemoryFd(s, f)),
        2 => strategies::json().prop_map(Msg::State),
        1 => Just(Msg::Complete),
        1 => Just(Msg::CompletePaused),
        1 => Just(Msg::Abandon),
        2 => (any::<u16>(), prop_oneof![0..64u64, any::<u64>()], prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(c, l, p)| Msg::Raw(c % 12, l, p)),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Msg::Garbage),
    ]
}

fn request(command: Command, payload: &[u8]) -> Vec<u8> {
    let mut out = RequestHeader::new(command, payload.len() as u64)
        .to_bytes()
        .to_vec();
    out.extend_from_slice(payload);
    out
}

fn memfd(size: u64) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: a valid C string; the fd is checked and then owned by the File.
    let fd = unsafe { libc::memfd_create(c"fuzz-recv".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0);
    // SAFETY: fresh fd, owned by nobody else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    file
}

/// Sends `msgs` and closes; returns the bytes sent. Stops at the first failed write
/// (the receiver hung up).
fn send(stream: &mut UnixStream, msgs: &[Msg], config: &Value) -> usize {
    let mut sent = 0;
    for m in msgs {
        let bytes = match m {
            Msg::Start(v) => RequestHeader::start_with_version(*v).to_bytes().to_vec(),
            Msg::Config(None, _) => request(Command::Config, &serde_json::to_vec(config).unwrap()),
            Msg::Config(Some((_, v)), true) => {
                request(Command::Config, &serde_json::to_vec(v).unwrap())
            }
            Msg::Config(Some((pick, v)), false) => {
                let mut tree = config.clone();
                strategies::replace_one(&mut tree, *pick, v.clone());
                request(Command::Config, &serde_json::to_vec(&tree).unwrap())
            }
            Msg::Memory(ranges, data) => {
                let table: Vec<u8> = ranges
                    .iter()
                    .flat_map(|&(g, l)| MemoryRange::new(g, l).to_bytes())
                    .collect();
                let mut out = request(Command::Memory, &table);
                out.resize(out.len() + data, 0xa5);
                out
            }
            Msg::MemoryFd(slot, Some(size)) => {
                if vm_migration::fd::send_memory_fd(stream, *slot, memfd(*size)).is_err() {
                    break;
                }
                sent += 20;
                continue;
            }
            Msg::MemoryFd(slot, None) => request(Command::MemoryFd, &slot.to_le_bytes()),
            Msg::State(v) => request(Command::State, &serde_json::to_vec(v).unwrap()),
            Msg::Complete => request(Command::Complete, &[]),
            Msg::CompletePaused => request(Command::CompletePaused, &[]),
            Msg::Abandon => request(Command::Abandon, &[]),
            Msg::Raw(c, l, p) => {
                let mut out = vec![0u8; 16];
                out[..2].copy_from_slice(&c.to_le_bytes());
                out[8..].copy_from_slice(&l.to_le_bytes());
                out.extend_from_slice(p);
                out
            }
            Msg::Garbage(g) => g.clone(),
        };
        if stream.write_all(&bytes).is_err() {
            break;
        }
        sent += bytes.len();
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    sent
}

static SOCKETS: AtomicU64 = AtomicU64::new(0);

/// One sequence against a fresh receive. Returns whether a VM arrived.
fn run_case(msgs: &[Msg], postcopy: bool, config: &Value, peak: &Peak) -> bool {
    let path = std::env::temp_dir().join(format!(
        "vmm-fuzz-recv-{}-{}.sock",
        std::process::id(),
        SOCKETS.fetch_add(1, Ordering::Relaxed)
    ));
    let url = MigrationUrl::Unix(path.clone());
    let params = ReceiveParams {
        url: url.clone(),
        postcopy,
        connect_timeout: Duration::from_secs(10),
        // The sender always closes its side; some sequences still end only at this
        // deadline (see docs/fuzzing.md), so it is short.
        idle_timeout: IDLE,
        max_connections: 2,
        page_timeout: Duration::from_secs(1),
    };
    let local = LocalDevices {
        serial: off(),
        console: off(),
    };
    let listener = receive::listen(&url).unwrap();
    let (events, _events_rx) = std::sync::mpsc::channel::<vmm::events::VmNotice>();
    let events = vmm::events::Notifier::new(events);
    let watch = Arc::new(Watch::new().unwrap());
    let sender = {
        let msgs = msgs.to_vec();
        let config = config.clone();
        std::thread::spawn(move || {
            let mut stream = UnixStream::connect(&path).unwrap();
            let sent = send(&mut stream, &msgs, &config);
            // Drain the responses until the receiver closes.
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink);
            sent
        })
    };
    let started = std::time::Instant::now();
    let (result, allocations) =
        measure(|| receive::receive(listener, &params, &local, events, watch));
    let elapsed = started.elapsed();
    let got_vm = match result {
        Ok((received, pending)) => {
            drop(received.vm);
            // Nothing started here: the sender is told so.
            let _ = pending.answer(false);
            true
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            if std::env::var_os("FUZZ_VERBOSE").is_some() {
                eprintln!("{msgs:?} -> {}", chain(&e));
            }
            false
        }
    };
    let sent = sender.join().unwrap();
    peak.note(&allocations);
    allocations.assert_within(cap(sent), "migration receiver");
    // Nothing waits past its deadline (the idle timeout, plus slack for a busy machine).
    assert!(
        elapsed < IDLE + Duration::from_secs(4),
        "the receive took {elapsed:?}"
    );
    got_vm
}

/// The valid sequence receives up to State (no KVM state of a real VM here, so State is
/// refused): the fuzzed sequences reach past Config into Memory and State.
#[test]
fn receiver_fuzz_valid_prefix_reaches_state() {
    let config = valid_config();
    let msgs = [
        Msg::Start(CURRENT_PROTOCOL_VERSION),
        Msg::Config(None, false),
        Msg::Memory(vec![(0, 4096), (RAM - 4096, 4096)], 8192),
        Msg::State(Value::Null),
    ];
    assert!(!run_case(&msgs, false, &config, &Peak::default()));
}

#[test]
fn fuzz_migration_receiver_sequences() {
    let peak = Peak::default();
    let config = valid_config();
    // Sequences mostly start as a sender would, so the later phases are reached.
    let sequence = (
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.6),
        prop::collection::vec(msg(), 0..8),
        prop::bool::weighted(0.2),
    );
    proptest!(fuzz_harness::config(60), |((start, configure, rest, postcopy) in sequence)| {
        let mut msgs = Vec::new();
        if start {
            msgs.push(Msg::Start(CURRENT_PROTOCOL_VERSION));
            if configure {
                msgs.push(Msg::Config(None, false));
            }
        }
        msgs.extend(rest);
        run_case(&msgs, postcopy, &config, &peak);
    });
    report("migration_receiver_sequences", peak.get(), CAP);
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}
