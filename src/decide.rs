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
    /// Nothing is due, but a token request was interrupted (the process stopped before its
    /// answer was recorded): look for what it may have created.
    Interrupted,
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
            Trigger::Interrupted => "an interrupted token request is looked for",
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
    if now >= current.renewal_time {
        return Some(Trigger::Due);
    }
    state.issuing.is_some().then_some(Trigger::Interrupted)
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
    use crate::state::{HeldToken, Sensitive, TokenRecord};

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn state(inputs: &str, renewal: i64) -> TokenState {
        TokenState {
            current: Some(HeldToken {
                token: TokenRecord {
                    url: None,
                    client_id: None,
                    client_secret: None,
                    access_token: Sensitive::new("a"),
                    refresh_token: None,
                    token_id: None,
                    personal: false,
                    gateway: false,
                },
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
            rotated_for: None,
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
        // An interrupted request is looked for even when nothing is due (e.g. the renewal
        // policy changed after the crash), but does not outrank a renewal.
        let mut interrupted = state("x", 100);
        interrupted.issuing = Some(crate::state::IssueIntent {
            tag: "awxto-0".into(),
            started_at: t(0),
            personal: true,
            gateway: false,
        });
        assert_eq!(
            trigger(t(99), &interrupted, "x", None, None),
            Some(Trigger::Interrupted)
        );
        assert_eq!(
            trigger(t(100), &interrupted, "x", None, None),
            Some(Trigger::Due)
        );
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

    #[test]
    fn allowed_hosts_handle_ipv6_literals_and_refuse_look_alikes() {
        let allowed = vec![
            "[::1]".to_string(),
            "[2001:db8::1]:8443".to_string(),
            " AWX.Example.com ".to_string(),
        ];
        assert!(host_allowed(&allowed, "[::1]"));
        assert!(host_allowed(&allowed, "[::1]:8052"));
        assert!(host_allowed(&allowed, "[2001:db8::1]:8443"));
        assert!(!host_allowed(&allowed, "[2001:db8::1]"));
        assert!(!host_allowed(&allowed, "[2001:db8::1]:443"));
        assert!(host_allowed(&allowed, "awx.example.com"));
        for refused in [
            "[::2]",
            "[::ffff:7f00:1]",
            "127.0.0.1",
            "awx.example.com.",
            "xawx.example.com",
            "awx.example.com.evil.example",
            "evil.example",
            "",
        ] {
            assert!(!host_allowed(&allowed, refused), "{refused:?}");
        }
        // A wildcard never matches the bare domain or a look-alike suffix.
        let wildcard = vec!["*.example.com".to_string()];
        assert!(host_allowed(&wildcard, "awx.example.com:8443"));
        assert!(!host_allowed(&wildcard, "example.com"));
        assert!(!host_allowed(&wildcard, "evilexample.com"));
        assert!(!host_allowed(&wildcard, "awx.example.com.evil.example"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn timestamp() -> impl Strategy<Value = Timestamp> {
            prop_oneof![
                Just(Timestamp::MIN),
                Just(Timestamp::MAX),
                (Timestamp::MIN.as_second()..=Timestamp::MAX.as_second())
                    .prop_map(|s| Timestamp::from_second(s).unwrap()),
            ]
        }

        fn duration() -> impl Strategy<Value = Duration> {
            prop_oneof![
                Just(Duration::MAX),
                (any::<u64>(), 0..1_000_000_000u32).prop_map(|(s, n)| Duration::new(s, n)),
                (0u64..100_000).prop_map(Duration::from_secs),
            ]
        }

        /// A host name as validation leaves it: lowercase DNS labels, an IPv4 or an IPv6
        /// literal.
        fn host_name() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?){0,3}",
                (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>())
                    .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
                any::<u128>().prop_map(|ip| format!("[{}]", std::net::Ipv6Addr::from(ip))),
            ]
        }

        fn with_port(host: &str, port: Option<u16>) -> String {
            match port {
                Some(port) => format!("{host}:{port}"),
                None => host.to_string(),
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn jitter_is_deterministic_and_below_one(
                parts in prop::collection::vec(any::<String>(), 0..5),
            ) {
                let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
                let j = jitter(&parts);
                prop_assert!((0.0..1.0).contains(&j), "{}", j);
                prop_assert_eq!(j.to_bits(), jitter(&parts).to_bits());
            }

            #[test]
            fn host_allowed_never_panics_and_an_empty_list_allows_nothing(
                allowed in prop::collection::vec(any::<String>(), 0..5),
                host in any::<String>(),
            ) {
                let _ = host_allowed(&allowed, &host);
                prop_assert!(!host_allowed(&[], &host));
            }

            #[test]
            fn host_entries_allow_exactly_their_host_and_port(
                host in host_name(),
                other in host_name(),
                port in prop::option::of(any::<u16>()),
                other_port in any::<u16>(),
                shout in any::<bool>(),
            ) {
                let target = with_port(&host, port);
                let entry = if shout { host.to_uppercase() } else { host.clone() };
                // Host alone: any port of that host.
                prop_assert!(host_allowed(std::slice::from_ref(&entry), &target), "{} {}", entry, target);
                // Host and port: that port only.
                let pinned = vec![format!("{entry}:{other_port}")];
                prop_assert_eq!(
                    host_allowed(&pinned, &target),
                    port == Some(other_port),
                    "{:?} {}", pinned, target
                );
                // The exact host string validation produces always matches itself.
                prop_assert!(host_allowed(std::slice::from_ref(&target), &target));
                if other != host {
                    prop_assert!(!host_allowed(std::slice::from_ref(&other), &target), "{} {}", other, target);
                    let pinned_other = vec![format!("{other}:{other_port}")];
                    prop_assert!(!host_allowed(&pinned_other, &target), "{:?} {}", pinned_other, target);
                }
            }

            #[test]
            fn wildcards_allow_only_strict_subdomains(
                sub in "[a-z0-9]([a-z0-9.-]{0,10}[a-z0-9])?",
                domain in "[a-z0-9]{1,8}\\.[a-z]{2,4}",
                host in host_name(),
                port in prop::option::of(any::<u16>()),
            ) {
                let wildcard = vec![format!("*.{domain}")];
                let subdomain = with_port(&format!("{sub}.{domain}"), port);
                prop_assert!(host_allowed(&wildcard, &subdomain), "{}", subdomain);
                prop_assert!(!host_allowed(&wildcard, &with_port(&domain, port)));
                let allowed = host_allowed(&wildcard, &with_port(&host, port));
                prop_assert_eq!(allowed, host.ends_with(&format!(".{domain}")), "{}", host);
            }

            #[test]
            fn the_gate_never_panics_and_never_waits_past_the_backoff(
                now in timestamp(),
                last in prop::option::of(timestamp()),
                failed_attempts in any::<u32>(),
                base in duration(),
                max in duration(),
                jitter in prop_oneof![0.0..1.0, any::<f64>()],
                forced in any::<bool>(),
            ) {
                let trigger = if forced { Trigger::Forced("r".into()) } else { Trigger::Due };
                let history = FailureHistory {
                    failed_attempts,
                    last_failure: last,
                    permanent_failure_inputs: None,
                };
                match gate(now, &trigger, "x", &history, base, max, jitter) {
                    Gate::Open => {}
                    Gate::Until(at) => {
                        prop_assert!(!forced && failed_attempts > 0);
                        prop_assert!(at > now);
                        prop_assert!(at <= schedule::add(last.unwrap(), max));
                    }
                    Gate::AwaitChange => prop_assert!(false, "no permanent failure was recorded"),
                }
            }
        }
    }
}
