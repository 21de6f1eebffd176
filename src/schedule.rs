//! When to renew a token, when to retry after a failure, and how long a requeue may be.
//! Pure functions over plain values and a clock passed in.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::spec::RenewBefore;

/// Longest single requeue: AWX's 1000-year lifetimes must never reach a timer, and a periodic
/// look keeps the resource honest even if a watch event is lost.
pub const MAX_REQUEUE: Duration = Duration::from_secs(3600);

/// Largest jitter taken off a renewal time.
const MAX_JITTER: Duration = Duration::from_secs(300);

/// What the renewal time of one token depends on.
#[derive(Clone, Copy, Debug)]
pub struct RenewalSchedule {
    pub issued_at: Timestamp,
    /// AWX's expiry of the access token, if it reported one.
    pub expires_at: Option<Timestamp>,
    pub rotate_every: Duration,
    pub renew_before: RenewBefore,
    /// Issue time of the refresh token when the strategy is Refresh.
    pub refresh_issued_at: Option<Timestamp>,
    /// How long AWX keeps a refresh token usable after its issue.
    pub refresh_lifetime: Duration,
    /// In [0, 1): how much of the allowed jitter to take, drawn once per token.
    pub jitter: f64,
}

impl RenewalSchedule {
    /// The earliest of: expiry minus renewBefore (or the percentage of the lifetime), issue
    /// plus rotateEvery, and the refresh token's death minus a margin; less a jitter of at most
    /// 10% of the time from issue to that point (and at most 5 minutes), so tokens issued
    /// together do not renew at the same second. Never before the issue time.
    pub fn renewal_time(&self) -> Timestamp {
        let issued = self.issued_at;
        let mut due = add(issued, self.rotate_every);
        if let Some(expires) = self.expires_at {
            let lifetime = span(issued, expires);
            let before = match self.renew_before {
                RenewBefore::Fixed(d) => d,
                RenewBefore::Percentage(p) => lifetime.mul_f64(f64::from(p) / 100.0),
            };
            // A lifetime shorter than renewBefore: renew at two thirds of it, as cert-manager does.
            let at = if before >= lifetime {
                add(issued, lifetime.mul_f64(2.0 / 3.0))
            } else {
                sub(expires, before)
            };
            due = due.min(at);
        }
        if let Some(refresh_issued) = self.refresh_issued_at {
            let margin = (self.refresh_lifetime / 10).min(Duration::from_secs(86400));
            due = due.min(add(refresh_issued, self.refresh_lifetime - margin));
        }
        let window = span(issued, due);
        // NaN would make mul_f64 panic; it means "no jitter".
        let fraction = if self.jitter.is_nan() {
            0.0
        } else {
            self.jitter.clamp(0.0, 0.999)
        };
        let jitter = (window / 10).min(MAX_JITTER).mul_f64(fraction);
        sub(due, jitter).max(issued)
    }
}

/// How long to wait before the next attempt after `failed_attempts` consecutive failures:
/// `base * 2^(n-1)`, capped at `max`, stretched by up to 20% of jitter (`jitter` in [0, 1)).
pub fn failure_backoff(
    failed_attempts: u32,
    base: Duration,
    max: Duration,
    jitter: f64,
) -> Duration {
    if failed_attempts == 0 {
        return Duration::ZERO;
    }
    let exp = failed_attempts.saturating_sub(1).min(30);
    let raw = base.saturating_mul(1u32 << exp).min(max);
    // Only the stretch goes through floating point: `raw.mul_f64(1.2)` panics when `max` is
    // near Duration::MAX, and a NaN jitter would make it panic at any size.
    let fraction = if jitter.is_nan() {
        0.0
    } else {
        jitter.clamp(0.0, 1.0)
    };
    let stretch =
        Duration::try_from_secs_f64(raw.as_secs_f64() * 0.2 * fraction).unwrap_or(Duration::ZERO);
    raw.saturating_add(stretch).min(max)
}

/// Delay until `at`, clamped to [0, MAX_REQUEUE].
pub fn requeue_delay(now: Timestamp, at: Timestamp) -> Duration {
    span(now, at).min(MAX_REQUEUE)
}

/// `to - from` as a non-negative Duration (zero when `to` is not after `from`).
pub fn span(from: Timestamp, to: Timestamp) -> Duration {
    Duration::try_from(to.duration_since(from)).unwrap_or(Duration::ZERO)
}

/// `t + d`, saturating at the largest timestamp.
pub fn add(t: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

/// `t - d`, saturating at the smallest timestamp.
pub fn sub(t: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_sub(d).ok())
        .unwrap_or(Timestamp::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3600;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn schedule() -> RenewalSchedule {
        RenewalSchedule {
            issued_at: t(0),
            expires_at: None,
            rotate_every: Duration::from_secs(24 * H),
            renew_before: RenewBefore::Fixed(Duration::from_secs(H)),
            refresh_issued_at: None,
            refresh_lifetime: AWX_REFRESH_LIFETIME,
            jitter: 0.0,
        }
    }

    /// AWX's default REFRESH_TOKEN_EXPIRE_SECONDS.
    const AWX_REFRESH_LIFETIME: Duration = Duration::from_secs(2_628_000);

    #[test]
    fn renews_at_rotate_every_when_awx_expiry_is_far() {
        let s = RenewalSchedule {
            expires_at: Some(add(t(0), Duration::from_secs(31_536_000_000))),
            ..schedule()
        };
        assert_eq!(s.renewal_time(), t(24 * 3600));
    }

    #[test]
    fn renews_before_expiry_when_expiry_comes_first() {
        let s = RenewalSchedule {
            expires_at: Some(t(10 * 3600)),
            ..schedule()
        };
        assert_eq!(s.renewal_time(), t(9 * 3600));
    }

    #[test]
    fn renews_at_percentage_of_lifetime_left() {
        let s = RenewalSchedule {
            expires_at: Some(t(10 * 3600)),
            renew_before: RenewBefore::Percentage(30),
            ..schedule()
        };
        assert_eq!(s.renewal_time(), t(7 * 3600));
    }

    #[test]
    fn lifetime_shorter_than_renew_before_renews_at_two_thirds() {
        let s = RenewalSchedule {
            expires_at: Some(t(1800)),
            ..schedule()
        };
        assert_eq!(s.renewal_time(), t(1200));
    }

    #[test]
    fn refresh_chain_renewed_before_refresh_token_dies() {
        let s = RenewalSchedule {
            rotate_every: Duration::from_secs(60 * 24 * H),
            refresh_issued_at: Some(t(0)),
            ..schedule()
        };
        // 2628000 s minus a margin of one day.
        assert_eq!(s.renewal_time(), t(2_628_000 - 86_400));
    }

    #[test]
    fn renews_before_expiry_with_jitter_bounded() {
        let base = RenewalSchedule {
            expires_at: Some(t(10 * 3600)),
            ..schedule()
        };
        let early = RenewalSchedule {
            jitter: 0.999,
            ..base
        };
        let taken = span(early.renewal_time(), base.renewal_time());
        assert!(
            taken > Duration::from_secs(299) && taken <= MAX_JITTER,
            "{taken:?}"
        );
        // Short windows get at most 10% of jitter.
        let short = RenewalSchedule {
            rotate_every: Duration::from_secs(10),
            jitter: 0.999,
            ..schedule()
        };
        let at = short.renewal_time();
        assert!(at > t(8) && at <= t(10), "{at}");
    }

    #[test]
    fn expiry_in_the_past_renews_immediately_not_before_issue() {
        let s = RenewalSchedule {
            expires_at: Some(t(-5)),
            ..schedule()
        };
        assert_eq!(s.renewal_time(), t(0));
    }

    #[test]
    fn thousand_year_expiry_never_reaches_a_timer() {
        let s = RenewalSchedule {
            rotate_every: Duration::from_secs(366 * 24 * H),
            expires_at: Some(add(t(0), Duration::from_secs(31_536_000_000))),
            ..schedule()
        };
        assert_eq!(requeue_delay(t(0), s.renewal_time()), MAX_REQUEUE);
        assert_eq!(requeue_delay(t(0), Timestamp::MAX), MAX_REQUEUE);
        assert_eq!(requeue_delay(t(10), t(0)), Duration::ZERO);
        assert_eq!(requeue_delay(t(0), t(5)), Duration::from_secs(5));
    }

    #[test]
    fn saturating_time_arithmetic() {
        assert_eq!(add(Timestamp::MAX, Duration::from_secs(1)), Timestamp::MAX);
        assert_eq!(add(t(0), Duration::MAX), Timestamp::MAX);
        assert_eq!(sub(Timestamp::MIN, Duration::from_secs(1)), Timestamp::MIN);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let base = Duration::from_secs(5);
        let max = Duration::from_secs(300);
        assert_eq!(failure_backoff(0, base, max, 0.0), Duration::ZERO);
        assert_eq!(failure_backoff(1, base, max, 0.0), Duration::from_secs(5));
        assert_eq!(failure_backoff(2, base, max, 0.0), Duration::from_secs(10));
        assert_eq!(failure_backoff(4, base, max, 0.0), Duration::from_secs(40));
        assert_eq!(failure_backoff(7, base, max, 0.0), Duration::from_secs(300));
        assert_eq!(
            failure_backoff(u32::MAX, base, max, 0.5),
            Duration::from_secs(300)
        );
        assert_eq!(failure_backoff(1, base, max, 1.0), Duration::from_secs(6));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn timestamp() -> impl Strategy<Value = Timestamp> {
            prop_oneof![
                Just(Timestamp::MIN),
                Just(Timestamp::MAX),
                (
                    Timestamp::MIN.as_second()..=Timestamp::MAX.as_second(),
                    0..1_000_000_000i32
                )
                    .prop_map(|(s, n)| Timestamp::new(s, n).unwrap_or(Timestamp::MAX)),
                (1_600_000_000i64..1_900_000_000).prop_map(|s| Timestamp::from_second(s).unwrap()),
            ]
        }

        fn duration() -> impl Strategy<Value = Duration> {
            prop_oneof![
                Just(Duration::ZERO),
                Just(Duration::MAX),
                (any::<u64>(), 0..1_000_000_000u32).prop_map(|(s, n)| Duration::new(s, n)),
                (0u64..100 * 365 * 86_400).prop_map(Duration::from_secs),
                (0u64..10_000).prop_map(Duration::from_millis),
            ]
        }

        fn fraction() -> impl Strategy<Value = f64> {
            prop_oneof![
                0.0..1.0,
                any::<f64>(),
                Just(f64::NAN),
                Just(f64::INFINITY),
                Just(f64::NEG_INFINITY),
                Just(-0.0),
                Just(1.0),
            ]
        }

        fn schedule() -> impl Strategy<Value = RenewalSchedule> {
            (
                timestamp(),
                prop::option::of(timestamp()),
                duration(),
                prop_oneof![
                    duration().prop_map(RenewBefore::Fixed),
                    any::<u8>().prop_map(RenewBefore::Percentage),
                ],
                prop::option::of(timestamp()),
                (1u64..400 * 86_400).prop_map(Duration::from_secs),
                fraction(),
            )
                .prop_map(
                    |(
                        issued_at,
                        expires_at,
                        rotate_every,
                        renew_before,
                        refresh_issued_at,
                        refresh_lifetime,
                        jitter,
                    )| {
                        RenewalSchedule {
                            issued_at,
                            expires_at,
                            rotate_every,
                            renew_before,
                            refresh_issued_at,
                            refresh_lifetime,
                            jitter,
                        }
                    },
                )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn renewal_time_is_never_before_issue_nor_after_the_limits(s in schedule()) {
                let at = s.renewal_time();
                prop_assert!(at >= s.issued_at, "{} before {}", at, s.issued_at);
                prop_assert!(at <= add(s.issued_at, s.rotate_every).max(s.issued_at));
                if let Some(expires) = s.expires_at {
                    prop_assert!(at <= expires.max(s.issued_at), "{} after expiry {}", at, expires);
                }
                if let Some(refreshed) = s.refresh_issued_at {
                    prop_assert!(at <= add(refreshed, s.refresh_lifetime).max(s.issued_at));
                }
                // The jitter only moves the time earlier, by at most 5 minutes and 10% of the
                // time from issue to renewal.
                let unjittered = RenewalSchedule { jitter: 0.0, ..s }.renewal_time();
                prop_assert!(at <= unjittered);
                let taken = span(at, unjittered);
                prop_assert!(taken <= MAX_JITTER, "{:?}", taken);
                prop_assert!(taken <= span(s.issued_at, unjittered) / 10, "{:?}", taken);
                prop_assert_eq!(at, s.renewal_time());
            }

            #[test]
            fn backoff_never_exceeds_max_and_grows_with_failures(
                attempts in prop_oneof![0u32..40, any::<u32>()],
                base in duration(),
                max in duration(),
                jitter in fraction(),
            ) {
                let wait = failure_backoff(attempts, base, max, jitter);
                prop_assert!(wait <= max, "{:?} > {:?}", wait, max);
                if attempts == 0 {
                    prop_assert_eq!(wait, Duration::ZERO);
                } else {
                    prop_assert!(wait >= base.min(max), "{:?} < {:?}", wait, base.min(max));
                    let next = failure_backoff(attempts.saturating_add(1), base, max, jitter);
                    prop_assert!(next >= wait, "{:?} then {:?}", wait, next);
                }
            }

            #[test]
            fn time_arithmetic_saturates_instead_of_panicking(
                t in timestamp(),
                u in timestamp(),
                d in duration(),
            ) {
                prop_assert!(add(t, d) >= t);
                prop_assert!(sub(t, d) <= t);
                prop_assert!(requeue_delay(t, u) <= MAX_REQUEUE);
                prop_assert_eq!(span(t, u) == Duration::ZERO, u <= t);
            }
        }
    }
}
