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
                let Ok(conn) = conn else { continue };
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
        st.kms_provider
    );
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

/// Escape a label value.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
