//! The Prometheus endpoint: `GET /metrics` in the text exposition format, on a
//! loopback address only (it has no authentication). A small HTTP/1.1 responder: one
//! scrape at a time is all Prometheus does.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use super::state::Shared;
use crate::fs::stats::{LATENCY_BUCKETS_US, stats};

/// Take the metrics address (before mounting, so that a taken port fails the start
/// cleanly).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
}

/// Answer scrapes on `listener` in a thread.
pub fn serve(shared: Arc<Shared>, listener: TcpListener) -> std::io::Result<SocketAddr> {
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("earfs-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                // Out of descriptors, the pending connection stays queued: wait
                // rather than spin on it.
                let Ok(conn) = conn else {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                answer(&shared, conn);
            }
        })?;
    Ok(bound)
}

fn answer(shared: &Shared, conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(&conn);
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    // Skip the headers.
    loop {
        let mut h = String::new();
        match reader.read_line(&mut h) {
            Ok(0) | Err(_) => break,
            Ok(_) if h == "\r\n" || h == "\n" => break,
            Ok(_) => {}
        }
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(shared),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "see /metrics\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let mut w = &conn;
    let _ = write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn help(out: &mut String, name: &str, kind: &str, text: &str) {
    let _ = writeln!(out, "# HELP {name} {text}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The metrics, in the Prometheus text format.
pub fn render(shared: &Shared) -> String {
    let st = shared.status();
    let mut o = String::new();
    help(
        &mut o,
        "earfs_info",
        "gauge",
        "The mounted volume (value 1).",
    );
    let _ = writeln!(
        o,
        "earfs_info{{volume_id=\"{}\",mountpoint=\"{}\",kms=\"{}\"}} 1",
        st.volume_id,
        escape(&st.mountpoint.to_string_lossy()),
        st.provider
    );
    build_info(&mut o);
    held(&mut o, shared.fs.held());
    process(&mut o);
    help(
        &mut o,
        "earfs_start_time_seconds",
        "gauge",
        "Unix time the daemon started.",
    );
    let _ = writeln!(o, "earfs_start_time_seconds {}", st.started);
    let all = stats().ops();
    help(
        &mut o,
        "earfs_operations_total",
        "counter",
        "Filesystem operations answered, by operation.",
    );
    for s in &all {
        let _ = writeln!(o, "earfs_operations_total{{op=\"{}\"}} {}", s.op, s.count);
    }
    help(
        &mut o,
        "earfs_operation_errors_total",
        "counter",
        "Filesystem operations answered with an error, by operation.",
    );
    for s in &all {
        let _ = writeln!(
            o,
            "earfs_operation_errors_total{{op=\"{}\"}} {}",
            s.op, s.errors
        );
    }
    help(
        &mut o,
        "earfs_operation_duration_seconds",
        "histogram",
        "Time to answer a filesystem operation, by operation.",
    );
    for s in all.iter().filter(|s| s.count > 0) {
        for (i, b) in LATENCY_BUCKETS_US.iter().enumerate() {
            let _ = writeln!(
                o,
                "earfs_operation_duration_seconds_bucket{{op=\"{}\",le=\"{}\"}} {}",
                s.op,
                *b as f64 / 1e6,
                s.cumulative[i]
            );
        }
        let _ = writeln!(
            o,
            "earfs_operation_duration_seconds_bucket{{op=\"{}\",le=\"+Inf\"}} {}",
            s.op, s.count
        );
        let _ = writeln!(
            o,
            "earfs_operation_duration_seconds_sum{{op=\"{}\"}} {}",
            s.op, s.total_seconds
        );
        let _ = writeln!(
            o,
            "earfs_operation_duration_seconds_count{{op=\"{}\"}} {}",
            s.op, s.count
        );
    }
    help(
        &mut o,
        "earfs_errors_total",
        "counter",
        "Error replies to the kernel, by errno.",
    );
    for (e, n) in &st.errors_by_errno {
        let _ = writeln!(o, "earfs_errors_total{{errno=\"{e}\"}} {n}");
    }
    help(
        &mut o,
        "earfs_bytes_encrypted_total",
        "counter",
        "Bytes encrypted (whole and partial sectors written).",
    );
    let _ = writeln!(o, "earfs_bytes_encrypted_total {}", st.bytes_encrypted);
    help(
        &mut o,
        "earfs_bytes_decrypted_total",
        "counter",
        "Bytes decrypted (sectors read).",
    );
    let _ = writeln!(o, "earfs_bytes_decrypted_total {}", st.bytes_decrypted);
    help(
        &mut o,
        "earfs_kms_calls_total",
        "counter",
        "KMS calls (each attempt), by provider and operation.",
    );
    let kms = crate::kms::stats::snapshot();
    for k in &kms {
        let _ = writeln!(
            o,
            "earfs_kms_calls_total{{provider=\"{}\",operation=\"{}\"}} {}",
            k.provider, k.operation, k.calls
        );
    }
    help(
        &mut o,
        "earfs_kms_call_errors_total",
        "counter",
        "Failed KMS calls, by provider, operation and kind.",
    );
    for k in &kms {
        for (kind, n) in &k.errors {
            let _ = writeln!(
                o,
                "earfs_kms_call_errors_total{{provider=\"{}\",operation=\"{}\",kind=\"{kind}\"}} {n}",
                k.provider, k.operation
            );
        }
    }
    help(
        &mut o,
        "earfs_kms_call_duration_seconds",
        "histogram",
        "Time of one KMS call attempt.",
    );
    for k in &kms {
        let labels = format!("provider=\"{}\",operation=\"{}\"", k.provider, k.operation);
        for (i, b) in crate::kms::stats::LATENCY_BUCKETS_S.iter().enumerate() {
            let _ = writeln!(
                o,
                "earfs_kms_call_duration_seconds_bucket{{{labels},le=\"{b}\"}} {}",
                k.cumulative.get(i).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(
            o,
            "earfs_kms_call_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
            k.calls
        );
        let _ = writeln!(
            o,
            "earfs_kms_call_duration_seconds_sum{{{labels}}} {}",
            k.total_seconds
        );
        let _ = writeln!(
            o,
            "earfs_kms_call_duration_seconds_count{{{labels}}} {}",
            k.calls
        );
    }
    help(
        &mut o,
        "earfs_cmk_last_success_timestamp_seconds",
        "gauge",
        "Unix time of the last CMK check that unwrapped the data keys.",
    );
    let _ = writeln!(
        o,
        "earfs_cmk_last_success_timestamp_seconds {}",
        st.last_cmk_success.unwrap_or(0)
    );
    help(
        &mut o,
        "earfs_cmk_last_check_ok",
        "gauge",
        "1 if the last CMK check succeeded.",
    );
    let _ = writeln!(
        o,
        "earfs_cmk_last_check_ok {}",
        u8::from(st.last_cmk_check.as_ref().is_some_and(|c| c.ok))
    );
    help(
        &mut o,
        "earfs_keys_locked",
        "gauge",
        "1 while the data keys are wiped because the CMK was revoked (file I/O fails with EIO).",
    );
    let _ = writeln!(o, "earfs_keys_locked {}", u8::from(st.keys_locked));
    help(
        &mut o,
        "earfs_cmk_revoked",
        "gauge",
        "1 while the last definitive CMK check failed (policy lock or warn).",
    );
    let _ = writeln!(
        o,
        "earfs_cmk_revoked {}",
        u8::from(st.revocation.state != "ok")
    );
    help(
        &mut o,
        "earfs_key_versions",
        "gauge",
        "Data key versions held in memory.",
    );
    let _ = writeln!(o, "earfs_key_versions {}", st.key_versions.len());
    help(
        &mut o,
        "earfs_current_key_version",
        "gauge",
        "The key version new files are created under (0 while locked).",
    );
    let _ = writeln!(
        o,
        "earfs_current_key_version {}",
        st.current_key_version.unwrap_or(0)
    );
    help(
        &mut o,
        "earfs_current_key_version_changed_timestamp_seconds",
        "gauge",
        "Unix time the current key version became current: the start, or the rotate or reload that changed it (0 while locked).",
    );
    let _ = writeln!(
        o,
        "earfs_current_key_version_changed_timestamp_seconds {}",
        st.current_key_version_since.unwrap_or(0)
    );
    o
}

/// `earfs_build_info`: what runs, as labels (value 1).
fn build_info(o: &mut String) {
    help(
        o,
        "earfs_build_info",
        "gauge",
        "The earfs build (value 1): version, git revision, AES kernel.",
    );
    let _ = writeln!(
        o,
        "earfs_build_info{{version=\"{}\",revision=\"{}\",aes=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        escape(option_env!("EARFS_GIT_REVISION").unwrap_or("unknown")),
        escape(crate::crypto::implementation()),
    );
}

/// Inodes and handles the daemon holds for the kernel (each costs descriptors).
fn held(o: &mut String, h: crate::fs::Held) {
    help(
        o,
        "earfs_inodes_held",
        "gauge",
        "Inodes the kernel holds a reference to (one O_PATH descriptor each), the root included.",
    );
    let _ = writeln!(o, "earfs_inodes_held {}", h.inodes);
    help(
        o,
        "earfs_handles_open",
        "gauge",
        "Open handles, by kind (file, dir).",
    );
    let _ = writeln!(o, "earfs_handles_open{{kind=\"file\"}} {}", h.open_files);
    let _ = writeln!(o, "earfs_handles_open{{kind=\"dir\"}} {}", h.open_dirs);
}

/// The standard process metrics, read from /proc/self as the Prometheus client
/// libraries do.
#[derive(Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub start_time_seconds: f64,
    pub virtual_memory_bytes: u64,
    pub resident_memory_bytes: u64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
}

/// Parse `/proc/self/stat` (after the command name, which may hold spaces) with the
/// clock tick rate, page size and boot time.
fn parse_stat(stat: &str, ticks: u64, page: u64, boot_time: u64) -> Option<ProcessStats> {
    let rest = &stat[stat.rfind(')')? + 2..];
    // Field N of proc(5) is rest[N - 3].
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |n: usize| -> Option<u64> { f.get(n - 3)?.parse().ok() };
    let ticks = ticks.max(1) as f64;
    Some(ProcessStats {
        cpu_seconds: (num(14)? + num(15)?) as f64 / ticks,
        start_time_seconds: boot_time as f64 + num(22)? as f64 / ticks,
        virtual_memory_bytes: num(23)?,
        resident_memory_bytes: num(24)? * page,
        ..ProcessStats::default()
    })
}

/// `btime` of /proc/stat: the boot time, unix seconds.
fn boot_time() -> Option<u64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// This process's stats; `None` where /proc cannot be read.
pub fn process_stats() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let ticks = rustix::param::clock_ticks_per_second();
    let page = rustix::param::page_size() as u64;
    let mut p = parse_stat(&stat, ticks, page, boot_time()?)?;
    // The directory's own descriptor is counted, as the client libraries do.
    p.open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    p.max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    Some(p)
}

fn process(o: &mut String) {
    let Some(p) = process_stats() else {
        return;
    };
    for (name, kind, text, value) in [
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            p.cpu_seconds.to_string(),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            p.start_time_seconds.to_string(),
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            p.virtual_memory_bytes.to_string(),
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            p.resident_memory_bytes.to_string(),
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            p.open_fds.to_string(),
        ),
    ] {
        help(o, name, kind, text);
        let _ = writeln!(o, "{name} {value}");
    }
    // An unlimited RLIMIT_NOFILE has no number to show (as in the client libraries).
    if let Some(max) = p.max_fds {
        help(
            o,
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
        );
        let _ = writeln!(o, "process_max_fds {max}");
    }
}

/// Escape a label value.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_fields() {
        // A command name with spaces and a parenthesis; utime 250, stime 150 ticks,
        // started 1000 ticks after boot, 8 MiB virtual, 300 pages resident.
        let stat = "4242 (earfs (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 150 0 0 20 0 9 0 1000 8388608 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let p = parse_stat(stat, 100, 4096, 1_700_000_000).unwrap();
        assert_eq!(p.cpu_seconds, 4.0);
        assert_eq!(p.start_time_seconds, 1_700_000_010.0);
        assert_eq!(p.virtual_memory_bytes, 8_388_608);
        assert_eq!(p.resident_memory_bytes, 300 * 4096);
        assert!(parse_stat("garbage", 100, 4096, 0).is_none());
    }

    #[test]
    fn this_process_is_measured() {
        // (other tests open files meanwhile: no exact descriptor count here; the mount
        // test in tests/metrics.rs counts them)
        let after = process_stats().unwrap();
        assert!(after.open_fds >= 4, "{after:?}");
        assert!(
            after.max_fds.is_none_or(|m| m >= after.open_fds),
            "{after:?}"
        );
        assert!(after.resident_memory_bytes > 0);
        assert!(after.virtual_memory_bytes >= after.resident_memory_bytes);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(after.start_time_seconds <= now + 1.0 && after.start_time_seconds > now - 86400.0);
    }
}
