//! Snapshot and restore: a guest of `ram_mib` that wrote `touched_mib` is snapshotted,
//! then restored twice into fresh VMMs, by copy and on demand. Every restore ends on a
//! clean verifier tick with the snapshot's nonce.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use test_infra::{TempDir, VmmProcess};

use crate::{Ctx, Sample, Scenario};

const TICK_MS: u64 = 200;
/// First touch of guest RAM runs at ~150-300 MiB/s here: a 6 GiB fill takes a while.
const FILL_TIMEOUT: Duration = Duration::from_secs(300);
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

pub struct SnapshotRestore {
    pub cpus: u8,
    pub ram_mib: u64,
    pub touched_mib: u64,
}

fn file_url(path: &Path) -> String {
    format!("file://{}", path.display())
}

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

/// Sum of `memory_data_bytes` in the snapshot's manifest.
fn data_bytes(snap: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(snap.join("snapshot.json")).context("manifest")?;
    let manifest: serde_json::Value = serde_json::from_str(&text)?;
    Ok(manifest["memory_data_bytes"]
        .as_array()
        .context("memory_data_bytes")?
        .iter()
        .filter_map(|v| v.as_u64())
        .sum())
}

/// Polls vm.info until its on-demand restore is complete (progress is only visible
/// through the API) and returns the final `memory_restore`; `each` runs on every poll.
pub fn wait_memory_restored(
    vmm: &test_infra::VmmProcess,
    timeout: Duration,
    mut each: impl FnMut(),
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        each();
        let p = vmm.vm_info()?["memory_restore"].clone();
        if p["complete"] == true {
            return Ok(p);
        }
        ensure!(
            Instant::now() < deadline,
            "on-demand restore not complete: {p}"
        );
        test_infra::wait::poll_until(Instant::now() + Duration::from_millis(5), || {
            Ok::<Option<()>, std::io::Error>(None)
        })?;
    }
}

/// Peak resident set of a process, in MiB.
pub fn peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    Ok(test_infra::procfs::peak_rss_kib(pid)? as f64 / 1024.0)
}

impl SnapshotRestore {
    /// Restores `snap` into a fresh VMM whose serial goes to `serial`; returns it and the
    /// time the API call took.
    fn restore(
        &self,
        ctx: &Ctx,
        snap: &Path,
        mode: &str,
        serial: &Path,
    ) -> anyhow::Result<(VmmProcess, Instant, Duration)> {
        let mut vmm = ctx.side.empty_vmm("bench-restored", serial).spawn()?;
        vmm.wait_api_ready(STEP_TIMEOUT)?;
        let body = format!(
            r#"{{"source_url":"{}","memory_restore_mode":"{mode}","resume":true}}"#,
            file_url(snap)
        );
        let start = Instant::now();
        let resp = vmm.api_with_timeout("PUT", "vm.restore", Some(&body), FILL_TIMEOUT)?;
        ensure!(
            resp.is_success(),
            "vm.restore: {} {}",
            resp.status,
            resp.body
        );
        Ok((vmm, start, start.elapsed()))
    }

    /// One restore of `snap` in `mode`, measured; the guest must carry on cleanly.
    #[allow(clippy::too_many_arguments)]
    fn measure_restore(
        &self,
        ctx: &Ctx,
        snap: &Path,
        mode: &str,
        prefix: &str,
        serial: &Path,
        nonce: u64,
        bytes: u64,
    ) -> anyhow::Result<Vec<Sample>> {
        let mut samples = Vec::new();
        let (mut vmm, start, call) = self.restore(ctx, snap, mode, serial)?;
        samples.push(Sample::ms(format!("{prefix}_restore_call"), call));
        let tick_at = Self::first_tick(&mut vmm, serial, nonce)?;
        samples.push(Sample::ms(format!("{prefix}_first_tick"), tick_at - start));
        if mode == "Copy" {
            samples.push(Sample::new(
                format!("{prefix}_rate"),
                mib_per_s(bytes, call),
                "MiB/s",
            ));
        } else {
            let progress = wait_memory_restored(&vmm, FILL_TIMEOUT, || {})?;
            let resident =
                Duration::from_millis(progress["completed_after_ms"].as_u64().unwrap_or(0));
            let num = |k: &str| progress[k].as_u64().unwrap_or(0) as f64;
            samples.push(Sample::ms(format!("{prefix}_fully_resident"), resident));
            samples.push(Sample::new(
                format!("{prefix}_fill_rate"),
                mib_per_s(bytes, resident),
                "MiB/s",
            ));
            samples.push(Sample::new(
                format!("{prefix}_faults"),
                num("faults"),
                "count",
            ));
            samples.push(Sample::new(
                format!("{prefix}_fault_p50"),
                num("fault_p50_us"),
                "us",
            ));
            samples.push(Sample::new(
                format!("{prefix}_fault_p99"),
                num("fault_p99_us"),
                "us",
            ));
        }
        samples.push(Sample::new(
            format!("{prefix}_peak_rss"),
            peak_rss_mib(vmm.pid())?,
            "MiB",
        ));
        let from = vmm.serial().len();
        vmm.wait_ticks(1, from, STEP_TIMEOUT)?;
        vmm.kill()?;
        Ok(samples)
    }

    /// Waits for the restored guest's first tick (same nonce, clean) and one more.
    fn first_tick(vmm: &mut VmmProcess, serial: &Path, nonce: u64) -> anyhow::Result<Instant> {
        vmm.follow_serial(serial);
        let (idx, tick) = vmm.wait_tick(0, STEP_TIMEOUT)?;
        let at = Instant::now();
        ensure!(
            tick.nonce == nonce,
            "restored guest has another nonce: {tick:?}"
        );
        vmm.wait_ticks(1, idx + 1, STEP_TIMEOUT)?;
        Ok(at)
    }
}

#[derive(Clone, Copy)]
pub enum Cache {
    Cold,
    Warm,
}

impl Cache {
    fn name(self) -> &'static str {
        match self {
            Cache::Cold => "cold",
            Cache::Warm => "warm",
        }
    }

    /// Drops the page cache (needs root), or reads the memory files into it. Either
    /// way the VMM's binary ends up cached, as on a host that runs it routinely: a
    /// restore's time is about the snapshot, not about paging in code from disk.
    pub fn prepare(self, snap: &Path, bins: &test_infra::Binaries) -> anyhow::Result<()> {
        match self {
            Cache::Cold => {
                std::process::Command::new("sync").status()?;
                std::fs::write("/proc/sys/vm/drop_caches", "3")
                    .context("dropping the page cache (the bench runs as root)")?;
            }
            // Only the data: reading a sparse file's holes would fill the page cache
            // with gigabytes of zero pages the restore never reads.
            Cache::Warm => {
                for entry in std::fs::read_dir(snap)? {
                    read_data_extents(&entry?.path())?;
                }
            }
        }
        // Last: reading gigabytes of snapshot takes long enough here for the host's
        // DAMON page-out to evict the binary's idle pages.
        std::fs::read(&bins.cloud_hypervisor)?;
        Ok(())
    }
}

/// Reads every data extent of `path` (SEEK_DATA/SEEK_HOLE) once, so it is in the page
/// cache; holes are skipped.
fn read_data_extents(path: &Path) -> anyhow::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    use vmm_sys_util::seek_hole::SeekHole;
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut pos = 0u64;
    let mut buf = vec![0u8; 8 << 20];
    while pos < len {
        let Some(data) = file.seek_data(pos)? else {
            break;
        };
        let hole = file.seek_hole(data)?.unwrap_or(len);
        file.seek(SeekFrom::Start(data))?;
        let mut left = hole - data;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = file.read(&mut buf[..want])?;
            ensure!(n > 0, "{} ended early", path.display());
            left -= n as u64;
        }
        pos = hole;
    }
    Ok(())
}

impl Scenario for SnapshotRestore {
    fn name(&self) -> String {
        format!(
            "snapshot_restore/{}M_ram/{}M_touched",
            self.ram_mib, self.touched_mib
        )
    }

    fn cpus(&self) -> u8 {
        self.cpus
    }

    fn run_once(&self, ctx: &Ctx) -> anyhow::Result<Vec<Sample>> {
        let dir = TempDir::new("bench-snap")?;
        let serial = dir.join("serial.log");
        let mut src = ctx
            .vmm()
            .tmp_prefix("bench-snap-src")
            .kernel(&ctx.kernel)
            .cmdline(format!(
                "mem={}M mode=fill tick={TICK_MS}",
                self.touched_mib
            ))
            .cpus(self.cpus)
            .memory(format!("size={}M", self.ram_mib))
            .serial_file(&serial)
            .spawn()?;
        let nonce = crate::wait_ticking(&mut src, STEP_TIMEOUT, FILL_TIMEOUT, 1)?.nonce;

        src.api_ok("PUT", "vm.pause", None)?;
        let snap = dir.join("snap");
        let body = format!(r#"{{"destination_url":"{}"}}"#, file_url(&snap));
        let t = Instant::now();
        let resp = src.api_with_timeout("PUT", "vm.snapshot", Some(&body), FILL_TIMEOUT)?;
        ensure!(
            resp.is_success(),
            "vm.snapshot: {} {}",
            resp.status,
            resp.body
        );
        let snapshot_time = t.elapsed();
        let bytes = data_bytes(&snap)?;
        src.kill()?;
        drop(src);

        let mut samples = vec![
            Sample::new("data", bytes as f64 / (1 << 20) as f64, "MiB"),
            Sample::ms("snapshot", snapshot_time),
            Sample::new("snapshot_rate", mib_per_s(bytes, snapshot_time), "MiB/s"),
        ];

        // Each restore mode from a cold page cache (the snapshot read from disk, as after
        // a reboot) and from a warm one (restored right after it was written or read).
        let mut n = 0;
        for (mode, name) in [("Copy", "copy"), ("OnDemand", "ondemand")] {
            for cache in [Cache::Cold, Cache::Warm] {
                n += 1;
                std::fs::rename(&serial, dir.join(format!("serial.{n}.log")))?;
                cache.prepare(&snap, &ctx.side.bins)?;
                let prefix = format!("{name}_{}", cache.name());
                samples.extend(
                    self.measure_restore(ctx, &snap, mode, &prefix, &serial, nonce, bytes)?,
                );
            }
        }
        Ok(samples)
    }
}
