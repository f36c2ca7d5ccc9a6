//! A [`Side`]: one Cloud-Hypervisor-compatible set of binaries (`cloud-hypervisor`,
//! `ch-remote`, `offload_daemon`) and the extra arguments its VMM gets. The plain bench
//! measures one side (ours); `--compare` measures two, alternating.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::ensure;
use test_infra::{Binaries, VmmBuilder};

#[derive(Debug, Clone)]
pub struct Side {
    /// Column name in the tables (`ours`, `CH`).
    pub label: String,
    pub bins: Binaries,
    pub daemon: PathBuf,
    /// Appended to every VMM command line (e.g. to turn off a build's syscall filters).
    pub vmm_args: Vec<OsString>,
    /// This project's binaries: figures only our VMM reports (its downtime metric, say)
    /// may be added as extra rows. Never set for the side being compared against.
    pub ours: bool,
    /// Whether a VMM started without a VM accepts `--serial` (ours needs it: a received
    /// VM writes where the receiving VMM's command line says; Cloud Hypervisor refuses
    /// it without a kernel and uses the path in the VM's config). Set by
    /// [`Side::probe`].
    pub serial_without_vm: bool,
}

impl Side {
    /// Our binaries (`offload_daemon` beside `cloud-hypervisor`).
    pub fn ours(bins: Binaries) -> anyhow::Result<Side> {
        let daemon = bins
            .cloud_hypervisor
            .parent()
            .map(|d| d.join("offload_daemon"))
            .unwrap_or_else(|| PathBuf::from("offload_daemon"));
        Ok(Side {
            label: "ours".into(),
            bins,
            daemon,
            vmm_args: Vec::new(),
            ours: true,
            serial_without_vm: true,
        })
    }

    /// The three binaries in `dir`, each of which must exist; `vmm_args` is split at
    /// whitespace (no quoting: VMM options have no spaces in their values).
    pub fn other(dir: &Path, label: &str, vmm_args: &str) -> anyhow::Result<Side> {
        // Absolute: each VMM runs in its own temp dir.
        let dir = &std::path::absolute(dir)?;
        for name in ["cloud-hypervisor", "ch-remote", "offload_daemon"] {
            let path = dir.join(name);
            ensure!(
                path.is_file(),
                "--compare {}: no {name} there (the directory must hold cloud-hypervisor, \
                 ch-remote and offload_daemon)",
                dir.display()
            );
        }
        Ok(Side {
            label: label.into(),
            bins: Binaries::in_dir(dir),
            daemon: dir.join("offload_daemon"),
            vmm_args: split_args(vmm_args),
            ours: false,
            serial_without_vm: false,
        })
    }

    /// A VMM of this side with its extra arguments.
    pub fn vmm(&self, tmp_prefix: &str) -> VmmBuilder {
        self.vmm_args
            .iter()
            .fold(VmmBuilder::new(self.bins.clone()), |b, a| b.arg(a.clone()))
            .tmp_prefix(tmp_prefix)
    }

    /// A VMM without a VM, waiting for a restore or an incoming migration, whose VM's
    /// serial output goes to `serial` (given on the command line where the VMM takes it,
    /// see `serial_without_vm`: ours uses only its own, never a path stored in a
    /// snapshot or sent by a source; Cloud Hypervisor takes those).
    pub fn empty_vmm(&self, tmp_prefix: &str, serial: &Path) -> VmmBuilder {
        let vmm = self.vmm(tmp_prefix).without_vm_options();
        if !self.serial_without_vm {
            return vmm;
        }
        let mut file = OsString::from("file=");
        file.push(serial);
        vmm.arg("--serial").arg(file).arg("--console").arg("off")
    }

    /// Finds out `serial_without_vm`: starts a VMM without a VM but with `--serial` and
    /// sees whether it comes up or exits.
    pub fn probe(&mut self) -> anyhow::Result<()> {
        let mut vmm = self
            .vmm("bench-probe")
            .without_vm_options()
            .arg("--serial")
            .arg("file=/dev/null")
            .arg("--console")
            .arg("off")
            .spawn()?;
        self.serial_without_vm = match vmm.wait_api_ready(Duration::from_secs(20)) {
            Ok(()) => true,
            Err(test_infra::Error::VmmExited { .. }) => false,
            Err(e) => return Err(e.into()),
        };
        eprintln!(
            "bench: {}: a VMM without a VM {} --serial",
            self.label,
            if self.serial_without_vm {
                "takes"
            } else {
                "refuses"
            }
        );
        Ok(())
    }

    /// Fails early, naming the file, when the daemon is missing.
    pub fn daemon(&self) -> anyhow::Result<&Path> {
        ensure!(
            self.daemon.is_file(),
            "{} is missing (cargo build --release -p offload_daemon)",
            self.daemon.display()
        );
        Ok(&self.daemon)
    }
}

fn split_args(args: &str) -> Vec<OsString> {
    args.split_whitespace().map(OsString::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_args_split_and_a_missing_binary_is_named() {
        assert_eq!(
            split_args(" --log-file  x "),
            [OsString::from("--log-file"), OsString::from("x")]
        );
        let err = Side::other(Path::new("/nonexistent"), "CH", "").unwrap_err();
        assert!(
            err.to_string().contains("no cloud-hypervisor there"),
            "{err}"
        );
    }
}
