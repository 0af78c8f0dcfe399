//! `earfs status [MOUNTPOINT] [--json]`: ask running daemons over their control sockets.
//!
//! With a MOUNTPOINT it exits 3 when no daemon runs for it, as `systemctl status` does
//! for a stopped unit; without one it lists the running daemons, none included (exit 0).

use std::path::Path;

use serde_json::Value;

use crate::fs::census::Census;

use super::output;
use crate::daemon::control::{request_status, runtime_dir, socket_path, sockets};
use crate::daemon::{Failure, exit};

pub(super) fn run(json: bool, files: bool, mountpoint: Option<&Path>) -> Result<(), Failure> {
    let targets = match mountpoint {
        Some(mp) => {
            let canon = std::fs::canonicalize(mp).map_err(|e| {
                Failure::new(
                    exit::NOT_RUNNING,
                    format!("no earfs daemon runs for {}: {e}", mp.display()),
                )
            })?;
            vec![socket_path(&canon)]
        }
        None => sockets().map_err(|e| {
            Failure::new(
                exit::FAILURE,
                format!(
                    "cannot read {}: {e} (earfs status needs root)",
                    runtime_dir().display()
                ),
            )
        })?,
    };
    let mut replies = Vec::new();
    for sock in &targets {
        match request_status(sock) {
            Ok(v) => replies.push(current_names(v)),
            Err(e) if mountpoint.is_some() => {
                let mp = mountpoint
                    .map(|m| m.display().to_string())
                    .unwrap_or_default();
                return Err(Failure::new(
                    if e.kind() == std::io::ErrorKind::PermissionDenied {
                        exit::FAILURE
                    } else {
                        exit::NOT_RUNNING
                    },
                    format!("no earfs daemon answers for {mp} ({}: {e})", sock.display()),
                ));
            }
            // A socket of a daemon that died: nobody listens on it any more.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) => {}
            // The daemon refused us (not root), or did not answer properly: say so
            // rather than report that none is running.
            Err(e) => {
                return Err(Failure::new(
                    exit::FAILURE,
                    format!("{}: {e}", sock.display()),
                ));
            }
        }
    }
    if files {
        for v in &mut replies {
            let backing = std::path::PathBuf::from(s(&v["backing"]));
            let c = super::files::count_files(&backing)?;
            v["files"] = super::files::census_json(&c);
        }
    }
    if json {
        if mountpoint.is_some() {
            let one = replies.into_iter().next().unwrap_or(Value::Null);
            return output::print("earfs.status.v1", &one);
        }
        return output::print(
            "earfs.status-list.v1",
            &serde_json::json!({ "daemons": replies }),
        );
    }
    if replies.is_empty() {
        println!(
            "no earfs daemon is running (no control socket answers in {})",
            runtime_dir().display()
        );
        return Ok(());
    }
    for (i, v) in replies.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print_one(v);
    }
    Ok(())
}

/// A daemon of an earlier earfs (still running across an upgrade) names two fields as
/// they were before docs/json.md: `kms_provider`, and `key` as prose for a local key.
fn current_names(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut()
        && let Some(p) = o.remove("kms_provider")
    {
        o.insert("provider".into(), p);
        if let Some(Value::String(k)) = o.get_mut("key")
            && let Some(path) = k.strip_prefix("key file ")
        {
            *k = path.to_string();
        }
    }
    v
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn when(v: &Value) -> String {
    let Some(t) = v.as_u64() else {
        return "never".into();
    };
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t);
    let ago = std::time::SystemTime::now()
        .duration_since(at)
        .map(|d| {
            humantime::format_duration(std::time::Duration::from_secs(d.as_secs())).to_string()
        })
        .unwrap_or_else(|_| "0s".into());
    format!("{} ({ago} ago)", humantime::format_rfc3339_seconds(at))
}

fn print_one(v: &Value) {
    println!("{} (pid {})", s(&v["mountpoint"]), s(&v["pid"]));
    println!(
        "  volume:        {} in {}",
        s(&v["volume_id"]),
        s(&v["backing"])
    );
    println!("  format:        {} (new files)", s(&v["format"]));
    println!("  key:           {} {}", s(&v["provider"]), s(&v["key"]));
    let locked = v["keys_locked"].as_bool().unwrap_or(false);
    println!(
        "  key versions:  {} (current {}{}){}",
        s(&v["key_versions"]),
        s(&v["current_key_version"]),
        if v["current_key_version_since"].is_u64() {
            format!(" since {}", when(&v["current_key_version_since"]))
        } else {
            String::new()
        },
        if locked { ", LOCKED" } else { "" }
    );
    let up = v["uptime_seconds"].as_u64().unwrap_or(0);
    println!(
        "  uptime:        {}, {} threads, writeback cache {}",
        humantime::format_duration(std::time::Duration::from_secs(up)),
        s(&v["threads"]),
        if v["writeback_cache"].as_bool().unwrap_or(false) {
            "on"
        } else {
            "off"
        }
    );
    let check = &v["last_cmk_check"];
    println!(
        "  CMK check:     {} at {}; every {}",
        s(&check["result"]),
        when(&check["at"]),
        v["recheck_interval_seconds"]
            .as_u64()
            .map(|n| humantime::format_duration(std::time::Duration::from_secs(n)).to_string())
            .unwrap_or_else(|| "never (rechecks off)".into())
    );
    let rev = &v["revocation"];
    println!(
        "  revocation:    {} (policy {}){}",
        s(&rev["state"]),
        s(&v["revocation_policy"]),
        rev["reason"]
            .as_str()
            .map(|r| format!(": {r}, since {}", when(&rev["since"])))
            .unwrap_or_default()
    );
    println!(
        "  bytes:         {} encrypted, {} decrypted",
        s(&v["bytes_encrypted"]),
        s(&v["bytes_decrypted"])
    );
    if let Some(errs) = v["errors_by_errno"].as_object().filter(|m| !m.is_empty()) {
        let list: Vec<String> = errs.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!("  errors:        {}", list.join(", "));
    } else {
        println!("  errors:        none");
    }
    if let Ok(c) = serde_json::from_value::<Census>(v["files"].clone()) {
        super::files::print_census(&c, "  ");
    }
    if let Some(ops) = v["ops"].as_array().filter(|o| !o.is_empty()) {
        println!(
            "  {:<12} {:>10} {:>8} {:>12}",
            "operation", "count", "errors", "mean"
        );
        for o in ops {
            let count = o["count"].as_u64().unwrap_or(0);
            let total = o["total_seconds"].as_f64().unwrap_or(0.0);
            let mean_us = if count > 0 {
                total / count as f64 * 1e6
            } else {
                0.0
            };
            println!(
                "  {:<12} {:>10} {:>8} {:>10.0}µs",
                s(&o["op"]),
                count,
                s(&o["errors"]),
                mean_us
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::current_names;

    #[test]
    fn an_older_daemons_names_are_renamed_and_current_ones_left_alone() {
        let old = serde_json::json!({"kms_provider": "local", "key": "key file /etc/earfs/k"});
        assert_eq!(
            current_names(old),
            serde_json::json!({"provider": "local", "key": "/etc/earfs/k"})
        );
        // A current daemon: nothing to rename, and a key is never touched without
        // `kms_provider` (an ARN cannot start with "key file ", but a path could).
        let new = serde_json::json!({"provider": "local", "key": "key file x"});
        assert_eq!(current_names(new.clone()), new);
        let aws = serde_json::json!({"kms_provider": "aws", "key": "arn:aws:kms:r:1:key/k"});
        assert_eq!(
            current_names(aws),
            serde_json::json!({"provider": "aws", "key": "arn:aws:kms:r:1:key/k"})
        );
    }
}
