//! The metrics a mounted daemon serves: `earfs_build_info`, the standard `process_*`
//! metrics, the inodes and handles held; and the shipped alert rules
//! (systemd/examples/earfs-alerts.yml, checked by `promtool check rules`) and Grafana
//! dashboard (systemd/examples/earfs-dashboard.json) name only metrics that a real
//! scrape has.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::*;

const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/systemd/examples/earfs-alerts.yml"
);
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/systemd/examples/earfs-dashboard.json"
);

/// The metric names of a page: its samples' and those its `# TYPE` lines declare (a
/// family without series yet, e.g. the KMS calls of a local-key volume), with a
/// histogram's `_bucket`, `_sum` and `_count`.
fn sample_names(page: &str) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = page
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    for l in page.lines() {
        let Some(t) = l.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = t.split_once(' ').unwrap();
        names.insert(name.to_string());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

/// The `earfs_*` and `process_*` metric names a PromQL expression uses.
fn names_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut i = 0;
    while i < b.len() {
        if ident(b[i]) && (i == 0 || !ident(b[i - 1])) {
            let start = i;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            if word.starts_with("earfs_") || word.starts_with("process_") {
                out.push(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Every `expr:` of the rules file (one line each).
fn rule_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(RULES).unwrap();
    let exprs: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(|e| e.trim().to_string())
        .collect();
    for e in &exprs {
        assert!(
            !e.is_empty() && !e.starts_with('|') && !e.starts_with('>'),
            "keep each expr on its line (this test reads them): {e:?}"
        );
    }
    exprs
}

/// Every query of the dashboard (panel targets and template variables).
fn dashboard_exprs() -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let mut out = Vec::new();
    walk(&d, &mut out);
    out
}

#[test]
fn promtool_accepts_the_rules_and_refuses_a_broken_copy() {
    let out = Command::new("promtool")
        .args(["check", "rules", RULES])
        .output()
        .expect("promtool (Debian package prometheus; scripts/deps.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("SUCCESS: 7 rules found"), "{text}");
    // The check can fail: the same file with one expression cut short.
    let d = TestDir::new("earfs-metrics-test-");
    let broken = d.path().join("broken.yml");
    let rules = std::fs::read_to_string(RULES).unwrap();
    assert!(rules.contains("expr: earfs_keys_locked == 1\n"));
    std::fs::write(
        &broken,
        rules.replace(
            "expr: earfs_keys_locked == 1\n",
            "expr: earfs_keys_locked ==\n",
        ),
    )
    .unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// `Max open files` soft limit of process `pid`.
fn max_open_files(pid: u32) -> f64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// The daemon's pid, from `earfs status --json`.
fn daemon_pid(mnt: &Path) -> u32 {
    let out = run(&["status", "--json", mnt.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["pid"].as_u64().unwrap() as u32
}

#[test]
fn a_scrape_has_build_info_process_metrics_held_counts_and_every_name_the_rules_and_dashboard_use()
{
    let vol = Volume::new();
    let addr = format!("127.0.0.1:{}", free_port());
    let m = vol.mount(&["--metrics-address", &addr]);
    let pid = daemon_pid(&vol.mnt);
    // A known load: 20 files (the kernel keeps their inodes), 3 open, 1 directory open.
    std::fs::create_dir(m.path("d")).unwrap();
    for i in 0..20 {
        std::fs::write(m.path(&format!("d/f{i}")), b"x").unwrap();
    }
    let open: Vec<std::fs::File> = (0..3)
        .map(|i| std::fs::File::open(m.path(&format!("d/f{i}"))).unwrap())
        .collect();
    let dir = std::fs::read_dir(m.path("d")).unwrap();
    let page = scrape(&addr);

    // earfs_build_info: this build's version, value 1.
    let build = page
        .lines()
        .find(|l| l.starts_with("earfs_build_info{"))
        .unwrap_or_else(|| panic!("no earfs_build_info in\n{page}"));
    assert!(
        build.starts_with(&format!(
            "earfs_build_info{{version=\"{}\",revision=\"",
            env!("CARGO_PKG_VERSION")
        )) && build.ends_with("} 1"),
        "{build}"
    );
    // Held: every open handle, and at least every inode this test made known.
    assert_eq!(metric(&page, "earfs_handles_open{kind=\"file\"}"), 3.0);
    assert_eq!(metric(&page, "earfs_handles_open{kind=\"dir\"}"), 1.0);
    let inodes = metric(&page, "earfs_inodes_held");
    assert!((22.0..1000.0).contains(&inodes), "{inodes}");
    // process_*: what /proc says of the daemon. Each inode held is an O_PATH
    // descriptor and each open file at least one more.
    let fds = metric(&page, "process_open_fds");
    assert!(fds >= inodes + 3.0, "{fds} descriptors for {inodes} inodes");
    let now_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as f64;
    assert!((fds - now_fds).abs() <= 4.0, "{fds} vs {now_fds}");
    assert_eq!(metric(&page, "process_max_fds"), max_open_files(pid));
    let rss = metric(&page, "process_resident_memory_bytes");
    assert!(
        rss > 1e6 && metric(&page, "process_virtual_memory_bytes") > rss,
        "{rss}"
    );
    // (utime + stime of /proc/PID/stat; the daemon may not have used a tick yet)
    let cpu = metric(&page, "process_cpu_seconds_total");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    let proc_cpu = ticks / rustix::param::clock_ticks_per_second() as f64;
    assert!(
        cpu <= proc_cpu && proc_cpu - cpu < 0.5,
        "{cpu} vs {proc_cpu}"
    );
    let start = metric(&page, "process_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        start <= now + 1.0 && start > now - 120.0,
        "{start} vs {now}"
    );
    assert!((start - metric(&page, "earfs_start_time_seconds")).abs() < 30.0);

    // Closed: the handles go (the kernel's release is asynchronous).
    drop(open);
    drop(dir);
    assert!(
        wait_until(10, || {
            let p = scrape(&addr);
            metric(&p, "earfs_handles_open{kind=\"file\"}") == 0.0
                && metric(&p, "earfs_handles_open{kind=\"dir\"}") == 0.0
        }),
        "{}",
        scrape(&addr)
    );

    // Every metric the rules and the dashboard name exists in the scrape (a
    // histogram's _bucket/_sum/_count are sample names of their own). Errors by
    // errno and operation histograms appear once something happened: the missing
    // file gave an ENOENT, the writes the histograms.
    assert!(std::fs::metadata(m.path("missing")).is_err());
    let page = scrape(&addr);
    let have = sample_names(&page);
    let rules: BTreeSet<String> = rule_exprs().iter().flat_map(|e| names_in(e)).collect();
    let dash: BTreeSet<String> = dashboard_exprs().iter().flat_map(|e| names_in(e)).collect();
    for must in [
        "earfs_keys_locked",
        "earfs_cmk_last_success_timestamp_seconds",
        "earfs_errors_total",
        "process_open_fds",
        "process_max_fds",
    ] {
        assert!(rules.contains(must), "the rules lost {must}: {rules:?}");
    }
    assert!(dash.len() >= 20, "{dash:?}");
    for name in rules.iter().chain(&dash) {
        assert!(have.contains(name), "{name} is not in a scrape:\n{page}");
    }
    // (the checker can fail: a name that is not served)
    assert!(!have.contains("earfs_no_such_metric"));
    assert_eq!(
        names_in("rate(earfs_x_total[5m]) / process_y"),
        ["earfs_x_total", "process_y"]
    );
}
