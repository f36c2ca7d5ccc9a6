//! `bench --compare <dir>`: the paths of [`crate::paths`] on our binaries (side A) and
//! on another set (side B), alternating A B A B per repetition, written as one table
//! with both columns and the ratio B/A per path and size (`results.md`,
//! `results.json`).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::paths::{ComparePath, Group, Size};
use crate::report::{ScenarioResult, summarize};
use crate::snapshot::Cache;
use crate::{Ctx, Sample, Scenario};

/// What a row measures, by (group, metric), in table order. Rows for metrics only our
/// VMM reports say so; the other side's cell stays empty.
const ROWS: &[(&str, &str, &str)] = &[
    (
        "offload",
        "daemon_snapshot",
        "daemon snapshot (send-migration → daemon exit, fsynced)",
    ),
    (
        "offload",
        "daemon_eager_first_tick",
        "daemon eager restore (daemon start → first tick)",
    ),
    (
        "offload",
        "daemon_ondemand_first_tick",
        "daemon on-demand restore, first tick",
    ),
    (
        "offload",
        "daemon_ondemand_done",
        "daemon on-demand restore, daemon done (all resident)",
    ),
    ("snapshot", "vm_snapshot", "vm.snapshot (incl. `sync`)"),
    (
        "snapshot",
        "restore_copy_first_tick",
        "vm.restore copy (call → first tick)",
    ),
    (
        "snapshot",
        "restore_ondemand_first_tick",
        "vm.restore on-demand, first tick",
    ),
    (
        "precopy_tcp4",
        "source_done",
        "pre-copy TCP ×4, source done (send-migration → source exit)",
    ),
    (
        "precopy_tcp4",
        "tick_gap",
        "pre-copy TCP ×4, guest tick gap (tick = 20 ms)",
    ),
    (
        "precopy_tcp4",
        "first_tick",
        "pre-copy TCP ×4, destination's first tick",
    ),
    (
        "precopy_tcp4",
        "vmm_downtime",
        "pre-copy TCP ×4, downtime as our VMM reports it (ours only)",
    ),
    (
        "precopy_tcp4",
        "vmm_total",
        "pre-copy TCP ×4, total as our VMM reports it (ours only)",
    ),
    ("postcopy_tcp", "source_done", "post-copy TCP, source done"),
    (
        "postcopy_tcp",
        "first_tick",
        "post-copy TCP, destination's first tick",
    ),
    ("postcopy_tcp", "tick_gap", "post-copy TCP, guest tick gap"),
    (
        "postcopy_tcp",
        "vmm_downtime",
        "post-copy TCP, downtime as our VMM reports it (ours only)",
    ),
    (
        "postcopy_tcp",
        "vmm_total",
        "post-copy TCP, total as our VMM reports it (ours only)",
    ),
    ("local", "first_tick", "local migration, first tick"),
    ("local", "tick_gap", "local migration, guest tick gap"),
    ("local", "source_done", "local migration, source done"),
    (
        "local",
        "vmm_downtime",
        "local migration, downtime as our VMM reports it (ours only)",
    ),
    (
        "local",
        "vmm_total",
        "local migration, total as our VMM reports it (ours only)",
    ),
    (
        "offload",
        "rss_after_ondemand",
        "RSS of the VMM after an on-demand daemon restore",
    ),
];

/// The host limit that bounds a row, by (group, metric) → the [`crate::host`] probe's
/// sample measured in the same repetitions.
const LIMITS: &[(&str, &str, &str)] = &[
    ("offload", "daemon_snapshot", "write"),
    ("offload", "daemon_eager_first_tick", "cold_read"),
    ("snapshot", "vm_snapshot", "write"),
    ("snapshot", "restore_copy_first_tick", "cold_read"),
    ("precopy_tcp4", "source_done", "tcp4"),
];

fn limit_of(group: &str, metric: &str) -> Option<&'static str> {
    LIMITS
        .iter()
        .find(|(g, m, _)| *g == group && *m == metric)
        .map(|(_, _, l)| *l)
}

/// What the user asked `--compare` to run.
pub struct Plan {
    pub sizes: Vec<Size>,
    pub groups: Vec<Group>,
    pub filter: Option<String>,
    pub cache: Cache,
    pub reps: usize,
    pub out: PathBuf,
}

/// One side as the report describes it.
#[derive(Debug, Serialize)]
struct SideInfo {
    label: String,
    vmm: PathBuf,
    vmm_args: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Summary {
    n: usize,
    p50: f64,
    min: f64,
    max: f64,
    samples: Vec<f64>,
}

impl From<&ScenarioResult> for Summary {
    fn from(r: &ScenarioResult) -> Summary {
        Summary {
            n: r.n,
            p50: r.p50,
            min: r.min,
            max: r.max,
            samples: r.samples.clone(),
        }
    }
}

#[derive(Debug, Serialize)]
struct Row {
    scenario: String,
    group: String,
    ram_mib: u64,
    touched_mib: u64,
    metric: String,
    label: String,
    unit: &'static str,
    /// Side A (ours), side B (the other binaries).
    a: Option<Summary>,
    b: Option<Summary>,
    /// Median of B over median of A: above 1, ours took less time (or memory).
    ratio: Option<f64>,
    /// What the host alone needs for this path's data movement ([`LIMITS`]), measured
    /// in the same repetitions, and its median over A's: 1 is as fast as the host can go.
    limit: Option<Limit>,
}

#[derive(Debug, Serialize)]
struct Limit {
    probe: &'static str,
    time: Summary,
    share_of_a: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Failure {
    scenario: String,
    side: String,
    rep: usize,
    error: String,
}

#[derive(Debug, Serialize)]
struct CompareReport {
    timestamp: u64,
    host_cpus: usize,
    reps: usize,
    a: SideInfo,
    b: SideInfo,
    sizes: Vec<(u64, u64)>,
    rows: Vec<Row>,
    failures: Vec<Failure>,
}

fn side_info(ctx: &Ctx) -> SideInfo {
    SideInfo {
        label: ctx.side.label.clone(),
        vmm: ctx.side.bins.cloud_hypervisor.clone(),
        vmm_args: ctx
            .side
            .vmm_args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
    }
}

/// Runs the plan on `a` (ours) and `b`, writes `results.json` and `results.md` into
/// `plan.out` and prints the table. Fails (after writing) if any repetition failed.
pub fn run(a: &Ctx, b: &Ctx, plan: &Plan) -> anyhow::Result<()> {
    let mut scenarios: Vec<ComparePath> = Vec::new();
    for &size in &plan.sizes {
        for &group in &plan.groups {
            scenarios.push(ComparePath {
                group,
                size,
                cache: plan.cache,
            });
        }
    }
    scenarios.retain(|s| {
        plan.filter
            .as_ref()
            .is_none_or(|f| s.name().contains(f.as_str()))
    });
    if scenarios.is_empty() {
        bail!("--compare: no path matches the chosen groups, sizes and --filter");
    }
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for scenario in &scenarios {
        let name = scenario.name();
        let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
        let mut limits: Vec<Sample> = Vec::new();
        for rep in 0..plan.reps {
            for (i, ctx) in [a, b].into_iter().enumerate() {
                match scenario.run_once(ctx) {
                    Ok(got) => {
                        eprintln!(
                            "bench: {name} [{}] #{}: {}",
                            ctx.side.label,
                            rep + 1,
                            got.iter()
                                .map(|s| format!("{}={:.3}{}", s.metric, s.value, s.unit))
                                .collect::<Vec<_>>()
                                .join(" ")
                        );
                        samples[i].extend(got);
                    }
                    Err(e) => {
                        eprintln!(
                            "bench: {name} [{}] #{} FAILED: {e:#}",
                            ctx.side.label,
                            rep + 1
                        );
                        failures.push(Failure {
                            scenario: name.clone(),
                            side: ctx.side.label.clone(),
                            rep: rep + 1,
                            error: format!("{e:#}"),
                        });
                    }
                }
            }
            match probe_host(scenario) {
                Ok(got) => limits.extend(got),
                Err(e) => failures.push(Failure {
                    scenario: name.clone(),
                    side: "host limit".into(),
                    rep: rep + 1,
                    error: format!("{e:#}"),
                }),
            }
        }
        rows.extend(rows_of(scenario, &samples, &limits));
    }
    let report = CompareReport {
        timestamp: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        host_cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        reps: plan.reps,
        a: side_info(a),
        b: side_info(b),
        sizes: plan
            .sizes
            .iter()
            .map(|s| (s.ram_mib, s.touched_mib))
            .collect(),
        rows,
        failures,
    };
    write(&report, &plan.out)?;
    print!("{}", markdown(&report));
    eprintln!(
        "bench: wrote {} and {}",
        plan.out.join("results.json").display(),
        plan.out.join("results.md").display()
    );
    if !report.failures.is_empty() {
        bail!(
            "{} repetition(s) failed (see the table's notes and results.json)",
            report.failures.len()
        );
    }
    Ok(())
}

/// The host's limits for `scenario`, probed in a scratch directory on the disk the
/// scenarios write to.
fn probe_host(scenario: &ComparePath) -> anyhow::Result<Vec<Sample>> {
    let dir = test_infra::TempDir::new("bench-host")?;
    let got = crate::host::probe(scenario.group, scenario.size.touched_mib, dir.path())?;
    eprintln!(
        "bench: {} [host limit]: {}",
        scenario.name(),
        got.iter()
            .map(|s| format!("{}={:.3}{}", s.metric, s.value, s.unit))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(got)
}

/// One row per metric either side measured, in [`ROWS`] order, then any others.
fn rows_of(scenario: &ComparePath, samples: &[Vec<Sample>; 2], limits: &[Sample]) -> Vec<Row> {
    let name = scenario.name();
    let [a, b] = [
        summarize(&name, 2, &samples[0]),
        summarize(&name, 2, &samples[1]),
    ];
    let limits = summarize(&name, 2, limits);
    let group = scenario.group.key();
    let mut metrics: Vec<(&str, &'static str)> = Vec::new();
    for r in a.iter().chain(&b) {
        if !metrics.iter().any(|(m, _)| *m == r.metric) {
            metrics.push((&r.metric, r.unit));
        }
    }
    let order = |m: &str| {
        ROWS.iter()
            .position(|(g, metric, _)| *g == group && *metric == m)
            .unwrap_or(usize::MAX)
    };
    metrics.sort_by_key(|(m, _)| order(m));
    metrics
        .into_iter()
        .map(|(metric, unit)| {
            let find = |side: &[ScenarioResult]| {
                side.iter().find(|r| r.metric == metric).map(Summary::from)
            };
            let (sa, sb) = (find(&a), find(&b));
            let ratio = match (&sa, &sb) {
                (Some(x), Some(y)) if x.p50 > 0.0 => Some(y.p50 / x.p50),
                _ => None,
            };
            let limit = limit_of(group, metric).and_then(|probe| {
                let time = Summary::from(limits.iter().find(|r| r.metric == probe)?);
                let share_of_a = sa
                    .as_ref()
                    .filter(|a| a.p50 > 0.0)
                    .map(|a| time.p50 / a.p50);
                Some(Limit {
                    probe,
                    time,
                    share_of_a,
                })
            });
            Row {
                scenario: name.clone(),
                group: group.to_string(),
                ram_mib: scenario.size.ram_mib,
                touched_mib: scenario.size.touched_mib,
                metric: metric.to_string(),
                label: ROWS
                    .iter()
                    .find(|(g, m, _)| *g == group && *m == metric)
                    .map_or_else(|| format!("{group}: {metric}"), |(_, _, l)| l.to_string()),
                unit,
                a: sa,
                b: sb,
                ratio,
                limit,
            }
        })
        .collect()
}

fn value(v: f64, unit: &str) -> String {
    match unit {
        "ms" if v >= 1000.0 => format!("{:.2} s", v / 1000.0),
        "ms" if v >= 10.0 => format!("{v:.0} ms"),
        "ms" => format!("{v:.1} ms"),
        "MiB" => format!("{v:.0} MiB"),
        u => format!("{v:.3} {u}"),
    }
}

/// The table: one line per path, per size three columns (A, B, B/A).
fn markdown(r: &CompareReport) -> String {
    let (la, lb) = (&r.a.label, &r.b.label);
    let mut md = format!(
        "Median of {} repetition(s) per side, run alternately ({la}, {lb}, {la}, {lb}, ...); \
         every figure measured outside the VMMs (serial lines stamped on arrival, process \
         exits, /proc). {lb}/{la} above 1: {la} took less. \"host\": the bare data \
         movement of that path on this host with no VMM (bench/src/host.rs), measured in \
         the same repetitions, and {la}'s speed as a share of it. {lb}: {}{}\n\n",
        r.reps,
        r.b.vmm.display(),
        if r.b.vmm_args.is_empty() {
            String::new()
        } else {
            format!(" `{}`", r.b.vmm_args.join(" "))
        }
    );
    md.push_str("| path |");
    let mut rule = String::from("|---|");
    for (ram, touched) in &r.sizes {
        md.push_str(&format!(
            " {ram} MiB / {touched} MiB: {la} | {lb} | {lb}/{la} | host | {la}/host |"
        ));
        rule.push_str("---:|---:|---:|---:|---:|");
    }
    md.push('\n');
    md.push_str(&rule);
    md.push('\n');
    // Rows by label, in order of first appearance (sizes share labels).
    let mut labels: Vec<&str> = Vec::new();
    let mut ordered: Vec<&Row> = r.rows.iter().collect();
    ordered.sort_by_key(|row| {
        ROWS.iter()
            .position(|(g, m, _)| *g == row.group && *m == row.metric)
            .unwrap_or(usize::MAX)
    });
    for row in ordered {
        if !labels.contains(&row.label.as_str()) {
            labels.push(&row.label);
        }
    }
    for label in labels {
        md.push_str(&format!("| {label} |"));
        for &(ram, touched) in &r.sizes {
            let row = r
                .rows
                .iter()
                .find(|x| x.label == label && x.ram_mib == ram && x.touched_mib == touched);
            let cell = |s: Option<&Summary>| {
                s.map_or("—".to_string(), |s| {
                    row.map_or(String::new(), |row| value(s.p50, row.unit))
                })
            };
            let ratio = row
                .and_then(|x| x.ratio)
                .map_or("—".to_string(), |v| format!("{v:.2}"));
            let limit = row.and_then(|x| x.limit.as_ref());
            let share = limit
                .and_then(|l| l.share_of_a)
                .map_or(String::new(), |v| format!("{:.0}%", v * 100.0));
            md.push_str(&format!(
                " {} | {} | {ratio} | {} | {share} |",
                cell(row.and_then(|x| x.a.as_ref())),
                cell(row.and_then(|x| x.b.as_ref())),
                limit.map_or(String::new(), |l| format!(
                    "{} ({})",
                    value(l.time.p50, row.map_or("ms", |r| r.unit)),
                    l.probe
                ))
            ));
        }
        md.push('\n');
    }
    if !r.failures.is_empty() {
        md.push_str("\nFailed repetitions (left out of the medians):\n\n");
        for f in &r.failures {
            let first = f.error.lines().next().unwrap_or_default();
            md.push_str(&format!(
                "- {} [{}] #{}: {first}\n",
                f.scenario, f.side, f.rep
            ));
        }
    }
    md
}

fn write(report: &CompareReport, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = serde_json::to_string_pretty(report).context("serializing results")?;
    let path = out.join("results.json");
    std::fs::write(&path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    let path = out.join("results.md");
    std::fs::write(&path, markdown(report))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn table_has_both_columns_the_ratio_and_ours_only_rows() {
        let size = Size {
            ram_mib: 1024,
            touched_mib: 768,
        };
        let scenario = ComparePath {
            group: Group::Precopy,
            size,
            cache: Cache::Warm,
        };
        let a = vec![
            Sample::ms("tick_gap", Duration::from_millis(25)),
            Sample::ms("source_done", Duration::from_millis(2670)),
            Sample::new("vmm_downtime", 4.0, "ms"),
        ];
        let b = vec![
            Sample::ms("source_done", Duration::from_millis(2480)),
            Sample::ms("tick_gap", Duration::from_millis(100)),
        ];
        let rows = rows_of(
            &scenario,
            &[a, b],
            &[Sample::ms("tcp4", Duration::from_millis(2136))],
        );
        assert_eq!(
            rows.iter().map(|r| r.metric.as_str()).collect::<Vec<_>>(),
            ["source_done", "tick_gap", "vmm_downtime"]
        );
        assert!((rows[1].ratio.unwrap() - 4.0).abs() < 1e-9);
        assert!(rows[2].b.is_none() && rows[2].ratio.is_none());
        let limit = rows[0].limit.as_ref().unwrap();
        assert_eq!(limit.probe, "tcp4");
        assert!((limit.share_of_a.unwrap() - 0.8).abs() < 1e-9);
        assert!(rows[1].limit.is_none());
        let info = |label: &str| SideInfo {
            label: label.into(),
            vmm: PathBuf::from("/x/cloud-hypervisor"),
            vmm_args: vec!["--log-file".into(), "x".into()],
        };
        let report = CompareReport {
            timestamp: 0,
            host_cpus: 2,
            reps: 1,
            a: info("ours"),
            b: info("CH"),
            sizes: vec![(1024, 768)],
            rows,
            failures: vec![Failure {
                scenario: "compare/local/1024M_ram/768M_touched".into(),
                side: "CH".into(),
                rep: 1,
                error: "boom\nmore".into(),
            }],
        };
        let md = markdown(&report);
        assert!(
            md.contains("| path | 1024 MiB / 768 MiB: ours | CH | CH/ours | host | ours/host |"),
            "{md}"
        );
        assert!(
            md.contains("| pre-copy TCP ×4, source done (send-migration → source exit) | 2.67 s | 2.48 s | 0.93 | 2.14 s (tcp4) | 80% |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| pre-copy TCP ×4, guest tick gap (tick = 20 ms) | 25 ms | 100 ms | 4.00 |  |  |"
            ),
            "{md}"
        );
        assert!(md.contains("(ours only) | 4.0 ms | — | — |  |  |"), "{md}");
        assert!(md.contains("`--log-file x`"), "{md}");
        assert!(
            md.contains("- compare/local/1024M_ram/768M_touched [CH] #1: boom\n"),
            "{md}"
        );
    }
}
