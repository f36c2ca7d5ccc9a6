//! The `vm.send-migration` and `vm.receive-migration` bodies (Cloud Hypervisor v54 field
//! names), their validation into [`SendParams`] and [`ReceiveParams`] (what the migration
//! workers run with), and the option strings ch-remote accepts for them.
//!
//! On the wire we write Cloud Hypervisor's spelling (`"memory_mode": "Postcopy"`,
//! `"timeout_strategy": "Ignore"`), so its VMM understands our ch-remote; as input we also
//! take our aliases (`"postcopy": true`, lowercase values). Its fields for what this VMM
//! lacks (`tls_dir`, `vfio_fds`, `iommufd_fd`, `zone_updates`) are accepted null or empty,
//! and refused naming the field otherwise.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::options::{Key, Options, OptionsError, Toggle, value};
use super::vm_config::{NO_VFIO, NO_ZONES, Unsupported, refuse_if};
use crate::net::MigrationUrl;

/// What to do when the guest dirties memory faster than it can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeoutStrategy {
    /// Give up; the source VM keeps running.
    #[default]
    Cancel,
    /// Pause the VM anyway and send the rest, however long the downtime.
    Ignore,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendParams {
    pub url: MigrationUrl,
    pub local: bool,
    /// Total connections: 1 = memory on the main connection; N > 1 = N extra memory
    /// connections beside the main one.
    pub connections: u8,
    pub downtime: Duration,
    pub timeout: Duration,
    pub timeout_strategy: TimeoutStrategy,
    pub preserve_source: bool,
    /// Memory after the switch, pulled by the destination.
    pub postcopy: bool,
    /// How long any wait on the destination may last: a connect, a write that makes no
    /// progress, an answer that does not come.
    pub io_timeout: Duration,
}

/// Default `connect_timeout_s`: long enough for an operator to start the sender after
/// the receiver.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(300);
/// Default `idle_timeout_s`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `max_connections`: extra memory connections a sender may open (Cloud
/// Hypervisor's own limit is 128).
pub const DEFAULT_MAX_CONNECTIONS: usize = 16;

/// A `vm.receive-migration` request after validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiveParams {
    pub url: MigrationUrl,
    /// Guest memory arrives on demand from the sender after the VM runs.
    pub postcopy: bool,
    /// How long the sender may take to connect.
    pub connect_timeout: Duration,
    /// How long the sender may send nothing (on any of its connections), between and
    /// within messages.
    pub idle_timeout: Duration,
    /// Extra (PrecopyMemory or Fault) connections the sender may have open at once.
    pub max_connections: usize,
    /// Post-copy: the longest wait for one page pulled from the sender.
    pub page_timeout: Duration,
}

/// Pre-copy (memory before the switch) or post-copy (after it, pulled by the destination).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum MemoryMode {
    #[default]
    Precopy,
    Postcopy,
}

#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    #[error("unknown {what} {value:?} (expected {expected})")]
    UnknownValue {
        what: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{0}")]
    Url(#[from] crate::net::UrlError),
    #[error("{field} must be at least 1")]
    Zero { field: &'static str },
    #[error("connections must be 1..=128, got {0}")]
    Connections(u64),
    #[error("max_connections must be 1..=128, got {0}")]
    MaxConnections(u64),
    #[error("connections > 1 needs a tcp: URL (memory connections are TCP only)")]
    ConnectionsNeedTcp,
    #[error("local=on works only with a unix: URL (memory fds are passed over it)")]
    LocalNeedsUnix,
    #[error("local=on and connections > 1 cannot be combined (no memory is copied)")]
    LocalWithConnections,
    #[error("preserve_source=on needs local=on")]
    PreserveNeedsLocal,
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
    #[error("postcopy=on cannot be combined with local=on (local mode copies no memory)")]
    PostcopyWithLocal,
    #[error(
        "postcopy=on cannot be combined with connections > 1 (post-copy opens its own fault \
         connections)"
    )]
    PostcopyWithConnections,
}

fn parse_case_insensitive<T: Copy>(
    what: &'static str,
    expected: &'static str,
    value: &str,
    choices: &[(&str, T)],
) -> Result<T, ParamsError> {
    choices
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(value))
        .map(|(_, v)| *v)
        .ok_or_else(|| ParamsError::UnknownValue {
            what,
            value: value.to_string(),
            expected,
        })
}

impl std::str::FromStr for MemoryMode {
    type Err = ParamsError;
    fn from_str(s: &str) -> Result<Self, ParamsError> {
        parse_case_insensitive(
            "memory_mode",
            "precopy or postcopy",
            s,
            &[
                ("precopy", MemoryMode::Precopy),
                ("postcopy", MemoryMode::Postcopy),
            ],
        )
    }
}

impl<'de> Deserialize<'de> for MemoryMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

fn parse_strategy(s: &str) -> Result<TimeoutStrategy, ParamsError> {
    parse_case_insensitive(
        "timeout_strategy",
        "cancel or ignore",
        s,
        &[
            ("cancel", TimeoutStrategy::Cancel),
            ("ignore", TimeoutStrategy::Ignore),
        ],
    )
}

/// Cloud Hypervisor's spelling, which its VMM requires.
impl Serialize for TimeoutStrategy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            TimeoutStrategy::Cancel => "Cancel",
            TimeoutStrategy::Ignore => "Ignore",
        })
    }
}

/// Any case, as on the command line.
impl<'de> Deserialize<'de> for TimeoutStrategy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_strategy(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for TimeoutStrategy {
    type Err = ParamsError;
    fn from_str(s: &str) -> Result<Self, ParamsError> {
        parse_strategy(s)
    }
}

fn default_downtime_ms() -> u64 {
    300
}
fn default_timeout_s() -> u64 {
    3600
}
fn default_connections() -> u64 {
    1
}
/// Long enough for a receiver that waits on its own before answering (a post-copy
/// receiver waits up to 10 s at State for the fault connections), short enough that a
/// guest paused for the final step does not sit out a dead destination for minutes.
fn default_io_timeout_s() -> u64 {
    30
}
/// A vCPU waits this long on one page at most: well past any network hiccup a guest
/// survives, far short of "frozen for good".
fn default_page_timeout_s() -> u64 {
    10
}

/// `PUT /api/v1/vm.send-migration`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMigrationConfig {
    pub destination_url: String,
    #[serde(default)]
    pub local: bool,
    #[serde(default)]
    pub preserve_source: bool,
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: u64,
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    #[serde(default)]
    pub timeout_strategy: TimeoutStrategy,
    #[serde(default = "default_connections")]
    pub connections: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<String>,
    #[serde(default)]
    pub memory_mode: MemoryMode,
    /// Same as `memory_mode: Postcopy` (our older spelling; read, never written).
    #[serde(default, skip_serializing)]
    pub postcopy: bool,
    /// The longest any wait on the destination may last (connect, a write that makes no
    /// progress, an answer); then the migration fails.
    #[serde(default = "default_io_timeout_s")]
    pub io_timeout_s: u64,
}

impl SendMigrationConfig {
    pub fn params(&self) -> Result<SendParams, ParamsError> {
        let url: MigrationUrl = self.destination_url.parse()?;
        refuse_if(self.tls_dir.is_some(), "tls_dir", NO_TLS)?;
        let postcopy = self.postcopy || self.memory_mode == MemoryMode::Postcopy;
        if self.downtime_ms == 0 {
            return Err(ParamsError::Zero {
                field: "downtime_ms",
            });
        }
        if self.timeout_s == 0 {
            return Err(ParamsError::Zero { field: "timeout_s" });
        }
        if self.io_timeout_s == 0 {
            return Err(ParamsError::Zero {
                field: "io_timeout_s",
            });
        }
        let connections = u8::try_from(self.connections)
            .ok()
            .filter(|c| (1..=128).contains(c))
            .ok_or(ParamsError::Connections(self.connections))?;
        let unix = matches!(url, MigrationUrl::Unix(_));
        if connections > 1 && unix {
            return Err(ParamsError::ConnectionsNeedTcp);
        }
        if self.local && !unix {
            return Err(ParamsError::LocalNeedsUnix);
        }
        if self.local && connections > 1 {
            return Err(ParamsError::LocalWithConnections);
        }
        if self.preserve_source && !self.local {
            return Err(ParamsError::PreserveNeedsLocal);
        }
        if postcopy && self.local {
            return Err(ParamsError::PostcopyWithLocal);
        }
        if postcopy && connections > 1 {
            return Err(ParamsError::PostcopyWithConnections);
        }
        Ok(SendParams {
            url,
            local: self.local,
            connections,
            downtime: Duration::from_millis(self.downtime_ms),
            timeout: Duration::from_secs(self.timeout_s),
            timeout_strategy: self.timeout_strategy,
            preserve_source: self.preserve_source,
            postcopy,
            io_timeout: Duration::from_secs(self.io_timeout_s),
        })
    }
}

/// `PUT /api/v1/vm.receive-migration`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveMigrationConfig {
    pub receiver_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<String>,
    #[serde(default)]
    pub memory_mode: MemoryMode,
    /// Same as `memory_mode: Postcopy` (our older spelling; read, never written).
    #[serde(default, skip_serializing)]
    pub postcopy: bool,
    /// Accepted when null or empty (Cloud Hypervisor's ch-remote always sends them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vfio_fds: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommufd_fd: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zone_updates: Vec<serde_json::Value>,
    /// Post-copy: how long the destination waits for the source's answer to one page
    /// pull before it stops the VM with an error naming the page and the source.
    #[serde(default = "default_page_timeout_s")]
    pub page_timeout_s: u64,
    /// Seconds the sender may take to connect (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_s: Option<u64>,
    /// Seconds the sender may go without sending anything, between or inside messages
    /// (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u64>,
    /// Extra memory/fault connections the sender may have open at once (default 16, at
    /// most 128).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u64>,
}

impl ReceiveMigrationConfig {
    /// The URL, once the fields this VMM cannot honour are known to ask for nothing.
    pub fn url(&self) -> Result<MigrationUrl, ParamsError> {
        let url = self.receiver_url.parse()?;
        refuse_if(self.tls_dir.is_some(), "tls_dir", NO_TLS)?;
        refuse_if(
            self.vfio_fds.as_ref().is_some_and(|v| !v.is_empty()),
            "vfio_fds",
            NO_VFIO,
        )?;
        refuse_if(self.iommufd_fd.is_some(), "iommufd_fd", NO_VFIO)?;
        refuse_if(!self.zone_updates.is_empty(), "zone_updates", NO_ZONES)?;
        Ok(url)
    }

    /// The validated request, defaults filled in.
    pub fn params(&self) -> Result<ReceiveParams, ParamsError> {
        let seconds = |v: Option<u64>, default: Duration, field| match v {
            Some(0) => Err(ParamsError::Zero { field }),
            Some(s) => Ok(Duration::from_secs(s)),
            None => Ok(default),
        };
        let max_connections = match self.max_connections {
            None => DEFAULT_MAX_CONNECTIONS,
            Some(n @ 1..=128) => n as usize,
            Some(n) => return Err(ParamsError::MaxConnections(n)),
        };
        Ok(ReceiveParams {
            url: self.url()?,
            postcopy: self.postcopy(),
            connect_timeout: seconds(
                self.connect_timeout_s,
                DEFAULT_CONNECT_TIMEOUT,
                "connect_timeout_s",
            )?,
            idle_timeout: seconds(self.idle_timeout_s, DEFAULT_IDLE_TIMEOUT, "idle_timeout_s")?,
            max_connections,
            page_timeout: self.page_timeout()?,
        })
    }

    /// Memory on demand from the sender (`postcopy: true` or `memory_mode: Postcopy`).
    pub fn postcopy(&self) -> bool {
        self.postcopy || self.memory_mode == MemoryMode::Postcopy
    }

    pub fn page_timeout(&self) -> Result<Duration, ParamsError> {
        if self.page_timeout_s == 0 {
            return Err(ParamsError::Zero {
                field: "page_timeout_s",
            });
        }
        Ok(Duration::from_secs(self.page_timeout_s))
    }
}

/// Why `tls_dir` cannot apply.
const NO_TLS: &str = "this VMM migrates without TLS (use a trusted network or a UNIX socket)";

const SEND_KEYS: &[Key] = &[
    value("destination_url"),
    value("local"),
    value("preserve_source"),
    value("downtime_ms"),
    value("timeout_s"),
    value("timeout_strategy"),
    value("connections"),
    value("tls_dir"),
    value("memory_mode"),
    value("postcopy"),
    value("io_timeout_s"),
];
const RECEIVE_KEYS: &[Key] = &[
    value("receiver_url"),
    value("tls_dir"),
    value("memory_mode"),
    value("postcopy"),
    value("page_timeout_s"),
    value("connect_timeout_s"),
    value("idle_timeout_s"),
    value("max_connections"),
];

fn toggle(opts: &Options, key: &'static str) -> Result<bool, OptionsError> {
    Ok(opts.convert::<Toggle>(key)?.is_some_and(|t| t.0))
}

/// `memory_mode=...`, or Postcopy for our alias `postcopy=on`: the body then says
/// `"memory_mode": "Postcopy"`, the only spelling Cloud Hypervisor's VMM knows.
fn memory_mode(opts: &Options) -> Result<MemoryMode, OptionsError> {
    if toggle(opts, "postcopy")? {
        return Ok(MemoryMode::Postcopy);
    }
    Ok(opts.convert("memory_mode")?.unwrap_or_default())
}

/// ch-remote `send-migration destination_url=tcp:H:P[,local=on][,connections=N]...`.
pub fn parse_send_migration(input: &str) -> Result<SendMigrationConfig, OptionsError> {
    let opts = Options::parse("send-migration", SEND_KEYS, input)?;
    Ok(SendMigrationConfig {
        destination_url: opts.required("destination_url")?,
        local: toggle(&opts, "local")?,
        preserve_source: toggle(&opts, "preserve_source")?,
        downtime_ms: opts
            .convert("downtime_ms")?
            .unwrap_or(default_downtime_ms()),
        timeout_s: opts.convert("timeout_s")?.unwrap_or(default_timeout_s()),
        timeout_strategy: opts.convert("timeout_strategy")?.unwrap_or_default(),
        connections: opts
            .convert("connections")?
            .unwrap_or(default_connections()),
        tls_dir: opts.get("tls_dir").map(str::to_string),
        memory_mode: memory_mode(&opts)?,
        postcopy: false,
        io_timeout_s: opts
            .convert("io_timeout_s")?
            .unwrap_or(default_io_timeout_s()),
    })
}

/// ch-remote `receive-migration receiver_url=unix:PATH[,memory_mode=precopy]
/// [,connect_timeout_s=N][,idle_timeout_s=N][,max_connections=N]`.
pub fn parse_receive_migration(input: &str) -> Result<ReceiveMigrationConfig, OptionsError> {
    let opts = Options::parse("receive-migration", RECEIVE_KEYS, input)?;
    Ok(ReceiveMigrationConfig {
        receiver_url: opts.required("receiver_url")?,
        tls_dir: opts.get("tls_dir").map(str::to_string),
        memory_mode: memory_mode(&opts)?,
        postcopy: false,
        vfio_fds: None,
        iommufd_fd: None,
        zone_updates: Vec::new(),
        page_timeout_s: opts
            .convert("page_timeout_s")?
            .unwrap_or(default_page_timeout_s()),
        connect_timeout_s: opts.convert("connect_timeout_s")?,
        idle_timeout_s: opts.convert("idle_timeout_s")?,
        max_connections: opts.convert("max_connections")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str) -> Result<SendParams, String> {
        serde_json::from_str::<SendMigrationConfig>(json)
            .map_err(|e| e.to_string())?
            .params()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn send_defaults_and_validation() {
        let p = body(r#"{"destination_url":"tcp:127.0.0.1:6000"}"#).unwrap();
        assert_eq!(p.connections, 1);
        assert_eq!(p.downtime, Duration::from_millis(300));
        assert_eq!(p.timeout_strategy, TimeoutStrategy::Cancel);
        assert_eq!(p.io_timeout, Duration::from_secs(30));
        let p = body(r#"{"destination_url":"tcp:h:1","io_timeout_s":2}"#).unwrap();
        assert_eq!(p.io_timeout, Duration::from_secs(2));
        let p =
            body(r#"{"destination_url":"tcp:h:1","connections":4,"timeout_strategy":"ignore"}"#)
                .unwrap();
        assert_eq!(
            (p.connections, p.timeout_strategy),
            (4, TimeoutStrategy::Ignore)
        );
        for (json, want) in [
            (
                r#"{"destination_url":"unix:/s","connections":2}"#,
                "tcp: URL",
            ),
            (r#"{"destination_url":"tcp:h:1","local":true}"#, "unix: URL"),
            (
                r#"{"destination_url":"tcp:h:1","connections":0}"#,
                "1..=128",
            ),
            (
                r#"{"destination_url":"tcp:h:1","connections":129}"#,
                "1..=128",
            ),
            (
                r#"{"destination_url":"tcp:h:1","downtime_ms":0}"#,
                "at least 1",
            ),
            (
                r#"{"destination_url":"tcp:h:1","io_timeout_s":0}"#,
                "io_timeout_s must be at least 1",
            ),
            (
                r#"{"destination_url":"unix:/s","preserve_source":true}"#,
                "local=on",
            ),
            (
                r#"{"destination_url":"tcp:h:1","timeout_strategy":"maybe"}"#,
                "cancel or ignore",
            ),
            (
                r#"{"destination_url":"unix:/s","memory_mode":"Postcopy","local":true}"#,
                "local=on",
            ),
            (
                r#"{"destination_url":"tcp:h:1","postcopy":true,"connections":2}"#,
                "fault connections",
            ),
            (r#"{"destination_url":"http://x"}"#, "migration URL"),
            (
                r#"{"destination_url":"tcp:h:1","bogus":1}"#,
                "unknown field",
            ),
        ] {
            let e = body(json).unwrap_err();
            assert!(e.contains(want), "{json}: {e}");
        }
    }

    /// What Cloud Hypervisor's ch-remote sends (its null/empty fields mean "absent"), and
    /// its fields asking for what we lack, refused by name.
    #[test]
    fn cloud_hypervisor_bodies() {
        let p = body(
            r#"{"destination_url":"tcp:127.0.0.1:6000","local":false,"preserve_source":false,"downtime_ms":200,"timeout_s":60,"timeout_strategy":"Ignore","connections":4,"tls_dir":null,"memory_mode":"Precopy"}"#,
        )
        .unwrap();
        assert_eq!(
            (p.connections, p.timeout_strategy, p.postcopy),
            (4, TimeoutStrategy::Ignore, false)
        );
        let e = body(r#"{"destination_url":"tcp:h:1","tls_dir":"/x"}"#).unwrap_err();
        assert!(e.starts_with("tls_dir is not supported here"), "{e}");

        let receive = |json: &str| {
            serde_json::from_str::<ReceiveMigrationConfig>(json)
                .map_err(|e| e.to_string())?
                .params()
                .map_err(|e| e.to_string())
        };
        let p = receive(
            r#"{"receiver_url":"tcp:0.0.0.0:6000","tls_dir":null,"memory_mode":"Postcopy","vfio_fds":null,"iommufd_fd":null,"zone_updates":[]}"#,
        )
        .unwrap();
        assert!(p.postcopy);
        for (field, extra) in [
            ("tls_dir", r#""tls_dir":"/x""#),
            ("vfio_fds", r#""vfio_fds":[{"id":"v"}]"#),
            ("iommufd_fd", r#""iommufd_fd":3"#),
            (
                "zone_updates",
                r#""zone_updates":[{"id":"z","host_numa_node":1}]"#,
            ),
        ] {
            let e = receive(&format!(r#"{{"receiver_url":"unix:/r",{extra}}}"#)).unwrap_err();
            assert!(
                e.starts_with(&format!("{field} is not supported here")),
                "{field}: {e}"
            );
        }
        let e = receive(r#"{"receiver_url":"unix:/r","bogus":1}"#).unwrap_err();
        assert!(e.contains("unknown field `bogus`"), "{e}");
    }

    /// Our aliases stay accepted as input.
    #[test]
    fn our_aliases_are_read() {
        assert!(
            body(r#"{"destination_url":"tcp:h:1","postcopy":true}"#)
                .unwrap()
                .postcopy
        );
        assert_eq!(
            body(r#"{"destination_url":"tcp:h:1","timeout_strategy":"ignore"}"#)
                .unwrap()
                .timeout_strategy,
            TimeoutStrategy::Ignore
        );
        let r: ReceiveMigrationConfig =
            serde_json::from_str(r#"{"receiver_url":"unix:/r","postcopy":true}"#).unwrap();
        assert!(r.params().unwrap().postcopy);
        let r: ReceiveMigrationConfig =
            serde_json::from_str(r#"{"receiver_url":"unix:/r","memory_mode":"postcopy"}"#).unwrap();
        assert!(r.params().unwrap().postcopy);
    }

    #[test]
    fn option_strings() {
        let c = parse_send_migration(
            "destination_url=tcp:127.0.0.1:6000,connections=4,downtime_ms=20,timeout_strategy=cancel",
        )
        .unwrap();
        assert_eq!(c.connections, 4);
        assert_eq!(c.params().unwrap().downtime, Duration::from_millis(20));
        let c =
            parse_send_migration("destination_url=unix:/s,local=on,preserve_source=on").unwrap();
        assert!(c.params().unwrap().local);
        assert!(parse_send_migration("destination_url=unix:/s,speed=fast").is_err());
        for opts in [
            "destination_url=tcp:h:1,postcopy=on",
            "destination_url=tcp:h:1,memory_mode=postcopy",
            "destination_url=unix:/s,memory_mode=Postcopy",
        ] {
            assert!(
                parse_send_migration(opts)
                    .unwrap()
                    .params()
                    .unwrap()
                    .postcopy,
                "{opts}"
            );
        }
        assert!(!body(r#"{"destination_url":"tcp:h:1"}"#).unwrap().postcopy);
        assert!(
            body(r#"{"destination_url":"tcp:h:1","memory_mode":"Postcopy"}"#)
                .unwrap()
                .postcopy
        );
        let r = parse_receive_migration("receiver_url=unix:/tmp/r.sock").unwrap();
        assert_eq!(r.url().unwrap(), MigrationUrl::Unix("/tmp/r.sock".into()));
        assert_eq!(r.page_timeout().unwrap(), Duration::from_secs(10));
        let r = parse_receive_migration("receiver_url=unix:/x,memory_mode=postcopy").unwrap();
        assert!(r.postcopy());
        let r = parse_receive_migration("receiver_url=unix:/x,page_timeout_s=2").unwrap();
        assert_eq!(r.page_timeout().unwrap(), Duration::from_secs(2));
        let r = parse_receive_migration("receiver_url=unix:/x,page_timeout_s=0").unwrap();
        assert!(r.page_timeout().is_err());
        let c = parse_send_migration("destination_url=unix:/s,io_timeout_s=5").unwrap();
        assert_eq!(c.params().unwrap().io_timeout, Duration::from_secs(5));
        assert!(
            parse_receive_migration("receiver_url=unix:/x,postcopy=on")
                .unwrap()
                .postcopy()
        );
        let p = parse_receive_migration("receiver_url=unix:/x")
            .unwrap()
            .params()
            .unwrap();
        assert_eq!(p.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(p.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(p.max_connections, DEFAULT_MAX_CONNECTIONS);
        let p = parse_receive_migration(
            "receiver_url=unix:/x,connect_timeout_s=2,idle_timeout_s=3,max_connections=4",
        )
        .unwrap()
        .params()
        .unwrap();
        assert_eq!(
            (p.connect_timeout, p.idle_timeout, p.max_connections),
            (Duration::from_secs(2), Duration::from_secs(3), 4)
        );
        for bad in [
            "receiver_url=unix:/x,idle_timeout_s=0",
            "receiver_url=unix:/x,connect_timeout_s=0",
            "receiver_url=unix:/x,max_connections=0",
            "receiver_url=unix:/x,max_connections=129",
        ] {
            let e = parse_receive_migration(bad).unwrap().params();
            assert!(e.is_err(), "{bad}");
        }
    }
}
