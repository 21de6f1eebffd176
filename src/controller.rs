//! The reconciler: from an `AwxToken` to a working token in a Secret, renewed and revoked.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{Future, StreamExt};
use jiff::Timestamp;
use k8s_openapi::{
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{PartialObjectMeta, Patch, PatchParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        finalizer::{Event as FinalizerEvent, finalizer},
        reflector::{ObjectRef, Store},
        watcher::{self, watcher},
    },
};
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    Error,
    awx::{
        AwxClient, AwxError, ClientCredentials, Endpoint, Flavor, IssuedToken, RequestLimits,
        RequestObserver, RevocationCredentials, Scope, TokenGrant, TokenKind,
    },
    crd::{
        AwxToken, AwxTokenStatus, FlavorSpec, GrantType, ROTATE_ANNOTATION, RenewalStrategy,
        SKIP_REVOKE_ANNOTATION, ScopeSpec,
    },
    decide::{self, FailureHistory, Gate, Trigger},
    metrics::{FlavorLabels, Metrics, OutcomeLabels, ReasonLabels, ResultLabels, TokenLabels},
    schedule::{self, REFRESH_TOKEN_LIFETIME, RenewalSchedule},
    secrets::{self, Ownership},
    spec::{self, SpecError, ValidSpec},
    state::{HeldToken, IssueIntent, STATE_KEY, Sensitive, TokenRecord, TokenState},
};

pub const FINALIZER: &str = "awx-token-operator.io/revoke";
pub const FIELD_MANAGER: &str = "awx-token-operator";

/// Operator-wide settings of the controller.
#[derive(Clone, Debug)]
pub struct Settings {
    pub allowed_hosts: Option<Vec<String>>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub awx_max_rps: Option<NonZeroU32>,
    pub awx_max_in_flight: Option<usize>,
    pub concurrency: u16,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            allowed_hosts: None,
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(300),
            awx_max_rps: NonZeroU32::new(20),
            awx_max_in_flight: Some(8),
            concurrency: 16,
        }
    }
}

/// What the reconciler shares between calls.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    recorder: Recorder,
    awx: AwxPool,
    memory: Mutex<HashMap<(String, String), Memory>>,
}

/// Per-object facts kept only in this process.
#[derive(Default)]
struct Memory {
    /// Inputs fingerprint of a non-retryable failure: no new attempt until they change.
    permanent_failure_inputs: Option<String>,
    /// Last time AWX confirmed the token in the Secret (verifyEvery).
    verified_at: Option<Timestamp>,
    in_backoff: bool,
    /// Consecutive Kubernetes API errors, for error_policy's backoff.
    api_errors: u32,
}

impl Context {
    pub fn new(
        client: Client,
        settings: Settings,
        metrics: Arc<Metrics>,
        instance: Option<String>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance,
            },
        );
        let observer: Arc<dyn RequestObserver> = metrics.clone();
        Self {
            awx: AwxPool::new(&settings, observer),
            client,
            settings,
            metrics,
            recorder,
            memory: Mutex::default(),
        }
    }

    /// Runs `f` on the object's memory; the backoff gauge follows its `in_backoff` flag
    /// (adjusted by the change, not recounted over every object on each call).
    fn with_memory<R>(&self, token: &AwxToken, f: impl FnOnce(&mut Memory) -> R) -> R {
        let key = (token.namespace().unwrap_or_default(), token.name_any());
        let mut memory = lock(&self.memory);
        let entry = memory.entry(key).or_default();
        let before = entry.in_backoff;
        let result = f(entry);
        self.count_backoff(before, entry.in_backoff);
        result
    }

    fn forget(&self, token: &AwxToken) {
        let key = (token.namespace().unwrap_or_default(), token.name_any());
        if let Some(gone) = lock(&self.memory).remove(&key) {
            self.count_backoff(gone.in_backoff, false);
        }
    }

    fn count_backoff(&self, before: bool, after: bool) {
        match (before, after) {
            (false, true) => drop(self.metrics.objects_in_backoff.inc()),
            (true, false) => drop(self.metrics.objects_in_backoff.dec()),
            _ => {}
        }
    }

    /// How long to wait after `attempts` consecutive failures, with a jitter derived from `seed`.
    fn failure_wait(&self, attempts: u32, seed: &str) -> Duration {
        let jitter = decide::jitter(&[seed, &attempts.to_string()]);
        schedule::failure_backoff(
            attempts,
            self.settings.backoff_base,
            self.settings.backoff_max,
            jitter,
        )
    }

    async fn publish(&self, token: &AwxToken, type_: EventType, reason: &str, note: String) {
        let event = KubeEvent {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &token.object_ref(&())).await {
            warn!(error = %e, "could not publish event");
        }
    }
}

/// AWX clients and per-host request limits, shared by all AwxTokens.
struct AwxPool {
    clients: Mutex<HashMap<String, AwxClient>>,
    limits: Mutex<HashMap<String, RequestLimits>>,
    /// Detected flavour per URL; one detection at a time per URL, however many tokens wait.
    flavors: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<Flavor>>>>,
    max_rps: Option<NonZeroU32>,
    max_in_flight: Option<usize>,
    observer: Arc<dyn RequestObserver>,
}

impl AwxPool {
    fn new(settings: &Settings, observer: Arc<dyn RequestObserver>) -> Self {
        Self {
            clients: Mutex::default(),
            limits: Mutex::default(),
            flavors: Mutex::default(),
            max_rps: settings.awx_max_rps,
            max_in_flight: settings.awx_max_in_flight,
            observer,
        }
    }

    fn client(
        &self,
        spec: &ValidSpec,
        insecure: bool,
        ca_bundle: Option<&[u8]>,
    ) -> Result<AwxClient, AwxError> {
        let mut key = Sha256::new();
        key.update(spec.url.as_str());
        key.update([u8::from(insecure)]);
        key.update(spec.timeout.as_millis().to_be_bytes());
        if let Some(ca) = ca_bundle {
            key.update(ca);
        }
        let key = hex::encode(key.finalize());
        if let Some(client) = lock(&self.clients).get(&key) {
            return Ok(client.clone());
        }
        let limits = lock(&self.limits)
            .entry(spec.host.clone())
            .or_insert_with(|| RequestLimits {
                rate: self
                    .max_rps
                    .map(|rps| Arc::new(governor::RateLimiter::direct(request_quota(rps)))),
                in_flight: self
                    .max_in_flight
                    .map(|n| Arc::new(tokio::sync::Semaphore::new(n.max(1)))),
            })
            .clone();
        let client = AwxClient::new(
            Endpoint {
                base_url: spec.url.clone(),
                ca_bundle_pem: ca_bundle.map(<[u8]>::to_vec),
                insecure_skip_tls_verify: insecure,
                timeout: spec.timeout,
            },
            limits,
            Some(self.observer.clone()),
        )?;
        lock(&self.clients).insert(key, client.clone());
        Ok(client)
    }

    async fn flavor(
        &self,
        client: &AwxClient,
        spec: &ValidSpec,
        wanted: FlavorSpec,
    ) -> Result<Flavor, AwxError> {
        match wanted {
            FlavorSpec::Controller => Ok(Flavor::Controller),
            FlavorSpec::Gateway => Ok(Flavor::Gateway),
            FlavorSpec::Auto => {
                let cell = lock(&self.flavors)
                    .entry(spec.url.to_string())
                    .or_default()
                    .clone();
                cell.get_or_try_init(|| client.detect_flavor())
                    .await
                    .copied()
            }
        }
    }
}

/// No burst, and requests spaced 10% wider than 1/rps: AWX itself (not just this process) never
/// sees more than `rps` requests in any one-second window, even with network and server-side
/// scheduling jitter (measured up to ~40 ms on a loaded 2-core machine).
fn request_quota(rps: NonZeroU32) -> governor::Quota {
    let spacing = Duration::from_secs(1).mul_f64(1.10) / rps.get();
    governor::Quota::with_period(spacing.max(Duration::from_micros(1)))
        .unwrap_or_else(|| governor::Quota::per_second(rps))
        .allow_burst(NonZeroU32::MIN)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why an AwxToken is not Ready; every variant becomes a condition reason and message.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    InvalidSpec(#[from] SpecError),
    #[error("AWX host {0:?} is not in the operator's --allowed-awx-hosts; no request was sent")]
    HostNotAllowed(String),
    #[error("Secret {name:?} in this namespace does not exist; create it with the {what}")]
    SecretMissing { name: String, what: &'static str },
    #[error("Secret {name:?} has no key {key:?} (or it is empty); it must hold the {what}")]
    KeyMissing {
        name: String,
        key: String,
        what: &'static str,
    },
    #[error(
        "Secret {name:?} exists and {why}; the operator does not overwrite it. Delete it or set spec.secret.name to another name"
    )]
    SecretConflict { name: String, why: String },
    #[error("{0}")]
    Awx(#[from] AwxError),
}

impl Failure {
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::InvalidSpec(_) => "InvalidSpec",
            Failure::HostNotAllowed(_) => "HostNotAllowed",
            Failure::SecretMissing { .. } | Failure::KeyMissing { .. } => "CredentialsNotFound",
            Failure::SecretConflict { .. } => "SecretConflict",
            Failure::Awx(e) => e.reason(),
        }
    }

    pub fn is_retryable(&self) -> bool {
        match self {
            Failure::Awx(e) => e.is_retryable(),
            // A conflicting Secret is not watched (it is not ours): look again later.
            Failure::SecretConflict { .. } => true,
            _ => false,
        }
    }

    /// Whether an attempt at AWX was made (and so counts towards the backoff).
    fn reached_awx(&self) -> bool {
        matches!(self, Failure::Awx(_))
    }
}

/// Credentials and trust material read from the AwxToken's Secrets.
struct Inputs {
    username: Option<String>,
    password: Option<SecretString>,
    client: Option<ClientCredentials>,
    ca_bundle: Option<Vec<u8>>,
    /// Hash of everything a token is issued from; stored only in the state Secret.
    fingerprint: String,
}

impl Inputs {
    /// The grant to send; a personal token's description carries `tag` so a token whose
    /// creation answer was lost can be found again.
    fn grant(&self, token: &AwxToken, tag: &str) -> TokenGrant {
        let username = self.username.clone().unwrap_or_default();
        let password = self
            .password
            .clone()
            .unwrap_or_else(|| SecretString::from(String::new()));
        match token.spec.grant.type_ {
            GrantType::Password => TokenGrant::Password {
                client: self.client.clone().unwrap_or(ClientCredentials {
                    client_id: String::new(),
                    client_secret: None,
                }),
                username,
                password,
            },
            GrantType::ClientCredentials => TokenGrant::ClientCredentials {
                client: self.client.clone().unwrap_or(ClientCredentials {
                    client_id: String::new(),
                    client_secret: None,
                }),
            },
            GrantType::PersonalAccessToken => TokenGrant::PersonalAccessToken {
                username,
                password,
                description: format!(
                    "{} [{tag}]",
                    token.spec.grant.description.clone().unwrap_or_else(|| {
                        format!(
                            "awx-token-operator {}/{}",
                            token.namespace().unwrap_or_default(),
                            token.name_any()
                        )
                    })
                ),
            },
        }
    }

    fn revocation(&self) -> RevocationCredentials {
        RevocationCredentials {
            client: self.client.clone(),
            user: match (&self.username, &self.password) {
                (Some(u), Some(p)) => Some((u.clone(), p.clone())),
                _ => None,
            },
        }
    }
}

fn scope(s: ScopeSpec) -> Scope {
    match s {
        ScopeSpec::Read => Scope::Read,
        ScopeSpec::Write => Scope::Write,
    }
}

fn flavor_label(f: Flavor) -> &'static str {
    match f {
        Flavor::Controller => "Controller",
        Flavor::Gateway => "Gateway",
    }
}

fn grant_label(g: GrantType) -> &'static str {
    match g {
        GrantType::Password => "Password",
        GrantType::ClientCredentials => "ClientCredentials",
        GrantType::PersonalAccessToken => "PersonalAccessToken",
    }
}

/// Reads the credentials (and CA bundle) Secrets. Nothing is sent anywhere with an empty
/// credential: a missing key is a Failure.
async fn read_inputs(
    token: &AwxToken,
    spec: &ValidSpec,
    secrets: &Api<Secret>,
) -> Result<Result<Inputs, Failure>, Error> {
    let grant = &token.spec.grant;
    let refs = &grant.credentials_secret_ref;
    let Some(creds) = secrets.get_opt(&refs.name).await? else {
        return Ok(Err(Failure::SecretMissing {
            name: refs.name.clone(),
            what: "AWX credentials",
        }));
    };
    let read = |key: &str| -> Option<String> {
        let data = creds.data.as_ref()?;
        let value = String::from_utf8(data.get(key)?.0.clone()).ok()?;
        let value = value.trim_end_matches(['\n', '\r']).to_string();
        (!value.is_empty()).then_some(value)
    };
    let require = |key: &str, what: &'static str| {
        read(key).ok_or_else(|| Failure::KeyMissing {
            name: refs.name.clone(),
            key: key.to_string(),
            what,
        })
    };
    let mut fingerprint = Sha256::new();
    let mut feed = |part: &str| {
        fingerprint.update(part.as_bytes());
        fingerprint.update([0]);
    };
    feed(spec.url.as_str());
    feed(&format!(
        "{:?}/{:?}/{:?}/{:?}",
        token.spec.awx.flavor, grant.type_, grant.scope, token.spec.awx.insecure_skip_tls_verify
    ));
    feed(grant.description.as_deref().unwrap_or(""));
    let (mut username, mut password, mut client) = (None, None, None);
    let fields = match grant.type_ {
        GrantType::Password => (true, true),
        GrantType::ClientCredentials => (false, true),
        GrantType::PersonalAccessToken => (true, false),
    };
    let result = (|| {
        if fields.0 {
            let u = require(&refs.username_key, "AWX username")?;
            let p = require(&refs.password_key, "AWX password")?;
            feed(&u);
            feed(&p);
            username = Some(u);
            password = Some(SecretString::from(p));
        }
        if fields.1 {
            let id = require(&refs.client_id_key, "OAuth2 application client_id")?;
            let secret = if grant.type_ == GrantType::ClientCredentials {
                Some(require(
                    &refs.client_secret_key,
                    "OAuth2 application client_secret",
                )?)
            } else {
                read(&refs.client_secret_key)
            };
            feed(&id);
            feed(secret.as_deref().unwrap_or(""));
            client = Some(ClientCredentials {
                client_id: id,
                client_secret: secret.map(SecretString::from),
            });
        }
        Ok::<(), Failure>(())
    })();
    if let Err(f) = result {
        return Ok(Err(f));
    }
    let mut ca_bundle = None;
    if let Some(ca) = &token.spec.awx.ca_bundle_secret_ref {
        let Some(secret) = secrets.get_opt(&ca.name).await? else {
            return Ok(Err(Failure::SecretMissing {
                name: ca.name.clone(),
                what: "AWX CA bundle (PEM)",
            }));
        };
        let Some(pem) = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&ca.key))
            .filter(|v| !v.0.is_empty())
        else {
            return Ok(Err(Failure::KeyMissing {
                name: ca.name.clone(),
                key: ca.key.clone(),
                what: "AWX CA bundle (PEM)",
            }));
        };
        fingerprint.update(&pem.0);
        ca_bundle = Some(pem.0.clone());
    }
    Ok(Ok(Inputs {
        username,
        password,
        client,
        ca_bundle,
        fingerprint: hex::encode(fingerprint.finalize()),
    }))
}

/// Entry point called by kube-runtime for every change and requeue.
pub async fn reconcile(token: Arc<AwxToken>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = token.namespace().unwrap_or_default();
    let span = info_span!("reconcile", namespace = %ns, awxtoken = %token.name_any());
    let api: Api<AwxToken> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, token, |event| async {
        match event {
            FinalizerEvent::Apply(t) => apply(&t, &ctx).await,
            FinalizerEvent::Cleanup(t) => cleanup(&t, &ctx).await,
        }
    })
    .instrument(span)
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    let result_label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabels {
            result: result_label,
        })
        .inc();
    result
}

/// Kubernetes API errors (AWX failures are handled inside the reconciler): retry with an
/// exponential backoff per object.
pub fn error_policy(token: Arc<AwxToken>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ReasonLabels {
            reason: error.reason(),
        })
        .inc();
    let attempts = ctx.with_memory(&token, |m| {
        m.api_errors = m.api_errors.saturating_add(1);
        m.api_errors
    });
    let jitter = decide::jitter(&[&token.uid().unwrap_or_default(), &attempts.to_string()]);
    let delay = schedule::failure_backoff(
        attempts,
        Duration::from_secs(1),
        ctx.settings.backoff_max,
        jitter,
    );
    warn!(namespace = %token.namespace().unwrap_or_default(), name = %token.name_any(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

struct Reconciler<'a> {
    token: &'a AwxToken,
    ctx: &'a Context,
    secrets: Api<Secret>,
    now: Timestamp,
}

async fn apply(token: &AwxToken, ctx: &Context) -> Result<Action, Error> {
    let ns = token.namespace().unwrap_or_default();
    let r = Reconciler {
        token,
        ctx,
        secrets: Api::namespaced(ctx.client.clone(), &ns),
        now: Timestamp::now(),
    };
    let action = r.apply().await;
    if action.is_ok() {
        ctx.with_memory(token, |m| m.api_errors = 0);
    }
    action
}

async fn cleanup(token: &AwxToken, ctx: &Context) -> Result<Action, Error> {
    let ns = token.namespace().unwrap_or_default();
    let r = Reconciler {
        token,
        ctx,
        secrets: Api::namespaced(ctx.client.clone(), &ns),
        now: Timestamp::now(),
    };
    let action = r.cleanup().await?;
    ctx.metrics.set_schedule(&ns, &token.name_any(), None);
    ctx.forget(token);
    Ok(action)
}

impl Reconciler<'_> {
    fn status(&self) -> AwxTokenStatus {
        self.token.status.clone().unwrap_or_default()
    }

    async fn load_state(&self) -> Result<(TokenState, bool), Error> {
        let name = secrets::state_secret_name(&self.token.name_any());
        let Some(secret) = self.secrets.get_opt(&name).await? else {
            return Ok((TokenState::default(), false));
        };
        if !matches!(
            secrets::ownership(Some(&secret), self.token),
            Ownership::Ours
        ) {
            return Err(Error::StateConflict(name));
        }
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(STATE_KEY))
            .map(|b| b.0.clone())
            .unwrap_or_default();
        match TokenState::decode(&bytes) {
            Ok(state) => Ok((state, true)),
            Err(e) => Err(Error::StateCorrupt(name, e.to_string())),
        }
    }

    async fn save_state(&self, state: &TokenState) -> Result<(), Error> {
        let desired = secrets::render_state(self.token, state);
        let name = desired.name_any();
        self.secrets
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&desired),
            )
            .await?;
        Ok(())
    }

    async fn apply(&self) -> Result<Action, Error> {
        let token = self.token;
        let valid = match spec::validate(&token.spec) {
            Ok(v) => v,
            Err(e) => return self.fail(Failure::InvalidSpec(e), None, false).await,
        };
        if let Some(allowed) = &self.ctx.settings.allowed_hosts
            && !decide::host_allowed(allowed, &valid.host)
        {
            return self
                .fail(Failure::HostNotAllowed(valid.host.clone()), None, false)
                .await;
        }
        let (mut state, _) = self.load_state().await?;
        let target_name = token.secret_name();
        let target = self.secrets.get_opt(&target_name).await?;
        if let Ownership::Foreign(why) = secrets::ownership(target.as_ref(), token) {
            let has_token = state.current.is_some();
            return self
                .fail(
                    Failure::SecretConflict {
                        name: target_name,
                        why,
                    },
                    None,
                    has_token,
                )
                .await;
        }
        let has_token = state.current.is_some();
        let inputs = match read_inputs(token, &valid, &self.secrets).await? {
            Ok(i) => i,
            Err(f) => {
                // The token in the Secret stays; suspended resources report nothing new.
                if token.spec.suspend {
                    self.write_target(&state, target.as_ref()).await?;
                    return self.report_suspended(&state).await;
                }
                return self.fail(f, None, has_token).await;
            }
        };

        if token.spec.suspend {
            self.write_target(&state, target.as_ref()).await?;
            return self.report_suspended(&state).await;
        }

        // A changed renewal policy applies to the token already held.
        let mut state_changed = false;
        if let Some(current) = state.current.as_mut() {
            let due = self.renewal_time(
                current.issued_at,
                current.expires_at,
                current.refresh_issued_at,
                &valid,
            );
            if due != current.renewal_time {
                current.renewal_time = due;
                state_changed = true;
            }
        }

        let status = self.status();
        let rotate = token
            .annotations()
            .get(ROTATE_ANNOTATION)
            .map(String::as_str);
        if state.rotated_for.is_none() {
            state.rotated_for = status.rotated_for.clone();
        }
        let mut trigger = decide::trigger(
            self.now,
            &state,
            &inputs.fingerprint,
            rotate,
            state.rotated_for.as_deref(),
        );
        if trigger == Some(Trigger::Initial) {
            // An annotation present at creation asks for nothing beyond the first issue.
            state.rotated_for = rotate.map(str::to_string);
        }

        let client = match self.ctx.awx.client(
            &valid,
            token.spec.awx.insecure_skip_tls_verify,
            inputs.ca_bundle.as_deref(),
        ) {
            Ok(c) => c,
            Err(e) => {
                return self
                    .fail(Failure::Awx(e), Some(&inputs.fingerprint), has_token)
                    .await;
            }
        };

        // Verification of the token in the Secret, when asked for and nothing else is due.
        if trigger.is_none()
            && let (Some(every), Some(current)) = (valid.verify_every, &state.current)
        {
            let last = self
                .ctx
                .with_memory(token, |m| m.verified_at)
                .unwrap_or(current.issued_at)
                .max(current.issued_at);
            if self.now >= schedule::add(last, every) {
                match client
                    .whoami(
                        current.token.flavor(),
                        &current.token.access_token.to_secret(),
                    )
                    .await
                {
                    Ok(_) => self
                        .ctx
                        .with_memory(token, |m| m.verified_at = Some(self.now)),
                    Err(AwxError::TokenRejected { .. }) => trigger = Some(Trigger::Rejected),
                    Err(e) => {
                        return self
                            .fail(Failure::Awx(e), Some(&inputs.fingerprint), has_token)
                            .await;
                    }
                }
            }
        }

        if let Some(trigger) = trigger {
            let history_inputs = self
                .ctx
                .with_memory(token, |m| m.permanent_failure_inputs.clone());
            let history = FailureHistory {
                failed_attempts: status.failed_attempts,
                last_failure: status.last_failure_time.as_ref().map(|t| t.0),
                permanent_failure_inputs: history_inputs.as_deref(),
            };
            let jitter = decide::jitter(&[
                &token.uid().unwrap_or_default(),
                &status.failed_attempts.to_string(),
            ]);
            match decide::gate(
                self.now,
                &trigger,
                &inputs.fingerprint,
                &history,
                self.ctx.settings.backoff_base,
                self.ctx.settings.backoff_max,
                jitter,
            ) {
                Gate::Open => {}
                Gate::Until(at) => {
                    debug!(%at, "in failure backoff");
                    self.write_target(&state, target.as_ref()).await?;
                    return Ok(Action::requeue(
                        schedule::requeue_delay(self.now, at).max(Duration::from_millis(100)),
                    ));
                }
                Gate::AwaitChange => {
                    debug!("waiting for a change of spec or credentials");
                    self.write_target(&state, target.as_ref()).await?;
                    return Ok(Action::await_change());
                }
            }
            info!(reason = trigger.describe(), "AWX request due");
            let flavor = match self
                .ctx
                .awx
                .flavor(&client, &valid, token.spec.awx.flavor)
                .await
            {
                Ok(f) => f,
                Err(e) => {
                    return self
                        .fail(Failure::Awx(e), Some(&inputs.fingerprint), has_token)
                        .await;
                }
            };
            // After an interrupted request the refresh token may already have been rotated
            // away by it: using it again would be a double refresh (invalid_grant at AWX).
            let interrupted = state.issuing.is_some();
            if let Some(intent) = state.issuing.take()
                && let Err(e) = self
                    .recover_interrupted_issue(&client, &inputs, &intent)
                    .await
            {
                state.issuing = Some(intent);
                return self
                    .fail(Failure::Awx(e), Some(&inputs.fingerprint), has_token)
                    .await;
            }
            if trigger == Trigger::Interrupted {
                // Looked for and cleaned up; the current token stays.
                state_changed = true;
            } else {
                // Recorded before the request, so a restart in the middle knows to look for the
                // token AWX may have created.
                let intent = IssueIntent {
                    tag: format!("awxto-{:016x}", rand::random::<u64>()),
                    started_at: self.now,
                    personal: token.spec.grant.type_ == GrantType::PersonalAccessToken,
                    gateway: flavor == Flavor::Gateway,
                };
                state.issuing = Some(intent.clone());
                self.save_state(&state).await?;
                self.set_issuing(&trigger).await?;
                let refresh_from = state.current.as_ref().filter(|_| {
                    valid.strategy == RenewalStrategy::Refresh
                        && trigger.is_renewal()
                        && !interrupted
                });
                let outcome = self.obtain(&client, &inputs, refresh_from, &intent).await;
                state.issuing = None;
                match outcome {
                    Ok((issued, flavor, refreshed)) => {
                        let previous = state.current.take();
                        let held = self.hold(
                            issued,
                            flavor,
                            &valid,
                            &inputs,
                            refreshed,
                            previous.as_ref(),
                        );
                        if let Some(old) = previous
                            && !refreshed
                        {
                            state.retiring.push(
                                old.retire(schedule::add(self.now, valid.revoke_grace_period)),
                            );
                        }
                        let labels = TokenLabels {
                            grant: grant_label(token.spec.grant.type_),
                            flavor: flavor_label(flavor),
                        };
                        self.ctx.metrics.tokens_issued.get_or_create(&labels).inc();
                        if trigger.is_renewal() {
                            self.ctx.metrics.tokens_renewed.get_or_create(&labels).inc();
                        }
                        state.current = Some(held);
                        if let Trigger::Forced(v) = &trigger {
                            state.rotated_for = Some(v.clone());
                        }
                        // Persist before the Secret changes: a crash now leaves a token the state
                        // knows about, never one nobody can revoke.
                        self.save_state(&state).await?;
                        state_changed = false;
                        self.ctx.with_memory(token, |m| {
                            m.permanent_failure_inputs = None;
                            m.verified_at = Some(self.now);
                            m.in_backoff = false;
                        });
                        let note = format!(
                            "Token {} ({})",
                            if trigger.is_renewal() {
                                "renewed"
                            } else {
                                "issued"
                            },
                            trigger.describe()
                        );
                        self.ctx
                            .publish(token, EventType::Normal, "TokenIssued", note)
                            .await;
                    }
                    Err(e) => {
                        // A refusal, or a request that never reached AWX, created no token; any
                        // other failure (a timeout, a 5xx, a cut answer) may have: keep the intent
                        // so the next attempt looks for it first.
                        let nothing_created = !e.is_retryable()
                            || matches!(e.reason(), "AwxUnreachable" | "TlsError");
                        if nothing_created {
                            self.save_state(&state).await?;
                        }
                        return self
                            .fail(Failure::Awx(e), Some(&inputs.fingerprint), has_token)
                            .await;
                    }
                }
            }
        }

        let token_changed = self.write_target(&state, target.as_ref()).await?;
        if token_changed {
            self.restart_workloads().await;
        }

        // Retire replaced tokens whose grace period is over.
        let mut revocation_failure = None;
        let mut kept = Vec::new();
        for mut retiring in std::mem::take(&mut state.retiring) {
            if retiring.revoke_after > self.now {
                kept.push(retiring);
                continue;
            }
            state_changed = true;
            match self
                .revoke_token(
                    &retiring.token,
                    &client,
                    &valid,
                    inputs.ca_bundle.as_deref(),
                    &inputs.revocation(),
                )
                .await
            {
                Ok(()) => info!("revoked a replaced token"),
                Err(e) => {
                    retiring.failed_attempts = retiring.failed_attempts.saturating_add(1);
                    let wait = self.ctx.failure_wait(
                        retiring.failed_attempts,
                        retiring.token.access_token.expose().get(..4).unwrap_or(""),
                    );
                    retiring.revoke_after = schedule::add(self.now, wait);
                    warn!(error = %e, retry_in = ?wait, "could not revoke a replaced token");
                    revocation_failure = Some(e);
                    kept.push(retiring);
                }
            }
        }
        state.retiring = kept;
        if state_changed {
            self.save_state(&state).await?;
        }
        if let Some(e) = revocation_failure {
            self.ctx
                .publish(
                    token,
                    EventType::Warning,
                    "RevocationFailed",
                    format!("A replaced token could not be revoked yet; retrying: {e}"),
                )
                .await;
        }

        self.report_ready(&state, &valid).await?;
        Ok(Action::requeue(self.next_wake(&state, &valid)))
    }

    fn next_wake(&self, state: &TokenState, valid: &ValidSpec) -> Duration {
        let mut at = schedule::add(self.now, schedule::MAX_REQUEUE);
        if let Some(current) = &state.current {
            at = at.min(current.renewal_time);
            if let Some(every) = valid.verify_every {
                let last = self
                    .ctx
                    .with_memory(self.token, |m| m.verified_at)
                    .unwrap_or(current.issued_at);
                at = at.min(schedule::add(last, every));
            }
        }
        if let Some(next) = state.next_revocation() {
            at = at.min(next);
        }
        schedule::requeue_delay(self.now, at).max(Duration::from_millis(200))
    }

    async fn obtain(
        &self,
        client: &AwxClient,
        inputs: &Inputs,
        refresh_from: Option<&HeldToken>,
        intent: &IssueIntent,
    ) -> Result<(IssuedToken, Flavor, bool), AwxError> {
        let token = self.token;
        let flavor = if intent.gateway {
            Flavor::Gateway
        } else {
            Flavor::Controller
        };
        let scope = scope(token.spec.grant.scope);
        if let Some(current) = refresh_from
            && let (Some(refresh), Some(app)) = (&current.token.refresh_token, &inputs.client)
        {
            match client
                .refresh(current.token.flavor(), app, &refresh.to_secret(), scope)
                .await
            {
                Ok(issued) => return Ok((issued, current.token.flavor(), true)),
                Err(e) if e.requires_reissue() => {
                    info!(error = %e, "refresh failed; issuing a new token with the grant");
                }
                Err(e) => return Err(e),
            }
        }
        let issued = client
            .issue(flavor, &inputs.grant(token, &intent.tag), scope)
            .await?;
        Ok((issued, flavor, false))
    }

    fn hold(
        &self,
        issued: IssuedToken,
        flavor: Flavor,
        valid: &ValidSpec,
        inputs: &Inputs,
        refreshed: bool,
        previous: Option<&HeldToken>,
    ) -> HeldToken {
        let refresh_issued_at = issued.refresh_token.is_some().then_some(self.now);
        let renewal_time = self.renewal_time(self.now, issued.expires_at, refresh_issued_at, valid);
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
                    .map(|s| Sensitive::new(secrecy::ExposeSecret::expose_secret(s))),
                access_token: Sensitive::new(secrecy::ExposeSecret::expose_secret(
                    &issued.access_token,
                )),
                refresh_token: issued
                    .refresh_token
                    .as_ref()
                    .map(|r| Sensitive::new(secrecy::ExposeSecret::expose_secret(r))),
                token_id: issued.token_id,
                personal: matches!(issued.kind, TokenKind::Personal),
                gateway: flavor == Flavor::Gateway,
            },
            scope: issued.scope.clone(),
            user: issued
                .user
                .clone()
                .or_else(|| {
                    if refreshed {
                        previous.and_then(|p| p.user.clone())
                    } else {
                        None
                    }
                })
                .or_else(|| inputs.username.clone()),
            issued_at: self.now,
            refresh_issued_at,
            expires_at: issued.expires_at,
            renewal_time,
            inputs: inputs.fingerprint.clone(),
        }
    }

    /// A token request was interrupted (the process stopped between asking AWX and recording
    /// the answer). A personal token carries the request's tag in its description: find and
    /// delete it. An OAuth2 token cannot be told apart from others of the same user: report it.
    async fn recover_interrupted_issue(
        &self,
        client: &AwxClient,
        inputs: &Inputs,
        intent: &IssueIntent,
    ) -> Result<(), AwxError> {
        let flavor = if intent.gateway {
            Flavor::Gateway
        } else {
            Flavor::Controller
        };
        match (intent.personal, &inputs.username, &inputs.password) {
            (true, Some(username), Some(password)) => {
                let ids = client
                    .find_tagged_tokens(flavor, username, password, &intent.tag)
                    .await?;
                for id in &ids {
                    client
                        .delete_token_with_login(flavor, *id, username, password)
                        .await?;
                }
                info!(
                    found = ids.len(),
                    "cleaned up after an interrupted token request"
                );
                self.ctx
                    .metrics
                    .interrupted_issues
                    .get_or_create(&OutcomeLabels { outcome: "cleaned" })
                    .inc();
            }
            _ => {
                let note = format!(
                    "A token request started at {} was interrupted before its answer was recorded; \
                     AWX may hold one token of this user that the operator does not know. Revoke \
                     it in AWX if it exists (tokens of the user created at that time).",
                    intent.started_at.strftime("%Y-%m-%dT%H:%M:%SZ")
                );
                warn!("{note}");
                self.ctx
                    .metrics
                    .interrupted_issues
                    .get_or_create(&OutcomeLabels {
                        outcome: "unrecoverable",
                    })
                    .inc();
                self.ctx
                    .publish(self.token, EventType::Warning, "InterruptedIssue", note)
                    .await;
            }
        }
        Ok(())
    }

    /// Revokes `token` where it was issued (see `revoking_client`), with the application that
    /// issued it or else `fallback`, and counts it.
    async fn revoke_token(
        &self,
        token: &TokenRecord,
        current: &AwxClient,
        valid: &ValidSpec,
        ca_bundle: Option<&[u8]>,
        fallback: &RevocationCredentials,
    ) -> Result<(), AwxError> {
        let client = self.revoking_client(token, current, valid, ca_bundle)?;
        client
            .revoke(
                token.flavor(),
                &token.to_revoke(),
                &token.revocation(fallback),
            )
            .await?;
        self.ctx
            .metrics
            .tokens_revoked
            .get_or_create(&FlavorLabels {
                flavor: flavor_label(token.flavor()),
            })
            .inc();
        Ok(())
    }

    /// The client that can revoke `token`: the AWX that issued it, which is not the one in
    /// the spec any more when spec.awx.url changed. That host must still be allowed.
    fn revoking_client(
        &self,
        token: &TokenRecord,
        current: &AwxClient,
        valid: &ValidSpec,
        ca_bundle: Option<&[u8]>,
    ) -> Result<AwxClient, AwxError> {
        let Some(url) = token.url.as_deref().filter(|u| *u != valid.url.as_str()) else {
            return Ok(current.clone());
        };
        let url = url::Url::parse(url).map_err(|e| AwxError::InvalidEndpoint {
            detail: format!("the URL that issued the token is unreadable: {e}"),
        })?;
        let host = spec::host_of(&url);
        if let Some(allowed) = &self.ctx.settings.allowed_hosts
            && !decide::host_allowed(allowed, &host)
        {
            return Err(AwxError::InvalidEndpoint {
                detail: format!(
                    "the token was issued by {host}, which is not in --allowed-awx-hosts any more; revoke it there by hand"
                ),
            });
        }
        let issuer = ValidSpec {
            url,
            host,
            ..valid.clone()
        };
        self.ctx.awx.client(
            &issuer,
            self.token.spec.awx.insecure_skip_tls_verify,
            ca_bundle,
        )
    }

    /// Renewal time of a token issued at `issued_at`; the jitter is derived from the object and
    /// the issue time, so recomputing it gives the same answer.
    fn renewal_time(
        &self,
        issued_at: Timestamp,
        expires_at: Option<Timestamp>,
        refresh_issued_at: Option<Timestamp>,
        valid: &ValidSpec,
    ) -> Timestamp {
        RenewalSchedule {
            issued_at,
            expires_at,
            rotate_every: valid.rotate_every,
            renew_before: valid.renew_before,
            refresh_issued_at: refresh_issued_at
                .filter(|_| valid.strategy == RenewalStrategy::Refresh),
            jitter: decide::jitter(&[
                &self.token.uid().unwrap_or_default(),
                &issued_at.to_string(),
            ]),
        }
        .renewal_time()
    }

    /// Makes the target Secret hold the current token (repairing edits and deletions).
    /// Returns whether the token value in it changed from an earlier one.
    async fn write_target(
        &self,
        state: &TokenState,
        existing: Option<&Secret>,
    ) -> Result<bool, Error> {
        let Some(current) = &state.current else {
            return Ok(false);
        };
        let desired = secrets::render_target(self.token, current.token.access_token.expose());
        if secrets::up_to_date(existing, &desired) {
            return Ok(false);
        }
        let before = existing.and_then(|s| secrets::token_in(s, self.token));
        self.secrets
            .patch(
                &desired.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&desired),
            )
            .await?;
        Ok(before.is_some_and(|b| b != current.token.access_token.expose()))
    }

    async fn restart_workloads(&self) {
        if self.token.spec.rollout_restart_targets.is_empty() {
            return;
        }
        let ns = self.token.namespace().unwrap_or_default();
        let stamp = self.now.to_string();
        for target in &self.token.spec.rollout_restart_targets {
            let patch = serde_json::json!({"spec": {"template": {"metadata": {"annotations": {
                "awx-token-operator.io/restartedAt": stamp,
            }}}}});
            let params = PatchParams::default();
            let result =
                match target.kind {
                    crate::crd::WorkloadKind::Deployment => Api::<
                        k8s_openapi::api::apps::v1::Deployment,
                    >::namespaced(
                        self.ctx.client.clone(), &ns
                    )
                    .patch(&target.name, &params, &Patch::Merge(&patch))
                    .await
                    .map(drop),
                    crate::crd::WorkloadKind::StatefulSet => Api::<
                        k8s_openapi::api::apps::v1::StatefulSet,
                    >::namespaced(
                        self.ctx.client.clone(), &ns
                    )
                    .patch(&target.name, &params, &Patch::Merge(&patch))
                    .await
                    .map(drop),
                    crate::crd::WorkloadKind::DaemonSet => Api::<
                        k8s_openapi::api::apps::v1::DaemonSet,
                    >::namespaced(
                        self.ctx.client.clone(), &ns
                    )
                    .patch(&target.name, &params, &Patch::Merge(&patch))
                    .await
                    .map(drop),
                };
            match result {
                Ok(()) => {
                    info!(kind = ?target.kind, workload = %target.name, "restarted workload after token change")
                }
                Err(e) => {
                    warn!(kind = ?target.kind, workload = %target.name, error = %e, "could not restart workload");
                    self.ctx
                        .publish(
                            self.token,
                            EventType::Warning,
                            "RestartFailed",
                            format!("Could not restart {:?} {}: {e}", target.kind, target.name),
                        )
                        .await;
                }
            }
        }
    }

    async fn set_issuing(&self, trigger: &Trigger) -> Result<(), Error> {
        let mut status = self.status();
        let message = format!("Requesting a token from AWX ({})", trigger.describe());
        set_condition(
            &mut status.conditions,
            "Issuing",
            true,
            "Issuing",
            &message,
            self.now,
        );
        self.patch_status(status).await
    }

    async fn report_ready(&self, state: &TokenState, valid: &ValidSpec) -> Result<(), Error> {
        let Some(current) = &state.current else {
            return Ok(());
        };
        // Ready again, also when the failure was fixed without a new token (a spec or Secret
        // conflict resolved): no longer in backoff.
        self.ctx.with_memory(self.token, |m| m.in_backoff = false);
        let old = self.status();
        let mut status = AwxTokenStatus {
            conditions: old.conditions.clone(),
            observed_generation: self.token.metadata.generation,
            secret_name: Some(self.token.secret_name()),
            flavor: Some(flavor_label(current.token.flavor()).to_string()),
            token_id: current.token.token_id,
            scope: Some(current.scope.clone()),
            user: current.user.clone(),
            issued_at: Some(Time(current.issued_at)),
            expires_at: current.expires_at.map(Time),
            renewal_time: Some(Time(current.renewal_time)),
            refresh_token_expires_at: (valid.strategy == RenewalStrategy::Refresh)
                .then_some(current.refresh_issued_at)
                .flatten()
                .map(|t| Time(schedule::add(t, REFRESH_TOKEN_LIFETIME))),
            pending_revocations: state.retiring.len() as u32,
            rotated_for: state.rotated_for.clone(),
            failed_attempts: 0,
            last_failure_time: None,
            last_failure_message: None,
        };
        let message = format!(
            "Secret {} holds a working token; renewal at {}",
            self.token.secret_name(),
            current.renewal_time.strftime("%Y-%m-%dT%H:%M:%SZ")
        );
        set_condition(
            &mut status.conditions,
            "Ready",
            true,
            "TokenReady",
            &message,
            self.now,
        );
        set_condition(
            &mut status.conditions,
            "Issuing",
            false,
            "Idle",
            "No request in flight",
            self.now,
        );
        if self.token.spec.awx.insecure_skip_tls_verify {
            set_condition(
                &mut status.conditions,
                "InsecureTls",
                true,
                "InsecureSkipTlsVerify",
                "TLS certificates of AWX are not verified (spec.awx.insecureSkipTlsVerify)",
                self.now,
            );
        } else {
            status.conditions.retain(|c| c.type_ != "InsecureTls");
        }
        let expiry = current
            .expires_at
            .map(|t| t.as_millisecond() as f64 / 1000.0);
        self.ctx.metrics.set_schedule(
            &self.token.namespace().unwrap_or_default(),
            &self.token.name_any(),
            Some((
                expiry,
                current.renewal_time.as_millisecond() as f64 / 1000.0,
            )),
        );
        if !same_when_stored(&status, &old) {
            if self.token.spec.awx.insecure_skip_tls_verify
                && !old.conditions.iter().any(|c| c.type_ == "InsecureTls")
            {
                self.ctx
                    .publish(self.token, EventType::Warning, "InsecureSkipTlsVerify", "AWX's TLS certificate is not verified; anyone on the path can read the credentials and tokens".into())
                    .await;
            }
            self.patch_status(status).await?;
        }
        Ok(())
    }

    async fn report_suspended(&self, state: &TokenState) -> Result<Action, Error> {
        let mut status = self.status();
        let (ready, message) = if state.current.is_some() {
            (
                true,
                "Suspended: no AWX traffic; the Secret keeps its current token",
            )
        } else {
            (false, "Suspended before a token was issued: no AWX traffic")
        };
        set_condition(
            &mut status.conditions,
            "Ready",
            ready,
            "Suspended",
            message,
            self.now,
        );
        set_condition(
            &mut status.conditions,
            "Issuing",
            false,
            "Suspended",
            "No request in flight",
            self.now,
        );
        status.observed_generation = self.token.metadata.generation;
        if Some(&status) != self.token.status.as_ref() {
            self.patch_status(status).await?;
        }
        Ok(Action::await_change())
    }

    /// Records a failure: Ready=False with an actionable message, backoff bookkeeping, a
    /// Warning event. The target Secret is left as it is.
    async fn fail(
        &self,
        failure: Failure,
        inputs: Option<&str>,
        has_token: bool,
    ) -> Result<Action, Error> {
        let token = self.token;
        let old = self.status();
        let reason = failure.reason();
        let mut message = failure.to_string();
        if has_token {
            message.push_str(". The Secret keeps its previous token.");
        }
        let same_as_before = old.conditions.iter().any(|c| {
            c.type_ == "Ready" && c.status == "False" && c.reason == reason && c.message == message
        });
        let attempted = failure.reached_awx();
        let mut status = old.clone();
        if attempted || !same_as_before {
            status.failed_attempts = old.failed_attempts.saturating_add(1);
            status.last_failure_time = Some(Time(self.now));
        }
        status.last_failure_message = Some(message.clone());
        status.observed_generation = token.metadata.generation;
        set_condition(
            &mut status.conditions,
            "Ready",
            false,
            reason,
            &message,
            self.now,
        );
        set_condition(
            &mut status.conditions,
            "Issuing",
            false,
            "Failed",
            "No request in flight",
            self.now,
        );
        self.ctx
            .metrics
            .reconcile_errors
            .get_or_create(&ReasonLabels { reason })
            .inc();
        let retryable = failure.is_retryable();
        self.ctx.with_memory(token, |m| {
            m.in_backoff = true;
            m.permanent_failure_inputs = if retryable {
                None
            } else {
                inputs.map(str::to_string)
            };
        });
        if status != old {
            warn!(reason, message = %message, "AwxToken not ready");
            self.ctx
                .publish(token, EventType::Warning, reason, message)
                .await;
            self.patch_status(status.clone()).await?;
        }
        if retryable {
            // failed_attempts is at least 1 here: a first failure always counts.
            let wait = self.ctx.failure_wait(
                status.failed_attempts.max(1),
                &token.uid().unwrap_or_default(),
            );
            Ok(Action::requeue(wait))
        } else {
            Ok(Action::await_change())
        }
    }

    async fn patch_status(&self, status: AwxTokenStatus) -> Result<(), Error> {
        let api: Api<AwxToken> = Api::namespaced(
            self.ctx.client.clone(),
            &self.token.namespace().unwrap_or_default(),
        );
        let body = serde_json::json!({
            "apiVersion": AwxToken::api_version(&()),
            "kind": AwxToken::kind(&()),
            "status": status,
        });
        api.patch_status(
            &self.token.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
        Ok(())
    }

    /// Revokes every token of a deleted AwxToken, unless told not to.
    async fn cleanup(&self) -> Result<Action, Error> {
        let token = self.token;
        let skip = token
            .annotations()
            .get(SKIP_REVOKE_ANNOTATION)
            .is_some_and(|v| v == "true");
        if !token.spec.revoke_on_delete || skip {
            info!(skip, "deleted without revoking");
            return Ok(Action::await_change());
        }
        let (mut state, exists) = match self.load_state().await {
            Ok(s) => s,
            Err(Error::StateCorrupt(..)) | Err(Error::StateConflict(..)) => {
                (TokenState::default(), false)
            }
            Err(e) => return Err(e),
        };
        if !exists
            || (state.current.is_none() && state.retiring.is_empty() && state.issuing.is_none())
        {
            return Ok(Action::await_change());
        }
        let valid = spec::validate(&token.spec).map_err(|e| Error::Revoke(e.to_string()))?;
        // The URL may have changed since the tokens were issued: a deletion must not become
        // a way around the allow-list (it would send tokens and credentials there).
        if let Some(allowed) = &self.ctx.settings.allowed_hosts
            && !decide::host_allowed(allowed, &valid.host)
        {
            return Err(Error::Revoke(format!(
                "AWX host {:?} is not in the operator's --allowed-awx-hosts, so the tokens \
                 cannot be revoked there; no request was sent. To delete without revoking set \
                 annotation {SKIP_REVOKE_ANNOTATION}: \"true\"",
                valid.host
            )));
        }
        let inputs = read_inputs(token, &valid, &self.secrets).await?;
        let (revocation, ca) = match &inputs {
            Ok(i) => (i.revocation(), i.ca_bundle.clone()),
            // Without credentials, personal tokens can still delete themselves.
            Err(_) => (
                RevocationCredentials {
                    client: None,
                    user: None,
                },
                None,
            ),
        };
        let client = self
            .ctx
            .awx
            .client(
                &valid,
                token.spec.awx.insecure_skip_tls_verify,
                ca.as_deref(),
            )
            .map_err(|e| Error::Revoke(e.to_string()))?;
        // A token request interrupted just before the delete: its personal token is findable.
        if let (Some(intent), Ok(inputs)) = (state.issuing.take(), &inputs) {
            self.recover_interrupted_issue(&client, inputs, &intent)
                .await
                .map_err(|e| Error::Revoke(e.to_string()))?;
        }
        let mut all: Vec<_> = state.retiring.drain(..).collect();
        if let Some(current) = state.current.take() {
            all.push(current.retire(self.now));
        }
        let mut failed = Vec::new();
        let mut last_error = None;
        for retiring in all {
            match self
                .revoke_token(&retiring.token, &client, &valid, ca.as_deref(), &revocation)
                .await
            {
                Ok(()) => {}
                Err(e) => {
                    last_error = Some(e.to_string());
                    failed.push(retiring);
                }
            }
        }
        if let Some(error) = last_error {
            state.retiring = failed;
            self.save_state(&state).await?;
            let message = format!(
                "Could not revoke the token in AWX on delete: {error}. Retrying; to delete without revoking set annotation {SKIP_REVOKE_ANNOTATION}: \"true\""
            );
            let mut status = self.status();
            set_condition(
                &mut status.conditions,
                "Ready",
                false,
                "RevokeFailed",
                &message,
                self.now,
            );
            if Some(&status) != token.status.as_ref() {
                self.ctx
                    .publish(token, EventType::Warning, "RevokeFailed", message.clone())
                    .await;
                self.patch_status(status).await?;
            }
            return Err(Error::Revoke(message));
        }
        info!("revoked all tokens of the deleted AwxToken");
        Ok(Action::await_change())
    }
}

/// Whether two statuses are the same once stored. The API server keeps times to the second,
/// and the times computed here (issue, expiry, renewal) have sub-second parts: compared as
/// they are, a healthy AwxToken would get a status write on every reconcile.
fn same_when_stored(a: &AwxTokenStatus, b: &AwxTokenStatus) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

/// Sets a condition, keeping its lastTransitionTime when its status does not change.
fn set_condition(
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

/// Maps a Secret event to the AwxTokens it concerns: the owner of a Secret we write, and
/// every AwxToken that reads it (credentials or CA bundle).
fn affected_tokens(
    store: &Store<AwxToken>,
    secret: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<AwxToken>> {
    let ns = secret.namespace().unwrap_or_default();
    let name = secret.name_any();
    let mut refs = Vec::new();
    if secret
        .labels()
        .get(secrets::MANAGED_BY_LABEL)
        .map(String::as_str)
        == Some(secrets::MANAGED_BY)
        && let Some(owner) = secret.annotations().get(secrets::OWNER_ANNOTATION)
    {
        refs.push(ObjectRef::new(owner).within(&ns));
    }
    for token in store.state() {
        if token.namespace().as_deref() != Some(ns.as_str()) {
            continue;
        }
        let reads = token.spec.grant.credentials_secret_ref.name == name
            || token
                .spec
                .awx
                .ca_bundle_secret_ref
                .as_ref()
                .is_some_and(|c| c.name == name);
        if reads {
            refs.push(ObjectRef::from(token.as_ref()));
        }
    }
    refs
}

/// Runs the controller until `shutdown` resolves; `ready` is set once the caches are synced.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    ready: Arc<std::sync::atomic::AtomicBool>,
) {
    let client = ctx.client.clone();
    let (tokens, secret_api): (Api<AwxToken>, Api<PartialObjectMeta<Secret>>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let controller = Controller::new(tokens, watcher::Config::default().any_semantic());
    let store = controller.store();
    let ready_store = store.clone();
    tokio::spawn(async move {
        // The store's readiness signal wakes only one waiter (the controller's own runner also
        // waits on it), so poll it instead of waiting once.
        loop {
            match tokio::time::timeout(Duration::from_millis(250), ready_store.wait_until_ready())
                .await
            {
                Ok(Ok(())) => {
                    ready.store(true, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                Ok(Err(_)) => return,
                Err(_) => {}
            }
        }
    });
    let mapper_store = store.clone();
    // Secrets are watched as metadata only: their data never enters this process's caches.
    let secret_events =
        watcher(secret_api, watcher::Config::default().any_semantic()).touched_objects();
    controller
        .watches_stream(secret_events, move |secret| {
            affected_tokens(&mapper_store, &secret)
        })
        .with_config(
            kube::runtime::controller::Config::default().concurrency(ctx.settings.concurrency),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                debug!(error = %e, "controller event");
            }
        })
        .await;
}

#[cfg(test)]
mod reconcile_tests;

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
        set_condition(&mut conditions, "Issuing", false, "Idle", "", t1);
        let types: Vec<_> = conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Issuing", "Ready"]);
    }

    #[test]
    fn failures_map_to_reasons_and_retry_classes() {
        let missing = Failure::SecretMissing {
            name: "bot".into(),
            what: "AWX credentials",
        };
        assert_eq!(missing.reason(), "CredentialsNotFound");
        assert!(!missing.is_retryable());
        assert!(missing.to_string().contains("\"bot\""));
        let conflict = Failure::SecretConflict {
            name: "s".into(),
            why: "it was not created by awx-token-operator".into(),
        };
        assert_eq!(conflict.reason(), "SecretConflict");
        assert!(conflict.is_retryable());
        assert_eq!(
            Failure::HostNotAllowed("evil:1".into()).reason(),
            "HostNotAllowed"
        );
    }
}
