//! The offload daemon: a guest of `ram_mib` that wrote `touched_mib` is snapshotted by
//! `offload_daemon snapshot` (the VMM sends with local=on), then restored eagerly by
//! `offload_daemon restore --resume` into a fresh VMM waiting in receive-migration, then
//! on demand (`--ondemand`) into another; each restored guest must tick on with the same
//! nonce. Both restores start from a cold page cache.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use test_infra::TempDir;
use test_infra::daemon::DaemonProcess;

use crate::snapshot::{Cache, peak_rss_mib};
use crate::{Ctx, Sample, Scenario};

const STEP_TIMEOUT: Duration = Duration::from_secs(300);

pub struct Offload {
    pub ram_mib: u64,
    pub touched_mib: u64,
}

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

impl Scenario for Offload {
    fn name(&self) -> String {
        format!(
            "offload/{}M_ram/{}M_touched",
            self.ram_mib, self.touched_mib
        )
    }

    fn cpus(&self) -> u8 {
        2
    }

    fn run_once(&self, ctx: &Ctx) -> anyhow::Result<Vec<Sample>> {
        let daemon = ctx.side.daemon()?.to_path_buf();
        let dir = TempDir::new("bench-offload")?;
        let serial = dir.join("serial.log");
        let mut src = ctx
            .vmm()
            .tmp_prefix("bench-offload-src")
            .kernel(&ctx.kernel)
            .cmdline(format!("mem={}M mode=fill tick=200", self.touched_mib))
            .cpus(2)
            .memory(format!("size={}M,shared=on", self.ram_mib))
            .serial_file(&serial)
            .spawn()?;
        let nonce = crate::wait_ticking(&mut src, STEP_TIMEOUT, STEP_TIMEOUT, 1)?.nonce;

        // Snapshot: the VMM sends to the daemon, which writes the directory.
        let snap = dir.join("snap");
        let sock = dir.join("snap.sock");
        let mut snapshotter = DaemonProcess::spawn(
            &daemon,
            [
                "snapshot".as_ref(),
                "--socket".as_ref(),
                sock.as_os_str(),
                "--output-dir".as_ref(),
                snap.as_os_str(),
            ],
            &dir.join("snapshot.log"),
        )?;
        ensure!(
            test_infra::migration::wait_listening(
                &format!("unix:{}", sock.display()),
                Duration::from_secs(10)
            )?,
            "the snapshot daemon never listened"
        );
        let start = Instant::now();
        src.api_ok(
            "PUT",
            "vm.send-migration",
            Some(&format!(
                r#"{{"destination_url":"unix:{}","local":true}}"#,
                sock.display()
            )),
        )?;
        let status = snapshotter
            .wait_exit(STEP_TIMEOUT)?
            .context("snapshot daemon did not exit")?;
        let snapshot_time = start.elapsed();
        ensure!(
            status.success(),
            "snapshot daemon: {}",
            snapshotter.output()
        );
        src.expect_exit(STEP_TIMEOUT)?;
        let data: u64 = std::fs::read_dir(&snap)?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("memory-"))
            .map(|e| {
                e.metadata()
                    .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            })
            .sum::<std::io::Result<u64>>()?;

        // Both restores read the snapshot from disk, as after a reboot: whether the page
        // cache holds it otherwise depends on what ran before (the daemon writes and
        // reads with O_DIRECT, but serves on-demand pages through the cache).
        // Eager restore into a fresh VMM waiting in receive-migration.
        Cache::Cold.prepare(&snap, &ctx.side.bins)?;
        std::fs::read(&daemon)?;
        let mut dest = ctx
            .vmm()
            .tmp_prefix("bench-offload-dst")
            // The received VM writes where this VMM's own --serial says.
            .serial_file(&serial)
            .spawn()?;
        dest.wait_api_ready(STEP_TIMEOUT)?;
        let rsock = dir.join("restore.sock");
        let url = format!("unix:{}", rsock.display());
        let receiver = test_infra::migration::receive_in_background(
            dest.api_socket().context("api socket")?,
            &url,
            false,
            STEP_TIMEOUT,
        )?;
        let start = Instant::now();
        let mut restorer = DaemonProcess::spawn(
            &daemon,
            [
                "restore".as_ref(),
                "--socket".as_ref(),
                rsock.as_os_str(),
                "--input-dir".as_ref(),
                snap.as_os_str(),
                "--resume".as_ref(),
            ],
            &dir.join("restore.log"),
        )?;
        let status = restorer
            .wait_exit(STEP_TIMEOUT)?
            .context("restore daemon did not exit")?;
        let restore_time = start.elapsed();
        ensure!(status.success(), "restore daemon: {}", restorer.output());
        let received = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
        ensure!(received.status == 204, "receive: {}", received.body);
        dest.follow_serial(&serial);
        dest.serial().refresh()?;
        let from = dest.serial().len();
        let (_, after) = dest.wait_ticks(2, from, STEP_TIMEOUT)?;
        ensure!(after[0].nonce == nonce, "restored guest has another nonce");

        dest.kill()?;
        drop(dest);

        // On-demand restore: the VM resumes before its memory is back.
        std::fs::rename(&serial, dir.join("serial.eager.log"))?;
        Cache::Cold.prepare(&snap, &ctx.side.bins)?;
        // The daemon's binary stays cached too, as on a host that runs it routinely:
        // time to resume is about the snapshot, not about loading a program from disk.
        std::fs::read(&daemon)?;
        let mut od = ctx
            .vmm()
            .tmp_prefix("bench-offload-od")
            // The received VM writes where this VMM's own --serial says.
            .serial_file(&serial)
            .spawn()?;
        od.wait_api_ready(STEP_TIMEOUT)?;
        let osock = dir.join("ondemand.sock");
        let url = format!("unix:{}", osock.display());
        let receiver = test_infra::migration::receive_in_background(
            od.api_socket().context("api socket")?,
            &url,
            true,
            STEP_TIMEOUT,
        )?;
        let start = Instant::now();
        let mut server = DaemonProcess::spawn(
            &daemon,
            [
                "restore".as_ref(),
                "--socket".as_ref(),
                osock.as_os_str(),
                "--input-dir".as_ref(),
                snap.as_os_str(),
                "--resume".as_ref(),
                "--ondemand".as_ref(),
            ],
            &dir.join("ondemand.log"),
        )?;
        let received = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
        let resume_time = start.elapsed();
        ensure!(received.status == 204, "receive: {}", received.body);
        let mut daemon_rss = 0.0f64;
        let daemon_pid = server.pid();
        let progress = crate::snapshot::wait_memory_restored(&od, STEP_TIMEOUT, || {
            if let Ok(rss) = peak_rss_mib(daemon_pid) {
                daemon_rss = daemon_rss.max(rss);
            }
        })?;
        let status = server
            .wait_exit(STEP_TIMEOUT)?
            .context("daemon did not exit")?;
        ensure!(status.success(), "on-demand daemon: {}", server.output());
        od.follow_serial(&serial);
        let (_, after) = od.wait_ticks(2, 0, STEP_TIMEOUT)?;
        ensure!(after[0].nonce == nonce, "restored guest has another nonce");
        let resident = Duration::from_millis(progress["completed_after_ms"].as_u64().unwrap_or(0));
        let num = |k: &str| progress[k].as_u64().unwrap_or(0) as f64;

        Ok(vec![
            Sample::ms("ondemand_resume", resume_time),
            Sample::ms("ondemand_fully_resident", resident),
            Sample::new("ondemand_fill_rate", mib_per_s(data, resident), "MiB/s"),
            Sample::new("ondemand_faults", num("faults"), "count"),
            Sample::new("ondemand_fault_p50", num("fault_p50_us"), "us"),
            Sample::new("ondemand_fault_p99", num("fault_p99_us"), "us"),
            Sample::new("ondemand_vmm_peak_rss", peak_rss_mib(od.pid())?, "MiB"),
            Sample::new("ondemand_daemon_peak_rss", daemon_rss, "MiB"),
            Sample::new("data_on_disk", data as f64 / (1 << 20) as f64, "MiB"),
            Sample::ms("daemon_snapshot", snapshot_time),
            Sample::new("snapshot_rate", mib_per_s(data, snapshot_time), "MiB/s"),
            Sample::ms("daemon_eager_restore", restore_time),
            Sample::new("restore_rate", mib_per_s(data, restore_time), "MiB/s"),
        ])
    }
}
