//! The `key=value,key=value` option parser shared by the CLI and ch-remote.
//!
//! Each option group (`--cpus`, `--memory`, ...) declares its keys once in a `&[Key]`
//! table; [`Options::parse`] splits the string (honouring `"..."` and `[...]`), rejects
//! unknown and duplicate keys, and the typed getters convert values while keeping the
//! conversion error as the `source`. The `parse_*` functions below turn each group into
//! its `VmConfig` piece.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::vm_config::{
    ConsoleConfig, ConsoleOutputMode, CpusConfig, MemoryConfig, MemoryRestoreMode, PayloadConfig,
    RestoreConfig, VmConfig,
};

/// Whether a key carries a value (`size=1G`) or is a bare word (`off`), or is a Cloud
/// Hypervisor key this VMM refuses (with the reason), so that a command line written for
/// Cloud Hypervisor fails with "not supported here" instead of "unknown key".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Value,
    Flag,
    Unsupported(&'static str),
}

/// One accepted key of an option group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    pub name: &'static str,
    pub kind: KeyKind,
}

/// A key that takes a value: `name=value`.
pub const fn value(name: &'static str) -> Key {
    Key {
        name,
        kind: KeyKind::Value,
    }
}

/// A bare-word key: `name`.
pub const fn flag(name: &'static str) -> Key {
    Key {
        name,
        kind: KeyKind::Flag,
    }
}

/// A Cloud Hypervisor key that this VMM refuses, and why (completes "not supported here: ").
pub const fn unsupported(name: &'static str, why: &'static str) -> Key {
    Key {
        name,
        kind: KeyKind::Unsupported(why),
    }
}

/// Boxed so that any conversion error (ints, sizes, toggles, range checks) can be kept.
pub type ValueSource = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("--{group}: unknown key `{key}` (accepted keys: {accepted})")]
    UnknownKey {
        group: &'static str,
        key: String,
        accepted: String,
    },
    #[error("--{group}: `{key}` is not supported here: {why}")]
    Unsupported {
        group: &'static str,
        key: String,
        why: String,
    },
    #[error("--{group}: key `{key}` is given more than once")]
    DuplicateKey { group: &'static str, key: String },
    #[error("--{group}: key `{key}` needs a value (`{key}=...`)")]
    MissingValue { group: &'static str, key: String },
    #[error("--{group}: key `{key}` takes no value")]
    UnexpectedValue { group: &'static str, key: String },
    #[error("--{group}: required key `{key}` is missing")]
    MissingKey {
        group: &'static str,
        key: &'static str,
    },
    #[error("--{group}: keys {keys} cannot be combined")]
    Conflict { group: &'static str, keys: String },
    #[error("--{group}: one of {keys} is required")]
    NoneOf { group: &'static str, keys: String },
    #[error("--{group}: empty option in {input:?}")]
    EmptyOption { group: &'static str, input: String },
    #[error("--{group}: unbalanced {what} in {input:?}")]
    Unbalanced {
        group: &'static str,
        what: &'static str,
        input: String,
    },
    #[error("--{group}: invalid value {value:?} for `{key}`")]
    InvalidValue {
        group: &'static str,
        key: &'static str,
        value: String,
        #[source]
        source: ValueSource,
    },
}

/// Splits `input` at the commas that are outside `"..."` and `[...]`. Quotes are removed,
/// brackets are kept (a list value such as `[0,2]` is parsed by its own converter).
pub fn split_options(group: &'static str, input: &str) -> Result<Vec<String>, OptionsError> {
    let unbalanced = |what| OptionsError::Unbalanced {
        group,
        what,
        input: input.to_string(),
    };
    let mut items = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    let mut depth = 0usize;
    for c in input.chars() {
        match c {
            '"' => in_quotes = !in_quotes,
            '[' if !in_quotes => {
                depth += 1;
                current.push(c);
            }
            ']' if !in_quotes => {
                depth = depth.checked_sub(1).ok_or_else(|| unbalanced("brackets"))?;
                current.push(c);
            }
            ',' if !in_quotes && depth == 0 => items.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    if in_quotes {
        return Err(unbalanced("quotes"));
    }
    if depth != 0 {
        return Err(unbalanced("brackets"));
    }
    items.push(current);
    Ok(items)
}

/// The parsed keys of one option group. Values are stored raw; getters convert them.
#[derive(Debug)]
pub struct Options {
    group: &'static str,
    keys: &'static [Key],
    values: BTreeMap<&'static str, Option<String>>,
}

impl Options {
    /// Parses `input` against the keys `keys` of the option group `--group`.
    pub fn parse(
        group: &'static str,
        keys: &'static [Key],
        input: &str,
    ) -> Result<Self, OptionsError> {
        let mut values = BTreeMap::new();
        for item in split_options(group, input)? {
            if item.is_empty() {
                return Err(OptionsError::EmptyOption {
                    group,
                    input: input.to_string(),
                });
            }
            let (name, val) = match item.split_once('=') {
                Some((name, val)) => (name, Some(val.to_string())),
                None => (item.as_str(), None),
            };
            let key =
                keys.iter()
                    .find(|k| k.name == name)
                    .ok_or_else(|| OptionsError::UnknownKey {
                        group,
                        key: name.to_string(),
                        accepted: accepted_list(keys),
                    })?;
            match (key.kind, &val) {
                (KeyKind::Unsupported(why), _) => {
                    return Err(OptionsError::Unsupported {
                        group,
                        key: name.to_string(),
                        why: why.to_string(),
                    });
                }
                (KeyKind::Value, None) => {
                    return Err(OptionsError::MissingValue {
                        group,
                        key: name.to_string(),
                    });
                }
                (KeyKind::Flag, Some(_)) => {
                    return Err(OptionsError::UnexpectedValue {
                        group,
                        key: name.to_string(),
                    });
                }
                _ => {}
            }
            if values.insert(key.name, val).is_some() {
                return Err(OptionsError::DuplicateKey {
                    group,
                    key: name.to_string(),
                });
            }
        }
        Ok(Options {
            group,
            keys,
            values,
        })
    }

    /// Whether `key` was given.
    pub fn is_set(&self, key: &'static str) -> bool {
        self.debug_check(key);
        self.values.contains_key(key)
    }

    /// The raw value of `key`, if it was given with one.
    pub fn get(&self, key: &'static str) -> Option<&str> {
        self.debug_check(key);
        self.values.get(key).and_then(|v| v.as_deref())
    }

    /// Converts `key` with `FromStr`, keeping the conversion error as the source.
    pub fn convert<T>(&self, key: &'static str) -> Result<Option<T>, OptionsError>
    where
        T: FromStr,
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        self.get(key)
            .map(|raw| {
                raw.parse::<T>()
                    .map_err(|e| self.invalid(key, raw, Box::new(e)))
            })
            .transpose()
    }

    /// Like [`Options::convert`], for a key that must be present.
    pub fn required<T>(&self, key: &'static str) -> Result<T, OptionsError>
    where
        T: FromStr,
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        self.convert(key)?.ok_or(OptionsError::MissingKey {
            group: self.group,
            key,
        })
    }

    /// An `InvalidValue` error for `key` (for checks after conversion, e.g. ranges).
    pub fn invalid(&self, key: &'static str, raw: &str, source: ValueSource) -> OptionsError {
        OptionsError::InvalidValue {
            group: self.group,
            key,
            value: raw.to_string(),
            source,
        }
    }

    /// Of the `candidates`, the single one that was given: `None` if none was, an error
    /// if several were.
    pub fn exclusive(
        &self,
        candidates: &[&'static str],
    ) -> Result<Option<&'static str>, OptionsError> {
        let given: Vec<&'static str> = candidates
            .iter()
            .copied()
            .filter(|k| self.is_set(k))
            .collect();
        match given.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one)),
            _ => Err(OptionsError::Conflict {
                group: self.group,
                keys: quoted_list(&given),
            }),
        }
    }

    /// Asking for a key the group never declared is a programming error, not bad input.
    fn debug_check(&self, key: &str) {
        debug_assert!(
            self.keys.iter().any(|k| k.name == key),
            "--{}: key `{key}` is not declared",
            self.group
        );
    }
}

fn accepted_list(keys: &[Key]) -> String {
    keys.iter()
        .filter_map(|k| match k.kind {
            KeyKind::Value => Some(format!("{}=", k.name)),
            KeyKind::Flag => Some(k.name.to_string()),
            KeyKind::Unsupported(_) => None,
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn quoted_list(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A size in bytes written as `4096`, `2K`, `512M`, `1G` or `1T` (binary multiples).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ByteSizeError {
    #[error("expected a number with an optional K, M, G or T suffix")]
    Syntax,
    #[error("the size does not fit in 64 bits")]
    Overflow,
}

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (digits, shift) = match s.as_bytes().last() {
            Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
            Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
            Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
            Some(b'T' | b't') => (&s[..s.len() - 1], 40),
            _ => (s, 0),
        };
        // `u64::from_str` accepts a leading `+`; sizes are plain digits only.
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ByteSizeError::Syntax);
        }
        let n: u64 = digits.parse().map_err(|_| ByteSizeError::Overflow)?;
        n.checked_mul(1u64 << shift)
            .map(ByteSize)
            .ok_or(ByteSizeError::Overflow)
    }
}

/// A boolean written `on|off|true|false`, in any case (`ON`, `Off`, `True`), and an empty
/// value meaning off: Cloud Hypervisor's toggles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Toggle(pub bool);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("expected on, off, true or false")]
pub struct ToggleError;

impl FromStr for Toggle {
    type Err = ToggleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "on" | "true" => Ok(Toggle(true)),
            "off" | "false" | "" => Ok(Toggle(false)),
            _ => Err(ToggleError),
        }
    }
}

/// A non-empty filesystem path (`PathBuf::from_str` would accept an empty string).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NonEmptyPath(pub PathBuf);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the path is empty")]
pub struct EmptyPathError;

impl FromStr for NonEmptyPath {
    type Err = EmptyPathError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            Err(EmptyPathError)
        } else {
            Ok(NonEmptyPath(PathBuf::from(s)))
        }
    }
}

/// Checks applied after a value converted fine.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValueError {
    #[error("must be between {min} and {max}")]
    OutOfRange { min: u64, max: u64 },
    #[error("must be a non-zero multiple of 4 KiB")]
    NotPageMultiple,
    #[error(
        "must equal `boot` ({boot}): this VMM has no CPU hotplug, so `max` above `boot` is not supported here"
    )]
    MaxAboveBoot { boot: u8 },
    #[error("must not be below `boot` ({boot})")]
    MaxBelowBoot { boot: u8 },
    #[error("must be a power of two of at least 4 KiB")]
    NotPowerOfTwo,
    #[error("needs hugepages=on")]
    NeedsHugepages,
    #[error("cannot be combined with shared=on (KSM merges only private memory)")]
    MergeableShared,
    #[error("is not a file descriptor number")]
    NotAnFd,
}

/// The most vCPUs a VM may have for now (the MP table and APIC setup assume a small VM).
pub const MAX_VCPUS: u8 = 32;
/// Guest RAM is mapped in whole pages.
pub const PAGE_SIZE: u64 = 4096;
/// `--memory` without `size=`: 512 MiB, as Cloud Hypervisor.
pub const DEFAULT_MEMORY_SIZE: u64 = 512 << 20;

const CPUS_KEYS: &[Key] = &[
    value("boot"),
    value("max"),
    unsupported("topology", "the guest sees one core per vCPU"),
    unsupported("kvm_hyperv", "there is no Hyper-V enlightenment"),
    unsupported(
        "max_phys_bits",
        "the guest gets the host's physical address width",
    ),
    unsupported("affinity", "vCPU threads are not pinned"),
    unsupported("features", "there are no optional CPU features"),
    unsupported(
        "nested",
        "nested virtualization is not offered to the guest",
    ),
    unsupported(
        "core_scheduling",
        "vCPU threads share no core scheduling cookie",
    ),
    unsupported("profile", "the guest gets the host's CPUID"),
];
const MEMORY_KEYS: &[Key] = &[
    value("size"),
    value("shared"),
    value("thp"),
    value("prefault"),
    value("mergeable"),
    value("hugepages"),
    value("hugepage_size"),
    value("reserve"),
    unsupported("file", "guest RAM is never backed by a user-given file"),
    unsupported("hotplug_method", "there is no memory hotplug"),
    unsupported("hotplug_size", "there is no memory hotplug"),
    unsupported("hotplugged_size", "there is no memory hotplug"),
];
const SERIAL_KEYS: &[Key] = &[
    flag("off"),
    flag("tty"),
    flag("null"),
    flag("pty"),
    value("file"),
    value("socket"),
];
const NO_CONSOLE: &str = "this VMM has no virtio-console device (the guest's console is the \
                          COM1 serial port: use --serial)";
const CONSOLE_KEYS: &[Key] = &[
    flag("off"),
    unsupported("tty", NO_CONSOLE),
    unsupported("null", NO_CONSOLE),
    unsupported("pty", NO_CONSOLE),
    unsupported("file", NO_CONSOLE),
    unsupported("socket", NO_CONSOLE),
    unsupported("iommu", NO_CONSOLE),
    unsupported("id", NO_CONSOLE),
    unsupported("pci_segment", NO_CONSOLE),
    unsupported("pci_device_id", NO_CONSOLE),
];
const EVENT_MONITOR_KEYS: &[Key] = &[value("path"), value("fd")];
const API_SOCKET_KEYS: &[Key] = &[
    value("path"),
    value("fd"),
    value("max_connections"),
    value("request_timeout_s"),
    value("reply_timeout_s"),
];
const RESTORE_KEYS: &[Key] = &[
    value("source_url"),
    value("memory_restore_mode"),
    value("resume"),
    value("prefault"),
];

/// `source_url=file:///dir[,memory_restore_mode=copy|ondemand][,resume=on][,prefault=on]`,
/// for `cloud-hypervisor --restore` and `ch-remote restore`.
pub fn parse_restore(input: &str) -> Result<RestoreConfig, OptionsError> {
    let opts = Options::parse("restore", RESTORE_KEYS, input)?;
    let source_url: String = opts.required("source_url")?;
    Ok(RestoreConfig {
        source_url,
        memory_restore_mode: opts
            .convert::<MemoryRestoreMode>("memory_restore_mode")?
            .unwrap_or_default(),
        resume: opts.convert::<Toggle>("resume")?.is_some_and(|t| t.0),
        prefault: opts.convert::<Toggle>("prefault")?.is_some_and(|t| t.0),
        ..RestoreConfig::default()
    })
}

/// `--cpus boot=N[,max=N]`: N vCPUs at boot, and as many at most. `max` means what it
/// means in Cloud Hypervisor, but without CPU hotplug it can only equal `boot`.
pub fn parse_cpus(input: &str) -> Result<CpusConfig, OptionsError> {
    let opts = Options::parse("cpus", CPUS_KEYS, input)?;
    let boot: u8 = opts.convert("boot")?.unwrap_or(1);
    if !(1..=MAX_VCPUS).contains(&boot) {
        return Err(opts.invalid(
            "boot",
            opts.get("boot").unwrap_or_default(),
            Box::new(ValueError::OutOfRange {
                min: 1,
                max: MAX_VCPUS.into(),
            }),
        ));
    }
    if let Some(raw) = opts.get("max") {
        // Any number is parsed first, so `max=64` says "no hotplug", not "too large".
        let max: u64 = opts.required("max")?;
        let problem = match max.cmp(&u64::from(boot)) {
            std::cmp::Ordering::Greater => Some(ValueError::MaxAboveBoot { boot }),
            std::cmp::Ordering::Less => Some(ValueError::MaxBelowBoot { boot }),
            std::cmp::Ordering::Equal => None,
        };
        if let Some(problem) = problem {
            return Err(opts.invalid("max", raw, Box::new(problem)));
        }
    }
    Ok(CpusConfig {
        boot_vcpus: boot,
        max_vcpus: boot,
    })
}

/// `--memory size=<n>[K|M|G][,shared=on][,thp=on][,prefault=on][,mergeable=on]
/// [,hugepages=on[,hugepage_size=<n>]][,reserve=on]` (Cloud Hypervisor's keys; the
/// hotplug keys and `file` are refused).
pub fn parse_memory(input: &str) -> Result<MemoryConfig, OptionsError> {
    let opts = Options::parse("memory", MEMORY_KEYS, input)?;
    let size = opts
        .convert::<ByteSize>("size")?
        .map_or(DEFAULT_MEMORY_SIZE, |s| s.0);
    if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
        return Err(opts.invalid(
            "size",
            opts.get("size").unwrap_or_default(),
            Box::new(ValueError::NotPageMultiple),
        ));
    }
    let toggle = |key| -> Result<bool, OptionsError> {
        Ok(opts.convert::<Toggle>(key)?.is_some_and(|t| t.0))
    };
    let config = MemoryConfig {
        size,
        shared: toggle("shared")?,
        thp: toggle("thp")?,
        prefault: toggle("prefault")?,
        mergeable: toggle("mergeable")?,
        hugepages: toggle("hugepages")?,
        hugepage_size: opts.convert::<ByteSize>("hugepage_size")?.map(|s| s.0),
        reserve: toggle("reserve")?,
    };
    let raw = |key| opts.get(key).unwrap_or_default();
    if let Some(page) = config.hugepage_size {
        if !config.hugepages {
            let e = ValueError::NeedsHugepages;
            return Err(opts.invalid("hugepage_size", raw("hugepage_size"), Box::new(e)));
        }
        if !page.is_power_of_two() || page < PAGE_SIZE {
            let e = ValueError::NotPowerOfTwo;
            return Err(opts.invalid("hugepage_size", raw("hugepage_size"), Box::new(e)));
        }
    }
    if config.mergeable && config.shared {
        let e = ValueError::MergeableShared;
        return Err(opts.invalid("mergeable", raw("mergeable"), Box::new(e)));
    }
    Ok(config)
}

/// `--serial off|null|tty|pty|file=<path>|socket=<path>`.
pub fn parse_serial(input: &str) -> Result<ConsoleConfig, OptionsError> {
    let group = "serial";
    let opts = Options::parse(group, SERIAL_KEYS, input)?;
    let modes = ["off", "tty", "null", "pty", "file", "socket"];
    let mode = opts.exclusive(&modes)?.ok_or(OptionsError::NoneOf {
        group,
        keys: quoted_list(&modes),
    })?;
    Ok(match mode {
        "tty" => ConsoleConfig::mode(ConsoleOutputMode::Tty),
        "null" => ConsoleConfig::mode(ConsoleOutputMode::Null),
        "pty" => ConsoleConfig::mode(ConsoleOutputMode::Pty),
        "file" => ConsoleConfig {
            file: Some(opts.required::<NonEmptyPath>("file")?.0),
            ..ConsoleConfig::mode(ConsoleOutputMode::File)
        },
        "socket" => ConsoleConfig {
            socket: Some(opts.required::<NonEmptyPath>("socket")?.0),
            ..ConsoleConfig::mode(ConsoleOutputMode::Socket)
        },
        _ => ConsoleConfig::mode(ConsoleOutputMode::Off),
    })
}

/// `--console off`: there is no virtio-console device, so every Cloud Hypervisor mode
/// that would create one is refused by name.
pub fn parse_console(input: &str) -> Result<ConsoleConfig, OptionsError> {
    let group = "console";
    let opts = Options::parse(group, CONSOLE_KEYS, input)?;
    opts.exclusive(&["off"])?.ok_or(OptionsError::NoneOf {
        group,
        keys: quoted_list(&["off"]),
    })?;
    Ok(ConsoleConfig::mode(ConsoleOutputMode::Off))
}

/// A file descriptor number the VMM inherited (`fd=N`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdNumber(pub i32);

impl FromStr for FdNumber {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ValueError::NotAnFd);
        }
        s.parse().map(FdNumber).map_err(|_| ValueError::NotAnFd)
    }
}

/// A file the VMM opens by path, or one it inherited open as `fd=N`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathOrFd {
    Path(PathBuf),
    Fd(i32),
}

/// `path=` or `fd=`, exactly one of them.
fn path_or_fd(opts: &Options, group: &'static str) -> Result<PathOrFd, OptionsError> {
    match opts.exclusive(&["path", "fd"])? {
        Some("fd") => Ok(PathOrFd::Fd(opts.required::<FdNumber>("fd")?.0)),
        Some(_) => Ok(PathOrFd::Path(opts.required::<NonEmptyPath>("path")?.0)),
        None => Err(OptionsError::NoneOf {
            group,
            keys: quoted_list(&["path", "fd"]),
        }),
    }
}

/// Where `--event-monitor` writes its events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventMonitorConfig {
    pub target: PathOrFd,
}

/// `--event-monitor path=<file>` (truncated, as Cloud Hypervisor does) or `fd=<n>`.
pub fn parse_event_monitor(input: &str) -> Result<EventMonitorConfig, OptionsError> {
    let opts = Options::parse("event-monitor", EVENT_MONITOR_KEYS, input)?;
    Ok(EventMonitorConfig {
        target: path_or_fd(&opts, "event-monitor")?,
    })
}

/// What protects the REST API from slow, idle or too many clients (see `docs/api.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiLimits {
    /// Connections served at once, counting requests still waiting for the control loop;
    /// one more is answered 503 and closed.
    pub max_connections: usize,
    /// The whole request (head and body) must arrive within this, however the client
    /// paces its bytes; else 408.
    pub request_timeout: Duration,
    /// How long a request waits for the control loop's answer before 504 (snapshot,
    /// restore and receive-migration wait as long as they take).
    pub reply_timeout: Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            max_connections: 32,
            request_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(30),
        }
    }
}

/// The largest `max_connections`: each connection may have a thread.
pub const MAX_API_CONNECTIONS: u64 = 1024;
/// The longest `request_timeout_s` / `reply_timeout_s`: a day.
pub const MAX_API_TIMEOUT_S: u64 = 86_400;

/// `--api-socket` parsed: the socket (a path to bind, or an inherited listening socket)
/// and the server's limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiSocketConfig {
    pub socket: PathOrFd,
    pub limits: ApiLimits,
}

/// `--api-socket <path>`, or `--api-socket path=<path>|fd=<n>[,max_connections=N]
/// [,request_timeout_s=S][,reply_timeout_s=S]` (Cloud Hypervisor accepts the first three
/// forms; `fd=` is a listening UNIX socket the VMM inherited).
pub fn parse_api_socket(input: &str) -> Result<ApiSocketConfig, OptionsError> {
    // A bare path may itself contain `=` or `,`; only the `key=` forms go to the parser
    // (so `fd=3` is an inherited socket, not a file named "fd=3").
    if !(input.starts_with("path=") || input.starts_with("fd=")) {
        let path =
            input
                .parse::<NonEmptyPath>()
                .map(|p| p.0)
                .map_err(|e| OptionsError::InvalidValue {
                    group: "api-socket",
                    key: "path",
                    value: input.to_string(),
                    source: Box::new(e),
                })?;
        return Ok(ApiSocketConfig {
            socket: PathOrFd::Path(path),
            limits: ApiLimits::default(),
        });
    }
    let opts = Options::parse("api-socket", API_SOCKET_KEYS, input)?;
    let defaults = ApiLimits::default();
    let ranged = |key: &'static str, max: u64| -> Result<Option<u64>, OptionsError> {
        let value = opts.convert::<u64>(key)?;
        match value {
            Some(v) if !(1..=max).contains(&v) => Err(opts.invalid(
                key,
                opts.get(key).unwrap_or_default(),
                Box::new(ValueError::OutOfRange { min: 1, max }),
            )),
            _ => Ok(value),
        }
    };
    let seconds = |key, default: Duration| {
        ranged(key, MAX_API_TIMEOUT_S).map(|v| v.map_or(default, Duration::from_secs))
    };
    let max_connections = match ranged("max_connections", MAX_API_CONNECTIONS)? {
        // In range, so it fits.
        Some(n) => usize::try_from(n).unwrap_or(defaults.max_connections),
        None => defaults.max_connections,
    };
    Ok(ApiSocketConfig {
        socket: path_or_fd(&opts, "api-socket")?,
        limits: ApiLimits {
            max_connections,
            request_timeout: seconds("request_timeout_s", defaults.request_timeout)?,
            reply_timeout: seconds("reply_timeout_s", defaults.reply_timeout)?,
        },
    })
}

/// The raw CLI strings a `VmConfig` is built from.
#[derive(Clone, Debug, Default)]
pub struct VmParams<'a> {
    pub kernel: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub initramfs: Option<PathBuf>,
    pub cpus: &'a str,
    pub memory: &'a str,
    pub serial: &'a str,
    pub console: &'a str,
}

impl VmParams<'_> {
    /// Parses every option group into a `VmConfig`.
    pub fn parse(&self) -> Result<VmConfig, OptionsError> {
        Ok(VmConfig {
            cpus: parse_cpus(self.cpus)?,
            memory: parse_memory(self.memory)?,
            payload: PayloadConfig {
                kernel: self.kernel.clone(),
                cmdline: self.cmdline.clone(),
                initramfs: self.initramfs.clone(),
            },
            serial: parse_serial(self.serial)?,
            console: parse_console(self.console)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    const TEST_KEYS: &[Key] = &[value("a"), value("list"), value("p"), flag("f")];

    fn source_string(e: &OptionsError) -> String {
        e.source().map(|s| s.to_string()).unwrap_or_default()
    }

    #[test]
    fn split_honours_quotes_and_brackets() {
        let items = split_options("t", r#"a=1,list=[0,[1,2]],p="x,y=z",f"#).unwrap();
        assert_eq!(items, vec!["a=1", "list=[0,[1,2]]", "p=x,y=z", "f"]);
        let q = split_options("t", r#"p="[not,a,list""#).unwrap();
        assert_eq!(q, vec!["p=[not,a,list"]);
    }

    #[test]
    fn split_rejects_unbalanced() {
        for bad in [r#"p="abc"#, "list=[0,1", "list=0]"] {
            let e = split_options("t", bad).unwrap_err();
            assert!(matches!(e, OptionsError::Unbalanced { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn parse_and_convert() {
        let o = Options::parse("t", TEST_KEYS, "a=7,f,p=\"/x,y\"").unwrap();
        assert_eq!(o.convert::<u32>("a").unwrap(), Some(7));
        assert!(o.is_set("f"));
        assert!(!o.is_set("list"));
        assert_eq!(o.get("p"), Some("/x,y"));
        assert_eq!(o.convert::<u32>("list").unwrap(), None);
    }

    #[test]
    fn unknown_key_lists_accepted() {
        let e = Options::parse("t", TEST_KEYS, "a=1,zz=2").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--t: unknown key `zz` (accepted keys: a=, list=, p=, f)"
        );
    }

    #[test]
    fn duplicate_key() {
        let e = Options::parse("t", TEST_KEYS, "a=1,a=2").unwrap_err();
        assert!(matches!(e, OptionsError::DuplicateKey { .. }), "{e}");
        let e = Options::parse("t", TEST_KEYS, "f,f").unwrap_err();
        assert!(matches!(e, OptionsError::DuplicateKey { .. }), "{e}");
    }

    #[test]
    fn missing_and_unexpected_values() {
        let e = Options::parse("t", TEST_KEYS, "a").unwrap_err();
        assert!(matches!(e, OptionsError::MissingValue { .. }), "{e}");
        let e = Options::parse("t", TEST_KEYS, "f=on").unwrap_err();
        assert!(matches!(e, OptionsError::UnexpectedValue { .. }), "{e}");
    }

    #[test]
    fn empty_options() {
        for bad in ["", "a=1,", ",a=1", "a=1,,f"] {
            let e = Options::parse("t", TEST_KEYS, bad).unwrap_err();
            assert!(matches!(e, OptionsError::EmptyOption { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn bad_value_keeps_source() {
        let o = Options::parse("t", TEST_KEYS, "a=x").unwrap();
        let e = o.convert::<u32>("a").unwrap_err();
        assert_eq!(e.to_string(), "--t: invalid value \"x\" for `a`");
        assert_eq!(source_string(&e), "invalid digit found in string");
    }

    #[test]
    fn required_key() {
        let o = Options::parse("t", TEST_KEYS, "f").unwrap();
        let e = o.required::<u32>("a").unwrap_err();
        assert!(
            matches!(e, OptionsError::MissingKey { key: "a", .. }),
            "{e}"
        );
    }

    #[test]
    fn byte_size() {
        assert_eq!("4096".parse(), Ok(ByteSize(4096)));
        assert_eq!("2K".parse(), Ok(ByteSize(2048)));
        assert_eq!("512M".parse(), Ok(ByteSize(512 << 20)));
        assert_eq!("1G".parse(), Ok(ByteSize(1 << 30)));
        assert_eq!("1g".parse(), Ok(ByteSize(1 << 30)));
        assert_eq!("2T".parse(), Ok(ByteSize(2 << 40)));
        for bad in ["", "M", "1.5G", "+1G", "-1", "1X", "1 G", "1GB"] {
            assert_eq!(bad.parse::<ByteSize>(), Err(ByteSizeError::Syntax), "{bad}");
        }
        assert_eq!(
            "99999999999999999999".parse::<ByteSize>(),
            Err(ByteSizeError::Overflow)
        );
        assert_eq!(
            "17179869184G".parse::<ByteSize>(),
            Err(ByteSizeError::Overflow)
        );
    }

    #[test]
    fn toggle() {
        for (text, value) in [
            ("on", true),
            ("true", true),
            ("ON", true),
            ("True", true),
            ("off", false),
            ("false", false),
            ("Off", false),
            ("FALSE", false),
            // Cloud Hypervisor reads an empty toggle as off.
            ("", false),
        ] {
            assert_eq!(text.parse(), Ok(Toggle(value)), "{text:?}");
        }
        assert_eq!("yes".parse::<Toggle>(), Err(ToggleError));
        assert_eq!("1".parse::<Toggle>(), Err(ToggleError));
    }

    #[test]
    fn cpus() {
        assert_eq!(
            parse_cpus("boot=4").unwrap(),
            CpusConfig {
                boot_vcpus: 4,
                max_vcpus: 4
            }
        );
        assert_eq!(parse_cpus("boot=32").unwrap().boot_vcpus, 32);
        assert_eq!(parse_cpus("boot=2,max=2").unwrap().max_vcpus, 2);
        assert_eq!(parse_cpus("max=1").unwrap().boot_vcpus, 1);
    }

    #[test]
    fn cpus_errors() {
        let e = parse_cpus("boot=0").unwrap_err();
        assert_eq!(e.to_string(), "--cpus: invalid value \"0\" for `boot`");
        assert_eq!(source_string(&e), "must be between 1 and 32");
        let e = parse_cpus("boot=33").unwrap_err();
        assert_eq!(source_string(&e), "must be between 1 and 32");
        let e = parse_cpus("boot=300").unwrap_err();
        assert_eq!(source_string(&e), "number too large to fit in target type");
        let e = parse_cpus("boot=two").unwrap_err();
        assert!(matches!(e, OptionsError::InvalidValue { .. }));
        let e = parse_cpus("boot=2,max=4").unwrap_err();
        assert_eq!(e.to_string(), "--cpus: invalid value \"4\" for `max`");
        assert_eq!(
            source_string(&e),
            "must equal `boot` (2): this VMM has no CPU hotplug, so `max` above `boot` is \
             not supported here"
        );
        let e = parse_cpus("boot=2,max=1").unwrap_err();
        assert_eq!(source_string(&e), "must not be below `boot` (2)");
        let e = parse_cpus("boot=1,topology=1:1:1:1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--cpus: `topology` is not supported here: the guest sees one core per vCPU"
        );
        let e = parse_cpus("boot=1,bogus=1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--cpus: unknown key `bogus` (accepted keys: boot=, max=)"
        );
    }

    #[test]
    fn memory() {
        assert_eq!(
            parse_memory("size=1G,shared=on").unwrap(),
            MemoryConfig {
                shared: true,
                ..MemoryConfig::with_size(1 << 30)
            }
        );
        assert_eq!(
            parse_memory("shared=off,thp=on").unwrap(),
            MemoryConfig {
                thp: true,
                ..MemoryConfig::with_size(DEFAULT_MEMORY_SIZE)
            }
        );
        assert_eq!(parse_memory("size=8K").unwrap().size, 8192);
        assert_eq!(parse_memory("size=4096").unwrap().size, 4096);
        let all = parse_memory(
            "size=64M,prefault=ON,mergeable=On,hugepages=on,hugepage_size=2M,reserve=true",
        )
        .unwrap();
        assert_eq!(
            all,
            MemoryConfig {
                prefault: true,
                mergeable: true,
                hugepages: true,
                hugepage_size: Some(2 << 20),
                reserve: true,
                ..MemoryConfig::with_size(64 << 20)
            }
        );
        assert!(!parse_memory("size=64M,prefault=Off").unwrap().prefault);
    }

    #[test]
    fn memory_errors() {
        let e = parse_memory("size=1000").unwrap_err();
        assert_eq!(source_string(&e), "must be a non-zero multiple of 4 KiB");
        let e = parse_memory("size=0").unwrap_err();
        assert_eq!(source_string(&e), "must be a non-zero multiple of 4 KiB");
        let e = parse_memory("size=1Q").unwrap_err();
        assert_eq!(
            source_string(&e),
            "expected a number with an optional K, M, G or T suffix"
        );
        let e = parse_memory("size=1G,shared=maybe").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--memory: invalid value \"maybe\" for `shared`"
        );
        assert_eq!(source_string(&e), "expected on, off, true or false");
        let e = parse_memory("size=1G,size=2G").unwrap_err();
        assert!(matches!(e, OptionsError::DuplicateKey { .. }), "{e}");
        let e = parse_memory("size=1G,hotplug_size=1G").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--memory: `hotplug_size` is not supported here: there is no memory hotplug"
        );
        let e = parse_memory("size=1G,hugepage_size=2M").unwrap_err();
        assert_eq!(source_string(&e), "needs hugepages=on");
        let e = parse_memory("size=1G,hugepages=on,hugepage_size=3M").unwrap_err();
        assert_eq!(
            source_string(&e),
            "must be a power of two of at least 4 KiB"
        );
        let e = parse_memory("size=1G,shared=on,mergeable=on").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--memory: invalid value \"on\" for `mergeable`"
        );
        let e = parse_memory("size=1G,bogus=on").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--memory: unknown key `bogus` (accepted keys: size="),
            "{e}"
        );
        assert!(!e.to_string().contains("hotplug"), "{e}");
    }

    #[test]
    fn serial_and_console() {
        let off = ConsoleConfig::mode(ConsoleOutputMode::Off);
        assert_eq!(parse_serial("off").unwrap(), off);
        assert_eq!(parse_console("off").unwrap(), off);
        assert_eq!(parse_serial("tty").unwrap().mode, ConsoleOutputMode::Tty);
        assert_eq!(parse_serial("null").unwrap().mode, ConsoleOutputMode::Null);
        assert_eq!(
            parse_serial("pty").unwrap(),
            ConsoleConfig::mode(ConsoleOutputMode::Pty)
        );
        assert_eq!(
            parse_serial("file=/tmp/serial.log").unwrap(),
            ConsoleConfig {
                file: Some(PathBuf::from("/tmp/serial.log")),
                ..ConsoleConfig::mode(ConsoleOutputMode::File)
            }
        );
        assert_eq!(
            parse_serial("socket=/tmp/serial.sock").unwrap(),
            ConsoleConfig {
                socket: Some(PathBuf::from("/tmp/serial.sock")),
                ..ConsoleConfig::mode(ConsoleOutputMode::Socket)
            }
        );
        assert_eq!(
            parse_serial("file=\"/tmp/a,b\"").unwrap().file,
            Some(PathBuf::from("/tmp/a,b"))
        );
    }

    #[test]
    fn serial_and_console_errors() {
        let e = parse_serial("bogus").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--serial: unknown key `bogus` (accepted keys: off, tty, null, pty, file=, socket=)"
        );
        let e = parse_serial("tty,file=/x").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--serial: keys `tty`, `file` cannot be combined"
        );
        let e = parse_serial("file=").unwrap_err();
        assert_eq!(source_string(&e), "the path is empty");
        let e = parse_serial("socket").unwrap_err();
        assert!(matches!(e, OptionsError::MissingValue { .. }), "{e}");
        let e = parse_serial("file").unwrap_err();
        assert!(matches!(e, OptionsError::MissingValue { .. }), "{e}");
        let e = parse_console("off=1").unwrap_err();
        assert!(matches!(e, OptionsError::UnexpectedValue { .. }), "{e}");
        let e = parse_console("").unwrap_err();
        assert!(matches!(e, OptionsError::EmptyOption { .. }), "{e}");
        for mode in ["tty", "null", "pty", "file=/x", "socket=/x"] {
            let e = parse_console(mode).unwrap_err();
            assert!(matches!(e, OptionsError::Unsupported { .. }), "{mode}: {e}");
            let name = mode.split('=').next().unwrap_or_default();
            assert!(
                e.to_string().starts_with(&format!(
                    "--console: `{name}` is not supported here: this VMM has no virtio-console"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn event_monitor() {
        assert_eq!(
            parse_event_monitor("path=/tmp/ev.json").unwrap().target,
            PathOrFd::Path(PathBuf::from("/tmp/ev.json"))
        );
        assert_eq!(parse_event_monitor("fd=3").unwrap().target, PathOrFd::Fd(3));
        let e = parse_event_monitor("path=").unwrap_err();
        assert_eq!(source_string(&e), "the path is empty");
        let e = parse_event_monitor("fd=-1").unwrap_err();
        assert_eq!(source_string(&e), "is not a file descriptor number");
        let e = parse_event_monitor("fd=3,path=/x").unwrap_err();
        assert!(matches!(e, OptionsError::Conflict { .. }), "{e}");
        let e = parse_event_monitor("/tmp/ev.json").unwrap_err();
        assert!(matches!(e, OptionsError::UnknownKey { .. }), "{e}");
    }

    #[test]
    fn api_socket() {
        let plain = ApiSocketConfig {
            socket: PathOrFd::Path(PathBuf::from("/tmp/api.sock")),
            limits: ApiLimits::default(),
        };
        assert_eq!(parse_api_socket("/tmp/api.sock").unwrap(), plain);
        assert_eq!(parse_api_socket("path=/tmp/api.sock").unwrap(), plain);
        let tuned =
            parse_api_socket("path=/s,max_connections=4,request_timeout_s=2,reply_timeout_s=5")
                .unwrap();
        assert_eq!(
            tuned.limits,
            ApiLimits {
                max_connections: 4,
                request_timeout: Duration::from_secs(2),
                reply_timeout: Duration::from_secs(5),
            }
        );
        for bad in [
            "path=/s,max_connections=0",
            "path=/s,max_connections=100000",
            "path=/s,request_timeout_s=0",
            "path=/s,reply_timeout_s=-1",
            "fd=x",
        ] {
            let e = parse_api_socket(bad).unwrap_err();
            assert!(matches!(e, OptionsError::InvalidValue { .. }), "{bad}: {e}");
        }
        assert_eq!(parse_api_socket("fd=3").unwrap().socket, PathOrFd::Fd(3));
        let e = parse_api_socket("fd=3,path=/s").unwrap_err();
        assert!(matches!(e, OptionsError::Conflict { .. }), "{e}");
        let e = parse_api_socket("").unwrap_err();
        assert!(matches!(e, OptionsError::InvalidValue { .. }), "{e}");
        let e = parse_api_socket("path=").unwrap_err();
        assert!(matches!(e, OptionsError::InvalidValue { .. }), "{e}");
    }

    #[test]
    fn vm_params() {
        let params = VmParams {
            kernel: Some(PathBuf::from("/k")),
            cmdline: Some("console=ttyS0".to_string()),
            initramfs: None,
            cpus: "boot=2",
            memory: "size=64M,shared=on",
            serial: "tty",
            console: "off",
        };
        let config = params.parse().unwrap();
        assert_eq!(config.cpus.boot_vcpus, 2);
        assert_eq!(config.memory.size, 64 << 20);
        assert!(config.memory.shared);
        assert_eq!(config.payload.kernel, Some(PathBuf::from("/k")));
        assert_eq!(config.serial.mode, ConsoleOutputMode::Tty);
        assert_eq!(config.console.mode, ConsoleOutputMode::Off);

        let bad = VmParams {
            memory: "size=3",
            ..params
        };
        assert!(matches!(
            bad.parse().unwrap_err(),
            OptionsError::InvalidValue { key: "size", .. }
        ));
    }
}
