//! The plan's decisions, case by case, and the backoff as a property over whole outages.

use std::time::Duration;

use jiff::Timestamp;
use proptest::prelude::*;

use super::*;
use crate::{
    crd::AwxTokenSpec,
    spec::{self, SpecError, ValidSpec},
    state::{
        FailureRecord, HeldToken, IssueIntent, RetiringToken, Sensitive, Session, TokenRecord,
    },
};

const UID: &str = "5b1c7d0e-0000-4000-8000-000000000001";
const ME: &str = "operator-a/0001";

fn t(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).unwrap()
}

fn spec_with(extra: serde_json::Value) -> AwxTokenSpec {
    let mut spec = serde_json::json!({
        "awx": {"url": "https://awx.example.com", "timeoutSeconds": 30},
        "grant": {"type": "Password", "credentialsSecretRef": {"name": "bot"}},
        "renewal": {"rotateEvery": "24h", "revokeGracePeriod": "5m"},
    });
    for (k, v) in extra.as_object().unwrap() {
        match (spec.get_mut(k), v) {
            (Some(serde_json::Value::Object(inner)), serde_json::Value::Object(more)) => {
                inner.extend(more.clone())
            }
            _ => {
                spec[k] = v.clone();
            }
        }
    }
    serde_json::from_value(spec).unwrap()
}

fn record(value: &str) -> TokenRecord {
    TokenRecord {
        url: Some("https://awx.example.com/".into()),
        client_id: Some("app".into()),
        client_secret: Some(Sensitive::new("app-secret")),
        access_token: Sensitive::new(value),
        refresh_token: Some(Sensitive::new(format!("r-{value}"))),
        token_id: None,
        personal: false,
        gateway: false,
    }
}

fn held(value: &str, issued: Timestamp) -> HeldToken {
    HeldToken {
        token: record(value),
        scope: "write".into(),
        user: Some("bot".into()),
        issued_at: issued,
        refresh_issued_at: Some(issued),
        expires_at: None,
        renewal_time: issued,
        inputs: "fp".into(),
        verified_at: None,
        verify_failed_at: None,
        rejected_at: None,
        refresh_broken: false,
        clock_offset: None,
        application_id: None,
    }
}

fn marker(holder: &str, started: Timestamp) -> IssueIntent {
    IssueIntent {
        tag: "awxto-1".into(),
        started_at: started,
        personal: false,
        gateway: false,
        refresh: false,
        holder: holder.into(),
        search_attempts: 0,
        search_after: None,
        tagged: false,
        username: Some("bot".into()),
        client_id: Some("app".into()),
        application: None,
        clock_offset: None,
        searched: false,
        search_error: None,
        claimed_at: None,
    }
}

fn failure(attempts: u32, at: Timestamp, retryable: bool) -> FailureRecord {
    FailureRecord {
        attempts,
        at,
        since: None,
        reason: if retryable {
            "AwxServerError"
        } else {
            "InvalidCredentials"
        }
        .into(),
        message: "m".into(),
        retryable,
        inputs: "fp".into(),
        rotation: None,
    }
}

/// Owns what a `Facts` borrows.
struct World {
    now: Timestamp,
    spec: AwxTokenSpec,
    valid: Result<ValidSpec, SpecError>,
    allowed: Option<Vec<String>>,
    rotate: Option<String>,
    state: TokenState,
    predecessor: bool,
    target: Target,
    inputs: Result<(String, Option<String>, bool), (String, String)>,
    rollout_checked: bool,
    started_at: Option<Timestamp>,
    renew_from: Option<Timestamp>,
}

impl World {
    fn new(spec: AwxTokenSpec) -> Self {
        Self {
            now: t(0),
            valid: spec::validate(&spec),
            spec,
            allowed: None,
            rotate: None,
            state: TokenState::default(),
            predecessor: false,
            target: Target::Writable { up_to_date: false },
            inputs: Ok(("fp".into(), Some("app".into()), true)),
            rollout_checked: false,
            started_at: None,
            renew_from: None,
        }
    }

    fn healthy() -> Self {
        let mut w = Self::new(spec_with(serde_json::json!({})));
        w.state.current = Some(held("A", t(-3600)));
        w.target = Target::Writable { up_to_date: true };
        w
    }

    fn respec(&mut self, extra: serde_json::Value) {
        self.spec = spec_with(extra);
        self.valid = spec::validate(&self.spec);
    }

    fn facts(&self) -> Facts<'_> {
        Facts {
            now: self.now,
            uid: UID,
            spec: &self.spec,
            valid: self.valid.as_ref(),
            allowed_hosts: self.allowed.as_deref(),
            rotate: self.rotate.as_deref(),
            state: &self.state,
            predecessor_state: self.predecessor,
            target: self.target.clone(),
            inputs: match &self.inputs {
                Ok((fingerprint, client_id, user_login)) => Ok(super::Inputs {
                    fingerprint,
                    client_id: client_id.as_deref(),
                    user_login: *user_login,
                }),
                Err((reason, message)) => Err(Blocker { reason, message }),
            },
            rollout_checked: self.rollout_checked,
            started_at: self.started_at,
            renew_from: self.renew_from,
            backoff: Backoff {
                base: Duration::from_secs(5),
                max: Duration::from_secs(300),
            },
            holder: ME,
        }
    }

    fn next(&self) -> Next {
        next(&self.facts())
    }

    fn renewal(&self) -> Timestamp {
        renewal_time(
            UID,
            self.state.current.as_ref().unwrap(),
            self.valid.as_ref().unwrap(),
        )
    }
}

fn obtain(trigger: Trigger, refresh: bool) -> Next {
    Next::Obtain(Obtain { trigger, refresh })
}

#[test]
fn a_new_awx_token_obtains_its_first_token() {
    let w = World::new(spec_with(serde_json::json!({})));
    assert_eq!(w.next(), obtain(Trigger::Initial, false));
}

#[test]
fn a_healthy_token_sleeps_until_its_renewal_time() {
    let w = World::healthy();
    let renewal = w.renewal();
    assert!(
        renewal > t(23 * 3600 - 300) && renewal <= t(23 * 3600),
        "{renewal}"
    );
    assert_eq!(w.next(), Next::Done(Wake::At(renewal)));
}

#[test]
fn a_due_token_is_renewed_by_the_grant_or_by_refresh() {
    let mut w = World::healthy();
    w.now = w.renewal();
    assert_eq!(w.next(), obtain(Trigger::Due, false));
    w.respec(serde_json::json!({"renewal": {"strategy": "Refresh"}}));
    w.now = w.renewal();
    assert_eq!(w.next(), obtain(Trigger::Due, true));
    // A chain that failed or was interrupted is not trusted: the grant, at once (a lost
    // refresh may have taken the access token in the Secret with it).
    w.state.current.as_mut().unwrap().refresh_broken = true;
    assert_eq!(w.next(), obtain(Trigger::ChainBroken, false));
    w.now = t(0);
    assert_eq!(
        w.next(),
        obtain(Trigger::ChainBroken, false),
        "before the renewal time"
    );
    // ...but no faster than the backoff after a failed grant.
    w.state.failure = Some(failure(1, t(0), true));
    assert!(
        matches!(w.next(), Next::Done(Wake::At(_))),
        "{:?}",
        w.next()
    );
    w.state.failure = None;
    w.now = w.renewal();
    w.state.current.as_mut().unwrap().refresh_broken = false;
    w.state.interrupted.push(IssueIntent {
        refresh: true,
        ..marker("other", t(-100))
    });
    assert_eq!(w.next(), obtain(Trigger::Due, false));
    w.state.interrupted.clear();
    // A refresh token of another application than the credentials name: the grant.
    w.inputs = Ok(("fp".into(), Some("other-app".into()), true));
    assert_eq!(w.next(), obtain(Trigger::Due, false));
}

#[test]
fn a_changed_policy_applies_to_the_token_already_held() {
    let mut w = World::healthy();
    w.respec(serde_json::json!({"renewal": {"rotateEvery": "30m"}}));
    assert_eq!(w.next(), obtain(Trigger::Due, false));
}

#[test]
fn new_inputs_and_a_new_rotate_value_trigger_a_new_token() {
    let mut w = World::healthy();
    w.inputs = Ok(("fp2".into(), Some("app".into()), true));
    assert_eq!(w.next(), obtain(Trigger::InputsChanged, false));
    let mut w = World::healthy();
    w.rotate = Some("1".into());
    assert_eq!(w.next(), obtain(Trigger::Forced("1".into()), false));
    w.state.rotated_for = Some("1".into());
    assert!(matches!(w.next(), Next::Done(Wake::At(_))));
}

#[test]
fn a_retryable_failure_holds_the_next_attempt_back_by_the_backoff() {
    let mut w = World::healthy();
    w.now = w.renewal();
    let failed_at = w.now;
    w.state.failure = Some(failure(1, failed_at, true));
    let retry = retry_time(w.state.failure.as_ref().unwrap(), w.facts().backoff, UID);
    assert!(
        retry >= schedule::add(failed_at, Duration::from_secs(5))
            && retry <= schedule::add(failed_at, Duration::from_secs(6)),
        "{retry}"
    );
    w.now = schedule::add(failed_at, Duration::from_secs(1));
    assert_eq!(w.next(), Next::Done(Wake::At(retry)));
    w.now = retry;
    assert_eq!(w.next(), obtain(Trigger::Due, false));
}

#[test]
fn a_refusal_waits_for_new_inputs() {
    let mut w = World::new(spec_with(serde_json::json!({})));
    w.state.failure = Some(failure(1, t(0), false));
    w.now = t(100_000);
    assert_eq!(w.next(), Next::Done(Wake::OnChange));
    // A fixed password is tried at once.
    w.inputs = Ok(("fp2".into(), Some("app".into()), true));
    assert_eq!(w.next(), obtain(Trigger::Initial, false));
}

#[test]
fn a_new_rotate_value_skips_the_backoff_once() {
    let mut w = World::healthy();
    w.state.failure = Some(failure(3, t(0), true));
    w.rotate = Some("r1".into());
    w.now = t(1);
    assert_eq!(w.next(), obtain(Trigger::Forced("r1".into()), false));
    // That attempt failed too: later attempts for r1 wait.
    w.state.failure = Some(FailureRecord {
        rotation: Some("r1".into()),
        ..failure(4, t(1), true)
    });
    w.now = t(2);
    assert!(matches!(w.next(), Next::Done(Wake::At(at)) if at > t(40)));
    // Even a rotation refused for good may be retried once with a new value.
    w.state.failure = Some(FailureRecord {
        rotation: Some("r1".into()),
        ..failure(1, t(1), false)
    });
    assert_eq!(
        w.next(),
        Next::Done(Wake::At(schedule::add(t(2), schedule::MAX_REQUEUE)))
    );
    w.rotate = Some("r2".into());
    assert_eq!(w.next(), obtain(Trigger::Forced("r2".into()), false));
}

#[test]
fn a_marker_of_this_process_is_claimed_at_once_another_after_the_timeout() {
    let mut w = World::healthy();
    w.state.issuing = Some(marker(ME, t(-1)));
    assert_eq!(w.next(), Next::ClaimInterrupted);
    w.state.issuing = Some(marker("operator-b/0002", t(-1)));
    w.now = t(5);
    // Another process may be asking right now: no second request, wake when it cannot be.
    assert_eq!(
        w.next(),
        Next::Done(Wake::At(schedule::add(t(-1), Duration::from_secs(40))))
    );
    w.now = schedule::add(t(-1), Duration::from_secs(40));
    assert_eq!(w.next(), Next::ClaimInterrupted);
}

#[test]
fn interrupted_requests_are_searched_with_a_login_or_a_write_token_others_reported() {
    let mut w = World::healthy();
    w.state.interrupted.push(IssueIntent {
        personal: true,
        ..marker(ME, t(-5))
    });
    assert_eq!(w.next(), Next::Search(0));
    w.inputs = Err(("CredentialsNotFound".into(), "gone".into()));
    // The held token has write scope: it may list and delete the user's tokens.
    assert_eq!(w.next(), Next::Search(0), "the held write token looks");
    w.state.current.as_mut().unwrap().scope = "read".into();
    assert_ne!(
        w.next(),
        Next::Search(0),
        "no login, no write token, no search"
    );
    // A client-credentials request (no user) can only be reported, which needs no login.
    w.state.interrupted[0] = IssueIntent {
        username: None,
        ..marker(ME, t(-5))
    };
    assert_eq!(w.next(), Next::Search(0), "reported without a login");
    w.inputs = Ok(("fp".into(), Some("app".into()), true));
    w.state.interrupted[0] = marker(ME, t(-5));
    w.state.interrupted[0].search_after = Some(t(60));
    assert_eq!(w.next(), Next::Done(Wake::At(t(60))));
    w.state.interrupted[0].search_after = None;
    assert_eq!(w.next(), Next::Search(0));
}

#[test]
fn a_search_by_creation_time_waits_for_another_process_request_in_flight() {
    let mut w = World::healthy();
    w.state.interrupted.push(marker(ME, t(-60)));
    w.state.issuing = Some(marker("operator-b/0002", t(-1)));
    // Its token would fall in the window: no search (and no busy loop) until the marker
    // is old enough to be taken for interrupted too.
    assert_eq!(
        w.next(),
        Next::Done(Wake::At(schedule::add(t(-1), Duration::from_secs(40))))
    );
    // A tagged request's token is told apart by its tag: its search need not wait.
    w.state.interrupted[0].tagged = true;
    assert_eq!(w.next(), Next::Search(0));
    w.state.interrupted[0].tagged = false;
    w.now = schedule::add(t(-1), Duration::from_secs(40));
    assert_eq!(w.next(), Next::ClaimInterrupted);
    w.state.interrupted.extend(w.state.issuing.take());
    assert_eq!(w.next(), Next::Search(0));
}

fn retiring(value: &str, after: Timestamp) -> RetiringToken {
    RetiringToken {
        token: record(value),
        revoke_after: after,
        failed_attempts: 0,
        issued_at: None,
        clock_offset: None,
    }
}

#[test]
fn replaced_tokens_are_revoked_when_due_whatever_else_fails() {
    let mut w = World::healthy();
    w.state.retiring.push(retiring("OLD", t(10)));
    assert_eq!(w.next(), Next::Done(Wake::At(t(10))));
    w.now = t(10);
    assert_eq!(w.next(), Next::Revoke(0));
    // The credentials are gone, the renewal fails, the spec is broken: still revoked.
    w.inputs = Err(("CredentialsNotFound".into(), "gone".into()));
    assert_eq!(w.next(), Next::Revoke(0));
    w.inputs = Ok(("fp".into(), Some("app".into()), true));
    w.state.failure = Some(failure(2, t(9), true));
    assert_eq!(w.next(), Next::Revoke(0));
    w.respec(serde_json::json!({"renewal": {"rotateEvery": "soon"}}));
    assert!(w.valid.is_err());
    assert_eq!(w.next(), Next::Revoke(0));
    // Not where the allow-list forbids it.
    w.allowed = Some(vec!["other.example.com".into()]);
    assert_ne!(w.next(), Next::Revoke(0));
}

#[test]
fn a_predecessors_state_is_discarded_first() {
    let mut w = World::healthy();
    w.predecessor = true;
    assert_eq!(w.next(), Next::DiscardPredecessorState);
}

#[test]
fn suspended_means_no_awx_traffic_but_the_secret_is_repaired() {
    let mut w = World::healthy();
    w.respec(serde_json::json!({"suspend": true}));
    w.now = w.renewal();
    w.state.retiring.push(retiring("OLD", t(-10)));
    w.state.interrupted.push(marker(ME, t(-10)));
    assert_eq!(w.next(), Next::Done(Wake::OnChange));
    w.target = Target::Writable { up_to_date: false };
    assert_eq!(w.next(), Next::WriteTarget);
}

#[test]
fn a_foreign_target_is_never_written_and_nothing_is_issued_for_it() {
    let mut w = World::new(spec_with(serde_json::json!({})));
    w.target = Target::Foreign("it was not created by awx-token-operator".into());
    assert_eq!(w.next(), Next::Done(Wake::OnChange));
}

#[test]
fn verification_runs_when_due_and_a_rejected_token_is_replaced_with_the_grant() {
    let mut w = World::healthy();
    w.respec(serde_json::json!({"renewal": {"verifyEvery": "10m", "strategy": "Refresh"}}));
    assert_eq!(w.next(), Next::Verify, "issued an hour ago, never verified");
    w.state.current.as_mut().unwrap().verified_at = Some(t(-60));
    assert_eq!(w.next(), Next::Done(Wake::At(t(540))));
    // No answer last time: not again at once.
    w.now = t(600);
    w.state.current.as_mut().unwrap().verify_failed_at = Some(t(590));
    assert!(matches!(w.next(), Next::Done(Wake::At(at)) if at > t(600)));
    w.state.current.as_mut().unwrap().rejected_at = Some(t(600));
    assert_eq!(w.next(), obtain(Trigger::Rejected, false));
}

#[test]
fn deletion_retires_the_current_token_then_revokes_everything() {
    let mut w = World::healthy();
    w.state.retiring.push(retiring("OLD", t(1000)));
    assert_eq!(next_on_delete(&w.facts()), Next::RetireCurrent);
    w.state.current = None;
    // Nobody uses a deleted AwxToken's tokens: no grace period.
    assert_eq!(next_on_delete(&w.facts()), Next::Revoke(0));
    // A failed attempt's backoff still holds.
    w.state.retiring[0].failed_attempts = 1;
    assert_eq!(next_on_delete(&w.facts()), Next::Done(Wake::At(t(1000))));
    w.state.retiring[0].failed_attempts = 0;
    w.state.retiring.clear();
    w.state.interrupted.push(IssueIntent {
        personal: true,
        ..marker(ME, t(-5))
    });
    assert_eq!(next_on_delete(&w.facts()), Next::Search(0));
    w.state.interrupted.clear();
    assert_eq!(next_on_delete(&w.facts()), Next::Done(Wake::OnChange));
    w.state.retiring.push(RetiringToken {
        failed_attempts: 2,
        ..retiring("OLD", t(30))
    });
    assert_eq!(next_on_delete(&w.facts()), Next::Done(Wake::At(t(30))));
}

/// The plan's side of a fake reconcile: what an attempt does to the state.
fn fail_attempt(w: &mut World) {
    let attempts = w.state.failure.as_ref().map_or(0, |f| f.attempts) + 1;
    w.state.failure = Some(FailureRecord {
        rotation: w.rotate.clone(),
        ..failure(attempts, w.now, true)
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Defect "retry storm while a rotation is pending": during an outage, however often the
    /// reconciler is woken (watch events, its own writes, rotate annotations), at most 6
    /// attempts are let through in 60 s.
    #[test]
    fn an_outage_gets_at_most_six_attempts_a_minute_however_often_woken(
        wakeups in prop::collection::vec((0u64..60_000, 0u8..4), 1..400),
        due in any::<bool>(),
        new_rotation_at in prop::option::of(0u64..60_000),
    ) {
        let mut w = World::healthy();
        let start = if due { w.renewal() } else { t(0) };
        let mut wakeups = wakeups;
        wakeups.sort();
        let mut attempts = 0;
        for (ms, _kind) in wakeups {
            w.now = schedule::add(start, Duration::from_millis(ms));
            if new_rotation_at.is_some_and(|at| ms >= at) {
                w.rotate = Some("pending".into());
            }
            if let Next::Obtain(_) = w.next() {
                attempts += 1;
                fail_attempt(&mut w);
            }
        }
        prop_assert!(attempts <= 6, "{} attempts", attempts);
    }

    /// Whatever the state, the plan settles: a step the executor performs changes what the
    /// plan sees, and `next` never panics.
    #[test]
    fn next_never_panics(
        issuing in any::<bool>(),
        own in any::<bool>(),
        failed in prop::option::of((1u32..40, any::<bool>())),
        retiring_due in any::<bool>(),
        suspended in any::<bool>(),
        has_current in any::<bool>(),
        up_to_date in any::<bool>(),
        offset in -100_000i64..100_000,
    ) {
        let mut w = World::healthy();
        if suspended {
            w.respec(serde_json::json!({"suspend": true}));
        }
        if !has_current {
            w.state.current = None;
        }
        w.target = Target::Writable { up_to_date };
        w.now = t(offset);
        if issuing {
            w.state.issuing = Some(marker(if own { ME } else { "other" }, t(0)));
        }
        if let Some((n, retryable)) = failed {
            w.state.failure = Some(failure(n, t(0), retryable));
        }
        if retiring_due {
            w.state.retiring.push(retiring("OLD", t(0)));
        }
        let _ = next(&w.facts());
        let _ = next_on_delete(&w.facts());
    }
}

#[test]
fn an_owed_restart_waits_for_the_secret_and_its_delay_and_holds_revocation_until_the_rollout() {
    use crate::state::{RestartOwed, Restarted, WorkloadRef};
    let mut w = World::healthy();
    w.respec(serde_json::json!({
        "rolloutRestartTargets": [{"kind": "Deployment", "name": "web"}],
        "rolloutRestart": {"delay": "10s"},
        "renewal": {"revokeGracePeriod": "1m"},
    }));
    w.state.retiring.push(retiring("OLD", t(60)));
    w.state.restart = Some(RestartOwed {
        since: t(0),
        retry_after: None,
        attempts: 0,
        error: None,
        restarted: None,
        warned: false,
    });
    w.target = Target::Writable { up_to_date: false };
    assert_eq!(
        w.next(),
        Next::WriteTarget,
        "the Secret gets the new token first"
    );
    w.target = Target::Writable { up_to_date: true };
    assert_eq!(
        w.next(),
        Next::Done(Wake::At(t(10))),
        "the delay holds the restart; the grace period does not wake anything"
    );
    w.now = t(10);
    assert_eq!(w.next(), Next::Restart);
    // A failed attempt (or a workload's minimum interval) holds it back.
    w.state.restart.as_mut().unwrap().retry_after = Some(t(30));
    assert_eq!(w.next(), Next::Done(Wake::At(t(30))));
    w.now = t(30);
    assert_eq!(w.next(), Next::Restart);
    w.state.restart.as_mut().unwrap().restarted = Some(Restarted {
        at: t(30),
        workloads: vec![WorkloadRef {
            kind: crate::crd::WorkloadKind::Deployment,
            name: "web".into(),
        }],
    });
    assert_eq!(w.next(), Next::CheckRollout);
    w.rollout_checked = true;
    w.now = t(100);
    assert_eq!(
        w.next(),
        Next::Done(Wake::At(t(105))),
        "past the grace period the replaced token still waits for the rollout"
    );
    // The rollout finished: the step that saw it cleared the restart.
    w.state.restart = None;
    assert_eq!(w.next(), Next::Revoke(0));
}

#[test]
fn without_restart_targets_an_owed_restart_is_forgotten_and_the_grace_period_rules() {
    use crate::state::RestartOwed;
    let mut w = World::healthy();
    w.state.retiring.push(retiring("OLD", t(60)));
    w.state.restart = Some(RestartOwed {
        since: t(0),
        retry_after: Some(t(500)),
        attempts: 3,
        error: Some("forbidden".into()),
        restarted: None,
        warned: false,
    });
    assert_eq!(
        w.next(),
        Next::Restart,
        "the targets were removed: the step forgets it"
    );
    w.state.restart = None;
    assert_eq!(w.next(), Next::Done(Wake::At(t(60))));
    w.now = t(60);
    assert_eq!(w.next(), Next::Revoke(0));
}

#[test]
fn verifications_due_at_a_process_start_are_spread_over_its_first_minute() {
    let mut w = World::healthy();
    w.respec(serde_json::json!({"renewal": {"verifyEvery": "10m"}}));
    // Verified 30 minutes ago: due 20 minutes ago, while no operator ran.
    w.state.current.as_mut().unwrap().verified_at = Some(t(-1800));
    w.started_at = Some(t(0));
    let due = |w: &World| super::verification_due(&w.facts(), w.valid.as_ref().unwrap()).unwrap();
    let at = due(&w);
    assert!(at > t(0) && at < t(60), "{at}");
    w.now = at;
    assert_eq!(w.next(), Next::Verify);
    // Another object has its own place in that minute.
    let spread: std::collections::BTreeSet<Timestamp> = (0..20)
        .map(|i| {
            let uid = format!("uid-{i}");
            let f = Facts {
                uid: &uid,
                ..w.facts()
            };
            super::verification_due(&f, w.valid.as_ref().unwrap()).unwrap()
        })
        .collect();
    assert!(spread.len() >= 18, "{spread:?}");
    assert!(spread.iter().all(|at| *at > t(0) && *at < t(60)));
    // Due well after the start: as scheduled.
    w.state.current.as_mut().unwrap().verified_at = Some(t(300));
    assert_eq!(due(&w), t(900));
}

// ------------------------------------------------------------------ grant AuthorizationCode

fn sign_in_world() -> World {
    let mut w = World::new(spec_with(serde_json::json!({
        "grant": {"type": "AuthorizationCode", "credentialsSecretRef": {"name": "ci-bot-sign-in"}},
    })));
    // A sign-in's inputs: no user login of its own until a session exists.
    w.inputs = Ok(("fp".into(), Some("app".into()), false));
    w
}

fn session(refreshed: Timestamp, inputs: &str) -> Session {
    Session {
        access_token: Sensitive::new("session-access"),
        refresh_token: Sensitive::new("session-refresh"),
        refreshed_at: refreshed,
        inputs: inputs.into(),
        user: Some("alice".into()),
        rejected: false,
        url: Some("https://awx.example.com".into()),
        client_id: Some("app".into()),
        client_secret: None,
        gateway: false,
    }
}

/// AWX's REFRESH_TOKEN_EXPIRE_SECONDS, the default spec.renewal.refreshTokenLifetime.
const REFRESH_LIFETIME: i64 = 2_628_000;

#[test]
fn a_sign_in_starts_its_session_before_any_token_is_created() {
    let mut w = sign_in_world();
    assert_eq!(w.next(), Next::RefreshSession);
    w.state.session = Some(session(t(0), "fp"));
    assert_eq!(w.next(), obtain(Trigger::Initial, false));
}

#[test]
fn a_sign_in_renews_its_personal_token_make_before_break() {
    let mut w = sign_in_world();
    w.state.session = Some(session(t(-3600), "fp"));
    w.state.current = Some(held("A", t(-3600)));
    w.target = Target::Writable { up_to_date: true };
    let renewal = w.renewal();
    w.now = renewal;
    // Never by refresh, whatever the spec says: the consumer's token is a personal token.
    assert_eq!(w.next(), obtain(Trigger::Due, false));
    w.respec(serde_json::json!({
        "grant": {"type": "AuthorizationCode", "credentialsSecretRef": {"name": "ci-bot-sign-in"}},
        "renewal": {"strategy": "Refresh"},
    }));
    assert_eq!(w.next(), obtain(Trigger::Due, false));
}

#[test]
fn a_sign_in_is_refreshed_at_two_thirds_of_the_refresh_token_lifetime() {
    let mut w = sign_in_world();
    w.state.session = Some(session(t(0), "fp"));
    w.state.current = Some(held("A", t(0)));
    w.target = Target::Writable { up_to_date: true };
    w.respec(serde_json::json!({
        "grant": {"type": "AuthorizationCode", "credentialsSecretRef": {"name": "ci-bot-sign-in"}},
        "renewal": {"rotateEvery": "366d"},
    }));
    let due = t(REFRESH_LIFETIME * 2 / 3);
    w.now = t(10);
    assert_eq!(w.next(), Next::Done(Wake::At(due)));
    w.now = due;
    assert_eq!(w.next(), Next::RefreshSession);
    // AWX refused its access token: refreshed at once.
    w.now = t(10);
    w.state.session.as_mut().unwrap().rejected = true;
    assert_eq!(w.next(), Next::RefreshSession);
}

#[test]
fn a_new_refresh_token_in_the_secret_replaces_the_session() {
    let mut w = sign_in_world();
    w.state.session = Some(session(t(-60), "fp"));
    w.state.current = Some(held("A", t(-60)));
    w.target = Target::Writable { up_to_date: true };
    assert!(matches!(w.next(), Next::Done(_)), "{:?}", w.next());
    // `login` ran again: the fingerprint holds the new refresh token's hash.
    w.inputs = Ok(("fp2".into(), Some("app".into()), false));
    assert_eq!(w.next(), Next::RefreshSession);
    w.state.session = Some(session(t(0), "fp2"));
    assert_eq!(w.next(), obtain(Trigger::InputsChanged, false));
}

#[test]
fn an_expired_sign_in_is_not_tried_again_until_a_new_sign_in() {
    let mut w = sign_in_world();
    w.state.current = Some(held("A", t(-60)));
    w.target = Target::Writable { up_to_date: true };
    w.state.failure = Some(FailureRecord {
        reason: "SignInExpired".into(),
        ..failure(1, t(-1), false)
    });
    // No session (the refused one was dropped), no retry, and no token created without one;
    // not even a rotation request opens it.
    assert!(matches!(w.next(), Next::Done(_)), "{:?}", w.next());
    w.now = t(100_000);
    assert!(matches!(w.next(), Next::Done(_)), "{:?}", w.next());
    w.rotate = Some("again".into());
    assert!(matches!(w.next(), Next::Done(_)), "{:?}", w.next());
    w.inputs = Ok(("fp2".into(), Some("app".into()), false));
    assert_eq!(w.next(), Next::RefreshSession);
}

#[test]
fn a_failing_sign_in_refresh_waits_for_the_backoff() {
    let mut w = sign_in_world();
    w.state.failure = Some(failure(1, t(0), true));
    w.now = t(1);
    let Next::Done(Wake::At(at)) = w.next() else {
        panic!("{:?}", w.next());
    };
    assert!(at > t(1) && at <= t(6), "{at}");
    w.now = at;
    assert_eq!(w.next(), Next::RefreshSession);
}

#[test]
fn deletion_retires_the_sign_in_after_the_current_token() {
    let mut w = sign_in_world();
    w.state.session = Some(session(t(0), "fp"));
    w.state.current = World::healthy().state.current;
    assert_eq!(next_on_delete(&w.facts()), Next::RetireCurrent);
    let current = w.state.current.take().expect("a current token");
    w.state.retiring.push(current.retire(t(10)));
    // The sign-in's pair is retired only once the current token no longer needs it.
    assert_eq!(next_on_delete(&w.facts()), Next::RetireSession);
    let session = w.state.session.take().expect("a session");
    w.state.retiring.push(session.retire(t(10)));
    // The current token first (its revocation may use the sign-in), then the sign-in.
    assert_eq!(next_on_delete(&w.facts()), Next::Revoke(0));
    w.state.retiring.remove(0);
    assert_eq!(next_on_delete(&w.facts()), Next::Revoke(0));
    assert_eq!(
        w.state.retiring[0].token.refresh_token,
        Some(Sensitive::new("session-refresh")),
        "the refresh token is revoked with it"
    );
    w.state.retiring.clear();
    assert_eq!(next_on_delete(&w.facts()), Next::Done(Wake::OnChange));
}

#[test]
fn a_retired_sign_in_is_revoked_where_and_by_what_issued_it() {
    let retired = session(t(0), "fp").retire(t(5));
    assert_eq!(
        (
            retired.token.url.as_deref(),
            retired.token.client_id.as_deref(),
            retired.token.personal,
            retired.token.gateway,
            retired.revoke_after,
            retired.issued_at,
        ),
        (
            Some("https://awx.example.com"),
            Some("app"),
            false,
            false,
            t(5),
            Some(t(0))
        )
    );
}
