//! Live migration between two VMM processes: a guest of `ram_mib` that keeps rewriting
//! `touched_mib` at `rate` MiB/s migrates over UNIX, TCP (1 or 4 connections) or locally
//! (memfds handed over). The destination must go on ticking cleanly with the nonce.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use test_infra::{TempDir, VmmBuilder};

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
        format!(
            "migrate/{t}/{}M_ram/{}M_touched/{rate}",
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
        let mut src = VmmBuilder::new(ctx.bins.clone())
            .tmp_prefix("bench-mig-src")
            .kernel(&ctx.kernel)
            .cmdline(format!("mem={}M {mode} tick=100", self.touched_mib))
            .cpus(2)
            .memory(format!(
                "size={}M,shared={}",
                self.ram_mib,
                if shared { "on" } else { "off" }
            ))
            .serial_file(&serial)
            .spawn()?;
        src.wait_api_ready(STEP_TIMEOUT)?;
        let (boot_idx, _) = src.wait_boot(STEP_TIMEOUT)?;
        let (ready_idx, _) = src.wait_ready(boot_idx + 1, STEP_TIMEOUT)?;
        let (_, ticks) = src.wait_ticks(2, ready_idx + 1, STEP_TIMEOUT)?;
        let nonce = ticks[0].nonce;

        let mut dest = VmmBuilder::new(ctx.bins.clone())
            .tmp_prefix("bench-mig-dst")
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
        let receiver = test_infra::migration::receive_in_background(
            dest.api_socket().context("destination socket")?,
            &url,
            false,
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
