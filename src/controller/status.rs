//! The status an AwxToken reports, as a pure function of what the reconciler knows once it is
//! done. Nothing here comes from the (possibly stale) cached status but the times conditions
//! last changed: failures, attempts and the rotation acknowledgement come from the state.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::{
    execute::SIGN_IN_EXPIRED,
    plan::{self, Facts, Target},
};
use crate::{
    crd::{AwxTokenStatus, RenewalStrategy},
    schedule,
    state::HeldToken,
};

pub const READY: &str = "Ready";
/// True while the token in the Secret works but renewing it fails (or cannot be tried).
pub const RENEWAL_FAILED: &str = "RenewalFailed";
pub const INSECURE_TLS: &str = "InsecureTls";
/// True while token requests whose answer was lost are still to be looked for in AWX.
pub const CLEANUP_PENDING: &str = "CleanupPending";
/// With rolloutRestartTargets: True once the workloads run with the current token (or no
/// restart was ever owed); False while a restart or its rollout is pending, or timed out.
pub const CONSUMERS_RESTARTED: &str = "ConsumersRestarted";

/// Why things are not as they should be, most fundamental first.
struct Problem {
    reason: String,
    message: String,
}

/// The status to report. `old` gives the last transition times of unchanged conditions.
pub fn render(
    f: &Facts<'_>,
    generation: Option<i64>,
    secret_name: &str,
    old: &AwxTokenStatus,
) -> AwxTokenStatus {
    let state = f.state;
    let current = state.current.as_ref().filter(|_| !f.predecessor_state);
    let valid = f.valid.ok();
    let renewal = current
        .zip(valid)
        .map(|(c, v)| plan::renewal_time(f.uid, c, v));
    let mut status = AwxTokenStatus {
        conditions: old.conditions.clone(),
        observed_generation: generation,
        secret_name: Some(secret_name.to_string()),
        flavor: current.map(|c| c.token.flavor().as_str().to_string()),
        token_id: current.and_then(|c| c.token.token_id),
        scope: current.map(|c| c.scope.clone()),
        user: current.and_then(|c| c.user.clone()),
        issued_at: current.map(|c| Time(c.issued_at)),
        expires_at: current.and_then(|c| c.expires_at).map(Time),
        renewal_time: renewal.map(Time),
        // A sign-in's refresh token is the one whose death matters (its consumers hold
        // personal tokens).
        refresh_token_expires_at: match (&state.session, valid) {
            (Some(session), Some(v)) => Some(Time(plan::session_expiry(session, v))),
            _ => current
                .zip(valid)
                .filter(|(_, v)| v.strategy == RenewalStrategy::Refresh)
                .and_then(|(c, v)| {
                    c.refresh_issued_at
                        .map(|t| Time(schedule::add(t, v.refresh_token_lifetime)))
                }),
        },
        verified_at: current.and_then(|c| c.verified_at).map(Time),
        pending_revocations: state.retiring.len() as u32,
        rotated_for: state.rotated_for.clone(),
        failed_attempts: state.failure.as_ref().map_or(0, |r| r.attempts),
        last_failure_time: state.failure.as_ref().map(|r| Time(r.at)),
        last_failure_message: state.failure.as_ref().map(|r| failure_message(f, r)),
    };
    let problem = problem(f);
    // A sign-in that cannot be renewed is not Ready even while its last personal token works:
    // nothing renews that token any more, and only a person can fix it (the message says how).
    let sign_in_expired = state.failure.as_ref().is_some_and(|r| {
        r.reason == SIGN_IN_EXPIRED && f.inputs.is_ok_and(|i| i.fingerprint == r.inputs)
    });
    let usable = current.filter(|c| {
        works(c, f.now) && f.target == Target::Writable { up_to_date: true } && !sign_in_expired
    });
    let now = f.now;
    match (usable, &problem) {
        (Some(_), _) if f.spec.suspend => set_condition(
            &mut status.conditions,
            READY,
            true,
            "Suspended",
            "Suspended: no AWX traffic; the Secret keeps its current token",
            now,
        ),
        (Some(c), problem) => {
            let message = match (renewal, problem) {
                (Some(at), None) => format!(
                    "Secret {secret_name} holds a working token; renewal at {}",
                    fmt_time(at)
                ),
                (Some(at), Some(_)) if at <= now => format!(
                    "Secret {secret_name} holds a working token; its renewal is overdue (since \
                     {}), see condition {RENEWAL_FAILED}",
                    fmt_time(at)
                ),
                _ => format!(
                    "Secret {secret_name} holds a working token{}; see condition {RENEWAL_FAILED}",
                    c.expires_at
                        .map(|e| format!(" (AWX expires it at {})", fmt_time(e)))
                        .unwrap_or_default()
                ),
            };
            set_condition(
                &mut status.conditions,
                READY,
                true,
                "TokenReady",
                &message,
                now,
            );
        }
        (None, _) => {
            let problem = problem.as_ref().map_or_else(
                || unusable(f, current),
                |p| Problem {
                    reason: p.reason.clone(),
                    message: p.message.clone(),
                },
            );
            let mut message = problem.message.clone();
            if current.is_some() && f.target == (Target::Writable { up_to_date: true }) {
                message.push_str(". The Secret keeps its previous token.");
            }
            set_condition(
                &mut status.conditions,
                READY,
                false,
                &problem.reason,
                &message,
                now,
            );
        }
    }
    match (current, &problem) {
        (Some(_), Some(p)) if !f.spec.suspend => set_condition(
            &mut status.conditions,
            RENEWAL_FAILED,
            true,
            &p.reason,
            &p.message,
            now,
        ),
        (Some(_), _) => set_condition(
            &mut status.conditions,
            RENEWAL_FAILED,
            false,
            "Renewing",
            "Renewal is not held back by any failure",
            now,
        ),
        (None, _) => status.conditions.retain(|c| c.type_ != RENEWAL_FAILED),
    }
    let lost = &state.interrupted;
    if let Some(marker) = state.issuing.as_ref().filter(|_| lost.is_empty()) {
        // Left by another process (this one records its answers before it reports): in
        // flight there, or interrupted by its end, which only time tells apart.
        let deadline = schedule::add(marker.started_at, plan::marker_patience(f));
        set_condition(
            &mut status.conditions,
            CLEANUP_PENDING,
            true,
            "RequestInFlight",
            &format!(
                "a token request started at {} by {} has not recorded its answer; unless it \
                 does by {}, AWX may hold its token, which is then looked for and deleted",
                fmt_time(marker.started_at),
                marker.holder,
                fmt_time(deadline)
            ),
            now,
        );
    } else if lost.is_empty() {
        status.conditions.retain(|c| c.type_ != CLEANUP_PENDING);
    } else {
        let failing = lost.iter().find_map(|m| m.search_error.as_deref());
        let next = lost.iter().filter_map(|m| m.search_after).min();
        let mut message = format!(
            "{} token request(s) got no complete answer; AWX may hold their tokens, which are \
             looked for and deleted",
            lost.len()
        );
        if let Some(next) = next {
            message.push_str(&format!("; next look at {}", fmt_time(next)));
        }
        if let Some(error) = failing {
            message.push_str(&format!("; the last look failed: {error}"));
        }
        set_condition(
            &mut status.conditions,
            CLEANUP_PENDING,
            true,
            if failing.is_some() {
                "SearchFailing"
            } else {
                "SearchPending"
            },
            &message,
            now,
        );
    }
    if f.spec.awx.insecure_skip_tls_verify {
        set_condition(
            &mut status.conditions,
            INSECURE_TLS,
            true,
            "InsecureSkipTlsVerify",
            "TLS certificates of AWX are not verified (spec.awx.insecureSkipTlsVerify)",
            now,
        );
    } else {
        status.conditions.retain(|c| c.type_ != INSECURE_TLS);
    }
    match consumers(f) {
        Some((ok, reason, message)) => set_condition(
            &mut status.conditions,
            CONSUMERS_RESTARTED,
            ok,
            reason,
            &message,
            now,
        ),
        None => status.conditions.retain(|c| c.type_ != CONSUMERS_RESTARTED),
    }
    // Conditions of earlier versions (Issuing) are dropped.
    status.conditions.retain(|c| {
        [
            READY,
            RENEWAL_FAILED,
            INSECURE_TLS,
            CLEANUP_PENDING,
            CONSUMERS_RESTARTED,
        ]
        .contains(&c.type_.as_str())
    });
    status
}

/// The ConsumersRestarted condition, when there are restart targets (or a restart is owed).
fn consumers(f: &Facts<'_>) -> Option<(bool, &'static str, String)> {
    let state = f.state;
    if f.spec.rollout_restart_targets.is_empty() {
        return None;
    }
    let Some(owed) = &state.restart else {
        return Some(match &state.rollout_timed_out {
            Some(message) => (false, "RolloutTimedOut", message.clone()),
            None => (
                true,
                "UpToDate",
                "No restart is owed: the workloads were restarted for the current token, or it \
                 is the first"
                    .to_string(),
            ),
        });
    };
    let valid = f.valid.ok();
    Some(match &owed.restarted {
        None => {
            let due = plan::restart_due(f)
                .map(|at| format!(" at {}", fmt_time(at)))
                .unwrap_or_default();
            match &owed.error {
                Some(error) => (
                    false,
                    "RestartFailed",
                    format!(
                        "restarting the workloads for the new token failed ({} attempts): \
                         {error}; retrying{due}",
                        owed.attempts
                    ),
                ),
                None => (
                    false,
                    "RestartPending",
                    format!("the workloads are restarted for the new token{due}"),
                ),
            }
        }
        Some(restarted) => {
            let names: Vec<String> = restarted.workloads.iter().map(|w| w.to_string()).collect();
            let until = valid
                .map(|v| {
                    format!(
                        " or until {}",
                        fmt_time(schedule::add(restarted.at, v.restart.rollout_timeout))
                    )
                })
                .unwrap_or_default();
            (
                false,
                "WaitingForRollout",
                format!(
                    "restarted {} at {} for the new token; the replaced token stays valid until \
                     the rollout finishes{until}",
                    if names.is_empty() {
                        "no workload".to_string()
                    } else {
                        names.join(", ")
                    },
                    fmt_time(restarted.at)
                ),
            )
        }
    })
}

/// Whether `current` is one AWX still takes: not rejected, not past its expiry.
pub fn works(current: &HeldToken, now: Timestamp) -> bool {
    current.rejected_at.is_none() && current.expires_at.is_none_or(|e| e > now)
}

/// A failure's message, naming the connection the request went through, if any.
fn failure_message(f: &Facts<'_>, failure: &crate::state::FailureRecord) -> String {
    match &f.spec.connection_ref {
        Some(r) => format!("{} (through {:?} {:?})", failure.message, r.kind, r.name),
        None => failure.message.clone(),
    }
}

/// What keeps the next token from being obtained, if anything.
fn problem(f: &Facts<'_>) -> Option<Problem> {
    let p = |reason: &str, message: String| {
        Some(Problem {
            reason: reason.to_string(),
            message,
        })
    };
    match f.valid {
        Err(e) => return p(e.reason, e.to_string()),
        Ok(valid) => {
            if let Some(allowed) = f.allowed_hosts
                && !crate::decide::host_allowed(allowed, &valid.host)
            {
                return p(
                    "HostNotAllowed",
                    format!(
                        "AWX host {:?} is not in the operator's --allowed-awx-hosts; no request \
                         was sent",
                        valid.host
                    ),
                );
            }
        }
    }
    if let Target::Foreign(why) = &f.target {
        return p(
            "SecretConflict",
            format!(
                "Secret {:?} exists and {why}; the operator does not overwrite it. Delete it or \
                 set spec.secret.name to another name",
                f.spec.secret.name.as_deref().unwrap_or("")
            ),
        );
    }
    if let Err(blocker) = f.inputs {
        return p(blocker.reason, blocker.message.to_string());
    }
    if let Some(failure) = &f.state.failure {
        return p(&failure.reason, failure_message(f, failure));
    }
    None
}

/// Why the token in the state (if any) is not usable when nothing failed.
fn unusable(f: &Facts<'_>, current: Option<&HeldToken>) -> Problem {
    let (reason, message) = match current {
        _ if f.spec.suspend => (
            "Suspended",
            "Suspended before a token was issued: no AWX traffic".to_string(),
        ),
        Some(c) if c.rejected_at.is_some() => (
            "TokenRejected",
            "AWX rejected the token in the Secret (deleted or revoked in AWX); a new one is being \
             issued"
                .to_string(),
        ),
        Some(c) if !works(c, f.now) => (
            "TokenExpired",
            "The token in the Secret is past the expiry AWX gave it; a new one is being issued"
                .to_string(),
        ),
        Some(_) => (
            "SecretNotWritten",
            "The Secret does not hold the current token yet".to_string(),
        ),
        None if !f.state.interrupted.is_empty() || f.state.issuing.is_some() => (
            "Issuing",
            "A token request is in flight or being cleaned up after an interruption".to_string(),
        ),
        None => ("Issuing", "Requesting a token from AWX".to_string()),
    };
    Problem {
        reason: reason.to_string(),
        message,
    }
}

fn fmt_time(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Whether two statuses are the same once stored. The API server keeps times to the second,
/// and the times computed here (issue, expiry, renewal) have sub-second parts: compared as
/// they are, a healthy AwxToken would get a status write on every reconcile.
pub fn same_when_stored(a: &AwxTokenStatus, b: &AwxTokenStatus) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

/// Sets a condition, keeping its lastTransitionTime when its status does not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    now: Timestamp,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let transition = conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    conditions.retain(|c| c.type_ != type_);
    conditions.push(Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message: message.chars().take(2048).collect(),
        last_transition_time: transition,
        observed_generation: None,
    });
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_transition_time_kept_while_status_unchanged() {
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        let t1 = Timestamp::from_second(1_700_000_100).unwrap();
        let mut conditions = Vec::new();
        set_condition(&mut conditions, "Ready", true, "TokenReady", "a", t0);
        set_condition(&mut conditions, "Ready", true, "TokenReady", "b", t1);
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, Time(t0));
        assert_eq!(conditions[0].message, "b");
        set_condition(&mut conditions, "Ready", false, "InvalidClient", "c", t1);
        assert_eq!(conditions[0].last_transition_time, Time(t1));
        set_condition(&mut conditions, "InsecureTls", false, "Idle", "", t1);
        let types: Vec<_> = conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["InsecureTls", "Ready"]);
    }
}
