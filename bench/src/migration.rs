//! Live migration between two VMM processes: a guest of `ram_mib` that keeps rewriting
//! `touched_mib` at `rate` MiB/s migrates over UNIX, TCP (1 or 4 connections) or locally
//! (memfds handed over), pre-copy or post-copy. The destination must go on ticking
//! cleanly with the nonce.
//!
//! Post-copy adds what happens after the switch: time until every page is on the
//! destination, fault latency, and how well the guest keeps going meanwhile (its tick
//! rate and its page-write rate during the transfer, against the same guest before).

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use test_infra::TempDir;

use crate::{Ctx, Sample, Scenario};

const STEP_TIMEOUT: Duration = Duration::from_secs(300);
const DOWNTIME_MS: u64 = 20;

#[derive(Clone, Copy, Debug)]
pub enum Transport {
    Unix,
    Tcp { connections: u8 },
    Local,
}

pub struct Migrate {
    pub ram_mib: u64,
    pub touched_mib: u64,
    /// Guest dirty rate in MiB/s; `None` = the guest only reads (mode=fill).
    pub rate: Option<u64>,
    pub transport: Transport,
    pub postcopy: bool,
}

/// Guest tick period in the benchmark: short, so the tick rate during a post-copy
/// transfer of a second or less is still measured over several ticks.
const TICK_MS: u64 = 50;

/// Tick lines in the serial log so far: how many, and the last one.
fn tick_count(serial: &std::path::Path) -> anyhow::Result<(u64, Option<test_infra::Tick>)> {
    let text = std::fs::read_to_string(serial)?;
    let mut n = 0;
    let mut last = None;
    for t in text.lines().filter_map(|l| test_infra::Tick::parse(l).ok()) {
        n += 1;
        last = Some(t);
    }
    Ok((n, last))
}

/// Ticks per second and page writes per second over a wall-clock window.
struct Pace {
    ticks_per_s: f64,
    writes_per_s: f64,
}

fn pace(
    start: (u64, Option<test_infra::Tick>),
    end: (u64, Option<test_infra::Tick>),
    took: Duration,
) -> Pace {
    let secs = took.as_secs_f64().max(1e-3);
    let writes = match (start.1, end.1) {
        (Some(a), Some(b)) => b.generation.saturating_sub(a.generation) as f64,
        _ => 0.0,
    };
    Pace {
        ticks_per_s: end.0.saturating_sub(start.0) as f64 / secs,
        writes_per_s: writes / secs,
    }
}

impl Scenario for Migrate {
    fn name(&self) -> String {
        let t = match self.transport {
            Transport::Unix => "unix".to_string(),
            Transport::Tcp { connections } => format!("tcp{connections}"),
            Transport::Local => "local".to_string(),
        };
        let rate = self
            .rate
            .map_or("read-only".to_string(), |r| format!("dirty{r}M/s"));
        let mode = if self.postcopy { "postcopy" } else { "precopy" };
        format!(
            "migrate/{mode}/{t}/{}M_ram/{}M_touched/{rate}",
            self.ram_mib, self.touched_mib
        )
    }

    fn cpus(&self) -> u8 {
        2
    }

    fn run_once(&self, ctx: &Ctx) -> anyhow::Result<Vec<Sample>> {
        let dir = TempDir::new("bench-mig")?;
        let serial = dir.join("serial.log");
        let shared = matches!(self.transport, Transport::Local);
        let mode = match self.rate {
            Some(r) => format!("mode=dirty rate={r}"),
            None => "mode=fill".into(),
        };
        let mut src = ctx
            .vmm()
            .tmp_prefix("bench-mig-src")
            .kernel(&ctx.kernel)
            .cmdline(format!("mem={}M {mode} tick={TICK_MS}", self.touched_mib))
            .cpus(2)
            .memory(format!(
                "size={}M,shared={}",
                self.ram_mib,
                if shared { "on" } else { "off" }
            ))
            .serial_file(&serial)
            .spawn()?;
        let nonce = crate::wait_ticking(&mut src, STEP_TIMEOUT, STEP_TIMEOUT, 2)?.nonce;
        // The guest's own pace before the migration, to compare the transfer against.
        let normal = if self.postcopy {
            let a = (tick_count(&serial)?, Instant::now());
            std::thread::sleep(Duration::from_secs(1));
            let b = tick_count(&serial)?;
            Some(pace(a.0, b, a.1.elapsed()))
        } else {
            None
        };

        let mut dest = ctx
            .vmm()
            .tmp_prefix("bench-mig-dst")
            // The received VM writes where this VMM's own --serial says.
            .serial_file(&serial)
            .spawn()?;
        dest.wait_api_ready(STEP_TIMEOUT)?;
        let (url, options) = match self.transport {
            Transport::Unix => (
                format!("unix:{}", dir.join("m.sock").display()),
                String::new(),
            ),
            Transport::Local => (
                format!("unix:{}", dir.join("m.sock").display()),
                r#","local":true"#.to_string(),
            ),
            Transport::Tcp { connections } => (
                format!("tcp:127.0.0.1:{}", test_infra::migration::free_tcp_port()?),
                format!(r#","connections":{connections}"#),
            ),
        };
        let options = if self.postcopy {
            format!(r#"{options},"postcopy":true"#)
        } else {
            options
        };
        let receiver = test_infra::migration::receive_in_background(
            dest.api_socket().context("destination socket")?,
            &url,
            self.postcopy,
            STEP_TIMEOUT,
        )?;
        let start = Instant::now();
        // The issue's downtime target, asked for explicitly (the default is 300 ms).
        src.api_ok(
            "PUT",
            "vm.send-migration",
            Some(&format!(
                r#"{{"destination_url":"{url}","downtime_ms":{DOWNTIME_MS}{options}}}"#
            )),
        )?;
        let received = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
        let wall = start.elapsed();
        ensure!(
            received.status == 204,
            "receive: {} {}",
            received.status,
            received.body
        );
        // Post-copy: the destination runs now and pulls memory until every page is in.
        let mut transfer = None;
        if self.postcopy {
            let at_switch = (tick_count(&serial)?, Instant::now());
            let restore = loop {
                let r = dest.vm_info()?["memory_restore"].clone();
                if r["complete"] == true {
                    break r;
                }
                ensure!(
                    at_switch.1.elapsed() < STEP_TIMEOUT,
                    "memory never completed: {r}"
                );
                std::thread::sleep(Duration::from_millis(5));
            };
            let during = pace(at_switch.0, tick_count(&serial)?, at_switch.1.elapsed());
            transfer = Some((restore, during));
        }
        let exit = src.expect_exit(STEP_TIMEOUT)?;
        ensure!(exit.success(), "source exited with {exit}");
        let finished = src
            .events()
            .into_iter()
            .find(|e| e["event"] == "migration-finished")
            .context("no migration-finished event")?;
        let prop = |k: &str| -> f64 {
            finished["properties"][k]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        dest.follow_serial(&serial);
        dest.serial().refresh()?;
        let from = dest.serial().len();
        let (_, after) = dest.wait_ticks(2, from, STEP_TIMEOUT)?;
        ensure!(
            after[0].nonce == nonce,
            "destination guest has another nonce"
        );

        let total_ms = prop("total_ms");
        let bytes = prop("bytes_sent");
        let mut samples = vec![
            Sample::new("total", total_ms, "ms"),
            Sample::ms("send_call_to_received", wall),
            Sample::new("downtime", prop("downtime_us") / 1000.0, "ms"),
            Sample::new("iterations", prop("iterations"), "count"),
            Sample::new("sent", bytes / (1 << 20) as f64, "MiB"),
        ];
        if let (Some((restore, during)), Some(normal)) = (&transfer, &normal) {
            let num = |k: &str| restore[k].as_f64().unwrap_or(0.0);
            samples.push(Sample::new(
                "fully_resident",
                num("completed_after_ms"),
                "ms",
            ));
            samples.push(Sample::new("faults", num("faults"), "count"));
            samples.push(Sample::new("fault_p50", num("fault_p50_us"), "us"));
            samples.push(Sample::new("fault_p99", num("fault_p99_us"), "us"));
            samples.push(Sample::new(
                "pulled",
                num("bytes_fetched") / (1 << 20) as f64,
                "MiB",
            ));
            if num("completed_after_ms") > 0.0 {
                samples.push(Sample::new(
                    "pull_rate",
                    num("bytes_fetched") / (1 << 20) as f64 / (num("completed_after_ms") / 1e3),
                    "MiB/s",
                ));
            }
            let pct = |a: f64, b: f64| if b > 0.0 { 100.0 * a / b } else { 0.0 };
            samples.push(Sample::new(
                "tick_rate_during_transfer",
                pct(during.ticks_per_s, normal.ticks_per_s),
                "%",
            ));
            if self.rate.is_some() {
                samples.push(Sample::new(
                    "write_rate_during_transfer",
                    pct(during.writes_per_s, normal.writes_per_s),
                    "%",
                ));
            }
        }
        if total_ms > 0.0 && bytes > 0.0 {
            samples.push(Sample::new(
                "throughput",
                bytes / (1 << 20) as f64 / (total_ms / 1000.0),
                "MiB/s",
            ));
        }
        Ok(samples)
    }
}
