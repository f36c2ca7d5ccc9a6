//! The VM configuration as plain serde data, in Cloud Hypervisor's JSON shape.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything needed to build a VM. It is what `vm.info` reports as `config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub cpus: CpusConfig,
    pub memory: MemoryConfig,
    pub payload: PayloadConfig,
    pub serial: ConsoleConfig,
    pub console: ConsoleConfig,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusConfig {
    pub boot_vcpus: u8,
    pub max_vcpus: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Guest RAM in bytes; a multiple of 4 KiB.
    pub size: u64,
    /// MAP_SHARED guest RAM (needed later for local migration and offload).
    pub shared: bool,
    /// Transparent huge pages for private guest RAM (Cloud Hypervisor's `thp`). Off by
    /// default here, unlike Cloud Hypervisor (see the README, "Guest memory").
    #[serde(default)]
    pub thp: bool,
    /// Populate every page of guest RAM when the VM boots (Cloud Hypervisor's
    /// `prefault`), so the guest never waits on a first-touch fault. A restored or
    /// received VM is not prefaulted here: its pages come from the snapshot or the peer.
    #[serde(default)]
    pub prefault: bool,
    /// MADV_MERGEABLE on private guest RAM, so KSM may merge identical pages.
    #[serde(default)]
    pub mergeable: bool,
    /// Guest RAM from a hugetlbfs memfd (Cloud Hypervisor's `hugepages`).
    #[serde(default)]
    pub hugepages: bool,
    /// The huge page size in bytes; the host's default huge page size when absent.
    #[serde(default)]
    pub hugepage_size: Option<u64>,
    /// Reserve swap for guest RAM (map it without MAP_NORESERVE).
    #[serde(default)]
    pub reserve: bool,
}

impl MemoryConfig {
    /// `size` bytes of private RAM with every option off.
    pub fn with_size(size: u64) -> Self {
        MemoryConfig {
            size,
            shared: false,
            thp: false,
            prefault: false,
            mergeable: false,
            hugepages: false,
            hugepage_size: None,
            reserve: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadConfig {
    pub kernel: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub initramfs: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleOutputMode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    Null,
}

/// Where a serial port's output goes. For `Pty` the VMM fills in `file` with the path of
/// the pty it opened (as Cloud Hypervisor does), so `vm.info` tells a client where to
/// read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    pub file: Option<PathBuf>,
    pub mode: ConsoleOutputMode,
    /// The UNIX socket of `Socket` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

impl ConsoleConfig {
    /// A port in `mode` with no file or socket.
    pub fn mode(mode: ConsoleOutputMode) -> Self {
        ConsoleConfig {
            file: None,
            mode,
            socket: None,
        }
    }
}

/// How `vm.restore` brings guest memory back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum MemoryRestoreMode {
    /// Read every data page of the snapshot before the VM runs.
    #[default]
    Copy,
    /// Run at once; pages arrive through userfaultfd as the guest touches them.
    OnDemand,
}

#[derive(Debug, thiserror::Error)]
#[error("unknown memory restore mode {0:?} (expected copy or ondemand)")]
pub struct UnknownRestoreMode(String);

impl std::str::FromStr for MemoryRestoreMode {
    type Err = UnknownRestoreMode;
    /// Case-insensitive, as Cloud Hypervisor v54 accepts `Copy`, `copy`, `OnDemand`, ...
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "copy" => Ok(MemoryRestoreMode::Copy),
            "ondemand" => Ok(MemoryRestoreMode::OnDemand),
            _ => Err(UnknownRestoreMode(s.to_string())),
        }
    }
}

impl<'de> Deserialize<'de> for MemoryRestoreMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The `vm.restore` body: every field Cloud Hypervisor v54 defines for it. The ones for
/// devices this VMM does not have (`net_fds`, `vfio_fds`, `iommufd_fd`, `zone_updates`)
/// are accepted when null or empty, as Cloud Hypervisor's ch-remote always sends them,
/// and refused by [`RestoreConfig::params`] otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    pub source_url: String,
    #[serde(default)]
    pub memory_restore_mode: MemoryRestoreMode,
    #[serde(default)]
    pub resume: bool,
    /// Accepted for compatibility; a Copy restore always reads everything up front.
    #[serde(default)]
    pub prefault: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_fds: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vfio_fds: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommufd_fd: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zone_updates: Vec<serde_json::Value>,
}

/// The `vm.snapshot` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshotConfig {
    pub destination_url: String,
}

/// A field of Cloud Hypervisor's API that this VMM accepts only when it asks for nothing
/// (null, empty or false).
#[derive(Debug, thiserror::Error)]
#[error("{field} is not supported here: {why} (leave it out, null or empty)")]
pub struct Unsupported {
    pub field: &'static str,
    pub why: &'static str,
}

/// `Err` naming `field` when the request asks for something through it.
pub fn refuse_if(present: bool, field: &'static str, why: &'static str) -> Result<(), Unsupported> {
    if present {
        Err(Unsupported { field, why })
    } else {
        Ok(())
    }
}

/// Why the VMM has none of the devices `vfio_fds`/`iommufd_fd` are for.
pub const NO_VFIO: &str = "this VMM has no VFIO devices";
/// Why `zone_updates` cannot apply.
pub const NO_ZONES: &str = "this VMM has no NUMA memory zones";

/// A restore request after its URL has been checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreParams {
    pub source: PathBuf,
    pub mode: MemoryRestoreMode,
    pub resume: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("{0:?} is not a file:// URL")]
    NotFileUrl(String),
    #[error("{0:?} has no absolute path after file://")]
    NoPath(String),
}

/// `file:///dir` -> `/dir`.
pub fn file_url_path(url: &str) -> Result<PathBuf, UrlError> {
    let path = url
        .strip_prefix("file://")
        .ok_or_else(|| UrlError::NotFileUrl(url.to_string()))?;
    if !path.starts_with('/') {
        return Err(UrlError::NoPath(url.to_string()));
    }
    Ok(PathBuf::from(path))
}

/// Why a `vm.restore` body cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RestoreBodyError {
    #[error("source_url: {0}")]
    Url(#[from] UrlError),
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
}

impl RestoreConfig {
    pub fn params(&self) -> Result<RestoreParams, RestoreBodyError> {
        refuse_if(
            self.net_fds.as_ref().is_some_and(|v| !v.is_empty()),
            "net_fds",
            "this VMM has no network devices",
        )?;
        refuse_if(
            self.vfio_fds.as_ref().is_some_and(|v| !v.is_empty()),
            "vfio_fds",
            NO_VFIO,
        )?;
        refuse_if(self.iommufd_fd.is_some(), "iommufd_fd", NO_VFIO)?;
        refuse_if(!self.zone_updates.is_empty(), "zone_updates", NO_ZONES)?;
        Ok(RestoreParams {
            source: file_url_path(&self.source_url)?,
            mode: self.memory_restore_mode,
            resume: self.resume,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_mode_is_case_insensitive() {
        for (text, mode) in [
            ("\"Copy\"", MemoryRestoreMode::Copy),
            ("\"copy\"", MemoryRestoreMode::Copy),
            ("\"OnDemand\"", MemoryRestoreMode::OnDemand),
            ("\"ondemand\"", MemoryRestoreMode::OnDemand),
        ] {
            assert_eq!(
                serde_json::from_str::<MemoryRestoreMode>(text).unwrap(),
                mode
            );
        }
        assert!(serde_json::from_str::<MemoryRestoreMode>("\"lazy\"").is_err());
    }

    #[test]
    fn restore_body_defaults_and_strictness() {
        let c: RestoreConfig = serde_json::from_str(r#"{"source_url":"file:///s"}"#).unwrap();
        assert_eq!(
            c.params().unwrap(),
            RestoreParams {
                source: "/s".into(),
                mode: MemoryRestoreMode::Copy,
                resume: false
            }
        );
        assert!(serde_json::from_str::<RestoreConfig>(r#"{"source_url":"x","bogus":1}"#).is_err());
    }

    /// What Cloud Hypervisor's ch-remote always sends: the device fields null or empty.
    #[test]
    fn restore_body_accepts_cloud_hypervisor_empty_fields() {
        let c: RestoreConfig = serde_json::from_str(
            r#"{"source_url":"file:///s","prefault":false,"memory_restore_mode":"OnDemand","net_fds":null,"vfio_fds":null,"iommufd_fd":null,"resume":true,"zone_updates":[]}"#,
        )
        .unwrap();
        let p = c.params().unwrap();
        assert_eq!((p.mode, p.resume), (MemoryRestoreMode::OnDemand, true));
        let c: RestoreConfig =
            serde_json::from_str(r#"{"source_url":"file:///s","net_fds":[],"vfio_fds":[]}"#)
                .unwrap();
        c.params().unwrap();
        for (field, body) in [
            ("net_fds", r#""net_fds":[{"id":"net0","num_fds":1}]"#),
            ("vfio_fds", r#""vfio_fds":[{"id":"vfio0"}]"#),
            ("iommufd_fd", r#""iommufd_fd":3"#),
            (
                "zone_updates",
                r#""zone_updates":[{"id":"z","host_numa_node":0}]"#,
            ),
        ] {
            let json = format!(r#"{{"source_url":"file:///s",{body}}}"#);
            let c: RestoreConfig = serde_json::from_str(&json).unwrap();
            let e = c.params().unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("{field} is not supported here")),
                "{field}: {e}"
            );
        }
    }

    /// Our own ch-remote's body names only what it sets: Cloud Hypervisor reads it too.
    #[test]
    fn restore_body_serializes_without_the_empty_fields() {
        let c = RestoreConfig {
            source_url: "file:///s".into(),
            ..RestoreConfig::default()
        };
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"source_url":"file:///s","memory_restore_mode":"Copy","resume":false,"prefault":false}"#
        );
    }

    #[test]
    fn file_urls() {
        assert_eq!(file_url_path("file:///a/b").unwrap(), PathBuf::from("/a/b"));
        assert!(file_url_path("/a/b").is_err());
        assert!(file_url_path("file://relative").is_err());
        assert!(file_url_path("tcp:1.2.3.4:5").is_err());
    }
}
