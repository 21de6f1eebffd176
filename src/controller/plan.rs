//! What to do next for one AwxToken, as a pure function of what was observed and the time.
//!
//! The executor asks [`next`] for one step, performs it, updates what it observed, and asks
//! again, until the answer is [`Next::Done`]. Every decision (whether a token is due, whether
//! the failure backoff holds an attempt back, which replaced tokens may be revoked, when to
//! wake up) is made here; the executor only carries steps out.

use std::time::Duration;

use jiff::Timestamp;

use crate::{
    crd::{AwxTokenSpec, GrantType, RenewalStrategy},
    decide,
    schedule::{self, RenewalSchedule},
    spec::{SpecError, ValidSpec},
    state::{FailureRecord, HeldToken, RetiringToken, Session, TokenState},
};

/// Everything a decision depends on.
#[derive(Clone)]
pub struct Facts<'a> {
    pub now: Timestamp,
    pub uid: &'a str,
    pub spec: &'a AwxTokenSpec,
    pub valid: Result<&'a ValidSpec, &'a SpecError>,
    /// `--allowed-awx-hosts`, when set.
    pub allowed_hosts: Option<&'a [String]>,
    /// The rotate annotation's value.
    pub rotate: Option<&'a str>,
    pub state: &'a TokenState,
    /// The state Secret was left by an earlier AwxToken of the same name (another UID).
    pub predecessor_state: bool,
    pub target: Target,
    /// The credentials as far as they could be read: their fingerprint, or why not.
    pub inputs: Result<Inputs<'a>, Blocker<'a>>,
    pub backoff: Backoff,
    /// This operator process, as request markers name it.
    pub holder: &'a str,
    /// The restarted workloads' rollouts were looked at in this reconcile.
    pub rollout_checked: bool,
    /// When this operator process started, if it says.
    pub started_at: Option<Timestamp>,
    /// When the renewal of the current token is to start, at or before its renewal time, so
    /// that renewals due together fit the request rate limit ([`super::pace`]).
    pub renew_from: Option<Timestamp>,
}

/// What the credentials allow.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// Hash of everything a token is issued from.
    pub fingerprint: &'a str,
    /// The OAuth2 application's client id, when the grant uses one.
    pub client_id: Option<&'a str>,
    /// A username and password are at hand (personal tokens can be looked for).
    pub user_login: bool,
}

/// The target Secret as observed (or as just written).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Absent, or ours (by UID, or the predecessor's to take over): `up_to_date` says whether
    /// it holds the current token as the spec lays it out.
    Writable { up_to_date: bool },
    /// Someone else's; never touched. The text says whose.
    Foreign(String),
}

/// Why no token can be obtained, whatever AWX would say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocker<'a> {
    pub reason: &'a str,
    pub message: &'a str,
}

#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

/// Why a new token is needed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// No token yet.
    Initial,
    /// URL, grant, scope or credentials changed since the token was issued.
    InputsChanged,
    /// AWX rejected the token in the Secret (verification).
    Rejected,
    /// The rotate annotation has a value not yet acted on.
    Forced(String),
    /// The refresh chain broke: a refresh failed, or its answer was lost, in which case AWX
    /// may have deleted the access token in the Secret along with it.
    /// docs/awx-protocol.md#interrupted-requests
    ChainBroken,
    /// The renewal time has come.
    Due,
}

impl Trigger {
    /// Whether the token in the Secret is being renewed (rather than first issued or replaced
    /// because its inputs changed).
    pub fn is_renewal(&self) -> bool {
        matches!(
            self,
            Trigger::Forced(_) | Trigger::Due | Trigger::Rejected | Trigger::ChainBroken
        )
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Trigger::Initial => "first issue",
            Trigger::InputsChanged => "the URL, grant or credentials changed",
            Trigger::Rejected => "AWX rejected the token in the Secret",
            Trigger::Forced(_) => "rotation requested by annotation",
            Trigger::ChainBroken => "the refresh chain broke (a refresh failed or was interrupted)",
            Trigger::Due => "renewal time reached",
        }
    }
}

/// How a token is obtained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Obtain {
    pub trigger: Trigger,
    /// With the current token's refresh token (strategy Refresh) rather than the grant.
    pub refresh: bool,
}

/// What the failure history says about attempting now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Open,
    /// Retry at this time.
    Until(Timestamp),
    /// A non-retryable failure with the same inputs: wait for a change of spec or credentials.
    AwaitChange,
}

/// The next step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Delete the state Secret an earlier AwxToken of the same name left behind.
    DiscardPredecessorState,
    /// A request marker was found: record its request as interrupted (its outcome is unknown).
    ClaimInterrupted,
    /// Look for the token of `state.interrupted[i]` and delete it.
    Search(usize),
    /// Refresh the browser sign-in (grant type AuthorizationCode): the first time with the
    /// credentials Secret's refresh token, then with the one kept in the state.
    RefreshSession,
    Obtain(Obtain),
    /// Write the current token into the target Secret.
    WriteTarget,
    /// Revoke `state.retiring[i]`.
    Revoke(usize),
    /// Check the current token with AWX.
    Verify,
    /// Restart spec.rolloutRestartTargets for the token change `state.restart` records.
    Restart,
    /// See whether the restarted workloads have finished their rollouts.
    CheckRollout,
    /// On delete: the current token becomes a retiring one, due now.
    RetireCurrent,
    /// On delete: the browser sign-in's pair becomes a retiring token, due now.
    RetireSession,
    Done(Wake),
}

/// When to look again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    At(Timestamp),
    /// Only when something changes (spec, Secrets).
    OnChange,
}

/// The next step for an AwxToken that exists (not being deleted).
pub fn next(f: &Facts<'_>) -> Next {
    if f.predecessor_state {
        return Next::DiscardPredecessorState;
    }
    let state = f.state;
    let suspended = f.spec.suspend;
    if claimable(f) {
        return Next::ClaimInterrupted;
    }
    let target_ok = matches!(f.target, Target::Writable { .. });
    let usable = usable_spec(f);
    if !suspended
        && state.issuing.is_none()
        && target_ok
        && let Some(valid) = usable
        && let Ok(inputs) = f.inputs
    {
        if session_needed(f, valid, inputs.fingerprint) {
            if session_gate(f, inputs.fingerprint) == Gate::Open {
                return Next::RefreshSession;
            }
        } else if let Some(obtain) = obtain_now(f, valid, &inputs) {
            return Next::Obtain(obtain);
        }
    }
    if state.current.is_some()
        && f.valid.is_ok()
        && f.target == (Target::Writable { up_to_date: false })
    {
        return Next::WriteTarget;
    }
    if suspended {
        return Next::Done(Wake::OnChange);
    }
    if let Some(i) = search_due(f) {
        return Next::Search(i);
    }
    if let Some(step) = restart_step(f) {
        return step;
    }
    if let Some(i) = revocation_due(f) {
        return Next::Revoke(i);
    }
    if target_ok
        && let Some(valid) = usable
        && verification_due(f, valid).is_some_and(|at| at <= f.now)
    {
        return Next::Verify;
    }
    Next::Done(wake(f))
}

/// The next step for an AwxToken being deleted whose tokens are to be revoked: every token
/// it holds is revoked (and every interrupted request looked for) before the finalizer goes.
/// `Done(OnChange)` means finished; `Done(At)` means a revocation failed and is retried then.
pub fn next_on_delete(f: &Facts<'_>) -> Next {
    if f.predecessor_state {
        // Not this object's tokens: nothing to revoke.
        return Next::Done(Wake::OnChange);
    }
    let state = f.state;
    if claimable(f) {
        return Next::ClaimInterrupted;
    }
    if let Some(i) = search_due(f) {
        return Next::Search(i);
    }
    if state.current.is_some() && state.issuing.is_none() {
        return Next::RetireCurrent;
    }
    // After the current token, whose revocation may use the sign-in's access token.
    if state.session.is_some() && state.issuing.is_none() {
        return Next::RetireSession;
    }
    // Nobody uses a deleted AwxToken's tokens: a grace period no longer holds them back,
    // only the backoff after a failed attempt does.
    if let Some(i) = state
        .retiring
        .iter()
        .position(|r| (r.failed_attempts == 0 || r.revoke_after <= f.now) && revocable_here(f, r))
    {
        return Next::Revoke(i);
    }
    let retry = state
        .retiring
        .iter()
        .map(|r| r.revoke_after)
        .chain(state.interrupted.iter().filter_map(|i| i.search_after))
        .chain(marker_patience_end(f))
        .min();
    match retry {
        Some(at) => Next::Done(Wake::At(at)),
        None => Next::Done(Wake::OnChange),
    }
}

/// How long a request marker of another process is taken for a request in flight: the
/// longest a request may take, and a margin for writing its answer down.
pub fn marker_patience(f: &Facts<'_>) -> Duration {
    let timeout = f.valid.map_or(Duration::from_secs(30), |v| v.timeout);
    timeout + Duration::from_secs(10)
}

/// Whether the request marker (if any) is to be taken for an interrupted request now: it is
/// this process's own (left by a reconcile that failed after writing it), or old enough that
/// no request of another process can still be in flight.
fn claimable(f: &Facts<'_>) -> bool {
    f.state.issuing.as_ref().is_some_and(|m| {
        m.holder == f.holder || f.now >= schedule::add(m.started_at, marker_patience(f))
    })
}

/// When another process's marker will be old enough to claim, while it is not.
fn marker_patience_end(f: &Facts<'_>) -> Option<Timestamp> {
    let marker = f.state.issuing.as_ref()?;
    (!claimable(f)).then(|| schedule::add(marker.started_at, marker_patience(f)))
}

/// The spec, when it may be acted on: valid and pointing at an allowed host.
fn usable_spec<'a>(f: &Facts<'a>) -> Option<&'a ValidSpec> {
    let valid = f.valid.ok()?;
    host_allowed(f, &valid.host).then_some(valid)
}

fn host_allowed(f: &Facts<'_>, host: &str) -> bool {
    f.allowed_hosts
        .is_none_or(|allowed| decide::host_allowed(allowed, host))
}

/// Why a token is needed now, if it is.
pub fn trigger(f: &Facts<'_>, valid: &ValidSpec, fingerprint: &str) -> Option<Trigger> {
    let Some(current) = &f.state.current else {
        return Some(Trigger::Initial);
    };
    if current.rejected_at.is_some() {
        return Some(Trigger::Rejected);
    }
    if current.inputs != fingerprint {
        return Some(Trigger::InputsChanged);
    }
    if let Some(value) = f.rotate
        && Some(value) != f.state.rotated_for.as_deref()
    {
        return Some(Trigger::Forced(value.to_string()));
    }
    if current.refresh_broken {
        return Some(Trigger::ChainBroken);
    }
    if f.now >= renewal_time(f.uid, current, valid) || f.renew_from.is_some_and(|at| f.now >= at) {
        return Some(Trigger::Due);
    }
    None
}

/// How much of the refresh token's lifetime a sign-in is used before it is refreshed: two
/// thirds, so that a refresh failing for a while (AWX down) still has a third to succeed in.
const SESSION_REFRESH_SHARE: (u32, u32) = (2, 3);

/// When the sign-in is to be refreshed: two thirds of spec.renewal.refreshTokenLifetime
/// (AWX's REFRESH_TOKEN_EXPIRE_SECONDS) after its refresh token was issued.
pub fn session_refresh_time(session: &Session, valid: &ValidSpec) -> Timestamp {
    let (num, den) = SESSION_REFRESH_SHARE;
    schedule::add(
        session.refreshed_at,
        valid.refresh_token_lifetime * num / den,
    )
}

/// When the sign-in's refresh token dies (AWX counts from its issue).
pub fn session_expiry(session: &Session, valid: &ValidSpec) -> Timestamp {
    schedule::add(session.refreshed_at, valid.refresh_token_lifetime)
}

/// Whether a sign-in (grant type AuthorizationCode) must be refreshed before any token can be
/// created with it: none yet, a new sign-in in the credentials Secret (its refresh token's
/// hash is part of the fingerprint), AWX rejected its access token, or its refresh is due.
pub fn session_needed(f: &Facts<'_>, valid: &ValidSpec, fingerprint: &str) -> bool {
    if f.spec.grant.type_ != GrantType::AuthorizationCode {
        return false;
    }
    match &f.state.session {
        None => true,
        Some(s) => s.inputs != fingerprint || s.rejected || f.now >= session_refresh_time(s, valid),
    }
}

/// The failure backoff for a sign-in refresh. A rotate annotation does not open it (a dead
/// sign-in is not revived by asking again): only new inputs (a new sign-in) do, or time,
/// for a failure that may pass.
fn session_gate(f: &Facts<'_>, fingerprint: &str) -> Gate {
    gate(
        f.state.failure.as_ref(),
        &Trigger::Initial,
        fingerprint,
        f.now,
        f.backoff,
        f.uid,
    )
}

/// Whether the failure history lets an attempt for `trigger` through now.
///
/// After a failure the next attempt waits `base * 2^(n-1)` (capped, with up to 20% jitter),
/// whatever woke the reconciler: a watch event, its own writes, a restart. Only two things
/// are tried at once: inputs that have not failed yet (a fixed password), and a rotate
/// annotation value that has not been tried yet (once; later attempts for it wait as well).
pub fn gate(
    failure: Option<&FailureRecord>,
    trigger: &Trigger,
    fingerprint: &str,
    now: Timestamp,
    backoff: Backoff,
    uid: &str,
) -> Gate {
    let Some(failure) = failure else {
        return Gate::Open;
    };
    if failure.inputs != fingerprint {
        return Gate::Open;
    }
    if let Trigger::Forced(value) = trigger
        && failure.rotation.as_deref() != Some(value.as_str())
    {
        return Gate::Open;
    }
    if !failure.retryable {
        return Gate::AwaitChange;
    }
    let retry_at = retry_time(failure, backoff, uid);
    if now >= retry_at {
        Gate::Open
    } else {
        Gate::Until(retry_at)
    }
}

/// When the attempt after `failure` is allowed.
pub fn retry_time(failure: &FailureRecord, backoff: Backoff, uid: &str) -> Timestamp {
    let jitter = decide::jitter(&[uid, &failure.attempts.to_string()]);
    schedule::add(
        failure.at,
        schedule::failure_backoff(failure.attempts, backoff.base, backoff.max, jitter),
    )
}

fn obtain_now(f: &Facts<'_>, valid: &ValidSpec, inputs: &Inputs<'_>) -> Option<Obtain> {
    let trigger = trigger(f, valid, inputs.fingerprint)?;
    let open = gate(
        f.state.failure.as_ref(),
        &trigger,
        inputs.fingerprint,
        f.now,
        f.backoff,
        f.uid,
    ) == Gate::Open;
    if !open {
        return None;
    }
    let refresh = refreshable(f, valid, inputs, &trigger);
    Some(Obtain { trigger, refresh })
}

/// Whether the renewal may use the refresh token: strategy Refresh, a renewal (not new inputs,
/// not a token AWX rejected), a refresh token issued to the application in the credentials,
/// and no reason to distrust the chain (an interrupted or failed refresh).
fn refreshable(f: &Facts<'_>, valid: &ValidSpec, inputs: &Inputs<'_>, trigger: &Trigger) -> bool {
    let Some(current) = &f.state.current else {
        return false;
    };
    valid.strategy == RenewalStrategy::Refresh
        && matches!(trigger, Trigger::Due | Trigger::Forced(_))
        && current.token.refresh_token.is_some()
        && !current.refresh_broken
        && current.token.client_id.as_deref() == inputs.client_id
        && inputs.client_id.is_some()
        && !f.state.interrupted.iter().any(|i| i.refresh)
}

/// The renewal time of `current` under the spec in force now (a changed policy applies to
/// the token already held). The jitter comes from the object and the issue time, so
/// recomputing it gives the same answer.
pub fn renewal_time(uid: &str, current: &HeldToken, valid: &ValidSpec) -> Timestamp {
    RenewalSchedule {
        issued_at: current.issued_at,
        expires_at: current.expires_at,
        rotate_every: valid.rotate_every,
        renew_before: valid.renew_before,
        refresh_issued_at: current
            .refresh_issued_at
            .filter(|_| valid.strategy == RenewalStrategy::Refresh),
        refresh_lifetime: valid.refresh_token_lifetime,
        jitter: decide::jitter(&[uid, &current.issued_at.to_string()]),
    }
    .renewal_time()
}

/// The first interrupted request whose token is due to be looked for. Looking needs the
/// user's login or a write-scoped token of the user; a request that cannot be looked for is
/// only reported.
fn search_due(f: &Facts<'_>) -> Option<usize> {
    let login = f.inputs.is_ok_and(|inputs| inputs.user_login)
        || f.state
            .current
            .as_ref()
            .is_some_and(|c| c.scope.split_whitespace().any(|s| s == "write"));
    f.state.interrupted.iter().position(|i| {
        let due = i.search_after.is_none_or(|at| at <= f.now);
        // A search by creation time waits while another process's request is in flight: it
        // could take that request's token for the lost one (the marker says when it ends).
        let free = i.tagged || f.state.issuing.is_none();
        due && free && (!i.searchable() || login)
    })
}

/// How often the rollouts of restarted workloads are looked at.
pub const ROLLOUT_POLL: Duration = Duration::from_secs(5);

/// The restart step due now, if any: the Secret holds the new token first.
fn restart_step(f: &Facts<'_>) -> Option<Next> {
    let owed = f.state.restart.as_ref()?;
    if f.target != (Target::Writable { up_to_date: true }) {
        return None;
    }
    match &owed.restarted {
        None => restart_due(f)
            .is_some_and(|at| at <= f.now)
            .then_some(Next::Restart),
        Some(_) => (!f.rollout_checked).then_some(Next::CheckRollout),
    }
}

/// When the owed restart may be made: `rolloutRestart.delay` after the change (so changes of
/// several AwxTokens feeding one workload share a restart), and not before a failed attempt's
/// backoff or a workload's minimum interval ends.
pub fn restart_due(f: &Facts<'_>) -> Option<Timestamp> {
    let owed = f.state.restart.as_ref().filter(|o| o.restarted.is_none())?;
    if f.spec.rollout_restart_targets.is_empty() {
        // The targets were removed: nothing is owed any more (the step forgets it).
        return Some(f.now);
    }
    let valid = f.valid.ok()?;
    let at = schedule::add(owed.since, valid.restart.delay);
    Some(owed.retry_after.map_or(at, |r| r.max(at)))
}

/// Replaced tokens wait for the restarted workloads' rollouts (not for a grace period) while a
/// restart is owed; the step that ends the wait makes them due.
fn held_for_rollout(f: &Facts<'_>) -> bool {
    f.state.restart.is_some() && !f.spec.rollout_restart_targets.is_empty()
}

/// The first retiring token whose time has come and whose AWX may be reached.
fn revocation_due(f: &Facts<'_>) -> Option<usize> {
    if held_for_rollout(f) {
        return None;
    }
    f.state
        .retiring
        .iter()
        .position(|r| r.revoke_after <= f.now && revocable_here(f, r))
}

/// Whether the AWX that issued `r` may be sent requests (`--allowed-awx-hosts`).
fn revocable_here(f: &Facts<'_>, r: &RetiringToken) -> bool {
    r.token
        .url
        .as_deref()
        .and_then(|u| url::Url::parse(u).ok())
        .is_some_and(|u| host_allowed(f, &crate::spec::host_of(&u)))
}

/// Verifications due when the process starts are spread over this long (or verifyEvery, if
/// shorter).
pub const VERIFY_SPREAD: Duration = Duration::from_secs(60);

/// When the current token is next to be verified, if verification is on.
pub fn verification_due(f: &Facts<'_>, valid: &ValidSpec) -> Option<Timestamp> {
    let every = valid.verify_every?;
    let current = f.state.current.as_ref()?;
    if current.rejected_at.is_some() {
        return None;
    }
    let last = current
        .verified_at
        .unwrap_or(current.issued_at)
        .max(current.issued_at);
    let mut due = schedule::add(last, every);
    if let Some(started) = f.started_at
        && due < schedule::add(started, VERIFY_SPREAD.min(every))
    {
        // Came due while no operator ran (or just after it started): spread over the first
        // minute of this process by the object's own jitter, so that a restart of the
        // operator is no burst of verifications. The last verification is in the state, so
        // those done before the restart are not repeated.
        let spread = VERIFY_SPREAD
            .min(every)
            .mul_f64(decide::jitter(&[f.uid, "verify"]));
        due = due.max(schedule::add(started, spread));
    }
    if let Some(failed) = current.verify_failed_at
        && failed > last
    {
        // No answer last time: try again after a while, not in a loop.
        due = due.max(schedule::add(failed, every.min(f.backoff.max)));
    }
    Some(due)
}

/// The earliest time something becomes due, or `OnChange` when only a change can help.
fn wake(f: &Facts<'_>) -> Wake {
    let mut times: Vec<Timestamp> = Vec::new();
    let state = f.state;
    times.extend(marker_patience_end(f));
    if !held_for_rollout(f) {
        times.extend(state.retiring.iter().map(|r| r.revoke_after));
    }
    if let Some(owed) = &state.restart
        && f.target == (Target::Writable { up_to_date: true })
    {
        match &owed.restarted {
            None => times.extend(restart_due(f)),
            Some(_) => times.push(schedule::add(f.now, ROLLOUT_POLL)),
        }
    }
    times.extend(state.interrupted.iter().filter_map(|i| i.search_after));
    if let Some(valid) = usable_spec(f)
        && let Ok(inputs) = f.inputs
        && matches!(f.target, Target::Writable { .. })
        && !f.spec.suspend
    {
        if session_needed(f, valid, inputs.fingerprint) {
            if let Gate::Until(at) = session_gate(f, inputs.fingerprint) {
                times.push(at);
            }
        } else if let Some(session) = &state.session {
            times.push(session_refresh_time(session, valid));
        }
        match trigger(f, valid, inputs.fingerprint) {
            // Something is due already: the backoff says when to try (or nothing does).
            Some(trigger) => {
                if let Gate::Until(at) = gate(
                    state.failure.as_ref(),
                    &trigger,
                    inputs.fingerprint,
                    f.now,
                    f.backoff,
                    f.uid,
                ) {
                    times.push(at);
                }
            }
            None => {
                if let Some(current) = &state.current {
                    times.push(renewal_time(f.uid, current, valid));
                    times.extend(f.renew_from);
                    times.extend(verification_due(f, valid));
                }
            }
        }
    }
    match times.into_iter().min() {
        Some(at) => Wake::At(at),
        None if state.current.is_some() && usable_spec(f).is_some() => {
            // A healthy token is looked at again now and then, so that a lost watch event
            // cannot leave it forgotten.
            Wake::At(schedule::add(f.now, schedule::MAX_REQUEUE))
        }
        None => Wake::OnChange,
    }
}

#[cfg(test)]
mod tests;
