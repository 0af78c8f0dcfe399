//! Counters of KMS calls (every attempt): by provider and operation, with latency and
//! errors by kind. KMS calls are rare (start-up, rechecks), so a mutex is fine.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use super::{KmsCall, KmsError};

/// Upper bounds of the KMS latency buckets, in seconds (then +Inf).
pub const LATENCY_BUCKETS_S: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The counters of one (provider, operation).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct KmsOpStats {
    pub provider: &'static str,
    pub operation: &'static str,
    pub calls: u64,
    pub total_seconds: f64,
    /// Cumulative counts per bucket of [`LATENCY_BUCKETS_S`], then +Inf (= calls).
    #[serde(skip)]
    pub cumulative: Vec<u64>,
    /// Errors by kind (`access_denied`, `key_unusable`, `transient`, …).
    pub errors: BTreeMap<&'static str, u64>,
}

static STATS: Mutex<BTreeMap<(&'static str, &'static str), KmsOpStats>> =
    Mutex::new(BTreeMap::new());

/// The kind of an error, as a metric label.
pub fn kind(e: &KmsError) -> &'static str {
    match e {
        KmsError::AccessDenied { .. } => "access_denied",
        KmsError::KeyUnusable { .. } => "key_unusable",
        KmsError::InvalidCiphertext { .. } | KmsError::WrongKey(_) => "invalid_ciphertext",
        KmsError::Checksum { .. } => "checksum",
        KmsError::Transient { .. } | KmsError::DeadlineExceeded { .. } => "transient",
        KmsError::Credentials(_) | KmsError::CredentialsInsecure { .. } => "credentials",
        _ => "other",
    }
}

/// Record one attempt.
pub(super) fn record(call: &KmsCall, took: Duration, err: Option<&KmsError>) {
    let Ok(mut m) = STATS.lock() else {
        return;
    };
    let s = m
        .entry((call.provider, call.operation))
        .or_insert_with(|| KmsOpStats {
            provider: call.provider,
            operation: call.operation,
            cumulative: vec![0; LATENCY_BUCKETS_S.len() + 1],
            ..KmsOpStats::default()
        });
    s.calls += 1;
    let secs = took.as_secs_f64();
    s.total_seconds += secs;
    for (i, b) in LATENCY_BUCKETS_S.iter().enumerate() {
        if secs <= *b {
            s.cumulative[i] += 1;
        }
    }
    if let Some(last) = s.cumulative.last_mut() {
        *last += 1;
    }
    if let Some(e) = err {
        *s.errors.entry(kind(e)).or_insert(0) += 1;
    }
}

/// A snapshot of every (provider, operation) seen.
pub fn snapshot() -> Vec<KmsOpStats> {
    STATS
        .lock()
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default()
}
