//! The one retry loop of the KMS adapters: exponential backoff with full jitter under a
//! total deadline; only errors that [`KmsError::is_retryable`] are retried.

use std::time::{Duration, Instant};

use super::{KmsCall, KmsError};

/// How long KMS calls may take, per attempt and in total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Total time for one logical call, retries included.
    pub deadline: Duration,
    /// Longest single attempt (connect + request + reply).
    pub attempt_timeout: Duration,
}

/// First backoff step; doubles per attempt up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The total deadline of a KMS call when none is configured.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);

impl Default for Retry {
    fn default() -> Self {
        Retry {
            deadline: DEFAULT_DEADLINE,
            attempt_timeout: Duration::from_secs(10),
        }
    }
}

impl Retry {
    /// A total deadline with the default attempt timeout (capped at the deadline).
    pub fn with_deadline(deadline: Duration) -> Self {
        Retry {
            deadline,
            attempt_timeout: Retry::default().attempt_timeout.min(deadline),
        }
    }

    /// Run `attempt` until it succeeds, fails definitively, or the deadline passes.
    /// `attempt` gets the time it may take; it reports a timeout as a transient error.
    pub fn run<T>(
        &self,
        call: &KmsCall,
        mut attempt: impl FnMut(Duration) -> Result<T, KmsError>,
    ) -> Result<T, KmsError> {
        let start = Instant::now();
        let end = start + self.deadline;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let left = end.saturating_duration_since(Instant::now());
            let t0 = Instant::now();
            let outcome = attempt(self.attempt_timeout.min(left).max(Duration::from_millis(1)));
            super::stats::record(call, t0.elapsed(), outcome.as_ref().err());
            let err = match outcome {
                Ok(v) => return Ok(v),
                Err(e) if !e.is_retryable() => return Err(e),
                Err(e) => e,
            };
            let pause = jittered(backoff(attempts));
            let now = Instant::now();
            if now + pause >= end {
                return Err(KmsError::DeadlineExceeded {
                    call: call.clone(),
                    attempts,
                    elapsed: now - start,
                    deadline: self.deadline,
                    last: err.reason(),
                });
            }
            log::warn!(
                "{call}: attempt {attempts} failed ({}); retrying in {pause:.1?}",
                err.reason()
            );
            std::thread::sleep(pause);
        }
    }
}

/// A current-thread runtime for one provider's async SDK client. Each call blocks the
/// calling thread; a provider is used at start-up and by the CLI, never on the I/O path.
pub(super) fn runtime(call: &KmsCall) -> Result<tokio::runtime::Runtime, KmsError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| KmsError::Rejected {
            call: call.clone(),
            reason: format!("cannot start the async runtime: {e}"),
        })
}

impl Retry {
    /// [`Retry::run`] for an async SDK call: each attempt is a fresh future from `f`,
    /// run on `rt` and bounded by its attempt timeout.
    pub(super) fn run_on<T, Fut>(
        &self,
        rt: &tokio::runtime::Runtime,
        call: &KmsCall,
        mut f: impl FnMut() -> Fut,
    ) -> Result<T, KmsError>
    where
        Fut: std::future::Future<Output = Result<T, KmsError>>,
    {
        self.run(call, |t| attempt_on(rt, call, t, f()))
    }
}

/// Run one attempt of an SDK call on `rt`, bounded by `timeout`. An attempt that runs
/// out of time is a transient failure.
fn attempt_on<T>(
    rt: &tokio::runtime::Runtime,
    call: &KmsCall,
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, KmsError>>,
) -> Result<T, KmsError> {
    rt.block_on(async {
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(KmsError::Transient {
                call: call.clone(),
                reason: format!("no reply within {timeout:.1?}"),
            }),
        }
    })
}

/// The backoff cap before the `attempt`-th retry (1-based): 200 ms, 400 ms, … 10 s.
fn backoff(attempt: u32) -> Duration {
    BASE_BACKOFF
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

/// Full jitter: uniform in [cap/2, cap], so fleets restarting together spread out
/// while every node still backs off.
fn jittered(cap: Duration) -> Duration {
    let mut b = [0u8; 4];
    let r = if getrandom::getrandom(&mut b).is_ok() {
        u32::from_le_bytes(b)
    } else {
        u32::MAX / 2
    };
    let frac = f64::from(r) / f64::from(u32::MAX);
    cap.mul_f64(0.5 + frac / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call() -> KmsCall {
        KmsCall {
            provider: "test",
            operation: "Op",
            key: "k".into(),
        }
    }

    fn transient() -> KmsError {
        KmsError::Transient {
            call: call(),
            reason: "throttled".into(),
        }
    }

    #[test]
    fn retries_transient_until_success() {
        let r = Retry::with_deadline(Duration::from_secs(5));
        let mut n = 0;
        let v = r
            .run(&call(), |_| {
                n += 1;
                if n < 3 { Err(transient()) } else { Ok(n) }
            })
            .unwrap();
        assert_eq!(v, 3);
    }

    #[test]
    fn definitive_errors_are_not_retried() {
        let r = Retry::with_deadline(Duration::from_secs(5));
        let mut n = 0;
        let e = r
            .run(&call(), |_| -> Result<(), _> {
                n += 1;
                Err(KmsError::KeyUnusable {
                    call: call(),
                    reason: "disabled".into(),
                })
            })
            .unwrap_err();
        assert_eq!(n, 1);
        assert!(matches!(e, KmsError::KeyUnusable { .. }));
    }

    #[test]
    fn deadline_bounds_retries() {
        let r = Retry::with_deadline(Duration::from_millis(900));
        let start = Instant::now();
        let mut n = 0;
        let e = r
            .run(&call(), |t| -> Result<(), _> {
                assert!(t <= Duration::from_millis(900));
                n += 1;
                Err(transient())
            })
            .unwrap_err();
        // The loop plans no pause past the deadline; the slack covers a loaded machine
        // waking a sleeping thread late (the unit tests of fs run beside this one).
        assert!(
            start.elapsed() < Duration::from_millis(900 + 1000),
            "{:?}",
            start.elapsed()
        );
        assert!(n >= 2, "{n} attempts");
        match e {
            KmsError::DeadlineExceeded { attempts, last, .. } => {
                assert_eq!(attempts, n);
                assert_eq!(last, "throttled");
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(2), Duration::from_millis(400));
        assert_eq!(backoff(30), MAX_BACKOFF);
        for _ in 0..100 {
            let j = jittered(Duration::from_secs(1));
            assert!(j >= Duration::from_millis(500) && j <= Duration::from_secs(1));
        }
    }
}
