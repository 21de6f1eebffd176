//! Carrying out the plan: one step at a time, each write to the state Secret conditional on
//! the version read, in an order that survives a crash between any two writes:
//!
//! - a request marker is written before every token request, and cleared by the write that
//!   records the answer (so a crash leaves a marker, and the token it may have produced is
//!   looked for);
//! - a new token is written to the state before it reaches the target Secret (so a token in
//!   a Secret is always one the state can revoke);
//! - a replaced token is revoked only after its grace period, counted from when the target
//!   Secret held its successor.

use std::time::Duration;

use jiff::Timestamp;
use kube::{ResourceExt, runtime::controller::Action};
use tracing::{debug, info, warn};

use super::{
    Clock, Settings,
    awx_api::{AwxApi, Connection},
    cluster::{Cluster, Event},
    observe::{self, Observed},
    pace::RenewalPacer,
    plan::{self, Backoff, Blocker, Facts, Next, Obtain, Target, Trigger, Wake},
    status,
    workloads::Workload,
};
use crate::{
    Error,
    awx::{
        AwxError, Flavor, IssuedToken, ListedToken, Login, Outcome, Scope, TokenKind, TokenQuery,
    },
    connection::{self, Via},
    crd::{AwxToken, GrantType, ROTATE_ANNOTATION, ScopeSpec, WorkloadKind},
    metrics::{Metrics, OutcomeLabels, ReasonLabels, RestartLabels, RevocationLabels, TokenLabels},
    schedule,
    secrets::{self, Ownership},
    spec::ValidSpec,
    state::{
        FailureRecord, HeldToken, IssueIntent, RestartOwed, Restarted, Sensitive, Session,
        TokenRecord, TokenState, WorkloadRef,
    },
};

/// The condition reason of a sign-in (grant type AuthorizationCode) that cannot be renewed.
pub const SIGN_IN_EXPIRED: &str = "SignInExpired";

/// The command that signs in again (no secret in it; the client secret, if any, is read
/// from a file).
pub fn login_command(token: &AwxToken, valid: Option<&ValidSpec>, client_id: &str) -> String {
    let url = valid.map_or_else(|| token.spec.awx.url.clone(), |v| v.url.to_string());
    let url = url.trim_end_matches('/');
    let insecure = if url.starts_with("http://") {
        " --allow-insecure-http"
    } else {
        ""
    };
    format!(
        "awx-token-operator login --url {url} --client-id {client_id} --namespace {} --name {}{insecure}",
        token.namespace().unwrap_or_default(),
        token.name_any()
    )
}

/// What to tell a person whose sign-in cannot be renewed: the exact command that signs in
/// again.
pub fn sign_in_expired_message(
    token: &AwxToken,
    valid: Option<&ValidSpec>,
    client_id: &str,
) -> String {
    format!(
        "the sign-in can no longer be renewed (its refresh token expired, was revoked or was \
         already used, or the user was disabled); sign in again with: {}",
        login_command(token, valid, client_id)
    )
}

/// Steps one reconcile may take; a plan that does not settle within them is a bug, and the
/// reconcile stops rather than loop.
const MAX_STEPS: usize = 32;

/// Writes of the state Secret retried after a conflict (each after reading it again).
const MAX_CONFLICT_RETRIES: usize = 5;

/// What a reconcile runs against.
pub struct Env<'a, C, A, K> {
    pub cluster: &'a C,
    pub awx: &'a A,
    pub clock: &'a K,
    pub settings: &'a Settings,
    pub metrics: &'a Metrics,
    /// Renewal starts under the rate limit, shared by every reconcile of this process.
    pub pacer: &'a RenewalPacer<super::PacedName>,
}

/// How a reconcile of an existing AwxToken ended.
pub struct Applied {
    pub action: Action,
    /// The delay `action` asks for (`None`: wait for a change).
    pub requeue_after: Option<Duration>,
    /// Since when attempts to obtain a token have failed, with none succeeding since (unix
    /// seconds): a failure holds the next attempt back (the objects-in-backoff gauge).
    pub failing_since: Option<f64>,
    /// For the schedule metrics: AWX's expiry and the renewal time (unix seconds).
    pub schedule: Option<(Option<f64>, f64)>,
    /// The plan reached `Done` (false: it ran out of steps, which is a bug).
    pub settled: bool,
    /// Secrets of the AwxToken's connection it read (namespace, name): a change of one of
    /// them concerns it.
    pub connection_secrets: Vec<(String, String)>,
}

/// Brings an existing AwxToken to what its spec asks for.
pub async fn apply<C: Cluster, A: AwxApi, K: Clock>(
    token: &AwxToken,
    env: &Env<'_, C, A, K>,
) -> Result<Applied, Error> {
    let resolved = connection::resolve(token, env.cluster, &env.settings.connections).await?;
    let seen = observe::observe(&resolved, env.cluster).await?;
    let mut run = Run {
        token: resolved.token.as_ref(),
        via: resolved.via.as_ref(),
        env,
        seen,
        rollout_checked: false,
        session_refreshed: false,
    };
    for _ in 0..MAX_STEPS {
        let now = env.clock.now();
        let next = plan::next(&run.facts(now));
        debug!(?next, "next step");
        match next {
            Next::Done(wake) => return run.finish(now, wake).await,
            step => run.step(step, now).await?,
        }
    }
    warn!("the plan did not settle; looking again shortly");
    Ok(Applied {
        action: Action::requeue(Duration::from_secs(1)),
        requeue_after: Some(Duration::from_secs(1)),
        failing_since: None,
        schedule: None,
        settled: false,
        connection_secrets: run.connection_secrets(),
    })
}

/// Revokes every token of an AwxToken being deleted. `Ok` means the finalizer may go.
pub async fn cleanup<C: Cluster, A: AwxApi, K: Clock>(
    token: &AwxToken,
    env: &Env<'_, C, A, K>,
) -> Result<(), Error> {
    let resolved = connection::resolve(token, env.cluster, &env.settings.connections).await?;
    let seen = observe::observe(&resolved, env.cluster).await?;
    let mut run = Run {
        token: resolved.token.as_ref(),
        via: resolved.via.as_ref(),
        env,
        seen,
        rollout_checked: false,
        session_refreshed: false,
    };
    for _ in 0..MAX_STEPS {
        let now = env.clock.now();
        match plan::next_on_delete(&run.facts(now)) {
            Next::Done(Wake::OnChange) => {
                info!("revoked every token of the deleted AwxToken");
                return Ok(());
            }
            Next::Done(Wake::At(at)) => return Err(run.stuck_deletion(now, at).await),
            step => run.step(step, now).await?,
        }
    }
    Err(Error::Conflict("the deletion did not settle".into()))
}

struct Run<'a, C, A, K> {
    /// The AwxToken, with its connection's `awx` block in place (`connection::resolve`).
    token: &'a AwxToken,
    /// The connection it names, if any.
    via: Option<&'a Via>,
    env: &'a Env<'a, C, A, K>,
    seen: Observed,
    /// The restarted workloads' rollouts were looked at (once per reconcile).
    rollout_checked: bool,
    /// The sign-in was refreshed in this reconcile: AWX refusing its access token now is not
    /// a stale token, so it is not refreshed again (once per reconcile).
    session_refreshed: bool,
}

/// A state edit that cannot be applied to the state as it now is.
struct Abandon(&'static str);

impl<C: Cluster, A: AwxApi, K: Clock> Run<'_, C, A, K> {
    fn facts(&self, now: Timestamp) -> Facts<'_> {
        let settings = self.env.settings;
        Facts {
            now,
            uid: self.uid(),
            spec: &self.token.spec,
            valid: self.seen.valid.as_ref(),
            allowed_hosts: settings.allowed_hosts.as_deref(),
            rotate: self
                .token
                .annotations()
                .get(ROTATE_ANNOTATION)
                .map(String::as_str),
            state: &self.seen.state,
            predecessor_state: self.seen.predecessor_state,
            target: self.target_fact(),
            inputs: match &self.seen.inputs {
                Ok(i) => Ok(plan::Inputs {
                    fingerprint: &i.fingerprint,
                    client_id: i.client.as_ref().map(|c| c.client_id.as_str()),
                    // A sign-in's access token may list and delete the user's tokens too.
                    user_login: (i.username.is_some() && i.password.is_some())
                        || self.seen.state.session.is_some(),
                }),
                Err(r) => Err(Blocker {
                    reason: r.reason,
                    message: &r.message,
                }),
            },
            backoff: Backoff {
                base: settings.backoff_base,
                max: settings.backoff_max,
            },
            holder: &settings.identity,
            rollout_checked: self.rollout_checked,
            started_at: settings.started_at,
            renew_from: self.renew_from(),
        }
    }

    /// Books the current token's renewal with the pacer (or takes it off when there is
    /// nothing to renew) and returns when the renewal is to start.
    fn renew_from(&self) -> Option<Timestamp> {
        let renewable =
            self.token.metadata.deletion_timestamp.is_none() && !self.token.spec.suspend;
        match (&self.seen.state.current, &self.seen.valid) {
            (Some(current), Ok(valid)) if renewable => Some(self.env.pacer.book(
                self.uid(),
                &super::PacedName::of(self.token),
                &valid.host,
                current.issued_at,
                plan::renewal_time(self.uid(), current, valid),
            )),
            _ => {
                self.env.pacer.forget(self.uid());
                None
            }
        }
    }

    fn uid(&self) -> &str {
        self.token.metadata.uid.as_deref().unwrap_or_default()
    }

    fn namespace(&self) -> String {
        self.token.namespace().unwrap_or_default()
    }

    fn target_fact(&self) -> Target {
        match &self.seen.target_ownership {
            Ownership::Foreign(why) => Target::Foreign(why.clone()),
            ownership => Target::Writable {
                up_to_date: *ownership == Ownership::Ours
                    && match (&self.seen.state.current, &self.seen.valid) {
                        (Some(current), Ok(valid)) => secrets::up_to_date(
                            self.seen.target.as_ref(),
                            &secrets::render_target(
                                self.token,
                                &valid.secret_layout,
                                &current.into(),
                            ),
                        ),
                        _ => false,
                    },
            },
        }
    }

    /// Whether the target Secret holds the current token's value (whatever else differs).
    fn target_holds_current(&self) -> bool {
        match (&self.seen.target, &self.seen.state.current) {
            (Some(secret), Some(current)) => {
                self.seen.target_ownership == Ownership::Ours
                    && secrets::token_in(secret, self.token).as_deref()
                        == Some(current.token.access_token.expose())
            }
            _ => false,
        }
    }

    async fn step(&mut self, step: Next, now: Timestamp) -> Result<(), Error> {
        match step {
            Next::DiscardPredecessorState => self.discard_predecessor_state().await,
            Next::ClaimInterrupted => self.claim_interrupted().await,
            Next::Search(i) => self.search(i, now).await,
            Next::RefreshSession => self.refresh_session().await,
            Next::Obtain(obtain) => self.obtain(obtain).await,
            Next::WriteTarget => self.write_target().await,
            Next::Revoke(i) => self.revoke(i).await,
            Next::Verify => self.verify().await,
            Next::Restart => self.restart(now).await,
            Next::CheckRollout => self.check_rollout(now).await,
            Next::RetireCurrent => {
                // In memory only: the write that records its revocation (or the failure to)
                // stores it. Should that write meet a conflict, the state read again still
                // holds the token as current, and it is retired again.
                let state = &mut self.seen.state;
                if let Some(current) = state.current.take() {
                    state.retiring.push(current.retire(now));
                }
                Ok(())
            }
            Next::RetireSession => {
                // In memory only, as the current token is.
                let state = &mut self.seen.state;
                if let Some(session) = state.session.take() {
                    state.retiring.push(session.retire(now));
                }
                Ok(())
            }
            Next::Done(_) => Ok(()),
        }
    }

    // ------------------------------------------------------------------ the state Secret

    /// Applies `edit` to the state and writes it, conditional on the version read. On a
    /// conflict the state is read again and `edit` applied to that, so nothing another writer
    /// recorded is lost. Returns what `edit` returned (from its last, written, application).
    async fn edit_state<R>(
        &mut self,
        mut edit: impl FnMut(&mut TokenState) -> Result<R, Abandon>,
    ) -> Result<R, Error> {
        for _ in 0..MAX_CONFLICT_RETRIES {
            let mut next = self.seen.state.clone();
            let result = edit(&mut next).map_err(|Abandon(why)| Error::Conflict(why.into()))?;
            if next == self.seen.state {
                return Ok(result);
            }
            let mut desired = secrets::render_state(self.token, &next);
            let written = match &self.seen.stored {
                Some(stored) => {
                    desired.metadata.resource_version = stored.metadata.resource_version.clone();
                    self.env.cluster.replace_secret(&desired).await
                }
                None => self.env.cluster.create_secret(&desired).await,
            };
            match written {
                Ok(stored) => {
                    self.seen.state = next;
                    self.seen.stored = Some(stored);
                    return Ok(result);
                }
                Err(Error::Conflict(why)) => {
                    debug!(%why, "the state changed since it was read; reading it again");
                    let (state, stored, predecessor) =
                        observe::read_state(self.token, self.env.cluster).await?;
                    if predecessor {
                        return Err(Error::Conflict(why));
                    }
                    self.seen.state = state;
                    self.seen.stored = stored;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Conflict("the state Secret keeps changing".into()))
    }

    /// Forgets the state an earlier AwxToken of this name left: its tokens are not this
    /// object's (its finalizer revoked them, or was told not to). The Secret is taken over by
    /// the next state write, a replace conditional on the version read (so no right to delete
    /// Secrets is needed, and a Secret that changed meanwhile is not overwritten).
    async fn discard_predecessor_state(&mut self) -> Result<(), Error> {
        info!("ignoring the state Secret an earlier AwxToken of this name left");
        self.seen.state = TokenState::default();
        self.seen.predecessor_state = false;
        Ok(())
    }

    async fn claim_interrupted(&mut self) -> Result<(), Error> {
        warn!("a token request was interrupted before its answer was recorded");
        self.edit_state(|s| {
            if let Some(marker) = s.issuing.take() {
                if marker.refresh
                    && let Some(current) = s.current.as_mut()
                {
                    current.refresh_broken = true;
                }
                s.interrupted.push(marker);
            }
            Ok(())
        })
        .await
    }

    // ------------------------------------------------------------------ AWX

    /// Where a token issued at `url` (or the spec's AWX) is reached, with the spec's TLS
    /// settings and timeout.
    fn connection(&self, url: Option<&str>) -> Result<Connection, AwxError> {
        let url = match (url, &self.seen.valid) {
            (Some(u), _) => url::Url::parse(u).map_err(|e| AwxError::InvalidEndpoint {
                detail: format!("the URL that issued the token is unreadable: {e}"),
            })?,
            (None, Ok(valid)) => valid.url.clone(),
            (None, Err(e)) => {
                return Err(AwxError::InvalidEndpoint {
                    detail: e.to_string(),
                });
            }
        };
        let awx = &self.token.spec.awx;
        Ok(Connection {
            host: crate::spec::host_of(&url),
            url,
            insecure_skip_tls_verify: awx.insecure_skip_tls_verify,
            timeout: Duration::from_secs(u64::from(awx.timeout_seconds.clamp(1, 300))),
            ca_bundle: self.seen.ca_bundle.clone(),
            narrower: self.via.and_then(Via::narrower),
        })
    }

    fn valid(&self) -> Result<&ValidSpec, Error> {
        self.seen
            .valid
            .as_ref()
            .map_err(|e| Error::Conflict(format!("the spec became invalid: {e}")))
    }

    /// Refreshes the browser sign-in of grant type AuthorizationCode (docs/awx-protocol.md#keeping-the-sign-in-alive).
    ///
    /// A refresh kills the refresh token it used and the previous access token at once, so
    /// the rotated pair is written to the state (conditionally on the version read) before
    /// anything uses it. Refreshes are never concurrent: one per AwxToken in this process
    /// (the `exclusive` guard), and one operator process at a time (leader election). A crash
    /// between AWX's answer and the state write loses the sign-in: the next refresh, with
    /// the consumed token, is refused, which reports SignInExpired (run login again).
    async fn refresh_session(&mut self) -> Result<(), Error> {
        use secrecy::ExposeSecret as _;
        let token = self.token;
        let Ok(inputs) = self.seen.inputs.clone() else {
            return Ok(());
        };
        let Some(client) = inputs.client.clone() else {
            return Ok(());
        };
        let obtain = Obtain {
            trigger: plan::Trigger::Initial,
            refresh: true,
        };
        let at = match self.connection(None) {
            Ok(at) => at,
            Err(e) => return self.record_failure(&obtain, None, e, false, false).await,
        };
        let flavor = match self.env.awx.flavor(&at, token.spec.awx.flavor).await {
            Ok(f) => f,
            Err(e) => return self.record_failure(&obtain, None, e, false, false).await,
        };
        let _exclusive = self
            .env
            .awx
            .exclusive(format!("sign-in|{}|{}", at.url, self.uid()))
            .await;
        // The session kept in the state, unless the credentials Secret holds a new sign-in.
        let kept = self
            .seen
            .state
            .session
            .clone()
            .filter(|s| s.inputs == inputs.fingerprint);
        let (refresh_token, user) = match &kept {
            Some(s) => (s.refresh_token.to_secret(), s.user.clone()),
            None => match &inputs.refresh_token {
                Some(r) => (r.clone(), None),
                None => return Ok(()),
            },
        };
        info!(
            first = kept.is_none(),
            "refreshing the sign-in (grant AuthorizationCode)"
        );
        let scope = scope(token.spec.grant.scope);
        let now = self.env.clock.now();
        let issued = match self
            .env
            .awx
            .refresh(&at, flavor, &client, &refresh_token, scope)
            .await
        {
            Ok(issued) => issued,
            Err(e) if e.requires_reissue() => return self.sign_in_expired(&obtain, e).await,
            // AWX fails like that on every refresh of a sign-in whose access token was deleted
            // (docs/awx-protocol.md#delete-token); it may pass too (AWX down), so it is retried.
            Err(e @ AwxError::AwxServerError { .. }) => {
                let message = format!(
                    "{e}; for a sign-in that means signing in again with: {}",
                    self.login_command()
                );
                return self
                    .sign_in_failed(&obtain, None, e.reason(), &message, true)
                    .await;
            }
            Err(e) => return self.record_failure(&obtain, None, e, false, false).await,
        };
        let Some(rotated) = issued.refresh_token.as_ref() else {
            let e = AwxError::UnexpectedResponse {
                at: at.url.to_string(),
                status: None,
                detail: "the refresh answer holds no refresh token".into(),
                outcome: Outcome::Rejected,
            };
            return self.sign_in_expired(&obtain, e).await;
        };
        let session = Session {
            access_token: Sensitive::new(issued.access_token.expose_secret()),
            refresh_token: Sensitive::new(rotated.expose_secret()),
            refreshed_at: now,
            inputs: inputs.fingerprint.clone(),
            user,
            rejected: false,
            url: Some(at.url.to_string()),
            client_id: Some(client.client_id.clone()),
            client_secret: client
                .client_secret
                .as_ref()
                .map(|c| Sensitive::new(c.expose_secret())),
            gateway: flavor == Flavor::Gateway,
        };
        // Written before anything else happens: the old pair is dead now. A sign-in of other
        // inputs (`login` was run again) is replaced, and its pair revoked: AWX keeps its
        // access token alive for as long as a personal token's.
        self.edit_state(|s| {
            if let Some(old) = s.session.take()
                && old.inputs != session.inputs
            {
                s.retiring.push(old.retire(now));
            }
            s.session = Some(session.clone());
            Ok(())
        })
        .await?;
        self.session_refreshed = true;
        if session.user.is_none() {
            // Who signed in, for the personal tokens' owner and for looking tokens up.
            match self.env.awx.whoami(&at, flavor, &issued.access_token).await {
                Ok(who) => {
                    let name = who.username;
                    self.edit_state(|s| {
                        if let Some(kept) = s.session.as_mut() {
                            kept.user = Some(name.clone());
                        }
                        Ok(())
                    })
                    .await?;
                }
                Err(e) => warn!(error = %e, "could not tell who signed in"),
            }
        }
        Ok(())
    }

    /// The sign-in cannot be renewed: the refresh was refused (the refresh token expired, was
    /// revoked or already consumed; the user was disabled). Only a person can sign in again;
    /// the failure is not retried until the inputs change (a new refresh token).
    async fn sign_in_expired(&mut self, obtain: &Obtain, error: AwxError) -> Result<(), Error> {
        warn!(error = %error, "the sign-in cannot be renewed");
        let message =
            sign_in_expired_message(self.token, self.seen.valid.as_ref().ok(), &self.client_id());
        self.sign_in_failed(obtain, None, SIGN_IN_EXPIRED, &message, false)
            .await
    }

    /// The command that signs this AwxToken in again.
    fn login_command(&self) -> String {
        login_command(self.token, self.seen.valid.as_ref().ok(), &self.client_id())
    }

    fn client_id(&self) -> String {
        self.seen
            .inputs
            .as_ref()
            .ok()
            .and_then(|i| i.client.as_ref())
            .map(|c| c.client_id.clone())
            .unwrap_or_default()
    }

    /// Records a failure of the sign-in: the session is retired (to be revoked) when it
    /// cannot be renewed (`retryable` false: only a new sign-in helps), else marked rejected
    /// so that the next attempt, after the backoff, refreshes it first. `marker` is the
    /// request's, which created nothing.
    async fn sign_in_failed(
        &mut self,
        obtain: &Obtain,
        marker: Option<&IssueIntent>,
        reason: &'static str,
        message: &str,
        retryable: bool,
    ) -> Result<(), Error> {
        let failure = self.failure(reason, message, retryable);
        let tag = marker.map(|m| m.tag.clone());
        let now = self.env.clock.now();
        self.edit_state(|s| {
            if tag.is_some() && s.issuing.as_ref().map(|m| &m.tag) == tag.as_ref() {
                s.issuing = None;
            }
            if retryable {
                if let Some(kept) = s.session.as_mut() {
                    kept.rejected = true;
                }
            } else if let Some(dead) = s.session.take() {
                // Its refresh token is dead, but its access token may live on in AWX.
                s.retiring.push(dead.retire(now));
            }
            s.failure = Some(failure(s.failure.as_ref()));
            Ok(())
        })
        .await?;
        self.env
            .cluster
            .publish(
                self.token,
                Event::warning(
                    reason,
                    format!(
                        "{} failed: {message}",
                        capitalised(obtain.trigger.describe())
                    ),
                ),
            )
            .await;
        Ok(())
    }

    async fn obtain(&mut self, obtain: Obtain) -> Result<(), Error> {
        let token = self.token;
        let valid = self.valid()?.clone();
        let Ok(inputs) = self.seen.inputs.clone() else {
            return Ok(());
        };
        info!(reason = obtain.trigger.describe(), "AWX request due");
        let at = match self.connection(None) {
            Ok(at) => at,
            Err(e) => return self.record_failure(&obtain, None, e, false, false).await,
        };
        let flavor = match self.env.awx.flavor(&at, token.spec.awx.flavor).await {
            Ok(f) => f,
            Err(e) => return self.record_failure(&obtain, None, e, false, false).await,
        };
        let grant_type = token.spec.grant.type_;
        let login = inputs.username.clone().zip(inputs.password.clone());
        let client_id = inputs.client.as_ref().map(|c| c.client_id.clone());
        // Only a personal token is created with its tag; a grant's token is tagged after its
        // answer (`tag_after`).
        // A sign-in's consumers get personal tokens too, created with the sign-in.
        let personal = matches!(
            grant_type,
            GrantType::PersonalAccessToken | GrantType::AuthorizationCode
        );
        let tagged = personal;
        let session = self.seen.state.session.clone();
        let username = inputs
            .username
            .clone()
            .or_else(|| session.as_ref().and_then(|s| s.user.clone()));
        // Requests whose token is tagged after the answer: one at a time per AWX user and
        // application in this process, so the token created just then is told apart.
        let _exclusive = if tagged {
            None
        } else {
            let key = format!(
                "{}|{}|{}",
                at.url,
                inputs.username.as_deref().unwrap_or_default(),
                client_id.as_deref().unwrap_or_default()
            );
            Some(self.env.awx.exclusive(key).await)
        };
        let now = self.env.clock.now();
        let marker = IssueIntent {
            tag: new_tag(),
            started_at: now,
            personal,
            gateway: flavor == Flavor::Gateway,
            refresh: obtain.refresh,
            holder: self.env.settings.identity.clone(),
            search_attempts: 0,
            search_after: None,
            tagged,
            username: username.clone(),
            client_id: client_id.clone().filter(|_| !personal),
            // The application's id, when known from an earlier token, narrows the search for
            // a token whose answer is lost to that application's tokens.
            application: self
                .seen
                .state
                .current
                .as_ref()
                .filter(|c| c.token.client_id == client_id)
                .and_then(|c| c.application_id),
            clock_offset: self
                .seen
                .state
                .current
                .as_ref()
                .and_then(|c| c.clock_offset),
            searched: false,
            search_error: None,
            claimed_at: None,
        };
        // Recorded before the request, so that a crash in the middle leaves a trace of it.
        self.edit_state(|s| {
            if s.issuing.is_some() {
                return Err(Abandon("another process is requesting a token"));
            }
            s.issuing = Some(marker.clone());
            Ok(())
        })
        .await?;

        let scope = scope(token.spec.grant.scope);
        let mut refreshed = false;
        let mut refresh_broken = false;
        // A request of this attempt whose answer was lost: AWX may hold its token, so the
        // marker is kept as interrupted whatever the next request brings.
        let mut lost_answer = false;
        let mut result = Err(AwxError::MissingCredentials {
            detail: "no request was made".into(),
        });
        if obtain.refresh
            && let (Some(current), Some(client)) = (&self.seen.state.current, &inputs.client)
            && let Some(refresh) = &current.token.refresh_token
        {
            result = self
                .env
                .awx
                .refresh(
                    &at,
                    current.token.flavor(),
                    client,
                    &refresh.to_secret(),
                    scope,
                )
                .await;
            match &result {
                Ok(_) => refreshed = true,
                // The chain is dead (refused, expired), or AWX failed on it (a 5xx: the refresh
                // token of a deleted access token makes AWX fail like that every time), or the
                // answer was lost (the refresh may have rotated it): only the grant helps.
                Err(e)
                    if e.requires_reissue()
                        || e.outcome() == Outcome::Unknown
                        || matches!(e, AwxError::AwxServerError { .. }) =>
                {
                    info!(error = %e, "refresh failed; issuing a new token with the grant");
                    refresh_broken = true;
                    lost_answer = e.outcome() == Outcome::Unknown;
                }
                Err(_) => {}
            }
        }
        if !refreshed && (!obtain.refresh || refresh_broken) {
            result = self
                .env
                .awx
                .issue(
                    &at,
                    flavor,
                    &inputs.grant(token, &marker.tag, session.as_ref()),
                    scope,
                )
                .await;
        }
        if grant_type == GrantType::AuthorizationCode
            && let Err(e @ (AwxError::InvalidCredentials { .. } | AwxError::Unauthorized { .. })) =
                &result
            && session.is_some()
        {
            if self.session_refreshed {
                // Refused just after AWX gave it: not a stale token (the user may have been
                // disabled, or the token deleted at once). Tried again, refreshed first, after
                // the backoff.
                let message = format!(
                    "AWX refused the access token of the sign-in it had just refreshed ({e}); \
                     it is refreshed and tried again after a backoff. If this repeats, check \
                     that the user can still sign in to AWX, or sign in again with: {}",
                    self.login_command()
                );
                return self
                    .sign_in_failed(&obtain, Some(&marker), e.reason(), &message, true)
                    .await;
            }
            // AWX no longer takes the sign-in's access token (deleted by a person, or the
            // sign-in was refreshed elsewhere): refresh the sign-in and try again, in this
            // reconcile.
            info!("AWX refused the sign-in's access token; refreshing the sign-in");
            let tag = marker.tag.clone();
            return self
                .edit_state(|s| {
                    if s.issuing.as_ref().map(|m| &m.tag) == Some(&tag) {
                        s.issuing = None;
                    }
                    if let Some(kept) = s.session.as_mut() {
                        kept.rejected = true;
                    }
                    Ok(())
                })
                .await;
        }
        match result {
            Ok(mut issued) => {
                // Looked up (once per process) only once the login is known to work: a wrong
                // password costs one request per attempt, the grant (AWX may lock accounts).
                let mut marker = marker;
                if let (None, GrantType::Password, Flavor::Controller, Some((u, p)), Some(c)) =
                    (marker.application, grant_type, flavor, &login, &client_id)
                {
                    match self.env.awx.application_id(&at, flavor, u, p, c).await {
                        Ok(id) => marker.application = id,
                        Err(e) => warn!(error = %e, "could not look up the application's id"),
                    }
                }
                // After a lost refresh the marker's tag names that request's token, which its
                // search deletes: the grant's token gets a tag of its own.
                let tag = if lost_answer {
                    new_tag()
                } else {
                    marker.tag.clone()
                };
                if !marker.tagged
                    && grant_type != GrantType::ClientCredentials
                    && let Some(tagged) = self.tag_after(&at, flavor, &marker, &issued, &tag).await
                {
                    issued.token_id = Some(tagged.id);
                    issued.application = tagged.application;
                }
                let got = Obtained {
                    issued,
                    flavor,
                    refreshed,
                    lost_answer,
                };
                self.install(&obtain, &marker, got, &valid, &at).await
            }
            Err(e) => {
                self.record_failure(&obtain, Some(&marker), e, refresh_broken, lost_answer)
                    .await
            }
        }
    }

    /// The description of a token the operator creates for this AwxToken, with a request's
    /// tag.
    fn tagged_description(&self, tag: &str) -> String {
        let base = self
            .token
            .spec
            .grant
            .description
            .clone()
            .unwrap_or_else(|| {
                format!(
                    "awx-token-operator {}/{}",
                    self.namespace(),
                    self.token.name_any()
                )
            });
        format!("{base} [{tag}]")
    }

    /// Tags a token that came without a description (a password grant or a refresh at the
    /// token endpoint): it is the one application token of the user, untagged and not held,
    /// that AWX created around the time it answered. Returns its id; `None` when it cannot be
    /// told apart (it then stays untagged, like one whose answer was lost).
    async fn tag_after(
        &self,
        at: &Connection,
        flavor: Flavor,
        marker: &IssueIntent,
        issued: &IssuedToken,
        tag: &str,
    ) -> Option<ListedToken> {
        let inputs = self.seen.inputs.as_ref().ok()?;
        let username = inputs.username.as_deref()?;
        // The new token itself, when its scope lets it change its own row: a Bearer token
        // costs AWX a lookup, a login a password hash (about 0.2 s of CPU each).
        // docs/awx-protocol.md#list-permissions
        let writes = issued.scope.split_whitespace().any(|s| s == "write");
        let login = match &inputs.password {
            Some(password) if !writes => Login::Password { username, password },
            _ => Login::Bearer(&issued.access_token),
        };
        // AWX's clock: its Date header (to the second), else ours.
        let around = issued.answered_at.unwrap_or_else(|| self.env.clock.now());
        let query = TokenQuery {
            username: Some(username),
            application: marker.application,
            personal: Some(false),
            created_from: Some(schedule::sub(around, Duration::from_secs(5))),
            created_to: Some(schedule::add(around, Duration::from_secs(5))),
            description_contains: None,
        };
        let held = held_ids(&self.seen.state);
        let found = match self.env.awx.list_tokens(at, flavor, login, &query).await {
            Ok(found) => found,
            Err(e) => {
                warn!(error = %e, "could not look up the new token to tag it");
                return None;
            }
        };
        let (from, to) = (
            query.created_from.unwrap_or(around),
            query.created_to.unwrap_or(around),
        );
        let candidates: Vec<_> = found
            .iter()
            .filter(|t| untagged_candidate(t, marker.application, (from, to), &held))
            .collect();
        let [only] = candidates.as_slice() else {
            warn!(
                candidates = candidates.len(),
                "the new token cannot be told apart from others created at the same time; it \
                 stays untagged"
            );
            return None;
        };
        let description = self.tagged_description(tag);
        match self
            .env
            .awx
            .describe_token(at, flavor, login, only.id, &description)
            .await
        {
            Ok(()) => Some((*only).clone()),
            Err(e) => {
                warn!(error = %e, "could not tag the new token");
                None
            }
        }
    }

    /// Records a new token, the marker cleared (or kept as interrupted when an earlier request
    /// of the attempt lost its answer), in one write.
    async fn install(
        &mut self,
        obtain: &Obtain,
        marker: &IssueIntent,
        got: Obtained,
        valid: &ValidSpec,
        at: &Connection,
    ) -> Result<(), Error> {
        let Obtained {
            issued,
            flavor,
            refreshed,
            lost_answer,
        } = got;
        let token = self.token;
        let now = self.env.clock.now();
        let Ok(inputs) = self.seen.inputs.clone() else {
            return Ok(());
        };
        let previous_user = self
            .seen
            .state
            .current
            .as_ref()
            .and_then(|c| c.user.clone());
        let mut held = held_token(
            &issued,
            flavor,
            valid,
            &inputs,
            refreshed,
            previous_user,
            now,
        );
        held.renewal_time = plan::renewal_time(self.uid(), &held, valid);
        let rotate = token.annotations().get(ROTATE_ANNOTATION).cloned();
        let grace_end = schedule::add(now, valid.revoke_grace_period);
        // Consumers have a token of this AwxToken to move off (else the new one is, for them,
        // the first, and restarts nothing).
        let consumers_hold_one = self.seen.target_ownership == Ownership::Ours
            && self
                .seen
                .target
                .as_ref()
                .and_then(|s| secrets::token_in(s, token))
                .is_some();
        let mut written = Err(Error::Conflict(String::new()));
        // A failed write (other than a conflict) is tried again a few times: the token exists
        // and only this process knows it.
        for _ in 0..3 {
            written = self
                .edit_state(|s| {
                    if s.issuing.as_ref().map(|m| &m.tag) != Some(&marker.tag) {
                        // Another process took this request for interrupted: the token never
                        // reaches the Secret, so it goes at once.
                        s.retiring.push(held.retire(now));
                        return Ok(false);
                    }
                    let marker = s.issuing.take();
                    if lost_answer {
                        s.interrupted.extend(marker);
                    }
                    if let Some(previous) = s.current.take() {
                        if !refreshed {
                            // A rejected token is dead already; any other one may be in use.
                            let after = if previous.rejected_at.is_some() {
                                now
                            } else {
                                grace_end
                            };
                            s.retiring.push(previous.retire(after));
                        }
                        // The workloads are restarted once the Secret has the new token; owed
                        // from now on, so that a crash in between loses no restart.
                        if consumers_hold_one && !token.spec.rollout_restart_targets.is_empty() {
                            s.restart = Some(RestartOwed {
                                since: now,
                                retry_after: None,
                                attempts: 0,
                                error: None,
                                restarted: None,
                                warned: false,
                            });
                            s.rollout_timed_out = None;
                        }
                    }
                    s.current = Some(held.clone());
                    s.failure = None;
                    match &obtain.trigger {
                        Trigger::Forced(value) => s.rotated_for = Some(value.clone()),
                        // An annotation present at creation asks for nothing beyond the first
                        // issue.
                        Trigger::Initial => s.rotated_for = rotate.clone(),
                        // Issued while the annotation holds a value, for whatever reason (new
                        // credentials, a rejected token), this is the new token the value asks
                        // for. Left unanswered, the value would replace it at once, with the
                        // failure backoff just cleared: a second attempt at once for one value.
                        _ if rotate.is_some() => s.rotated_for = rotate.clone(),
                        _ => {}
                    }
                    Ok(true)
                })
                .await;
            match &written {
                Ok(_) | Err(Error::Conflict(_)) => break,
                Err(e) => warn!(error = %e, "could not record the new token; trying again"),
            }
        }
        let installed = match written {
            Ok(installed) => installed,
            Err(e) => {
                // Never leave a token nobody can revoke: give it back.
                let to_revoke = held.token.to_revoke();
                let creds = held
                    .token
                    .revocation(&inputs.revocation(self.seen.state.session.as_ref()));
                match self
                    .env
                    .awx
                    .revoke(at, held.token.flavor(), &to_revoke, &creds)
                    .await
                {
                    Ok(()) => self.count_revocation(held.token.flavor(), "revoked"),
                    Err(revoke_error) => {
                        self.count_revocation(held.token.flavor(), "failed");
                        warn!(error = %revoke_error, "could not give back a token that could not be recorded");
                    }
                }
                return Err(e);
            }
        };
        if !installed {
            warn!("another operator process took this token request for interrupted");
            return Ok(());
        }
        let labels = TokenLabels {
            grant: grant_label(token.spec.grant.type_),
            flavor: flavor.as_str(),
        };
        let metrics = self.env.metrics;
        metrics.tokens_issued.get_or_create(&labels).inc();
        if obtain.trigger.is_renewal() {
            metrics.tokens_renewed.get_or_create(&labels).inc();
        }
        // One reason per cause: events are aggregated by reason (a repeat only counts up, its
        // note is not shown), so a rotation must not read as the first issue or a renewal.
        let (reason, what) = match (&obtain.trigger, refreshed) {
            (_, true) => ("TokenRefreshed", "Token refreshed"),
            (Trigger::Initial, _) => ("TokenIssued", "Token issued"),
            (Trigger::InputsChanged | Trigger::ChainBroken, _) => {
                ("TokenReissued", "Token re-issued")
            }
            (Trigger::Forced(_), _) => ("TokenRotated", "Token rotated"),
            (Trigger::Rejected, _) => ("TokenReplaced", "Token replaced"),
            (Trigger::Due, _) => ("TokenRenewed", "Token renewed"),
        };
        self.env
            .cluster
            .publish(
                token,
                Event::normal(reason, format!("{what} ({})", obtain.trigger.describe())),
            )
            .await;
        Ok(())
    }

    /// Counts a failed attempt to obtain a token, and returns the record that follows
    /// `previous` (the streak's count and start go on; the inputs and rotate annotation of
    /// this attempt are kept, so only a change is tried at once).
    fn failure(
        &self,
        reason: &'static str,
        message: &str,
        retryable: bool,
    ) -> impl Fn(Option<&FailureRecord>) -> FailureRecord + use<C, A, K> {
        self.env
            .metrics
            .renewal_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
        let now = self.env.clock.now();
        let inputs = self
            .seen
            .inputs
            .as_ref()
            .map(|i| i.fingerprint.clone())
            .unwrap_or_default();
        let rotation = self.token.annotations().get(ROTATE_ANNOTATION).cloned();
        let message = message.to_owned();
        move |previous| FailureRecord {
            attempts: previous.map_or(0, |f| f.attempts).saturating_add(1),
            at: now,
            since: Some(previous.map_or(now, FailureRecord::failing_since)),
            reason: reason.to_string(),
            message: message.clone(),
            retryable,
            inputs: inputs.clone(),
            rotation: rotation.clone(),
        }
    }

    /// Records a failed attempt (clearing the marker unless AWX may have created a token).
    async fn record_failure(
        &mut self,
        obtain: &Obtain,
        marker: Option<&IssueIntent>,
        error: AwxError,
        refresh_broken: bool,
        lost_answer: bool,
    ) -> Result<(), Error> {
        let reason = error.reason();
        let message = error.to_string();
        let unknown = lost_answer || error.outcome() == Outcome::Unknown;
        warn!(reason, error = %message, unknown, "AWX request failed");
        let failure = self.failure(reason, &message, error.is_retryable());
        self.edit_state(|s| {
            if let Some(marker) = marker
                && s.issuing.as_ref().map(|m| &m.tag) == Some(&marker.tag)
            {
                let marker = s.issuing.take();
                if unknown {
                    s.interrupted.extend(marker);
                }
            }
            if refresh_broken && let Some(current) = s.current.as_mut() {
                current.refresh_broken = true;
            }
            s.failure = Some(failure(s.failure.as_ref()));
            Ok(())
        })
        .await?;
        let note = if self.seen.state.current.is_some() {
            format!(
                "{} failed: {message}. The Secret keeps its previous token.",
                capitalised(obtain.trigger.describe())
            )
        } else {
            format!(
                "{} failed: {message}",
                capitalised(obtain.trigger.describe())
            )
        };
        self.env
            .cluster
            .publish(self.token, Event::warning(reason, note))
            .await;
        Ok(())
    }

    /// Looks for the token an interrupted request may have created, and deletes it: by its
    /// tag (personal tokens, and application tokens created or tagged with it), and, for a
    /// request whose token had no tag yet, by its user, application and creation time
    /// (docs/awx-protocol.md#interrupted-requests). AWX may still finish a request after the
    /// client gave up on it, so a request is looked for twice: now, and once it is too late
    /// for AWX to finish it.
    async fn search(&mut self, i: usize, now: Timestamp) -> Result<(), Error> {
        let Some(marker) = self.seen.state.interrupted.get(i).cloned() else {
            return Ok(());
        };
        let flavor = if marker.gateway {
            Flavor::Gateway
        } else {
            Flavor::Controller
        };
        let username = marker
            .username
            .clone()
            .or_else(|| self.seen.inputs.as_ref().ok()?.username.clone())
            .or_else(|| self.seen.state.session.as_ref()?.user.clone());
        let password = self
            .seen
            .inputs
            .as_ref()
            .ok()
            .and_then(|i| i.password.clone());
        let searchable = username.is_some() && (marker.personal || marker.client_id.is_some());
        if !searchable {
            // A client-credentials request (no user to list tokens of), or a marker of an
            // earlier release: only a person can look.
            return self.report_unrecoverable(&marker).await;
        }
        let username = username.unwrap_or_default();
        // The user's login; without it, a write-scoped token of the user may list and delete.
        let current = self
            .seen
            .state
            .current
            .as_ref()
            .filter(|c| c.scope.split_whitespace().any(|s| s == "write"))
            .map(|c| c.token.access_token.to_secret());
        // A sign-in's access token acts as the user as well.
        let current = self
            .seen
            .state
            .session
            .as_ref()
            .map(|s| s.access_token.to_secret())
            .or(current);
        let login = match (&password, &current) {
            (Some(password), _) => Login::Password {
                username: &username,
                password,
            },
            (None, Some(token)) => Login::Bearer(token),
            (None, None) => return Ok(()),
        };
        let late = late_end(&marker, self.seen.valid.as_ref().ok());
        // A search by creation time could take the token of a request in flight in another
        // process (one that lost its Lease, or its successor) for the lost one. So it starts
        // with a write conditional on the state read: after it, a request in flight shows in
        // the state (its marker is written before it is sent), and one that starts later
        // creates its token after `claimed`, which the search does not look past.
        let mut claimed = now;
        if !marker.tagged {
            let tag = marker.tag.clone();
            let free = self
                .edit_state(|s| {
                    if s.issuing.is_some() {
                        return Ok(false);
                    }
                    if let Some(m) = s.interrupted.iter_mut().find(|m| m.tag == tag) {
                        m.claimed_at = Some(now);
                    }
                    Ok(true)
                })
                .await?;
            if !free {
                debug!("another request is in flight; looking for the lost token later");
                return Ok(());
            }
            claimed = self.env.clock.now();
        }
        let held = held_ids(&self.seen.state);
        // Held tokens whose id is not known (tagging failed, or issued by an earlier release):
        // kept out of the search by their creation time. A retiring one whose issue time is
        // not known either keeps the whole search by creation time from deleting anything.
        let state = &self.seen.state;
        // Each with how far its creation time on AWX's clock may be off: a few seconds once
        // the offset between the clocks is known, else a minute.
        let known_offset = marker.clock_offset;
        let held_unknown: Vec<Option<(Timestamp, Duration)>> = state
            .current
            .iter()
            .map(|c| (Some(c.issued_at), c.token.token_id, c.clock_offset))
            .chain(
                state
                    .retiring
                    .iter()
                    .map(|r| (r.issued_at, r.token.token_id, r.clock_offset)),
            )
            .filter(|(_, id, _)| id.is_none())
            .map(|(t, _, offset)| {
                let offset = offset.or(known_offset);
                let margin = Duration::from_secs(if offset.is_some() { 5 } else { 60 });
                t.map(|t| (shift(t, offset), Duration::from_secs(3) + margin))
            })
            .collect();
        let result = async {
            let at = self.connection(None)?;
            let tagged = TokenQuery {
                username: Some(&username),
                description_contains: Some(&marker.tag),
                ..TokenQuery::default()
            };
            let mut kept: Vec<u64> = Vec::new();
            let mut found: Vec<u64> = self
                .env
                .awx
                .list_tokens(&at, flavor, login, &tagged)
                .await?
                .into_iter()
                .filter(|t| t.description.contains(&marker.tag) && !held.contains(&t.id))
                .map(|t| t.id)
                .collect();
            if !marker.tagged {
                let (from, to) = search_window(&marker, self.seen.valid.as_ref().ok());
                // Not past the claim (on AWX's clock, less the margin for the clocks).
                let to = to.min(schedule::sub(
                    shift(claimed, marker.clock_offset),
                    clock_margin(&marker),
                ));
                let untagged = TokenQuery {
                    username: Some(&username),
                    application: marker.application,
                    personal: Some(false),
                    created_from: Some(from),
                    created_to: Some(to),
                    description_contains: None,
                };
                let listed = self
                    .env
                    .awx
                    .list_tokens(&at, flavor, login, &untagged)
                    .await?;
                let candidates = listed
                    .into_iter()
                    .filter(|t| untagged_candidate(t, marker.application, (from, to), &held));
                for t in candidates {
                    // A held token whose id is not known is told apart by its creation time;
                    // a candidate too close to it to tell is kept, and reported.
                    let created = t.created.unwrap_or(from);
                    let close = held_unknown.iter().any(|h| match h {
                        Some((h, margin)) => {
                            schedule::span(*h, created).max(schedule::span(created, *h)) < *margin
                        }
                        None => true,
                    });
                    if close {
                        kept.push(t.id);
                    } else {
                        found.push(t.id);
                    }
                }
            }
            found.sort_unstable();
            found.dedup();
            for id in &found {
                self.env
                    .awx
                    .delete_token_as(&at, flavor, login, *id)
                    .await?;
            }
            Ok::<(usize, Vec<u64>), AwxError>((found.len(), kept))
        }
        .await;
        let tag = marker.tag.clone();
        match result {
            Ok((found, kept)) => {
                info!(found, "looked for the token of an interrupted request");
                self.count_interrupted("cleaned");
                if found > 0 {
                    self.env
                        .cluster
                        .publish(
                            self.token,
                            Event::normal(
                                "InterruptedIssueCleaned",
                                format!(
                                    "Found and deleted {found} token(s) of a request whose \
                                     answer was lost"
                                ),
                            ),
                        )
                        .await;
                }
                // Done only once AWX cannot be finishing the request, however many looks
                // came before (another process may have looked early).
                let last = self.env.clock.now() >= late;
                if last && !kept.is_empty() {
                    self.report_undecided(&marker, &username, &kept).await;
                }
                self.edit_state(|s| {
                    if !last {
                        // Once more, when AWX can no longer be finishing it.
                        if let Some(m) = s.interrupted.iter_mut().find(|m| m.tag == tag) {
                            m.searched = true;
                            m.search_attempts = 0;
                            m.search_error = None;
                            m.search_after = Some(late);
                        }
                    } else {
                        s.interrupted.retain(|m| m.tag != tag);
                    }
                    Ok(())
                })
                .await
            }
            Err(e) => {
                warn!(error = %e, "could not look for the token of an interrupted request");
                let backoff = self.env.settings;
                let message = e.to_string();
                self.edit_state(|s| {
                    if let Some(m) = s.interrupted.iter_mut().find(|m| m.tag == tag) {
                        m.search_attempts = m.search_attempts.saturating_add(1);
                        let wait = schedule::failure_backoff(
                            m.search_attempts,
                            backoff.backoff_base,
                            backoff.backoff_max,
                            crate::decide::jitter(&[&tag, &m.search_attempts.to_string()]),
                        );
                        m.search_after = Some(schedule::add(now, wait));
                        m.search_error = Some(message.clone());
                    }
                    Ok(())
                })
                .await
            }
        }
    }

    /// Tokens that may be an interrupted request's, or the held token whose id is not known:
    /// created too close together to tell apart. A Warning for a person, who can.
    async fn report_undecided(&self, marker: &IssueIntent, username: &str, ids: &[u64]) {
        let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
        let note = format!(
            "A token request started at {} got no complete answer; AWX token(s) {} of user \
             {username} were created then, too close to the token the Secret holds to tell \
             which is which, so none was deleted. Delete in AWX the one(s) the Secret does not \
             hold (compare with /api/v2/me/ or the token's last use).",
            marker.started_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            ids.join(", ")
        );
        self.warn_person(note).await;
    }

    /// A Warning event `InterruptedIssue` (and a log line and a count) for a person to act on.
    async fn warn_person(&self, note: String) {
        warn!("{note}");
        self.count_interrupted("unrecoverable");
        self.env
            .cluster
            .publish(self.token, Event::warning("InterruptedIssue", note))
            .await;
    }

    /// An interrupted request whose token cannot be looked for: a Warning for a person.
    async fn report_unrecoverable(&mut self, marker: &IssueIntent) -> Result<(), Error> {
        let note = format!(
            "A token request started at {} got no complete answer (interrupted, timed out or \
             cut off); AWX may hold {} that the operator cannot look for (a client-credentials \
             grant lists no user's tokens). Revoke it in AWX if it exists (tokens of the \
             application created at that time).",
            marker.started_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            if marker.refresh {
                "a token (two, when the refresh fell back to the grant)"
            } else {
                "one token"
            }
        );
        self.warn_person(note).await;
        let tag = marker.tag.clone();
        self.edit_state(|s| {
            s.interrupted.retain(|m| m.tag != tag);
            Ok(())
        })
        .await
    }

    fn count_revocation(&self, flavor: Flavor, outcome: &'static str) {
        self.env
            .metrics
            .revocations
            .get_or_create(&RevocationLabels {
                flavor: flavor.as_str(),
                outcome,
            })
            .inc();
    }

    fn count_interrupted(&self, outcome: &'static str) {
        self.env
            .metrics
            .interrupted_issues
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Revokes `state.retiring[i]` where it was issued, with the application that issued it.
    async fn revoke(&mut self, i: usize) -> Result<(), Error> {
        let Some(retiring) = self.seen.state.retiring.get(i).cloned() else {
            return Ok(());
        };
        let fallback = self
            .seen
            .inputs
            .as_ref()
            .map(|i| i.revocation(self.seen.state.session.as_ref()))
            .unwrap_or_default();
        let result = async {
            let at = self.connection(retiring.token.url.as_deref())?;
            self.env
                .awx
                .revoke(
                    &at,
                    retiring.token.flavor(),
                    &retiring.token.to_revoke(),
                    &retiring.token.revocation(&fallback),
                )
                .await
        }
        .await;
        let value = retiring.token.access_token.clone();
        let now = self.env.clock.now();
        match result {
            Ok(()) => {
                info!("revoked a replaced token");
                self.count_revocation(retiring.token.flavor(), "revoked");
                self.edit_state(|s| {
                    s.retiring.retain(|r| r.token.access_token != value);
                    Ok(())
                })
                .await?;
                // No event: a revocation is routine, and the state write and status above already
                // cost the renewal two writes (metrics count revocations by outcome).
                Ok(())
            }
            Err(e) => {
                let settings = self.env.settings;
                let attempts = retiring.failed_attempts.saturating_add(1);
                let wait = schedule::failure_backoff(
                    attempts,
                    settings.backoff_base,
                    settings.backoff_max,
                    crate::decide::jitter(&[self.uid(), "revoke", &attempts.to_string()]),
                );
                warn!(error = %e, retry_in = ?wait, "could not revoke a replaced token");
                self.count_revocation(retiring.token.flavor(), "failed");
                self.edit_state(|s| {
                    if let Some(r) = s
                        .retiring
                        .iter_mut()
                        .find(|r| r.token.access_token == value)
                    {
                        r.failed_attempts = attempts;
                        r.revoke_after = schedule::add(now, wait);
                    }
                    Ok(())
                })
                .await?;
                self.env
                    .cluster
                    .publish(
                        self.token,
                        Event::warning(
                            "RevocationFailed",
                            format!("A replaced token could not be revoked yet; retrying: {e}"),
                        ),
                    )
                    .await;
                Ok(())
            }
        }
    }

    async fn verify(&mut self) -> Result<(), Error> {
        let Some(current) = self.seen.state.current.clone() else {
            return Ok(());
        };
        let result = async {
            let at = self.connection(current.token.url.as_deref())?;
            self.env
                .awx
                .whoami(
                    &at,
                    current.token.flavor(),
                    &current.token.access_token.to_secret(),
                )
                .await
        }
        .await;
        let now = self.env.clock.now();
        let value = current.token.access_token.clone();
        let outcome = match &result {
            Ok(_) => "valid",
            Err(AwxError::TokenRejected { .. }) => "rejected",
            Err(_) => "error",
        };
        self.env
            .metrics
            .verifications
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.edit_state(|s| {
            if let Some(c) = s.current.as_mut().filter(|c| c.token.access_token == value) {
                match &result {
                    Ok(_) => c.verified_at = Some(now),
                    Err(AwxError::TokenRejected { .. }) => c.rejected_at = Some(now),
                    Err(_) => c.verify_failed_at = Some(now),
                }
            }
            Ok(())
        })
        .await?;
        match result {
            Ok(_) => {}
            Err(AwxError::TokenRejected { .. }) => {
                warn!("AWX rejects the token in the Secret; replacing it");
                self.env
                    .cluster
                    .publish(
                        self.token,
                        Event::warning(
                            "TokenRejected",
                            "AWX rejects the token in the Secret (deleted or revoked in AWX); \
                             issuing a new one",
                        ),
                    )
                    .await;
            }
            Err(e) => warn!(error = %e, "could not verify the token; trying again later"),
        }
        Ok(())
    }

    // ------------------------------------------------------------------ Kubernetes

    /// Makes the target Secret hold the current token (repairing edits and deletions).
    async fn write_target(&mut self) -> Result<(), Error> {
        let Some(current) = self.seen.state.current.clone() else {
            return Ok(());
        };
        let valid = self.valid()?.clone();
        if !self.target_holds_current() {
            // Consumers see the current token only from now on: the tokens it replaced get
            // their whole grace period from here (not from the start of this reconcile: the
            // grant, its tagging and the state writes came before). A twentieth of the period
            // (at most 2 s) early is left as it is: that saves a state write per renewal.
            let grace_end = schedule::add(self.env.clock.now(), valid.revoke_grace_period);
            let slack = schedule::sub(
                grace_end,
                (valid.revoke_grace_period / 20).min(Duration::from_secs(2)),
            );
            self.edit_state(|s| {
                for r in &mut s.retiring {
                    if r.failed_attempts == 0 && r.revoke_after < slack {
                        r.revoke_after = grace_end;
                    }
                }
                Ok(())
            })
            .await?;
        }
        let mut desired =
            secrets::render_target(self.token, &valid.secret_layout, &(&current).into());
        if self.seen.target_ownership == Ownership::Ours
            && let Some(existing) = &self.seen.target
        {
            desired.metadata.resource_version = existing.metadata.resource_version.clone();
        }
        let written = self.env.cluster.apply_secret(&desired).await?;
        self.seen.target = Some(written);
        self.seen.target_ownership = Ownership::Ours;
        Ok(())
    }

    // ------------------------------------------------------------------ consumers

    /// Restarts spec.rolloutRestartTargets for the token change the state records. A workload
    /// whose pod template was stamped at or after the change (by this AwxToken before a
    /// crash, or by another one) already has pods with the new token; one restarted less
    /// than `minInterval` ago waits. Failures are retried with the usual backoff.
    async fn restart(&mut self, now: Timestamp) -> Result<(), Error> {
        let Some(owed) = self.seen.state.restart.clone() else {
            return Ok(());
        };
        let targets = self.token.spec.rollout_restart_targets.clone();
        if targets.is_empty() {
            return self
                .edit_state(|s| {
                    s.restart = None;
                    Ok(())
                })
                .await;
        }
        let min_interval = self.valid()?.restart.min_interval;
        let ns = self.namespace();
        let mut restarted: Vec<WorkloadRef> = Vec::new();
        let mut wait: Option<Timestamp> = None;
        let mut errors: Vec<String> = Vec::new();
        let mut by_this: Vec<String> = Vec::new();
        for target in &targets {
            let found = match (&target.name, &target.selector) {
                (Some(name), _) => {
                    let id = WorkloadRef {
                        kind: target.kind,
                        name: name.clone(),
                    };
                    self.env
                        .cluster
                        .workload(&ns, &id)
                        .await
                        .map(|w| w.into_iter().collect::<Vec<_>>())
                        .map_err(|e| format!("reading {id}: {e}"))
                }
                (None, Some(selector)) => match crate::spec::label_selector(selector) {
                    Ok(selector) => self
                        .env
                        .cluster
                        .list_workloads(&ns, target.kind, &selector)
                        .await
                        .map_err(|e| format!("listing {:?}s ({selector}): {e}", target.kind)),
                    Err(e) => Err(e),
                },
                (None, None) => Ok(Vec::new()),
            };
            let found = match found {
                Ok(found) => found,
                Err(e) => {
                    self.count_restart(target.kind, "failed");
                    errors.push(e);
                    continue;
                }
            };
            if found.is_empty() {
                info!(kind = ?target.kind, name = ?target.name, "no workload to restart");
            }
            for workload in found {
                match self
                    .restart_one(&ns, workload, owed.since, min_interval, now)
                    .await
                {
                    Ok(Restart::Done(id, by_us)) => {
                        if by_us {
                            by_this.push(id.to_string());
                        }
                        restarted.push(id);
                    }
                    Ok(Restart::Wait(at)) => wait = wait.max(Some(at)),
                    Err(e) => errors.push(e),
                }
            }
        }
        let backoff = self.env.settings.backoff_base;
        let backoff_max = self.env.settings.backoff_max;
        let since = owed.since;
        let failed = !errors.is_empty();
        let message = errors.join("; ");
        self.edit_state(|s| {
            let Some(o) = s.restart.as_mut().filter(|o| o.since == since) else {
                // A newer change replaced this one: its own restart comes next.
                return Ok(());
            };
            if failed {
                o.attempts += 1;
                o.error = Some(message.clone());
                o.retry_after = Some(schedule::add(
                    now,
                    schedule::failure_backoff(o.attempts, backoff, backoff_max, 0.0),
                ));
            } else if let Some(at) = wait {
                o.error = None;
                o.retry_after = Some(at);
            } else {
                o.error = None;
                o.attempts = 0;
                o.retry_after = None;
                o.restarted = Some(Restarted {
                    at: now,
                    workloads: restarted.clone(),
                });
            }
            Ok(())
        })
        .await?;
        if !by_this.is_empty() {
            self.env
                .cluster
                .publish(
                    self.token,
                    Event::normal(
                        "WorkloadsRestarted",
                        format!(
                            "Restarted {} for the new token in Secret {}",
                            by_this.join(", "),
                            self.token.secret_name()
                        ),
                    ),
                )
                .await;
        }
        if failed {
            warn!(error = %message, "could not restart every workload; retrying");
            self.env
                .cluster
                .publish(
                    self.token,
                    Event::warning(
                        "RestartFailed",
                        format!("Could not restart the workloads for the new token: {message}"),
                    ),
                )
                .await;
        }
        Ok(())
    }

    /// Restarts one workload unless a restart since `since` already gave it the new token.
    async fn restart_one(
        &self,
        ns: &str,
        mut workload: Workload,
        since: Timestamp,
        min_interval: Duration,
        now: Timestamp,
    ) -> Result<Restart, String> {
        let kind = workload.id.kind;
        for _ in 0..MAX_CONFLICT_RETRIES {
            if workload.restarted_at.is_some_and(|at| at >= since) {
                self.count_restart(kind, "already_restarted");
                return Ok(Restart::Done(workload.id, false));
            }
            if let Some(last) = workload.restarted_at {
                let allowed = schedule::add(last, min_interval);
                if now < allowed {
                    debug!(workload = %workload.id, %allowed, "restarted recently; waiting for minInterval");
                    return Ok(Restart::Wait(allowed));
                }
            }
            match self.env.cluster.restart(ns, &workload, now).await {
                Ok(done) => {
                    self.count_restart(kind, "restarted");
                    info!(workload = %done.id, "restarted workload for the new token");
                    let secret = self.token.secret_name();
                    self.env
                        .cluster
                        .publish_on_workload(
                            ns,
                            &done,
                            Event::normal(
                                "RestartedForNewToken",
                                format!(
                                    "Restarted by AwxToken {}: the token in Secret {secret} changed",
                                    self.token.name_any()
                                ),
                            ),
                        )
                        .await;
                    return Ok(Restart::Done(done.id, true));
                }
                Err(Error::Conflict(_)) => {
                    // Changed since it was read (perhaps restarted by another AwxToken): read
                    // it again and decide anew.
                    match self.env.cluster.workload(ns, &workload.id).await {
                        Ok(Some(again)) => workload = again,
                        Ok(None) => return Ok(Restart::Done(workload.id, false)),
                        Err(e) => {
                            self.count_restart(kind, "failed");
                            return Err(format!("reading {}: {e}", workload.id));
                        }
                    }
                }
                Err(e) => {
                    self.count_restart(kind, "failed");
                    return Err(format!("restarting {}: {e}", workload.id));
                }
            }
        }
        self.count_restart(kind, "failed");
        Err(format!("{} keeps changing", workload.id))
    }

    fn count_restart(&self, kind: WorkloadKind, outcome: &'static str) {
        let kind = match kind {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
        };
        self.env
            .metrics
            .restarts
            .get_or_create(&RestartLabels { kind, outcome })
            .inc();
    }

    /// Looks at the rollouts of the restarted workloads: once all have finished (or the
    /// rollout timeout passed) the replaced tokens are due for revocation; a rollout still
    /// going after the grace period is warned about once.
    async fn check_rollout(&mut self, now: Timestamp) -> Result<(), Error> {
        self.rollout_checked = true;
        let Some(owed) = self.seen.state.restart.clone() else {
            return Ok(());
        };
        let Some(restarted) = owed.restarted.clone() else {
            return Ok(());
        };
        let valid = self.valid()?.clone();
        let ns = self.namespace();
        let mut waiting: Vec<String> = Vec::new();
        for id in &restarted.workloads {
            match self.env.cluster.workload(&ns, id).await {
                Ok(Some(w)) => {
                    if let Some(why) = w.rolling {
                        waiting.push(format!("{id}: {why}"));
                    }
                }
                // Deleted: no pods of it hold the old token.
                Ok(None) => {}
                Err(e) => waiting.push(format!("{id}: could not be read ({e})")),
            }
        }
        let names = || {
            restarted
                .workloads
                .iter()
                .map(|w| w.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let deadline = schedule::add(restarted.at, valid.restart.rollout_timeout);
        let since = owed.since;
        let ended = if waiting.is_empty() {
            info!(workloads = %names(), "rollout finished");
            self.env
                .metrics
                .rollouts
                .get_or_create(&OutcomeLabels {
                    outcome: "finished",
                })
                .inc();
            self.env
                .cluster
                .publish(
                    self.token,
                    Event::normal(
                        "RolloutFinished",
                        format!(
                            "{} finished the rollout with the new token; replaced tokens are \
                             revoked now",
                            if restarted.workloads.is_empty() {
                                "No workload".to_string()
                            } else {
                                names()
                            }
                        ),
                    ),
                )
                .await;
            Some(None)
        } else if now >= deadline {
            let message = format!(
                "The rollout did not finish within rolloutRestart.rolloutTimeout ({}): {}; the \
                 replaced token was revoked anyway",
                self.token.spec.rollout_restart.rollout_timeout,
                waiting.join("; ")
            );
            warn!(%message, "rollout timed out");
            self.env
                .metrics
                .rollouts
                .get_or_create(&OutcomeLabels {
                    outcome: "timed_out",
                })
                .inc();
            self.env
                .cluster
                .publish(
                    self.token,
                    Event::warning("RolloutTimedOut", message.clone()),
                )
                .await;
            Some(Some(message))
        } else {
            None
        };
        if let Some(timed_out) = ended {
            return self
                .edit_state(|s| {
                    if s.restart.as_ref().is_some_and(|o| o.since == since) {
                        s.restart = None;
                        s.rollout_timed_out = timed_out.clone();
                        for r in &mut s.retiring {
                            if r.failed_attempts == 0 {
                                r.revoke_after = r.revoke_after.min(now);
                            }
                        }
                    }
                    Ok(())
                })
                .await;
        }
        let late = schedule::add(restarted.at, valid.revoke_grace_period);
        if !owed.warned && now >= late && !self.seen.state.retiring.is_empty() {
            let message = format!(
                "The rollout is still going after revokeGracePeriod ({}): {}; the replaced \
                 token stays valid until it finishes or until {}",
                self.token.spec.renewal.revoke_grace_period,
                waiting.join("; "),
                deadline.strftime("%Y-%m-%dT%H:%M:%SZ")
            );
            warn!(%message, "rollout late");
            self.env
                .cluster
                .publish(self.token, Event::warning("RolloutNotFinished", message))
                .await;
            self.edit_state(|s| {
                if let Some(o) = s.restart.as_mut().filter(|o| o.since == since) {
                    o.warned = true;
                }
                Ok(())
            })
            .await?;
        }
        Ok(())
    }

    /// Reports the status and says when to look again.
    async fn finish(&mut self, now: Timestamp, wake: Wake) -> Result<Applied, Error> {
        let facts = self.facts(now);
        let old = self.token.status.clone().unwrap_or_default();
        let status = status::render(
            &facts,
            self.token.metadata.generation,
            &self.token.secret_name(),
            &old,
        );
        let failing_since = facts
            .state
            .failure
            .as_ref()
            .map(|f| f.failing_since().as_millisecond() as f64 / 1000.0);
        let schedule = facts
            .state
            .current
            .as_ref()
            .zip(facts.valid.ok())
            .map(|(c, v)| {
                (
                    c.expires_at.map(|t| t.as_millisecond() as f64 / 1000.0),
                    plan::renewal_time(facts.uid, c, v).as_millisecond() as f64 / 1000.0,
                )
            });
        if !status::same_when_stored(&status, &old) {
            let insecure_new = status
                .conditions
                .iter()
                .any(|c| c.type_ == status::INSECURE_TLS)
                && !old
                    .conditions
                    .iter()
                    .any(|c| c.type_ == status::INSECURE_TLS);
            if insecure_new {
                self.env
                    .cluster
                    .publish(
                        self.token,
                        Event::warning(
                            "InsecureSkipTlsVerify",
                            "AWX's TLS certificate is not verified; anyone on the path can read \
                             the credentials and tokens",
                        ),
                    )
                    .await;
            }
            self.env.cluster.apply_status(self.token, &status).await?;
        }
        let requeue_after = match wake {
            Wake::At(at) => Some(schedule::requeue_delay(now, at).max(Duration::from_millis(200))),
            Wake::OnChange => None,
        };
        Ok(Applied {
            action: requeue_after.map_or_else(Action::await_change, Action::requeue),
            requeue_after,
            failing_since,
            schedule,
            settled: true,
            connection_secrets: self.connection_secrets(),
        })
    }

    fn connection_secrets(&self) -> Vec<(String, String)> {
        self.via
            .map(|via| via.secrets(&self.token.spec.awx))
            .unwrap_or_default()
    }

    /// A deletion that cannot finish yet: the status says why, the error retries it then.
    async fn stuck_deletion(&mut self, now: Timestamp, retry_at: Timestamp) -> Error {
        let facts = self.facts(now);
        let blocked_hosts: Vec<String> = facts
            .state
            .retiring
            .iter()
            .filter_map(|r| r.token.url.as_deref())
            .filter_map(|u| url::Url::parse(u).ok())
            .map(|u| crate::spec::host_of(&u))
            .filter(|h| {
                facts
                    .allowed_hosts
                    .is_some_and(|a| !crate::decide::host_allowed(a, h))
            })
            .collect();
        let message = if let Some(host) = blocked_hosts.first() {
            format!(
                "AWX host {host:?} is not in the operator's --allowed-awx-hosts, so the tokens \
                 cannot be revoked there; no request was sent. To delete without revoking set \
                 annotation {}: \"true\"",
                crate::crd::SKIP_REVOKE_ANNOTATION
            )
        } else {
            format!(
                "Could not revoke every token in AWX on delete ({} left); retrying. To delete \
                 without revoking set annotation {}: \"true\"",
                facts.state.retiring.len() + facts.state.interrupted.len(),
                crate::crd::SKIP_REVOKE_ANNOTATION
            )
        };
        let mut status = self.token.status.clone().unwrap_or_default();
        status::set_condition(
            &mut status.conditions,
            status::READY,
            false,
            "RevokeFailed",
            &message,
            now,
        );
        if Some(&status) != self.token.status.as_ref() {
            self.env
                .cluster
                .publish(self.token, Event::warning("RevokeFailed", message.clone()))
                .await;
            if let Err(e) = self.env.cluster.apply_status(self.token, &status).await {
                return e;
            }
        }
        let retry_in = if blocked_hosts.is_empty() {
            schedule::requeue_delay(now, retry_at).max(Duration::from_millis(500))
        } else {
            schedule::MAX_REQUEUE
        };
        Error::Revoke { message, retry_in }
    }
}

/// What became of one restart target.
enum Restart {
    /// Its pods get the new token (restarted now, `true`, or since the change).
    Done(WorkloadRef, bool),
    /// Restarted too recently (rolloutRestart.minInterval): not before then.
    Wait(Timestamp),
}

/// What a successful attempt brought.
struct Obtained {
    issued: IssuedToken,
    flavor: Flavor,
    /// By refresh (the previous token is dead already) rather than the grant.
    refreshed: bool,
    /// An earlier request of the attempt lost its answer.
    lost_answer: bool,
}

/// The token as the state keeps it.
fn held_token(
    issued: &IssuedToken,
    flavor: Flavor,
    valid: &ValidSpec,
    inputs: &observe::Inputs,
    refreshed: bool,
    previous_user: Option<String>,
    now: Timestamp,
) -> HeldToken {
    use secrecy::ExposeSecret as _;
    let refresh_issued_at = issued.refresh_token.is_some().then_some(now);
    let app = inputs
        .client
        .as_ref()
        .filter(|_| !matches!(issued.kind, TokenKind::Personal));
    HeldToken {
        token: TokenRecord {
            url: Some(valid.url.to_string()),
            client_id: app.map(|c| c.client_id.clone()),
            client_secret: app
                .and_then(|c| c.client_secret.as_ref())
                .map(|s| Sensitive::new(s.expose_secret())),
            access_token: Sensitive::new(issued.access_token.expose_secret()),
            refresh_token: issued
                .refresh_token
                .as_ref()
                .map(|r| Sensitive::new(r.expose_secret())),
            token_id: issued.token_id,
            personal: matches!(issued.kind, TokenKind::Personal),
            gateway: flavor == Flavor::Gateway,
        },
        scope: issued.scope.clone(),
        user: issued
            .user
            .clone()
            .or_else(|| previous_user.filter(|_| refreshed))
            .or_else(|| inputs.username.clone()),
        issued_at: now,
        refresh_issued_at,
        expires_at: issued.expires_at,
        // Set by the caller; the plan recomputes it from the spec in force.
        renewal_time: now,
        inputs: inputs.fingerprint.clone(),
        verified_at: None,
        verify_failed_at: None,
        rejected_at: None,
        refresh_broken: false,
        clock_offset: issued
            .answered_at
            .map(|awx| awx.as_second() - now.as_second()),
        application_id: issued.application,
    }
}

/// How long after a request AWX may still finish it: its web server gives up on a request
/// after 120 s (uwsgi's harakiri, nginx's upstream timeout in AWX's deployment).
const LATE_COMMIT: Duration = Duration::from_secs(120);

/// Margin for the clocks of AWX and this process, and AWX's time to answer.
fn clock_margin(marker: &IssueIntent) -> Duration {
    if marker.clock_offset.is_some() {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(60)
    }
}

/// `t` on AWX's clock.
fn shift(t: Timestamp, offset: Option<i64>) -> Timestamp {
    let offset = offset.unwrap_or(0);
    let d = Duration::from_secs(offset.unsigned_abs());
    if offset >= 0 {
        schedule::add(t, d)
    } else {
        schedule::sub(t, d)
    }
}

/// When AWX can no longer be finishing the marker's request (on this process's clock).
fn late_end(marker: &IssueIntent, valid: Option<&ValidSpec>) -> Timestamp {
    let timeout = valid.map_or(Duration::from_secs(30), |v| v.timeout);
    // Past the end of the search window by a margin: the last search then looks up to it.
    schedule::add(
        marker.started_at,
        timeout.max(LATE_COMMIT) + clock_margin(marker) * 2,
    )
}

/// The creation times (on AWX's clock) of a token the marker's request may have made.
fn search_window(marker: &IssueIntent, valid: Option<&ValidSpec>) -> (Timestamp, Timestamp) {
    let start = shift(marker.started_at, marker.clock_offset);
    let timeout = valid.map_or(Duration::from_secs(30), |v| v.timeout);
    (
        schedule::sub(start, clock_margin(marker)),
        schedule::add(start, timeout.max(LATE_COMMIT) + clock_margin(marker)),
    )
}

/// Whether a listed token may be the untagged one a request of `application` created within
/// `window` (AWX's clock): an application token, untagged, not held. Checked here although
/// the listing asked AWX to filter: a server that ignores a filter must not widen what is
/// tagged or deleted.
fn untagged_candidate(
    t: &ListedToken,
    application: Option<u64>,
    (from, to): (Timestamp, Timestamp),
    held: &[u64],
) -> bool {
    let same_application = match application {
        Some(app) => t.application == Some(app),
        None => t.application.is_some(),
    };
    same_application
        && t.created.is_some_and(|c| from <= c && c <= to)
        && t.description.is_empty()
        && !held.contains(&t.id)
}

/// The ids of the tokens the state holds, where known.
/// A random tag for a token request, put into its token's description.
fn new_tag() -> String {
    format!("awxto-{:016x}", rand::random::<u64>())
}

fn held_ids(state: &TokenState) -> Vec<u64> {
    state
        .current
        .iter()
        .map(|c| &c.token)
        .chain(state.retiring.iter().map(|r| &r.token))
        .filter_map(|t| t.token_id)
        .collect()
}

fn scope(s: ScopeSpec) -> Scope {
    match s {
        ScopeSpec::Read => Scope::Read,
        ScopeSpec::Write => Scope::Write,
    }
}

pub fn grant_label(g: GrantType) -> &'static str {
    match g {
        GrantType::Password => "Password",
        GrantType::ClientCredentials => "ClientCredentials",
        GrantType::PersonalAccessToken => "PersonalAccessToken",
        GrantType::AuthorizationCode => "AuthorizationCode",
    }
}

fn capitalised(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod sign_in_tests {
    use super::*;

    /// The command a person runs to sign in again, exactly; no secret in it.
    #[test]
    fn an_expired_sign_in_names_the_exact_login_command() {
        let token: AwxToken = serde_json::from_value(serde_json::json!({
            "apiVersion": "awx-token-operator.io/v1alpha1", "kind": "AwxToken",
            "metadata": {"name": "ci-bot", "namespace": "apps"},
            "spec": {
                "awx": {"url": "https://awx.example.com/"},
                "grant": {"type": "AuthorizationCode",
                          "credentialsSecretRef": {"name": "ci-bot-sign-in"}},
            },
        }))
        .unwrap();
        let valid = crate::spec::validate(&token.spec).unwrap();
        assert_eq!(
            sign_in_expired_message(&token, Some(&valid), "app-id"),
            "the sign-in can no longer be renewed (its refresh token expired, was revoked or was \
             already used, or the user was disabled); sign in again with: awx-token-operator \
             login --url https://awx.example.com --client-id app-id --namespace apps --name ci-bot"
        );
    }
}
