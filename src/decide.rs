//! The reconciler's decisions as pure functions: whether a token must be obtained now and
//! why, whether a failure backoff holds the attempt back, and deterministic jitter.

use std::time::Duration;

use jiff::Timestamp;
use sha2::{Digest, Sha256};

use crate::{schedule, state::TokenState};

/// Why a new token is needed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// No token yet.
    Initial,
    /// URL, grant, scope or credentials changed since the token was issued.
    InputsChanged,
    /// The rotate annotation has a value not yet acted on.
    Forced(String),
    /// The renewal time has come.
    Due,
    /// AWX rejected the token during verification.
    Rejected,
}

impl Trigger {
    /// Whether the old token is being renewed (rather than replaced by new inputs or first issued).
    pub fn is_renewal(&self) -> bool {
        matches!(self, Trigger::Forced(_) | Trigger::Due | Trigger::Rejected)
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Trigger::Initial => "first issue",
            Trigger::InputsChanged => "the URL, grant or credentials changed",
            Trigger::Forced(_) => "rotation requested by annotation",
            Trigger::Due => "renewal time reached",
            Trigger::Rejected => "AWX rejected the token in the Secret",
        }
    }
}

/// Whether a token must be obtained now. `rotate` is the rotate annotation's value and
/// `rotated_for` the value last acted on.
pub fn trigger(
    now: Timestamp,
    state: &TokenState,
    inputs: &str,
    rotate: Option<&str>,
    rotated_for: Option<&str>,
) -> Option<Trigger> {
    let Some(current) = &state.current else {
        return Some(Trigger::Initial);
    };
    if current.inputs != inputs {
        return Some(Trigger::InputsChanged);
    }
    if let Some(value) = rotate
        && Some(value) != rotated_for
    {
        return Some(Trigger::Forced(value.to_string()));
    }
    (now >= current.renewal_time).then_some(Trigger::Due)
}

/// What the failure history says about attempting now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Go ahead.
    Open,
    /// Retry at this time.
    Until(Timestamp),
    /// A non-retryable failure with the same inputs: wait for a change of spec or credentials.
    AwaitChange,
}

/// Failure history of one AwxToken, as far as the gate needs it.
#[derive(Clone, Debug, Default)]
pub struct FailureHistory<'a> {
    pub failed_attempts: u32,
    pub last_failure: Option<Timestamp>,
    /// Inputs fingerprint of the last failure when it was not retryable (known only to this
    /// process; after a restart the time-based backoff applies).
    pub permanent_failure_inputs: Option<&'a str>,
}

pub fn gate(
    now: Timestamp,
    trigger: &Trigger,
    inputs: &str,
    history: &FailureHistory<'_>,
    base: Duration,
    max: Duration,
    jitter: f64,
) -> Gate {
    if history.failed_attempts == 0 || matches!(trigger, Trigger::Forced(_)) {
        return Gate::Open;
    }
    match history.permanent_failure_inputs {
        Some(failed) if failed == inputs => return Gate::AwaitChange,
        Some(_) => return Gate::Open,
        None => {}
    }
    let Some(last) = history.last_failure else {
        return Gate::Open;
    };
    let retry_at = schedule::add(
        last,
        schedule::failure_backoff(history.failed_attempts, base, max, jitter),
    );
    if now >= retry_at {
        Gate::Open
    } else {
        Gate::Until(retry_at)
    }
}

/// A number in [0, 1) derived from `parts`: stable for the same inputs, spread across objects.
pub fn jitter(parts: &[&str]) -> f64 {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether `host` (host or host:port of the AWX URL) is in the allow-list. An entry without a
/// port allows any port; `*.example.com` allows subdomains.
pub fn host_allowed(allowed: &[String], host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let bare = match host.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        Some((h, port)) if h.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host.as_str(),
    };
    allowed.iter().any(|entry| {
        let entry = entry.trim().to_ascii_lowercase();
        if let Some(suffix) = entry.strip_prefix("*.") {
            bare.ends_with(&format!(".{suffix}"))
        } else if entry.contains(':') && !entry.starts_with('[') || entry.contains("]:") {
            entry == host
        } else {
            entry == bare
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{HeldToken, Sensitive};

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn state(inputs: &str, renewal: i64) -> TokenState {
        TokenState {
            current: Some(HeldToken {
                access_token: Sensitive::new("a"),
                refresh_token: None,
                token_id: None,
                personal: false,
                gateway: false,
                scope: "write".into(),
                user: None,
                issued_at: t(0),
                refresh_issued_at: None,
                expires_at: None,
                renewal_time: t(renewal),
                inputs: inputs.into(),
            }),
            retiring: vec![],
            issuing: None,
        }
    }

    #[test]
    fn triggers_in_priority_order() {
        let empty = TokenState::default();
        assert_eq!(
            trigger(t(0), &empty, "x", None, None),
            Some(Trigger::Initial)
        );
        let s = state("x", 100);
        assert_eq!(
            trigger(t(50), &s, "y", Some("r1"), None),
            Some(Trigger::InputsChanged)
        );
        assert_eq!(
            trigger(t(50), &s, "x", Some("r1"), None),
            Some(Trigger::Forced("r1".into()))
        );
        assert_eq!(trigger(t(50), &s, "x", Some("r1"), Some("r1")), None);
        assert_eq!(
            trigger(t(100), &s, "x", Some("r1"), Some("r1")),
            Some(Trigger::Due)
        );
        assert_eq!(trigger(t(99), &s, "x", None, None), None);
    }

    #[test]
    fn gate_backs_off_exponentially_after_retryable_failures() {
        let base = Duration::from_secs(5);
        let max = Duration::from_secs(300);
        let history = FailureHistory {
            failed_attempts: 3,
            last_failure: Some(t(0)),
            permanent_failure_inputs: None,
        };
        assert_eq!(
            gate(t(1), &Trigger::Due, "x", &history, base, max, 0.0),
            Gate::Until(t(20))
        );
        assert_eq!(
            gate(t(20), &Trigger::Due, "x", &history, base, max, 0.0),
            Gate::Open
        );
        assert_eq!(
            gate(
                t(1),
                &Trigger::Forced("r".into()),
                "x",
                &history,
                base,
                max,
                0.0
            ),
            Gate::Open
        );
        assert_eq!(
            gate(
                t(1),
                &Trigger::Due,
                "x",
                &FailureHistory::default(),
                base,
                max,
                0.0
            ),
            Gate::Open
        );
    }

    #[test]
    fn credential_errors_wait_for_a_change_of_inputs() {
        let base = Duration::from_secs(5);
        let max = Duration::from_secs(300);
        let history = FailureHistory {
            failed_attempts: 1,
            last_failure: Some(t(0)),
            permanent_failure_inputs: Some("x"),
        };
        assert_eq!(
            gate(t(10_000), &Trigger::Initial, "x", &history, base, max, 0.0),
            Gate::AwaitChange
        );
        assert_eq!(
            gate(t(1), &Trigger::Initial, "y", &history, base, max, 0.0),
            Gate::Open
        );
    }

    #[test]
    fn jitter_is_stable_and_in_range() {
        let a = jitter(&["uid-1", "3"]);
        assert_eq!(a, jitter(&["uid-1", "3"]));
        assert_ne!(a, jitter(&["uid-2", "3"]));
        for i in 0..1000 {
            let j = jitter(&["u", &i.to_string()]);
            assert!((0.0..1.0).contains(&j));
        }
    }

    #[test]
    fn allowed_hosts_match_host_port_and_wildcards() {
        let allowed = vec![
            "awx.example.com".to_string(),
            "127.0.0.1:8052".to_string(),
            "*.corp.example".to_string(),
        ];
        assert!(host_allowed(&allowed, "awx.example.com"));
        assert!(host_allowed(&allowed, "AWX.example.com:8443"));
        assert!(host_allowed(&allowed, "127.0.0.1:8052"));
        assert!(!host_allowed(&allowed, "127.0.0.1:8053"));
        assert!(host_allowed(&allowed, "a.b.corp.example"));
        assert!(!host_allowed(&allowed, "corp.example"));
        assert!(!host_allowed(&allowed, "awx.example.com.evil.io"));
        assert!(!host_allowed(&allowed, "10.0.0.1"));
        assert!(!host_allowed(&[], "awx.example.com"));
    }
}
