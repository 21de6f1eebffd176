//! The reconciler: from an `AwxToken` to a working token in a Secret, renewed and revoked.
//!
//! Each reconcile [observes](observe) (the AwxToken from the watch cache; its state, target
//! and credentials Secrets fresh from the API server), asks the [plan](plan) for the next
//! step (a pure function of what was observed and the time), [executes](execute) it, and
//! asks again until the plan is done; the [status](status) it then reports is rendered from
//! what it knows, never carried over from a cached copy. The Kubernetes and AWX sides are
//! traits ([`cluster::Cluster`], [`awx_api::AwxApi`]), so the same plan and executor run
//! against the API server and AWX here, and against in-memory fakes in the simulation tests.

pub mod awx_api;
pub mod cluster;
pub mod execute;
pub mod observe;
pub mod plan;
pub mod status;

#[cfg(test)]
mod reconcile_tests;
#[cfg(test)]
mod simulation;

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client, ResourceExt,
    api::PartialObjectMeta,
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        finalizer::{Event as FinalizerEvent, finalizer},
        reflector::{ObjectRef, Store},
        watcher::{self, watcher},
    },
};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    Error,
    awx::RequestObserver,
    crd::{AwxToken, SKIP_REVOKE_ANNOTATION},
    decide,
    metrics::{Metrics, ReasonLabels, ResultLabels},
    schedule, secrets,
};
use awx_api::AwxPool;
use cluster::KubeCluster;
use execute::Env;

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
    /// This process, as its request markers name it: unique per process start.
    pub identity: String,
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
            identity: process_identity("awx-token-operator"),
        }
    }
}

/// `name` and a random suffix: a restarted process is another holder of request markers.
pub fn process_identity(name: &str) -> String {
    format!("{name}/{:08x}", rand::random::<u32>())
}

/// The time, as the reconciler sees it; the simulation tests move it by hand.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// What the reconciler shares between calls.
pub struct Context {
    pub cluster: KubeCluster,
    pub awx: AwxPool,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    /// Objects whose last attempt failed (the objects-in-backoff gauge).
    in_backoff: Mutex<HashSet<(String, String)>>,
    /// Consecutive Kubernetes API errors per object, for error_policy's backoff.
    api_errors: Mutex<HashMap<(String, String), u32>>,
}

impl Context {
    pub fn new(client: Client, settings: Settings, metrics: Arc<Metrics>) -> Self {
        let observer: Arc<dyn RequestObserver> = metrics.clone();
        Self {
            cluster: KubeCluster::new(client, Some(settings.identity.clone())),
            awx: AwxPool::new(settings.awx_max_rps, settings.awx_max_in_flight, observer),
            settings,
            metrics,
            in_backoff: Mutex::default(),
            api_errors: Mutex::default(),
        }
    }

    fn env(&self) -> Env<'_, KubeCluster, AwxPool, SystemClock> {
        Env {
            cluster: &self.cluster,
            awx: &self.awx,
            clock: &SystemClock,
            settings: &self.settings,
            metrics: &self.metrics,
        }
    }

    fn set_in_backoff(&self, key: (String, String), in_backoff: bool) {
        let mut set = lock(&self.in_backoff);
        let changed = if in_backoff {
            set.insert(key)
        } else {
            set.remove(&key)
        };
        if changed {
            self.metrics.objects_in_backoff.set(set.len() as i64);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn key_of(token: &AwxToken) -> (String, String) {
    (token.namespace().unwrap_or_default(), token.name_any())
}

/// Entry point called by kube-runtime for every change and requeue.
pub async fn reconcile(token: Arc<AwxToken>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = token.namespace().unwrap_or_default();
    let span = info_span!("reconcile", namespace = %ns, awxtoken = %token.name_any());
    let api: Api<AwxToken> = Api::namespaced(ctx.cluster.client().clone(), &ns);
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

async fn apply(token: &AwxToken, ctx: &Context) -> Result<Action, Error> {
    let applied = execute::apply(token, &ctx.env()).await?;
    let key = key_of(token);
    lock(&ctx.api_errors).remove(&key);
    ctx.set_in_backoff(key.clone(), applied.in_backoff);
    ctx.metrics.set_schedule(&key.0, &key.1, applied.schedule);
    Ok(applied.action)
}

async fn cleanup(token: &AwxToken, ctx: &Context) -> Result<Action, Error> {
    let skip = token
        .annotations()
        .get(SKIP_REVOKE_ANNOTATION)
        .is_some_and(|v| v == "true");
    if !token.spec.revoke_on_delete || skip {
        info!(skip, "deleted without revoking");
    } else {
        execute::cleanup(token, &ctx.env()).await?;
    }
    let key = key_of(token);
    ctx.metrics.set_schedule(&key.0, &key.1, None);
    ctx.set_in_backoff(key.clone(), false);
    lock(&ctx.api_errors).remove(&key);
    Ok(Action::await_change())
}

/// Kubernetes API errors, conflicts and stuck deletions (AWX failures are handled inside the
/// reconciler): retry with an exponential backoff per object.
pub fn error_policy(token: Arc<AwxToken>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ReasonLabels {
            reason: error.reason(),
        })
        .inc();
    let delay = match error.retry_in() {
        Some(delay) => delay,
        None => {
            let attempts = {
                let mut errors = lock(&ctx.api_errors);
                let n = errors.entry(key_of(&token)).or_default();
                *n = n.saturating_add(1);
                *n
            };
            let jitter = decide::jitter(&[&token.uid().unwrap_or_default(), &attempts.to_string()]);
            // Conflicts mean someone else wrote: read again soon.
            let base = if matches!(error.innermost(), Error::Conflict(_)) {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(1)
            };
            schedule::failure_backoff(attempts, base, ctx.settings.backoff_max, jitter)
        }
    };
    warn!(namespace = %token.namespace().unwrap_or_default(), name = %token.name_any(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Maps a Secret event to the AwxTokens it concerns: the owner of a Secret we write, every
/// AwxToken that reads it (credentials or CA bundle), and every AwxToken whose target it is
/// (a conflicting Secret that changes may now be writable).
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
        let concerns = token.spec.grant.credentials_secret_ref.name == name
            || token.secret_name() == name
            || token
                .spec
                .awx
                .ca_bundle_secret_ref
                .as_ref()
                .is_some_and(|c| c.name == name);
        if concerns {
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
    let client = ctx.cluster.client().clone();
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

use futures::StreamExt as _;
