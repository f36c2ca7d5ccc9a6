//! Input generators shared by the targets: bytes split at arbitrary points, and JSON
//! values and option strings built from the words the decoders know, so the fuzzer
//! reaches past the first syntax check.

use fuzz_harness::proptest::prelude::*;
use serde_json::Value;

/// `bytes` cut into pieces at arbitrary points (as a socket may deliver them).
pub fn split(bytes: Vec<u8>, cuts: Vec<usize>) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
    points.sort_unstable();
    let mut pieces = Vec::new();
    let mut start = 0;
    for p in points {
        pieces.push(bytes[start..p].to_vec());
        start = p;
    }
    pieces.push(bytes[start..].to_vec());
    pieces
}

/// Field names of the API bodies, migration Config and state tree, and option keys.
pub const WORDS: &[&str] = &[
    "destination_url",
    "source_url",
    "receiver_url",
    "memory_restore_mode",
    "resume",
    "prefault",
    "local",
    "preserve_source",
    "downtime_ms",
    "timeout_s",
    "timeout_strategy",
    "connections",
    "tls_dir",
    "memory_mode",
    "postcopy",
    "vm_config",
    "cpus",
    "boot_vcpus",
    "max_vcpus",
    "memory",
    "size",
    "shared",
    "thp",
    "payload",
    "kernel",
    "cmdline",
    "initramfs",
    "serial",
    "console",
    "file",
    "mode",
    "memory_manager_data",
    "guest_ram_mappings",
    "slot",
    "gpa",
    "file_offset",
    "zone_id",
    "virtio_mem",
    "format_version",
    "components",
    "data_ranges",
    "confirm_complete",
    "in_buffer",
    "line_status",
    "boot",
    "path",
    "max_connections",
    "request_timeout_s",
    "reply_timeout_s",
    "off",
    "tty",
    "null",
    "pty",
    "socket",
    "fd",
    "max",
    "prefault",
    "mergeable",
    "hugepages",
    "hugepage_size",
    "reserve",
    "hotplug_size",
    "topology",
];

/// Values the decoders treat specially.
pub const VALUES: &[&str] = &[
    "file:///tmp/x",
    "file://",
    "file:///",
    "unix:/tmp/s",
    "unix:",
    "tcp:127.0.0.1:6000",
    "tcp:[::1]:1",
    "tcp:host:99999",
    "on",
    "off",
    "true",
    "false",
    "copy",
    "ondemand",
    "Precopy",
    "Postcopy",
    "cancel",
    "ignore",
    "Null",
    "Off",
    "File",
    "Tty",
    "mem0",
    "serial",
    "kvm-vm",
    "vcpu-0",
    "postcopy",
    "0",
    "1",
    "4096",
    "18446744073709551615",
    "18446744073709551616",
    "-1",
    "1G",
    "1T",
    "16E",
    "",
];

fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(WORDS).prop_map(str::to_string),
        prop::sample::select(VALUES).prop_map(str::to_string),
        "[a-z_]{0,12}",
        any::<String>().prop_map(|s| s.chars().take(24).collect()),
    ]
}

const EDGE_NUMBERS: &[u64] = &[0, 1, 4096, u32::MAX as u64, u64::MAX];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(EDGE_NUMBERS).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        word().prop_map(Value::String),
    ]
}

/// JSON trees whose keys are mostly the decoders' own field names.
pub fn json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(6, 96, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((word(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// `key=value,key,...` strings from the option keys and values, with quotes and
/// brackets thrown in.
pub fn option_string() -> impl Strategy<Value = String> {
    let item = prop_oneof![
        (word(), word()).prop_map(|(k, v)| format!("{k}={v}")),
        word(),
        (word(), word()).prop_map(|(k, v)| format!("{k}=\"{v}\"")),
        (word(), word(), word()).prop_map(|(k, a, b)| format!("{k}=[{a},{b}]")),
        prop::sample::select(&["\"", "[", "]", ",", "=", "==", "[[", "]]"][..])
            .prop_map(str::to_string),
    ];
    prop::collection::vec(item, 0..8).prop_map(|items| items.join(","))
}

/// Replaces the value at a pseudo-random position of `tree` with `with` (a valid
/// payload with one value swapped, so a decoder gets past its syntax into its checks).
pub fn replace_one(tree: &mut Value, mut pick: usize, with: Value) {
    fn count(v: &Value) -> usize {
        1 + match v {
            Value::Array(a) => a.iter().map(count).sum(),
            Value::Object(o) => o.values().map(count).sum(),
            _ => 0,
        }
    }
    fn walk(v: &mut Value, pick: &mut usize, with: &mut Option<Value>) {
        if *pick == 0 {
            if let Some(w) = with.take() {
                *v = w;
            }
            return;
        }
        *pick -= 1;
        match v {
            Value::Array(a) => a.iter_mut().for_each(|c| walk(c, pick, with)),
            Value::Object(o) => o.values_mut().for_each(|c| walk(c, pick, with)),
            _ => {}
        }
    }
    pick %= count(tree);
    walk(tree, &mut pick, &mut Some(with));
}

/// A VM configuration without devices or kernel: what a valid Config payload describes
/// in the targets that need one.
pub fn vm_config(vcpus: u8, size: u64, cmdline: Option<&str>) -> vmm::config::VmConfig {
    use vmm::config::{
        ConsoleConfig, ConsoleOutputMode, CpusConfig, MemoryConfig, PayloadConfig, VmConfig,
    };
    let off = ConsoleConfig::mode(ConsoleOutputMode::Off);
    VmConfig {
        cpus: CpusConfig {
            boot_vcpus: vcpus,
            max_vcpus: vcpus,
        },
        memory: MemoryConfig {
            shared: true,
            ..MemoryConfig::with_size(size)
        },
        payload: PayloadConfig {
            kernel: None,
            cmdline: cmdline.map(str::to_string),
            initramfs: None,
        },
        serial: off.clone(),
        console: off,
    }
}
