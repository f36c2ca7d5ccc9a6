//! Summary statistics and the two output files.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;

use crate::Sample;

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One metric of one scenario over all repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub scenario: String,
    pub cpus: u8,
    pub metric: String,
    pub unit: &'static str,
    pub n: usize,
    pub mean: f64,
    pub p50: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

/// Groups `samples` by metric (in first-seen order) and computes the statistics.
pub fn summarize(scenario: &str, cpus: u8, samples: &[Sample]) -> Vec<ScenarioResult> {
    let mut metrics: Vec<(&str, &'static str)> = Vec::new();
    for s in samples {
        if !metrics.iter().any(|(m, _)| *m == s.metric) {
            metrics.push((&s.metric, s.unit));
        }
    }
    metrics
        .into_iter()
        .map(|(metric, unit)| {
            let values: Vec<f64> = samples
                .iter()
                .filter(|s| s.metric == metric)
                .map(|s| s.value)
                .collect();
            let stats = Stats::of(&values);
            ScenarioResult {
                scenario: scenario.to_string(),
                cpus,
                metric: metric.to_string(),
                unit,
                n: values.len(),
                mean: stats.mean,
                p50: stats.p50,
                min: stats.min,
                max: stats.max,
                samples: values,
            }
        })
        .collect()
}

#[derive(Debug, PartialEq)]
struct Stats {
    mean: f64,
    p50: f64,
    min: f64,
    max: f64,
}

impl Stats {
    /// `values` non-empty; p50 is the lower median (an observed value, not a blend).
    fn of(values: &[f64]) -> Stats {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        if n == 0 {
            return Stats {
                mean: 0.0,
                p50: 0.0,
                min: 0.0,
                max: 0.0,
            };
        }
        Stats {
            mean: sorted.iter().sum::<f64>() / n as f64,
            p50: sorted[(n - 1) / 2],
            min: sorted[0],
            max: sorted[n - 1],
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    /// Seconds since the epoch when the run finished.
    pub timestamp: u64,
    pub host_cpus: usize,
    pub reps: usize,
    pub results: Vec<ScenarioResult>,
}

impl Report {
    pub fn new(reps: usize, results: Vec<ScenarioResult>) -> Report {
        Report {
            timestamp: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            host_cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            reps,
            results,
        }
    }

    pub fn markdown(&self) -> String {
        let mut md = String::from(
            "| scenario | vCPUs | metric | unit | n | mean | p50 | max |\n\
             |---|---:|---|---|---:|---:|---:|---:|\n",
        );
        for r in &self.results {
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {:.3} | {:.3} | {:.3} |\n",
                r.scenario, r.cpus, r.metric, r.unit, r.n, r.mean, r.p50, r.max
            ));
        }
        md
    }

    pub fn write(&self, out: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let json = serde_json::to_string_pretty(self).context("serializing results")?;
        let path = out.join("results.json");
        std::fs::write(&path, json + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        let path = out.join("results.md");
        std::fs::write(&path, self.markdown())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_grouping() {
        let s = Stats::of(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!(
            s,
            Stats {
                mean: 4.0,
                p50: 2.0,
                min: 1.0,
                max: 10.0
            }
        );
        let samples = [
            Sample::ms("a", Duration::from_millis(1)),
            Sample::ms("b", Duration::from_millis(5)),
            Sample::ms("a", Duration::from_millis(3)),
        ];
        let r = summarize("x", 2, &samples);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].metric.as_str(), r[0].n), ("a", 2));
        assert!((r[0].mean - 2.0).abs() < 1e-9);
        let md = Report::new(1, r).markdown();
        assert!(md.contains("| x | 2 | b | ms | 1 | 5.000 |"), "{md}");
    }
}
