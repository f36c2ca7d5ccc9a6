//! The measurements. Each repetition starts its own VMM with the test guest and ends on
//! clean verifier ticks, so a number never comes from a broken guest.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use test_infra::{VmmBuilder, VmmProcess};

use crate::{Ctx, Sample, Scenario};

const TICK_MS: u64 = 100;
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
const TICK_TIMEOUT: Duration = Duration::from_secs(5);

fn guest(ctx: &Ctx, name: &str, cpus: u8) -> VmmBuilder {
    ctx.vmm()
        .tmp_prefix(name)
        .kernel(&ctx.kernel)
        .cmdline(format!("mem=16M tick={TICK_MS}"))
        .cpus(cpus)
        .memory("size=256M")
}

/// Waits for two clean ticks from serial line `from`; returns the line after them.
fn clean_ticks(vmm: &mut VmmProcess, from: usize) -> anyhow::Result<usize> {
    let (pos, _) = vmm
        .wait_ticks(2, from, TICK_TIMEOUT)
        .context("guest verifier ticks")?;
    Ok(pos)
}

/// Process spawn to the guest's first `TG ready` line (and to `TG boot` on the way).
pub struct BootToReady {
    pub cpus: u8,
}

impl Scenario for BootToReady {
    fn name(&self) -> String {
        format!("boot_to_ready/{}cpu", self.cpus)
    }

    fn cpus(&self) -> u8 {
        self.cpus
    }

    fn run_once(&self, ctx: &Ctx) -> anyhow::Result<Vec<Sample>> {
        let start = Instant::now();
        let mut vmm = guest(ctx, "bench-boot", self.cpus).spawn()?;
        let (boot_idx, boot) = vmm.wait_boot(BOOT_TIMEOUT)?;
        let to_boot = start.elapsed();
        ensure!(
            boot.cpus == u32::from(self.cpus),
            "guest saw {} CPUs, want {}",
            boot.cpus,
            self.cpus
        );
        let (ready_idx, _) = vmm.wait_ready(boot_idx + 1, BOOT_TIMEOUT)?;
        let to_ready = start.elapsed();
        clean_ticks(&mut vmm, ready_idx + 1)?;
        Ok(vec![
            Sample::ms("spawn_to_boot_line", to_boot),
            Sample::ms("spawn_to_ready", to_ready),
        ])
    }
}

/// Time for `PUT vm.pause` and `PUT vm.resume` to return, `cycles` times per VM, with
/// the guest proven running (a clean tick) between cycles.
pub struct PauseResume {
    pub cpus: u8,
    pub cycles: usize,
}

impl Scenario for PauseResume {
    fn name(&self) -> String {
        format!("pause_resume/{}cpu", self.cpus)
    }

    fn cpus(&self) -> u8 {
        self.cpus
    }

    fn run_once(&self, ctx: &Ctx) -> anyhow::Result<Vec<Sample>> {
        let mut vmm = guest(ctx, "bench-pause", self.cpus).spawn()?;
        vmm.wait_api_ready(BOOT_TIMEOUT)?;
        let (boot_idx, _) = vmm.wait_boot(BOOT_TIMEOUT)?;
        let (ready_idx, _) = vmm.wait_ready(boot_idx + 1, BOOT_TIMEOUT)?;
        let mut pos = clean_ticks(&mut vmm, ready_idx + 1)?;
        let mut samples = Vec::with_capacity(2 * self.cycles);
        for _ in 0..self.cycles {
            let t = Instant::now();
            vmm.api_ok("PUT", "vm.pause", None)?;
            samples.push(Sample::ms("pause", t.elapsed()));
            let t = Instant::now();
            vmm.api_ok("PUT", "vm.resume", None)?;
            samples.push(Sample::ms("resume", t.elapsed()));
            // Ticks completed while paused do not prove the resume worked.
            vmm.serial().refresh()?;
            let from = pos.max(vmm.serial().len());
            pos = clean_ticks(&mut vmm, from)?;
        }
        Ok(samples)
    }
}
