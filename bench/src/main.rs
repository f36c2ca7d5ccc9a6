//! `bench`: measures the VMM with the real test guest and writes `<out>/results.json`
//! and `<out>/results.md`.
//!
//! Every measurement is a [`Scenario`]: it runs once per repetition and returns named
//! samples. To add a measurement (snapshot, restore, migration ...), implement the trait
//! in a new module and add it to [`scenarios`].
//!
//! `--compare <dir>` ([`compare`]) runs the paths of [`paths`] on our binaries and on the
//! ones in `<dir>` ([`side::Side`]), alternately, timed from outside both VMMs
//! ([`clock`]); see docs/benchmarks.md.

mod clock;
mod compare;
mod host;
mod migration;
mod offload;
mod paths;
mod report;
mod scenarios;
mod side;
mod snapshot;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

pub use report::ms;

use anyhow::{Context, bail};
use clap::Parser;
use test_infra::Binaries;

use crate::paths::{Group, Size};
use crate::report::{Report, ScenarioResult};
use crate::side::Side;
use crate::snapshot::Cache;

#[derive(Parser, Debug)]
#[command(about = "Benchmarks the VMM with the test guest")]
struct Args {
    /// Directory for results.json and results.md (created if missing).
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Repetitions of every scenario.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// vCPU counts to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    cpus: Vec<u8>,
    /// Only run scenarios whose name contains this string.
    #[arg(long)]
    filter: Option<String>,
    /// Do not (re)build cloud-hypervisor first; use what is next to this binary (or
    /// $CLOUD_HYPERVISOR_BIN / $CH_REMOTE_BIN).
    #[arg(long)]
    no_build: bool,
    /// Compare mode (docs/benchmarks.md): run the comparison paths on our binaries and
    /// on the Cloud-Hypervisor-compatible cloud-hypervisor, ch-remote and offload_daemon
    /// in this directory, alternately, and write one table with both and the ratio.
    #[arg(long, value_name = "DIR")]
    compare: Option<PathBuf>,
    /// Compare mode: extra arguments for the other VMM, split at spaces (e.g. the
    /// switch that turns its syscall filters off, see docs/benchmarks.md).
    #[arg(
        long,
        value_name = "ARGS",
        default_value = "",
        allow_hyphen_values = true
    )]
    compare_vmm_args: String,
    /// Compare mode: the other side's column name.
    #[arg(long, value_name = "NAME", default_value = "CH")]
    compare_label: String,
    /// Compare mode: guest sizes as RAM:TOUCHED in MiB, comma separated.
    #[arg(
        long,
        value_name = "SIZES",
        value_delimiter = ',',
        default_value = "1024:768,4096:3072"
    )]
    compare_sizes: Vec<Size>,
    /// Compare mode: path groups, comma separated (offload, snapshot, precopy, postcopy,
    /// local).
    #[arg(long, value_name = "GROUPS", value_delimiter = ',',
          default_value = "offload,snapshot,precopy,postcopy,local", value_parser = Group::parse)]
    compare_paths: Vec<Group>,
    /// Compare mode: restore from a warm page cache instead of dropping it first (which
    /// needs root).
    #[arg(long)]
    warm_cache: bool,
}

/// What every scenario gets: the side it runs on and the guest.
pub struct Ctx {
    pub side: Side,
    pub kernel: PathBuf,
}

impl Ctx {
    /// A VMM of this side (its extra arguments included).
    pub fn vmm(&self) -> test_infra::VmmBuilder {
        self.side.vmm("vmm")
    }
}

/// One measurement. `run_once` performs a full repetition (its own VMM, from spawn to
/// teardown) and returns one value per metric it measures.
pub trait Scenario {
    /// Unique, stable name (a key in results.json), e.g. `boot_to_ready/2cpu`.
    fn name(&self) -> String;
    fn cpus(&self) -> u8;
    fn run_once(&self, ctx: &Ctx) -> anyhow::Result<Vec<Sample>>;
}

/// One measured value of one metric, in `unit`.
#[derive(Debug, Clone)]
pub struct Sample {
    pub metric: String,
    pub value: f64,
    pub unit: &'static str,
}

impl Sample {
    /// A duration, reported in milliseconds.
    pub fn ms(metric: impl Into<String>, value: Duration) -> Sample {
        Sample {
            metric: metric.into(),
            value: value.as_secs_f64() * 1e3,
            unit: "ms",
        }
    }

    pub fn new(metric: impl Into<String>, value: f64, unit: &'static str) -> Sample {
        Sample {
            metric: metric.into(),
            value,
            unit,
        }
    }
}

/// Every scenario, for each vCPU count.
/// Waits until a freshly spawned guest answers on its API, booted, filled its memory
/// (within `fill`) and printed `ticks` tick lines; returns the first of them.
pub fn wait_ticking(
    vmm: &mut test_infra::VmmProcess,
    step: Duration,
    fill: Duration,
    ticks: usize,
) -> anyhow::Result<test_infra::Tick> {
    vmm.wait_api_ready(step)?;
    let (boot_idx, _) = vmm.wait_boot(step)?;
    let (ready_idx, _) = vmm.wait_ready(boot_idx + 1, fill)?;
    let (_, seen) = vmm.wait_ticks(ticks, ready_idx + 1, step)?;
    seen.into_iter()
        .next()
        .context("the guest printed no tick line")
}

fn scenarios(cpus: &[u8]) -> Vec<Box<dyn Scenario>> {
    let mut all: Vec<Box<dyn Scenario>> = Vec::new();
    for &n in cpus {
        all.push(Box::new(scenarios::BootToReady { cpus: n }));
        all.push(Box::new(scenarios::PauseResume { cpus: n, cycles: 5 }));
    }
    // Guests of 1, 4 and 8 GiB that wrote 256 MiB or about 75% of their RAM, on 2 vCPUs
    // (this host has 2 cores).
    for (ram_gib, touched_mib) in [(1, 256), (1, 768), (4, 256), (4, 3072), (8, 256), (8, 6144)] {
        all.push(Box::new(snapshot::SnapshotRestore {
            cpus: 2,
            ram_mib: ram_gib << 10,
            touched_mib,
        }));
    }
    // Live migration: every transport on a 1 GiB guest rewriting 64 MiB/s of 256 MiB,
    // then a 4 GiB guest with 1 GiB touched at three dirty rates over TCP x4 and locally.
    use migration::{Migrate, Transport};
    for transport in [
        Transport::Unix,
        Transport::Tcp { connections: 1 },
        Transport::Tcp { connections: 4 },
        Transport::Local,
    ] {
        all.push(Box::new(Migrate {
            ram_mib: 1024,
            touched_mib: 256,
            rate: Some(64),
            transport,
            postcopy: false,
        }));
    }
    // Post-copy beside pre-copy on the same guests.
    for (ram_mib, touched_mib) in [(1024, 768), (4096, 3072)] {
        for transport in [Transport::Tcp { connections: 1 }, Transport::Unix] {
            for postcopy in [false, true] {
                all.push(Box::new(Migrate {
                    ram_mib,
                    touched_mib,
                    rate: Some(64),
                    transport,
                    postcopy,
                }));
            }
        }
    }
    for transport in [Transport::Tcp { connections: 4 }, Transport::Local] {
        for rate in [None, Some(64), Some(256)] {
            all.push(Box::new(Migrate {
                ram_mib: 4096,
                touched_mib: 1024,
                rate,
                transport,
                postcopy: false,
            }));
        }
    }
    for (ram_gib, touched_mib) in [(1, 256), (1, 768), (4, 3072), (8, 256), (8, 6144)] {
        all.push(Box::new(offload::Offload {
            ram_mib: ram_gib << 10,
            touched_mib,
        }));
    }
    all
}

/// Builds the VMM binaries in the profile this binary was built with, so a
/// `cargo run --release -p bench` never measures a stale or debug VMM.
fn build_vmm() -> anyhow::Result<()> {
    let Some(cargo) = std::env::var_os("CARGO") else {
        // Not started by cargo: trust the binaries that are there.
        return Ok(());
    };
    let exe = std::env::current_exe().context("current_exe")?;
    let profile = exe
        .parent()
        .and_then(|d| d.file_name())
        .and_then(|n| n.to_str())
        .map(|n| if n == "debug" { "dev" } else { n })
        .unwrap_or("release")
        .to_string();
    eprintln!("bench: building cloud-hypervisor ({profile} profile)");
    let status = Command::new(cargo)
        .args([
            "build",
            "--profile",
            &profile,
            "-p",
            "cloud-hypervisor",
            "-p",
            "offload_daemon",
            "--bins",
        ])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build -p cloud-hypervisor failed: {status}");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.reps == 0 {
        bail!("--reps must be at least 1");
    }
    if !args.no_build {
        build_vmm()?;
    }
    let ctx = Ctx {
        side: Side::ours(Binaries::locate()?)?,
        kernel: test_infra::guest::elf_path(),
    };
    eprintln!(
        "bench: VMM {}, guest {}",
        ctx.side.bins.cloud_hypervisor.display(),
        ctx.kernel.display()
    );
    if let Some(dir) = &args.compare {
        let mut other = Side::other(dir, &args.compare_label, &args.compare_vmm_args)?;
        other.probe()?;
        let mut ctx = ctx;
        ctx.side.probe()?;
        let other = Ctx {
            side: other,
            kernel: ctx.kernel.clone(),
        };
        let plan = compare::Plan {
            sizes: args.compare_sizes.clone(),
            groups: args.compare_paths.clone(),
            filter: args.filter.clone(),
            cache: if args.warm_cache {
                Cache::Warm
            } else {
                Cache::Cold
            },
            reps: args.reps,
            out: args.out.clone(),
        };
        return compare::run(&ctx, &other, &plan);
    }

    let mut results: Vec<ScenarioResult> = Vec::new();
    for scenario in scenarios(&args.cpus) {
        let name = scenario.name();
        if args
            .filter
            .as_ref()
            .is_some_and(|f| !name.contains(f.as_str()))
        {
            continue;
        }
        let mut samples: Vec<Sample> = Vec::new();
        for rep in 0..args.reps {
            let got = scenario
                .run_once(&ctx)
                .with_context(|| format!("{name}, repetition {}", rep + 1))?;
            eprintln!(
                "bench: {name} #{}: {}",
                rep + 1,
                got.iter()
                    .map(|s| format!("{}={:.3}{}", s.metric, s.value, s.unit))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            samples.extend(got);
        }
        results.extend(report::summarize(&name, scenario.cpus(), &samples));
    }

    let report = Report::new(args.reps, results);
    report.write(&args.out)?;
    print!("{}", report.markdown());
    eprintln!(
        "bench: wrote {} and {}",
        args.out.join("results.json").display(),
        args.out.join("results.md").display()
    );
    Ok(())
}
