//! Deterministic simulation of the reconciler under faults.
//!
//! The real plan and executor run against a Kubernetes API and an AWX kept in memory, on
//! tokio's paused clock. Each sequence, drawn from a seed, interleaves reconciles (sometimes
//! by two operator processes at once, which is what a leader losing its Lease amounts to)
//! with faults: AWX down, AWX answering 500, answers cut off after AWX acted, timeouts,
//! 409 conflicts from the other process, crashes between any two operations, clock jumps,
//! rotate annotations, password changes, tokens deleted in AWX, stale cached objects and
//! deletions. After every step the invariants are checked:
//!
//! - every token AWX holds is held by the state (current or retiring), or is the answer to a
//!   request whose outcome the operator did not learn and still remembers (a marker);
//!   application tokens of such requests are reported (`InterruptedIssue`);
//! - a target Secret that once held a token always holds one, and (strategy Reissue) one
//!   AWX accepts, unless AWX deleted it behind the operator's back;
//! - in any 60 s, an object sends at most 6 token requests, plus 2 for each reason to try at
//!   once (a new rotate value, new credentials, a process restart);
//! - no operator process sends AWX more than its rate limit in any one second;
//! - no token value appears in a status or an event.
//!
//! When a sequence ends the faults stop, and after enough reconciles every AwxToken must be
//! Ready with exactly its current token alive in AWX (deleted ones with none), no marker and
//! no replaced token left. A failing sequence prints its seed; `AWXTO_SIM_SEED=<seed>`
//! replays it, `AWXTO_SIM_SEQUENCES` sets how many run (default 10,000).

use std::{
    collections::{BTreeMap, HashMap},
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::Duration,
};

use jiff::Timestamp;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::ResourceExt;
use rand::{Rng, SeedableRng, rngs::StdRng};
use secrecy::{ExposeSecret as _, SecretString};

use super::{
    Clock, Settings,
    awx_api::{AwxApi, Connection, ExclusiveGuard},
    cluster::{Cluster, Event},
    execute::{self, Env},
    pace::RenewalPacer,
    status,
    workloads::Workload,
};
use crate::{
    Error,
    awx::{
        AwxError, AwxUser, ClientCredentials, Flavor, IssuedToken, ListedToken, Login,
        RequestLimits, RevocationCredentials, Scope, TokenGrant, TokenKind, TokenQuery,
        TokenToRevoke,
    },
    crd::{AwxToken, AwxTokenStatus, FlavorSpec, ROTATE_ANNOTATION, WorkloadKind},
    metrics::Metrics,
    secrets,
    state::{STATE_KEY, TokenState, WorkloadRef},
};

const NAMESPACE: &str = "sim";
const RPS: u32 = 5;
const APP_ID: &str = "app";
const APP_SECRET: &str = "app-secret-value";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ------------------------------------------------------------------ the world

/// What AWX does with the next requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outage {
    None,
    /// Nothing listens: connections are refused.
    Down,
    /// Every request is answered 500 (its database is gone).
    Failing,
}

#[derive(Clone, Debug)]
struct AwxTokenRow {
    id: u64,
    value: String,
    refresh: Option<String>,
    user: String,
    personal: bool,
    description: String,
    created: Timestamp,
    alive: bool,
    /// Deleted by an AWX admin, not by the operator.
    deleted_by_admin: bool,
}

#[derive(Clone, Debug)]
struct Request {
    at: tokio::time::Instant,
    holder: String,
    user: String,
    /// A request that may create a token (issue or refresh).
    obtains: bool,
}

struct World {
    rng: StdRng,
    // Kubernetes
    secrets: BTreeMap<String, Secret>,
    next_version: u64,
    statuses: HashMap<String, AwxTokenStatus>,
    /// Every status as written, serialised.
    status_writes: Vec<String>,
    events: Vec<(String, Event)>,
    // AWX
    passwords: HashMap<String, String>,
    tokens: Vec<AwxTokenRow>,
    next_id: u64,
    requests: Vec<Request>,
    outage: Outage,
    /// Probability that a request is cut off (after AWX acted) or times out.
    flakiness: f64,
    /// Log of reasons an object may try at once (rotate, new credentials, restarts).
    skips: Vec<(tokio::time::Instant, String)>,
    /// Every operation, when replaying one seed.
    trace: Option<Vec<String>>,
    /// The users see the application (AWX then creates its tokens through the REST API).
    app_visible: bool,
    /// The Deployment the object "restarted" names in rolloutRestartTargets.
    consumer: SimWorkload,
    /// Every token the target Secret of "restarted" held, in order.
    restarted_tokens: Vec<String>,
}

/// A Deployment whose rollouts finish at once.
#[derive(Default)]
struct SimWorkload {
    version: u64,
    restarted_at: Option<Timestamp>,
    restarts: u32,
}

impl SimWorkload {
    fn observed(&self) -> Workload {
        Workload {
            id: WorkloadRef {
                kind: WorkloadKind::Deployment,
                name: CONSUMER.into(),
            },
            uid: Some("consumer-uid".into()),
            resource_version: Some(self.version.to_string()),
            restarted_at: self.restarted_at,
            rolling: None,
        }
    }
}

const CONSUMER: &str = "consumer";

impl World {
    fn version(&mut self) -> String {
        self.next_version += 1;
        self.next_version.to_string()
    }

    fn trace(&mut self, what: impl FnOnce() -> String) {
        if let Some(t) = self.trace.as_mut() {
            t.push(what());
        }
    }

    fn token_mut(&mut self, value: &str) -> Option<&mut AwxTokenRow> {
        self.tokens.iter_mut().find(|t| t.value == value)
    }
}

/// One operator process: what it shares with the world, and whether it has crashed.
struct Process {
    holder: String,
    /// Operations left before the process dies (a crash between two operations).
    crash_after: Mutex<Option<usize>>,
    crashed: Mutex<bool>,
    /// Its renewal pacer (in memory: a new process starts with an empty one).
    pacer: RenewalPacer<super::PacedName>,
}

impl Process {
    fn new(holder: String) -> Arc<Self> {
        Arc::new(Self {
            holder,
            crash_after: Mutex::new(None),
            crashed: Mutex::new(false),
            pacer: RenewalPacer::new(NonZeroU32::new(RPS)),
        })
    }

    /// Counts one operation; `Err` when the process is (now) dead. `performed` says whether
    /// the fatal operation itself took effect (a crash after the request was sent).
    fn tick(&self, rng_says_performed: bool) -> Result<(), bool> {
        if *lock(&self.crashed) {
            return Err(false);
        }
        let mut left = lock(&self.crash_after);
        match left.as_mut() {
            Some(0) => {
                *lock(&self.crashed) = true;
                Err(rng_says_performed)
            }
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

#[derive(Clone)]
struct Sim {
    world: Arc<Mutex<World>>,
    process: Arc<Process>,
    limits: RequestLimits,
    start: (tokio::time::Instant, Timestamp),
}

impl Sim {
    /// Lets the other process run in between, sometimes.
    async fn interleave(&self) {
        let yields = lock(&self.world).rng.random_range(0..3);
        for _ in 0..yields {
            tokio::task::yield_now().await;
        }
    }

    fn crash_error() -> Error {
        Error::Conflict("simulated crash: the process is gone".into())
    }

    /// A Kubernetes operation: the process may die before it.
    async fn kube_op(&self) -> Result<(), Error> {
        self.interleave().await;
        let performed = lock(&self.world).rng.random_bool(0.5);
        match self.process.tick(performed) {
            Ok(()) => Ok(()),
            // A write that took effect just before the crash is modelled by the caller.
            Err(_) => Err(Self::crash_error()),
        }
    }
}

impl Clock for Sim {
    fn now(&self) -> Timestamp {
        let (instant, at) = self.start;
        crate::schedule::add(at, tokio::time::Instant::now() - instant)
    }
}

// ------------------------------------------------------------------ Kubernetes in memory

fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl Cluster for Sim {
    // The simulated AwxTokens carry spec.awx inline: no connection, no namespace to admit.
    async fn connection(
        &self,
        _namespace: &str,
        _r: &crate::connection::ConnectionRef,
    ) -> Result<Option<crate::connection::ConnectionView>, Error> {
        Ok(None)
    }

    async fn namespace_labels(
        &self,
        _namespace: &str,
    ) -> Result<Option<std::collections::BTreeMap<String, String>>, Error> {
        Ok(None)
    }

    async fn get_secret(&self, namespace: &str, name: &str) -> Result<Option<Secret>, Error> {
        self.kube_op().await?;
        Ok(lock(&self.world)
            .secrets
            .get(&key(namespace, name))
            .cloned())
    }

    async fn create_secret(&self, secret: &Secret) -> Result<Secret, Error> {
        self.kube_op().await?;
        let mut world = lock(&self.world);
        let summary = state_summary(secret);
        world.trace(|| format!("  k8s create {}: {summary}", secret.name_any()));
        let k = key(&secret.namespace().unwrap_or_default(), &secret.name_any());
        if world.secrets.contains_key(&k) {
            return Err(Error::Conflict("exists".into()));
        }
        let mut stored = secret.clone();
        stored.metadata.resource_version = Some(world.version());
        stored.metadata.uid = Some(format!("secret-uid-{}", world.next_version));
        world.secrets.insert(k, stored.clone());
        Ok(stored)
    }

    async fn replace_secret(&self, secret: &Secret) -> Result<Secret, Error> {
        self.kube_op().await?;
        let mut world = lock(&self.world);
        let summary = state_summary(secret);
        world.trace(|| format!("  k8s replace {}: {summary}", secret.name_any()));
        let k = key(&secret.namespace().unwrap_or_default(), &secret.name_any());
        let Some(existing) = world.secrets.get(&k).cloned() else {
            return Err(Error::Conflict("gone".into()));
        };
        if existing.metadata.resource_version != secret.metadata.resource_version {
            return Err(Error::Conflict("stale resourceVersion".into()));
        }
        let mut stored = secret.clone();
        stored.metadata.uid = existing.metadata.uid.clone();
        stored.metadata.resource_version = Some(world.version());
        world.secrets.insert(k, stored.clone());
        Ok(stored)
    }

    async fn apply_secret(&self, secret: &Secret) -> Result<Secret, Error> {
        self.kube_op().await?;
        let mut world = lock(&self.world);
        let k = key(&secret.namespace().unwrap_or_default(), &secret.name_any());
        let existing = world.secrets.get(&k).cloned();
        if let Some(wanted) = &secret.metadata.resource_version
            && existing
                .as_ref()
                .and_then(|e| e.metadata.resource_version.as_ref())
                != Some(wanted)
        {
            return Err(Error::Conflict("stale resourceVersion".into()));
        }
        let mut stored = secret.clone();
        stored.metadata.uid = existing
            .and_then(|e| e.metadata.uid)
            .or_else(|| Some(format!("secret-uid-{}", world.next_version + 1)));
        stored.metadata.resource_version = Some(world.version());
        if secret.name_any() == "restarted"
            && let Some(token) = secret.data.as_ref().and_then(|d| d.get("token"))
        {
            let token = String::from_utf8_lossy(&token.0).into_owned();
            if world.restarted_tokens.last() != Some(&token) {
                world.restarted_tokens.push(token);
            }
        }
        world.secrets.insert(k, stored.clone());
        Ok(stored)
    }

    async fn apply_status(&self, token: &AwxToken, status: &AwxTokenStatus) -> Result<(), Error> {
        self.kube_op().await?;
        let mut world = lock(&self.world);
        world
            .status_writes
            .push(serde_json::to_string(status).unwrap_or_default());
        world.statuses.insert(token.name_any(), status.clone());
        Ok(())
    }

    async fn publish(&self, token: &AwxToken, event: Event) {
        if self.kube_op().await.is_ok() {
            lock(&self.world).events.push((token.name_any(), event));
        }
    }

    async fn list_workloads(
        &self,
        _: &str,
        _: WorkloadKind,
        _: &str,
    ) -> Result<Vec<Workload>, Error> {
        self.kube_op().await?;
        Ok(vec![lock(&self.world).consumer.observed()])
    }

    async fn workload(&self, _: &str, id: &WorkloadRef) -> Result<Option<Workload>, Error> {
        self.kube_op().await?;
        let world = lock(&self.world);
        Ok((id.name == CONSUMER).then(|| world.consumer.observed()))
    }

    async fn restart(
        &self,
        _: &str,
        workload: &Workload,
        at: Timestamp,
    ) -> Result<Workload, Error> {
        self.kube_op().await?;
        let mut world = lock(&self.world);
        if workload.resource_version != Some(world.consumer.version.to_string()) {
            return Err(Error::Conflict("stale resourceVersion".into()));
        }
        world.trace(|| format!("  k8s restart {CONSUMER} at {at}"));
        world.consumer.version += 1;
        world.consumer.restarted_at = Some(at);
        world.consumer.restarts += 1;
        Ok(world.consumer.observed())
    }

    async fn publish_on_workload(&self, _: &str, _: &Workload, event: Event) {
        if self.kube_op().await.is_ok() {
            lock(&self.world).events.push((CONSUMER.into(), event));
        }
    }
}

/// What a state Secret holds, for traces.
fn state_summary(secret: &Secret) -> String {
    let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(STATE_KEY)) else {
        return "(no state)".into();
    };
    let state = TokenState::decode(&bytes.0).unwrap_or_default();
    format!(
        "current {:?}, retiring {:?}, marker {:?}, interrupted {}, failure {:?}",
        state.current.as_ref().map(|c| c
            .token
            .access_token
            .expose()
            .get(..9)
            .unwrap_or("")
            .to_string()),
        state
            .retiring
            .iter()
            .map(|r| r
                .token
                .access_token
                .expose()
                .get(..9)
                .unwrap_or("")
                .to_string())
            .collect::<Vec<_>>(),
        state.issuing.as_ref().map(|m| m.holder.clone()),
        state.interrupted.len(),
        state
            .failure
            .as_ref()
            .map(|f| (f.attempts, f.reason.clone())),
    )
}

// ------------------------------------------------------------------ AWX in memory

/// How one AWX request ends: the fault decided before it runs.
enum Fate {
    /// Answered normally.
    Answer,
    /// Refused connection: nothing happens.
    Refused,
    /// A complete 500: nothing happens.
    ServerError,
    /// AWX acts, the answer is lost (a cut body, a reset, a timeout after sending).
    Lost,
    /// A timeout before AWX got to it.
    TimedOutBefore,
    /// The process dies after AWX acted (or before, `performed` false).
    Crash { performed: bool },
}

fn at() -> String {
    "POST https://awx.sim/api/o/token/".into()
}

impl Sim {
    /// Waits for the rate limiter, logs the request and decides its fate.
    async fn request(&self, user: &str, obtains: bool) -> Fate {
        self.interleave().await;
        let performed = lock(&self.world).rng.random_bool(0.5);
        if let Err(performed_before_death) = self.process.tick(performed) {
            if !*lock(&self.process.crashed) || !performed_before_death {
                return Fate::Crash { performed: false };
            }
            // The crash came with this request on its way: AWX may act on it.
            let _admission = self.limits.admit().await;
            self.log(user, obtains);
            return Fate::Crash { performed: true };
        }
        let _admission = self.limits.admit().await;
        let mut world = lock(&self.world);
        match world.outage {
            Outage::Down => return Fate::Refused,
            Outage::Failing => {
                drop(world);
                self.log(user, obtains);
                return Fate::ServerError;
            }
            Outage::None => {}
        }
        let flaky = world.flakiness;
        let roll: f64 = world.rng.random();
        drop(world);
        self.log(user, obtains);
        if roll < flaky / 2.0 {
            Fate::Lost
        } else if roll < flaky {
            Fate::TimedOutBefore
        } else {
            Fate::Answer
        }
    }

    fn log(&self, user: &str, obtains: bool) {
        let holder = self.process.holder.clone();
        lock(&self.world)
            .trace(|| format!("  awx request by {holder} for {user} (obtains: {obtains})"));
        lock(&self.world).requests.push(Request {
            at: tokio::time::Instant::now(),
            holder: self.process.holder.clone(),
            user: user.to_string(),
            obtains,
        });
    }

    fn fate_error(fate: &Fate) -> Option<AwxError> {
        match fate {
            Fate::Answer => None,
            Fate::Refused | Fate::Crash { performed: false } => Some(AwxError::AwxUnreachable {
                at: at(),
                host: "awx.sim:443".into(),
                detail: "connection refused".into(),
                sent: false,
            }),
            Fate::ServerError => Some(AwxError::AwxServerError {
                at: at(),
                status: 500,
                detail: None,
                hint: "",
            }),
            Fate::Lost | Fate::Crash { performed: true } => Some(AwxError::AwxUnreachable {
                at: at(),
                host: "awx.sim:443".into(),
                detail: "the connection failed before a complete answer came".into(),
                sent: true,
            }),
            Fate::TimedOutBefore => Some(AwxError::Timeout {
                at: at(),
                host: "awx.sim:443".into(),
                timeout: Duration::from_secs(30),
                sent: true,
            }),
        }
    }

    /// Whether AWX acted on a request of this fate.
    fn acted(fate: &Fate) -> bool {
        matches!(
            fate,
            Fate::Answer | Fate::Lost | Fate::Crash { performed: true }
        )
    }

    fn create(&self, user: &str, personal: bool, description: &str) -> IssuedToken {
        let created = Clock::now(self);
        let mut world = lock(&self.world);
        world.next_id += 1;
        let id = world.next_id;
        world.trace(|| format!("  awx created token {id} for {user} ({description})"));
        let value = format!("tok{id:06}sim{:012x}", world.rng.random::<u64>() >> 16);
        let refresh =
            (!personal).then(|| format!("ref{id:06}sim{:012x}", world.rng.random::<u64>() >> 16));
        world.tokens.push(AwxTokenRow {
            id,
            value: value.clone(),
            refresh: refresh.clone(),
            user: user.to_string(),
            personal,
            description: description.to_string(),
            created,
            alive: true,
            deleted_by_admin: false,
        });
        IssuedToken {
            access_token: SecretString::from(value),
            refresh_token: refresh.map(SecretString::from),
            expires_at: None,
            scope: "write".into(),
            // Tokens created through the REST API (with a description) come with their id.
            token_id: (!description.is_empty()).then_some(id),
            user: Some(user.to_string()),
            kind: if personal {
                TokenKind::Personal
            } else {
                TokenKind::Application
            },
            application: (!personal && !description.is_empty()).then_some(1),
            answered_at: Some(created),
        }
    }

    /// The user a REST call authenticates as (one request), or why not.
    async fn login_user(&self, login: Login<'_>) -> Result<String, AwxError> {
        let claimed = match login {
            Login::Password { username, .. } => username.to_string(),
            Login::Bearer(_) => String::new(),
        };
        let fate = self.request(&claimed, false).await;
        if let Some(e) = Self::fate_error(&fate) {
            return Err(e);
        }
        match login {
            Login::Password { username, password } if self.login_ok(username, password) => {
                Ok(username.to_string())
            }
            Login::Bearer(token) => lock(&self.world)
                .tokens
                .iter()
                .find(|t| t.alive && t.value == token.expose_secret())
                .map(|t| t.user.clone())
                .ok_or(AwxError::TokenRejected {
                    at: at(),
                    status: 401,
                }),
            _ => Err(refused_login()),
        }
    }

    fn login_ok(&self, username: &str, password: &SecretString) -> bool {
        lock(&self.world)
            .passwords
            .get(username)
            .map(String::as_str)
            == Some(password.expose_secret())
    }
}

fn refused_login() -> AwxError {
    AwxError::InvalidCredentials {
        at: at(),
        status: 400,
        description: Some("invalid_grant: Invalid credentials given.".into()),
    }
}

impl AwxApi for Sim {
    async fn flavor(&self, _: &Connection, _: FlavorSpec) -> Result<Flavor, AwxError> {
        Ok(Flavor::Controller)
    }

    async fn issue(
        &self,
        _: &Connection,
        _: Flavor,
        grant: &TokenGrant,
        _: Scope,
    ) -> Result<IssuedToken, AwxError> {
        let (username, password, personal, description) = match grant {
            TokenGrant::Password {
                username, password, ..
            } => (username.clone(), password.clone(), false, String::new()),
            TokenGrant::PersonalAccessToken {
                username,
                password,
                description,
            } => (
                username.clone(),
                password.clone(),
                true,
                description.clone(),
            ),
            TokenGrant::ClientCredentials { .. } | TokenGrant::PersonalAccessTokenAs { .. } => {
                unreachable!("not simulated")
            }
        };
        let fate = self.request(&username, true).await;
        let ok = self.login_ok(&username, &password);
        let issued =
            (Self::acted(&fate) && ok).then(|| self.create(&username, personal, &description));
        match (Self::fate_error(&fate), issued) {
            (Some(e), _) => Err(e),
            (None, Some(issued)) => Ok(issued),
            (None, None) => Err(refused_login()),
        }
    }

    async fn refresh(
        &self,
        _: &Connection,
        _: Flavor,
        _: &ClientCredentials,
        refresh_token: &SecretString,
        _: Scope,
    ) -> Result<IssuedToken, AwxError> {
        let owner = {
            let world = lock(&self.world);
            world
                .tokens
                .iter()
                .find(|t| t.refresh.as_deref() == Some(refresh_token.expose_secret()))
                .map(|t| (t.user.clone(), t.alive, t.deleted_by_admin))
        };
        let user = owner.as_ref().map(|o| o.0.clone()).unwrap_or_default();
        let fate = self.request(&user, true).await;
        let mut result = None;
        if Self::acted(&fate) {
            result = match owner {
                // The refresh token is used up once its chain moved on.
                Some((_, false, false)) | None => Some(Err(AwxError::RefreshTokenInvalid {
                    at: at(),
                    status: 400,
                    description: None,
                })),
                // Its access token was deleted by an admin: AWX fails with 500 on it.
                Some((_, false, true)) => Some(Err(AwxError::AwxServerError {
                    at: at(),
                    status: 500,
                    detail: None,
                    hint: "",
                })),
                Some((user, true, _)) => {
                    let mut world = lock(&self.world);
                    if let Some(old) = world
                        .tokens
                        .iter_mut()
                        .find(|t| t.refresh.as_deref() == Some(refresh_token.expose_secret()))
                    {
                        old.alive = false;
                        old.refresh = Some(format!("used-{}", old.id));
                    }
                    drop(world);
                    Some(Ok(self.create(&user, false, "")))
                }
            };
        }
        match (Self::fate_error(&fate), result) {
            (Some(e), _) => Err(e),
            (None, Some(r)) => r,
            (None, None) => unreachable!("an answered request acts"),
        }
    }

    async fn revoke(
        &self,
        _: &Connection,
        _: Flavor,
        token: &TokenToRevoke,
        _: &RevocationCredentials,
    ) -> Result<(), AwxError> {
        let fate = self.request("revoke", false).await;
        if Self::acted(&fate) {
            let mut world = lock(&self.world);
            if let Some(t) = world.token_mut(token.access_token.expose_secret()) {
                t.alive = false;
            }
        }
        match Self::fate_error(&fate) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn whoami(
        &self,
        _: &Connection,
        _: Flavor,
        token: &SecretString,
    ) -> Result<AwxUser, AwxError> {
        let fate = self.request("whoami", false).await;
        if let Some(e) = Self::fate_error(&fate) {
            return Err(e);
        }
        let world = lock(&self.world);
        match world
            .tokens
            .iter()
            .find(|t| t.value == token.expose_secret() && t.alive)
        {
            Some(t) => Ok(AwxUser {
                id: None,
                username: t.user.clone(),
            }),
            None => Err(AwxError::TokenRejected {
                at: at(),
                status: 401,
            }),
        }
    }

    async fn application_id(
        &self,
        _: &Connection,
        _: Flavor,
        username: &str,
        password: &SecretString,
        _: &str,
    ) -> Result<Option<u64>, AwxError> {
        let fate = self.request(username, false).await;
        if let Some(e) = Self::fate_error(&fate) {
            return Err(e);
        }
        if !self.login_ok(username, password) {
            return Err(refused_login());
        }
        Ok(lock(&self.world).app_visible.then_some(1))
    }

    async fn list_tokens(
        &self,
        _: &Connection,
        _: Flavor,
        login: Login<'_>,
        query: &TokenQuery<'_>,
    ) -> Result<Vec<ListedToken>, AwxError> {
        let user = self.login_user(login).await?;
        let mut world = lock(&self.world);
        world.trace(|| {
            format!(
                "  awx lists tokens of {user}: from {:?} to {:?}, personal {:?}, tag {:?}",
                query.created_from, query.created_to, query.personal, query.description_contains
            )
        });
        Ok(world
            .tokens
            .iter()
            .filter(|t| t.alive && t.user == user)
            .filter(|t| query.username.is_none_or(|u| u == t.user))
            .filter(|t| query.personal.is_none_or(|p| p == t.personal))
            .filter(|t| query.created_from.is_none_or(|f| t.created >= f))
            .filter(|t| query.created_to.is_none_or(|to| t.created <= to))
            .filter(|t| {
                query
                    .description_contains
                    .is_none_or(|d| t.description.contains(d))
            })
            .map(|t| ListedToken {
                id: t.id,
                user: None,
                application: (!t.personal).then_some(1),
                created: Some(t.created),
                description: t.description.clone(),
            })
            .collect())
    }

    async fn describe_token(
        &self,
        _: &Connection,
        _: Flavor,
        login: Login<'_>,
        id: u64,
        description: &str,
    ) -> Result<(), AwxError> {
        let user = self.login_user(login).await?;
        let mut world = lock(&self.world);
        world.trace(|| format!("  awx tagged token {id} ({description})"));
        if let Some(t) = world
            .tokens
            .iter_mut()
            .find(|t| t.id == id && t.alive && t.user == user)
        {
            t.description = description.to_string();
        }
        Ok(())
    }

    async fn delete_token_as(
        &self,
        _: &Connection,
        _: Flavor,
        login: Login<'_>,
        id: u64,
    ) -> Result<(), AwxError> {
        let user = self.login_user(login).await?;
        let mut world = lock(&self.world);
        world.trace(|| format!("  awx deleted token {id}"));
        if let Some(t) = world
            .tokens
            .iter_mut()
            .find(|t| t.id == id && t.user == user)
        {
            t.alive = false;
        }
        Ok(())
    }

    async fn exclusive(&self, _: String) -> ExclusiveGuard {
        // One reconcile at a time per process in the simulation: nothing to hold off.
        ExclusiveGuard::none()
    }
}

// ------------------------------------------------------------------ the objects

struct Object {
    token: AwxToken,
    /// The token as last written, for reconciles of a stale cached copy.
    stale: Option<AwxToken>,
    user: String,
    refresh: bool,
    deleted: bool,
    /// Its target Secret once held a token.
    filled: bool,
    /// When the controller would reconcile it again by itself (a requeue), if it would.
    wake: Option<tokio::time::Instant>,
}

fn object(name: &str, grant: &str, refresh: bool, uid: u32) -> Object {
    let user = format!("{name}-bot");
    let mut renewal = serde_json::json!({"rotateEvery": "1h", "revokeGracePeriod": "5m"});
    if refresh {
        renewal["strategy"] = "Refresh".into();
    }
    if name == "verified" {
        renewal["verifyEvery"] = "10m".into();
    }
    let restart_targets = if name == "restarted" {
        serde_json::json!([{"kind": "Deployment", "name": CONSUMER}])
    } else {
        serde_json::json!([])
    };
    let mut token: AwxToken = serde_json::from_value(serde_json::json!({
        "apiVersion": "awx-token-operator.io/v1alpha1",
        "kind": "AwxToken",
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": format!("uid-{uid}"), "generation": 1},
        "spec": {
            "awx": {"url": "https://awx.sim", "flavor": "Controller"},
            "grant": {"type": grant, "credentialsSecretRef": {"name": format!("{name}-creds")}},
            "renewal": renewal,
            "rolloutRestartTargets": restart_targets,
            "rolloutRestart": {"delay": "5s", "minInterval": "30s", "rolloutTimeout": "10m"},
        },
    }))
    .expect("a valid AwxToken");
    token.metadata.resource_version = Some("1".into());
    Object {
        token,
        stale: None,
        user,
        refresh,
        deleted: false,
        filled: false,
        wake: None,
    }
}

fn credentials_secret(name: &str, user: &str, password: &str) -> Secret {
    let data = |v: &str| ByteString(v.as_bytes().to_vec());
    let mut secret = Secret::default();
    secret.metadata.name = Some(format!("{name}-creds"));
    secret.metadata.namespace = Some(NAMESPACE.into());
    secret.metadata.resource_version = Some("1".into());
    secret.data = Some(BTreeMap::from([
        ("username".to_string(), data(user)),
        ("password".to_string(), data(password)),
        ("client_id".to_string(), data(APP_ID)),
        ("client_secret".to_string(), data(APP_SECRET)),
    ]));
    secret
}

// ------------------------------------------------------------------ a sequence

struct Run {
    world: Arc<Mutex<World>>,
    objects: Vec<Object>,
    processes: Vec<Arc<Process>>,
    limits: Vec<RequestLimits>,
    start: (tokio::time::Instant, Timestamp),
    settings: Settings,
    metrics: Metrics,
    log: Vec<String>,
    next_holder: u32,
    /// Requests and events already checked (checks look at what is new).
    checked_requests: usize,
    checked_events: usize,
    checked_statuses: usize,
    /// Reconciles whose plan ran out of steps without reaching `Done`.
    unsettled: Vec<String>,
}

impl Run {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let flakiness = if rng.random_bool(0.5) { 0.0 } else { 0.15 };
        let app_visible = rng.random_bool(0.5);
        let objects = vec![
            object("reissue", "Password", false, 1),
            object("refresh", "Password", true, 2),
            object("personal", "PersonalAccessToken", false, 3),
            object("verified", "Password", false, 4),
            object("restarted", "Password", false, 5),
        ];
        let mut world = World {
            rng,
            secrets: BTreeMap::new(),
            next_version: 100,
            statuses: HashMap::new(),
            status_writes: Vec::new(),
            events: Vec::new(),
            passwords: HashMap::new(),
            tokens: Vec::new(),
            next_id: 0,
            requests: Vec::new(),
            outage: Outage::None,
            flakiness,
            skips: Vec::new(),
            trace: std::env::var("AWXTO_SIM_SEED").is_ok().then(Vec::new),
            app_visible,
            consumer: SimWorkload::default(),
            restarted_tokens: Vec::new(),
        };
        for o in &objects {
            let password = format!("pw-{}-0", o.user);
            world.passwords.insert(o.user.clone(), password.clone());
            let secret = credentials_secret(&o.token.name_any(), &o.user, &password);
            world
                .secrets
                .insert(key(NAMESPACE, &secret.name_any()), secret);
        }
        let mut run = Self {
            world: Arc::new(Mutex::new(world)),
            objects,
            processes: Vec::new(),
            limits: Vec::new(),
            start: (
                tokio::time::Instant::now(),
                Timestamp::from_second(1_900_000_000).unwrap(),
            ),
            settings: Settings::default(),
            metrics: Metrics::new(),
            log: Vec::new(),
            next_holder: 0,
            checked_requests: 0,
            checked_events: 0,
            checked_statuses: 0,
            unsettled: Vec::new(),
        };
        run.spawn_process();
        run
    }

    fn rng<R>(&self, f: impl FnOnce(&mut StdRng) -> R) -> R {
        f(&mut lock(&self.world).rng)
    }

    fn spawn_process(&mut self) {
        self.next_holder += 1;
        self.processes.push(Process::new(format!(
            "sim-operator/{:04}",
            self.next_holder
        )));
        self.limits
            .push(RequestLimits::new(NonZeroU32::new(RPS), Some(2)));
    }

    fn sim(&self, p: usize) -> Sim {
        Sim {
            world: self.world.clone(),
            process: self.processes[p].clone(),
            limits: self.limits[p].clone(),
            start: self.start,
        }
    }

    /// A crashed process is replaced by a new one (a new holder, nothing in memory).
    fn replace_crashed(&mut self) {
        for p in 0..self.processes.len() {
            if *lock(&self.processes[p].crashed) {
                self.next_holder += 1;
                self.processes[p] = Process::new(format!("sim-operator/{:04}", self.next_holder));
                self.limits[p] = RequestLimits::new(NonZeroU32::new(RPS), Some(2));
                let now = tokio::time::Instant::now();
                let mut world = lock(&self.world);
                for o in &self.objects {
                    world.skips.push((now, o.user.clone()));
                }
            }
        }
    }

    async fn reconcile(&mut self, i: usize, p: usize, stale: bool) {
        let sim = self.sim(p);
        let mut settings = self.settings.clone();
        settings.identity = sim.process.holder.clone();
        let object = &self.objects[i];
        let mut token = if stale {
            object.stale.clone().unwrap_or_else(|| object.token.clone())
        } else {
            object.token.clone()
        };
        // The status as the watch cache would show it (possibly before the last writes).
        if !stale {
            token.status = lock(&self.world).statuses.get(&token.name_any()).cloned();
        }
        let env = Env {
            cluster: &sim,
            awx: &sim,
            clock: &sim,
            settings: &settings,
            metrics: &self.metrics,
            pacer: &sim.process.pacer,
        };
        let result = if object.deleted {
            execute::cleanup(&token, &env).await.map(|()| None)
        } else {
            execute::apply(&token, &env).await.map(|a| {
                if !a.settled {
                    self.unsettled.push(token.name_any());
                }
                a.requeue_after
            })
        };
        // What kube-runtime would do next by itself: requeue as asked, or (an error) retry
        // after its error backoff.
        self.objects[i].wake = match &result {
            Ok(Some(after)) => Some(tokio::time::Instant::now() + *after),
            Ok(None) => None,
            Err(e) => {
                Some(tokio::time::Instant::now() + e.retry_in().unwrap_or(Duration::from_secs(1)))
            }
        };
        if let Some(trace) = lock(&self.world).trace.as_mut() {
            self.log.append(trace);
        }
        self.log.push(format!(
            "reconcile {} by {}{}: {}",
            token.name_any(),
            sim.process.holder,
            if stale { " (stale copy)" } else { "" },
            match &result {
                Ok(_) => "ok".to_string(),
                Err(e) => e.to_string(),
            }
        ));
        self.objects[i].stale = Some(token);
    }

    /// Two processes reconciling the same object at once.
    async fn reconcile_twice(&mut self, i: usize) {
        if self.processes.len() < 2 {
            self.spawn_process();
        }
        let (a, b) = (self.sim(0), self.sim(1));
        let object = &self.objects[i];
        let mut token = object.token.clone();
        token.status = lock(&self.world).statuses.get(&token.name_any()).cloned();
        let settings_a = Settings {
            identity: a.process.holder.clone(),
            ..self.settings.clone()
        };
        let settings_b = Settings {
            identity: b.process.holder.clone(),
            ..self.settings.clone()
        };
        let env_a = Env {
            cluster: &a,
            awx: &a,
            clock: &a,
            settings: &settings_a,
            metrics: &self.metrics,
            pacer: &a.process.pacer,
        };
        let env_b = Env {
            cluster: &b,
            awx: &b,
            clock: &b,
            settings: &settings_b,
            metrics: &self.metrics,
            pacer: &b.process.pacer,
        };
        let deleted = object.deleted;
        let (ra, rb) = if deleted {
            let (x, y) = futures::join!(
                execute::cleanup(&token, &env_a),
                execute::cleanup(&token, &env_b)
            );
            (x.map(drop), y.map(drop))
        } else {
            let (x, y) = futures::join!(
                execute::apply(&token, &env_a),
                execute::apply(&token, &env_b)
            );
            for applied in [&x, &y].into_iter().flatten() {
                if !applied.settled {
                    self.unsettled.push(token.name_any());
                }
            }
            (x.map(drop), y.map(drop))
        };
        if let Some(trace) = lock(&self.world).trace.as_mut() {
            self.log.append(trace);
        }
        self.log.push(format!(
            "reconcile {} by both processes: {:?} / {:?}",
            token.name_any(),
            ra.map_err(|e| e.to_string()),
            rb.map_err(|e| e.to_string())
        ));
    }

    /// A reconcile, then those its own writes trigger (the watch sees them), as kube-runtime
    /// would run them.
    async fn reconcile_and_follow(&mut self, i: usize, p: usize, stale: bool) {
        let before = lock(&self.world).next_version;
        self.reconcile(i, p, stale).await;
        let mut seen = lock(&self.world).next_version;
        let mut follow = 0;
        while seen != before && follow < 3 && !*lock(&self.processes[p].crashed) {
            follow += 1;
            let written = seen;
            self.reconcile(i, p, false).await;
            seen = lock(&self.world).next_version;
            if seen == written {
                break;
            }
        }
    }

    /// Moves the clock on by `secs`, running every requeue that comes due on the way.
    async fn advance(&mut self, secs: u64) {
        let until = tokio::time::Instant::now() + Duration::from_secs(secs);
        for _ in 0..200 {
            let due = self
                .objects
                .iter()
                .enumerate()
                .filter_map(|(i, o)| o.wake.map(|w| (w, i)))
                .filter(|(w, _)| *w <= until)
                .min();
            let Some((at, i)) = due else { break };
            let now = tokio::time::Instant::now();
            if at > now {
                tokio::time::advance(at - now).await;
            }
            self.reconcile_and_follow(i, 0, false).await;
            self.replace_crashed();
        }
        let now = tokio::time::Instant::now();
        if until > now {
            tokio::time::advance(until - now).await;
        }
    }

    async fn step(&mut self) {
        let n = self.objects.len();
        let choice = self.rng(|r| r.random_range(0..100));
        let i = self.rng(|r| r.random_range(0..n));
        match choice {
            0..=39 => {
                let stale = self.rng(|r| r.random_bool(0.15));
                if self.rng(|r| r.random_bool(0.15)) {
                    let ops = self.rng(|r| r.random_range(0..12));
                    *lock(&self.processes[0].crash_after) = Some(ops);
                }
                self.reconcile_and_follow(i, 0, stale).await;
                *lock(&self.processes[0].crash_after) = None;
            }
            40..=49 => self.reconcile_twice(i).await,
            50..=64 => {
                let secs = self.rng(|r| match r.random_range(0..4) {
                    0 => r.random_range(0..3),
                    1 => r.random_range(3..60),
                    2 => r.random_range(60..900),
                    _ => r.random_range(900..4000),
                });
                self.log.push(format!("clock +{secs}s"));
                self.advance(secs).await;
            }
            65..=71 => {
                let outage = self.rng(|r| match r.random_range(0..3) {
                    0 => Outage::None,
                    1 => Outage::Down,
                    _ => Outage::Failing,
                });
                self.log.push(format!("AWX {outage:?}"));
                lock(&self.world).outage = outage;
            }
            72..=79 => {
                let value = self.rng(|r| r.random_range(0..1000)).to_string();
                self.log.push(format!(
                    "rotate {} = {value}",
                    self.objects[i].token.name_any()
                ));
                self.objects[i]
                    .token
                    .annotations_mut()
                    .insert(ROTATE_ANNOTATION.into(), value);
                let user = self.objects[i].user.clone();
                lock(&self.world)
                    .skips
                    .push((tokio::time::Instant::now(), user));
            }
            80..=85 => {
                // A new password, in AWX and then (maybe later) in the credentials Secret.
                let o = &self.objects[i];
                let version = self.rng(|r| r.random_range(1..1000));
                let password = format!("pw-{}-{version}", o.user);
                let name = o.token.name_any();
                let user = o.user.clone();
                self.log.push(format!("password of {user} changed"));
                let mut world = lock(&self.world);
                world.passwords.insert(user.clone(), password.clone());
                let mut secret = credentials_secret(&name, &user, &password);
                secret.metadata.resource_version = Some(world.version());
                world
                    .secrets
                    .insert(key(NAMESPACE, &secret.name_any()), secret);
                world.skips.push((tokio::time::Instant::now(), user));
            }
            86..=89 => {
                // An admin deletes the token in the Secret behind the operator's back.
                let name = self.objects[i].token.secret_name();
                let mut world = lock(&self.world);
                let held = world
                    .secrets
                    .get(&key(NAMESPACE, &name))
                    .and_then(|s| s.data.as_ref()?.get("token").cloned());
                if let Some(value) = held {
                    let value = String::from_utf8_lossy(&value.0).into_owned();
                    if let Some(t) = world.token_mut(&value) {
                        t.alive = false;
                        t.deleted_by_admin = true;
                    }
                    drop(world);
                    self.log.push(format!("admin deleted the token of {name}"));
                }
            }
            90..=92 => {
                if !self.objects[i].deleted {
                    self.log
                        .push(format!("delete {}", self.objects[i].token.name_any()));
                    self.objects[i].deleted = true;
                }
            }
            _ => {
                // Reconcile every object (what a resync does).
                for j in 0..n {
                    self.reconcile(j, 0, false).await;
                }
            }
        }
        self.replace_crashed();
    }

    fn state_of(&self, o: &Object) -> Option<TokenState> {
        let world = lock(&self.world);
        let secret = world.secrets.get(&key(
            NAMESPACE,
            &secrets::state_secret_name(&o.token.name_any()),
        ))?;
        let bytes = secret.data.as_ref()?.get(STATE_KEY)?.0.clone();
        Some(TokenState::decode(&bytes).expect("the state Secret is readable"))
    }

    /// The invariants that hold after every step.
    fn check(&mut self) -> Result<(), String> {
        if let Some(name) = self.unsettled.first() {
            return Err(format!(
                "a reconcile of {name} ran out of steps: the plan did not settle"
            ));
        }
        let states: Vec<(usize, TokenState)> = self
            .objects
            .iter()
            .enumerate()
            .filter_map(|(i, o)| self.state_of(o).map(|s| (i, s)))
            .collect();
        let world = lock(&self.world);
        // Every live token is held, or the answer to a request still remembered by a marker.
        for t in world.tokens.iter().filter(|t| t.alive) {
            let Some(i) = self.objects.iter().position(|o| o.user == t.user) else {
                continue;
            };
            let state = states.iter().find(|(j, _)| *j == i).map(|(_, s)| s);
            let held = state.is_some_and(|s| s.holds(&t.value));
            let marked = state.is_some_and(|s| {
                s.issuing.iter().chain(&s.interrupted).any(|m| {
                    if t.personal {
                        t.description.contains(&m.tag)
                    } else {
                        !m.personal
                    }
                })
            });
            let reported = !t.personal
                && world.events.iter().any(|(name, e)| {
                    *name == self.objects[i].token.name_any() && e.reason == "InterruptedIssue"
                });
            if !(held || marked || reported) {
                return Err(format!(
                    "token {} of {} is alive in AWX, held by nobody, and no marker or warning \
                     accounts for it (description {:?}, created {:?}; state {:?})",
                    t.id, t.user, t.description, t.created, state
                ));
            }
        }
        // A Secret once filled stays filled, with a token AWX accepts.
        for o in self.objects.iter_mut().filter(|o| !o.deleted) {
            let value = world
                .secrets
                .get(&key(NAMESPACE, &o.token.secret_name()))
                .and_then(|s| s.data.as_ref()?.get("token").cloned())
                .map(|v| String::from_utf8_lossy(&v.0).into_owned());
            match value {
                Some(v) if !v.is_empty() => {
                    o.filled = true;
                    let row = world.tokens.iter().find(|t| t.value == v);
                    let works = row.is_some_and(|t| t.alive || t.deleted_by_admin);
                    if !o.refresh && !works {
                        return Err(format!(
                            "Secret of {} holds a token AWX rejects",
                            o.token.name_any()
                        ));
                    }
                }
                _ if o.filled => {
                    return Err(format!("Secret of {} lost its token", o.token.name_any()));
                }
                _ => {}
            }
        }
        // Attempts per minute, over every window that ends at a request made since the last
        // check.
        let new_requests = &world.requests[self.checked_requests..];
        for o in &self.objects {
            for last in new_requests
                .iter()
                .filter(|r| r.obtains && r.user == o.user)
            {
                let start = last
                    .at
                    .checked_sub(Duration::from_secs(60))
                    .unwrap_or(last.at);
                let in_window = world
                    .requests
                    .iter()
                    .rev()
                    .take_while(|r| r.at > start)
                    .filter(|r| r.at <= last.at && r.obtains && r.user == o.user)
                    .count();
                let skips = world
                    .skips
                    .iter()
                    .filter(|(t, u)| {
                        *u == o.user && *t + Duration::from_secs(60) > start && *t <= last.at
                    })
                    .count();
                if in_window > 6 + 2 * skips {
                    return Err(format!(
                        "{} sent {in_window} token requests within 60 s ({skips} reasons to try at once)",
                        o.user
                    ));
                }
            }
        }
        // Requests per second, per process, over every second that ends at a new request.
        for last in new_requests {
            let start = last
                .at
                .checked_sub(Duration::from_secs(1))
                .unwrap_or(last.at);
            let in_second = world
                .requests
                .iter()
                .rev()
                .take_while(|r| r.at > start)
                .filter(|r| r.at <= last.at && r.holder == last.holder)
                .count();
            if in_second > RPS as usize {
                let times: Vec<_> = world
                    .requests
                    .iter()
                    .rev()
                    .take_while(|r| r.at > start)
                    .filter(|r| r.at <= last.at && r.holder == last.holder)
                    .map(|r| format!("{:?} {}", r.at - self.start.0, r.user))
                    .collect();
                return Err(format!(
                    "{} sent {in_second} requests within one second: {times:?}",
                    last.holder
                ));
            }
        }
        // No token value in a status or an event.
        let shown: Vec<&str> = world.status_writes[self.checked_statuses..]
            .iter()
            .map(String::as_str)
            .chain(
                world.events[self.checked_events..]
                    .iter()
                    .map(|(_, e)| e.note.as_str()),
            )
            .collect();
        for t in &world.tokens {
            for text in &shown {
                if text.contains(t.value.as_str())
                    || t.refresh
                        .as_ref()
                        .is_some_and(|r| text.contains(r.as_str()))
                {
                    return Err(format!("token {} appears in a status or event", t.id));
                }
            }
        }
        self.checked_requests = world.requests.len();
        self.checked_events = world.events.len();
        self.checked_statuses = world.status_writes.len();
        Ok(())
    }

    /// No more faults: everything converges.
    async fn settle(&mut self) -> Result<(), String> {
        {
            let mut world = lock(&self.world);
            world.outage = Outage::None;
            world.flakiness = 0.0;
        }
        for round in 0..7 {
            // Past any backoff, grace period and marker patience.
            self.advance(if round < 4 { 400 } else { 100 }).await;
            for i in 0..self.objects.len() {
                self.reconcile(i, 0, false).await;
                self.check()?;
            }
        }
        let now = Clock::now(&self.sim(0));
        let world = lock(&self.world);
        for o in &self.objects {
            let state = {
                let secret = world.secrets.get(&key(
                    NAMESPACE,
                    &secrets::state_secret_name(&o.token.name_any()),
                ));
                secret
                    .and_then(|s| s.data.as_ref()?.get(STATE_KEY).cloned())
                    .map(|b| TokenState::decode(&b.0).expect("readable"))
                    .unwrap_or_default()
            };
            // A token replaced in the last minutes may still be in its grace period; anything
            // else retiring has failed to go.
            let in_grace: Vec<&str> = state
                .retiring
                .iter()
                .filter(|r| r.failed_attempts == 0 && r.revoke_after > now)
                .map(|r| r.token.access_token.expose())
                .collect();
            if o.token.name_any() == "restarted" && !o.deleted {
                // Every change of the token in the Secret restarted the consumer after it
                // (none lost to a crash), at most once per change, never on the first issue.
                let changes = world.restarted_tokens.len().saturating_sub(1) as u32;
                let consumer = &world.consumer;
                let issued = state.current.as_ref().map(|c| c.issued_at);
                // A change in the last seconds may still wait for its delay (5s).
                let waiting = state.restart.as_ref().is_some_and(|r| {
                    r.restarted.is_none()
                        && crate::schedule::add(r.since, Duration::from_secs(5)) > now
                });
                if state.restart.is_some() && !waiting {
                    return Err(format!(
                        "restarted: a restart is still owed after settling: {:?}",
                        state.restart
                    ));
                }
                if changes > 0 && !waiting && consumer.restarted_at < issued {
                    return Err(format!(
                        "restarted: the Secret's token changed {changes} times but the consumer \
                         was last restarted at {:?}, before the current token ({issued:?})",
                        consumer.restarted_at
                    ));
                }
                if consumer.restarts > changes {
                    return Err(format!(
                        "restarted: {} restarts for {changes} token changes",
                        consumer.restarts
                    ));
                }
            }
            if state.retiring.len() > in_grace.len()
                || state.issuing.is_some()
                || !state.interrupted.is_empty()
            {
                return Err(format!(
                    "{} did not settle: {} retiring, marker {}, {} interrupted",
                    o.token.name_any(),
                    state.retiring.len(),
                    state.issuing.is_some(),
                    state.interrupted.len()
                ));
            }
            let alive: Vec<&AwxTokenRow> = world
                .tokens
                .iter()
                .filter(|t| t.alive && t.user == o.user)
                .collect();
            let warnings = world
                .events
                .iter()
                .filter(|(n, e)| *n == o.token.name_any() && e.reason == "InterruptedIssue")
                .count();
            let current = state
                .current
                .as_ref()
                .map(|c| c.token.access_token.expose().to_string());
            let strays: Vec<_> = alive
                .iter()
                .filter(|t| {
                    Some(&t.value) != current.as_ref() && !in_grace.contains(&t.value.as_str())
                })
                .collect();
            // Only application tokens of requests reported as interrupted may remain (two for
            // a refresh that fell back to the grant).
            let allowed = if o.refresh { 2 * warnings } else { warnings };
            if strays.iter().any(|t| t.personal) || strays.len() > allowed {
                return Err(format!(
                    "{}: {} tokens alive besides the current one, {warnings} reported",
                    o.token.name_any(),
                    strays.len()
                ));
            }
            if o.deleted {
                if current.is_some() {
                    return Err(format!(
                        "{} was deleted but holds a token",
                        o.token.name_any()
                    ));
                }
                continue;
            }
            let Some(current) = current else {
                return Err(format!("{} has no token", o.token.name_any()));
            };
            if self.target_value_in(&world, o).as_deref() != Some(current.as_str()) {
                return Err(format!(
                    "{}: the Secret does not hold the current token",
                    o.token.name_any()
                ));
            }
            // Dead only if an admin deleted it: nothing tells the operator unless it verifies.
            let dead_by_admin = world
                .tokens
                .iter()
                .any(|t| t.value == current && t.deleted_by_admin);
            if !dead_by_admin && !alive.iter().any(|t| t.value == current) {
                return Err(format!(
                    "{}: the Secret's token is dead in AWX",
                    o.token.name_any()
                ));
            }
            let ready = world.statuses.get(&o.token.name_any()).and_then(|s| {
                s.conditions
                    .iter()
                    .find(|c| c.type_ == status::READY)
                    .cloned()
            });
            if ready.as_ref().map(|c| c.status.as_str()) != Some("True") {
                return Err(format!("{} is not Ready: {ready:?}", o.token.name_any()));
            }
        }
        Ok(())
    }

    fn target_value_in(&self, world: &World, o: &Object) -> Option<String> {
        let secret = world.secrets.get(&key(NAMESPACE, &o.token.secret_name()))?;
        let value = secret.data.as_ref()?.get("token")?;
        Some(String::from_utf8_lossy(&value.0).into_owned())
    }
}

fn run_sequence(seed: u64, steps: usize) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let mut run = Run::new(seed);
        let mut outcome = Ok(());
        for _ in 0..steps {
            run.step().await;
            if let Err(e) = run.check() {
                outcome = Err(e);
                break;
            }
        }
        if outcome.is_ok() {
            outcome = run.settle().await;
        }
        outcome.map_err(|e| {
            let keep = if std::env::var("AWXTO_SIM_SEED").is_ok() {
                400
            } else {
                25
            };
            let tail: Vec<_> = run.log.iter().rev().take(keep).rev().cloned().collect();
            format!("seed {seed}: {e}\nlast steps:\n  {}", tail.join("\n  "))
        })
    })
}

#[test]
fn invariants_hold_over_random_fault_sequences() {
    let sequences: u64 = std::env::var("AWXTO_SIM_SEQUENCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let seeds: Vec<u64> = match std::env::var("AWXTO_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(seed) => vec![seed],
        None => (0..sequences).collect(),
    };
    let started = std::time::Instant::now();
    // Seeds are independent: spread them over the cores (each sequence stays deterministic).
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let failure: Mutex<Option<(u64, String)>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for t in 0..threads {
            let (seeds, failure) = (&seeds, &failure);
            scope.spawn(move || {
                for seed in seeds.iter().skip(t).step_by(threads) {
                    if lock(failure).is_some() {
                        return;
                    }
                    if let Err(e) = run_sequence(*seed, 40) {
                        let mut first = lock(failure);
                        if first.as_ref().is_none_or(|(s, _)| *seed < *s) {
                            *first = Some((*seed, e));
                        }
                        return;
                    }
                }
            });
        }
    });
    if let Some((seed, e)) = lock(&failure).take() {
        panic!("{e}\nreplay with AWXTO_SIM_SEED={seed}");
    }
    eprintln!(
        "simulation: {} sequences of 40 steps in {:.1}s on {threads} threads",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
}
