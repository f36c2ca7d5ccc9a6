//! `bench --compare` end to end. CI cannot run Cloud Hypervisor, so the other side is
//! our own binaries again: the table must have both columns, every external figure on
//! both sides, our VMM's own figures on ours only, and ratios near 1.

use std::process::Command;

use test_infra::{Binaries, TempDir};

#[test]
fn compare_ours_with_ours_gives_both_columns_and_ratios_near_one() {
    let bins = Binaries::locate().unwrap();
    let dir = bins.cloud_hypervisor.parent().unwrap();
    let out = TempDir::new("bench-compare-test").unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--no-build", "--compare"])
        .arg(dir)
        .args([
            "--compare-label",
            "again",
            "--compare-sizes",
            "64:32",
            "--compare-paths",
            "offload,postcopy",
            "--reps",
            "1",
            "--warm-cache",
            "--out",
        ])
        .arg(out.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "bench failed: {stderr}");
    assert!(
        stderr.contains("again: a VMM without a VM takes --serial"),
        "{stderr}"
    );

    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.contains("| path | 64 MiB / 32 MiB: ours | again | again/ours |"),
        "{md}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["failures"], serde_json::json!([]), "{json:#}");
    let rows = json["rows"].as_array().unwrap();
    let row = |group: &str, metric: &str| {
        rows.iter()
            .find(|r| r["group"] == group && r["metric"] == metric)
            .unwrap_or_else(|| panic!("no {group}/{metric} row in {json:#}"))
    };
    for (group, metric) in [
        ("offload", "daemon_snapshot"),
        ("offload", "daemon_eager_first_tick"),
        ("offload", "daemon_ondemand_first_tick"),
        ("offload", "daemon_ondemand_done"),
        ("offload", "rss_after_ondemand"),
        ("postcopy_tcp", "source_done"),
        ("postcopy_tcp", "first_tick"),
        ("postcopy_tcp", "tick_gap"),
    ] {
        let r = row(group, metric);
        let (a, b) = (
            r["a"]["p50"].as_f64().unwrap(),
            r["b"]["p50"].as_f64().unwrap(),
        );
        let ratio = r["ratio"].as_f64().unwrap();
        assert!(a > 0.0 && b > 0.0, "{r:#}");
        assert!((ratio - b / a).abs() < 1e-9, "{r:#}");
        // Near 1: single 64 MiB runs are noisy, and a first tick or a gap is quantised
        // to the guest's 20 ms ticks, so two periods of slack on top of half the value.
        let slack = if r["unit"] == "ms" { 40.0 } else { 0.0 };
        assert!(
            (b - a).abs() <= 0.5 * a.max(b) + slack,
            "{group}/{metric}: ours {a}, again {b}, ratio {ratio}: {md}"
        );
        assert!(
            md.contains(r["label"].as_str().unwrap()),
            "{metric} not in the table: {md}"
        );
    }
    let rss = row("offload", "rss_after_ondemand")["ratio"]
        .as_f64()
        .unwrap();
    assert!((0.9..1.1).contains(&rss), "RSS ratio {rss}");

    let ours_only = row("postcopy_tcp", "vmm_downtime");
    assert!(ours_only["a"]["n"].as_u64() == Some(1), "{ours_only:#}");
    assert!(ours_only["b"].is_null() && ours_only["ratio"].is_null());
}
