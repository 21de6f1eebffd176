//! The reconciler: from an `AwxToken` to a working token in a Secret, renewed and revoked.
//!
//! Each reconcile [observes](observe) (the AwxToken, its state, target and credentials
//! Secrets, all fresh from the API server), asks the [plan](plan) for the next
//! step (a pure function of what was observed and the time), [executes](execute) it, and
//! asks again until the plan is done; the [status](status) it then reports is rendered from
//! what it knows, never carried over from a cached copy. The Kubernetes and AWX sides are
//! traits ([`cluster::Cluster`], [`awx_api::AwxApi`]), so the same plan and executor run
//! against the API server and AWX here, and against in-memory fakes in the simulation tests.

pub mod awx_api;
pub mod cluster;
pub mod connections;
pub mod events;
pub mod execute;
pub mod observe;
pub mod pace;
pub mod plan;
pub mod status;
pub mod workloads;

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
        reflector::{self, ObjectRef},
        watcher::{self, watcher},
    },
};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    Error,
    awx::RequestObserver,
    connection::ConnectionKind,
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
    /// Reconcile only the AwxTokens this label selector matches (one shard of several).
    pub shard_selector: Option<String>,
    /// When this process started: verifications that came due while no operator ran are
    /// spread over the first minutes after it (see `plan::verification_due`).
    pub started_at: Option<Timestamp>,
    /// Where the Secrets of ClusterAwxConnections are read; whether inline spec.awx is refused.
    pub connections: crate::connection::Policy,
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
            shard_selector: None,
            started_at: None,
            connections: crate::connection::Policy {
                operator_namespace: "default".into(),
                require_connection_ref: false,
                cluster_connections: true,
            },
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
    /// Renewal starts per host under the rate limit.
    pub pacer: pace::RenewalPacer<PacedName>,
    /// The Secrets each AwxToken reads or writes, from the spec its last reconcile read.
    index: SecretIndex,
    /// Which connection each AwxToken names (kept by the connections module's watch).
    connection_users: Mutex<connections::Users>,
    /// Objects whose last attempt failed (the objects-in-backoff gauge).
    in_backoff: Mutex<HashSet<(String, String)>>,
    /// Consecutive Kubernetes API errors per object, for error_policy's backoff.
    api_errors: Mutex<HashMap<(String, String), u32>>,
    /// The Secrets of connections each AwxToken read in its last reconcile.
    connection_reads: Mutex<ConnectionReads>,
}

/// (namespace, Secret name) of a connection's Secret → the AwxTokens (namespace, name) that
/// read it, so that a change of an application secret or CA bundle reaches its tokens.
#[derive(Default)]
struct ConnectionReads {
    by_secret: HashMap<(String, String), HashSet<(String, String)>>,
    by_token: HashMap<(String, String), Vec<(String, String)>>,
}

impl ConnectionReads {
    fn set(&mut self, token: (String, String), secrets: Vec<(String, String)>) {
        for old in self.by_token.remove(&token).unwrap_or_default() {
            if let Some(tokens) = self.by_secret.get_mut(&old) {
                tokens.remove(&token);
                if tokens.is_empty() {
                    self.by_secret.remove(&old);
                }
            }
        }
        for secret in &secrets {
            self.by_secret
                .entry(secret.clone())
                .or_default()
                .insert(token.clone());
        }
        if !secrets.is_empty() {
            self.by_token.insert(token, secrets);
        }
    }

    fn tokens_of(&self, namespace: &str, name: &str) -> Vec<(String, String)> {
        self.by_secret
            .get(&(namespace.to_string(), name.to_string()))
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }
}

impl Context {
    pub fn new(client: Client, settings: Settings, metrics: Arc<Metrics>) -> Self {
        let observer: Arc<dyn RequestObserver> = metrics.clone();
        Self {
            cluster: KubeCluster::new(client, Some(settings.identity.clone())),
            awx: AwxPool::new(settings.awx_max_rps, settings.awx_max_in_flight, observer),
            pacer: pace::RenewalPacer::new(settings.awx_max_rps),
            settings,
            metrics,
            in_backoff: Mutex::default(),
            api_errors: Mutex::default(),
            connection_reads: Mutex::default(),
            index: SecretIndex::default(),
            connection_users: Mutex::default(),
        }
    }

    fn env(&self) -> Env<'_, KubeCluster, AwxPool, SystemClock> {
        Env {
            cluster: &self.cluster,
            awx: &self.awx,
            clock: &SystemClock,
            settings: &self.settings,
            metrics: &self.metrics,
            pacer: &self.pacer,
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

/// What the controller caches of an AwxToken: its metadata, no spec and no status. That
/// is enough to know which AwxTokens exist and when one changed in a way that calls for a
/// reconcile ([`worth_a_reconcile`]); the reconcile reads the whole object from the API
/// server. A cached full AwxToken took about 2.2 KiB of heap (its struct alone is over
/// 1.4 KiB), 22 MiB at 10,000: the largest part of a restarted operator's memory.
pub type CachedToken = PartialObjectMeta<AwxToken>;

/// How the controller, the pacer and the mappers name an AwxToken.
pub type TokenRef = ObjectRef<CachedToken>;

/// How the pacer names an AwxToken: "namespace/name" (neither holds a slash) in one
/// allocation, where a [`TokenRef`] takes 96 bytes and two; the pacer holds every renewable
/// AwxToken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacedName(Box<str>);

impl PacedName {
    pub(crate) fn of(token: &impl ResourceExt) -> Self {
        Self(
            format!(
                "{}/{}",
                token.namespace().unwrap_or_default(),
                token.name_any()
            )
            .into(),
        )
    }

    /// The controller's reference: namespace and name only (no uid or resourceVersion, which
    /// references compare without).
    fn to_ref(&self) -> TokenRef {
        let (namespace, name) = self.0.split_once('/').unwrap_or(("", &self.0));
        ObjectRef::new(name).within(namespace)
    }
}

fn key_of(token: &impl ResourceExt) -> (String, String) {
    (token.namespace().unwrap_or_default(), token.name_any())
}

/// Entry point called by kube-runtime for every change and requeue. The AwxToken is read
/// from the API server (the cache has its metadata only): one GET per reconcile, which also
/// makes every reconcile start from the latest spec and status.
pub async fn reconcile(cached: Arc<CachedToken>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = cached.namespace().unwrap_or_default();
    let name = cached.name_any();
    let span = info_span!("reconcile", namespace = %ns, awxtoken = %name);
    let api: Api<AwxToken> = Api::namespaced(ctx.cluster.client().clone(), &ns);
    let result = async {
        let Some(token) = api.get_opt(&name).await? else {
            // Deleted since the event: its metadata's Delete event follows.
            ctx.index.forget(&ns, &name);
            return Ok(Action::await_change());
        };
        ctx.index.set(&token);
        finalizer(&api, FINALIZER, Arc::new(token), |event| async {
            match event {
                FinalizerEvent::Apply(t) => apply(&t, &ctx).await,
                FinalizerEvent::Cleanup(t) => cleanup(&t, &ctx).await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)))
    }
    .instrument(span)
    .await;
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
    lock(&ctx.connection_reads).set(key.clone(), applied.connection_secrets);
    ctx.set_in_backoff(key.clone(), applied.failing_since.is_some());
    ctx.metrics.set_schedule(&key.0, &key.1, applied.schedule);
    ctx.metrics
        .set_failing_since(&key.0, &key.1, applied.failing_since);
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
    ctx.metrics.set_failing_since(&key.0, &key.1, None);
    ctx.set_in_backoff(key.clone(), false);
    lock(&ctx.api_errors).remove(&key);
    lock(&ctx.connection_reads).set(key, Vec::new());
    Ok(Action::await_change())
}

/// Kubernetes API errors, conflicts and stuck deletions (AWX failures are handled inside the
/// reconciler): retry with an exponential backoff per object.
pub fn error_policy(token: Arc<CachedToken>, error: &Error, ctx: Arc<Context>) -> Action {
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
                let n = errors.entry(key_of(token.as_ref())).or_default();
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

/// The Secrets each AwxToken reads or writes (credentials, target, CA bundle), indexed by
/// Secret, so that a Secret event finds its AwxTokens without a scan of all of them. Set
/// from the spec each reconcile reads; the AwxToken watch (metadata only) takes out the
/// deleted ones, and a relist those it no longer lists. Until its first reconcile an
/// AwxToken is in no entry: a Secret's event then finds nothing, and that reconcile reads
/// the Secret anyway.
#[derive(Default)]
pub struct SecretIndex {
    inner: Mutex<IndexInner>,
}

#[derive(Default)]
struct IndexInner {
    /// (namespace, Secret name) → AwxToken names in that namespace.
    by_secret: HashMap<(String, String), Vec<String>>,
    /// (namespace, AwxToken name) → the Secrets it is indexed under.
    by_token: HashMap<(String, String), Indexed>,
    /// During a relist: the AwxTokens listed so far.
    relisted: Option<HashSet<(String, String)>>,
}

/// The Secrets of one AwxToken.
#[derive(Default)]
struct Indexed {
    /// Indexed under `by_secret`.
    secrets: Vec<String>,
    /// Its target Secret has its own name (the default). Not kept in `by_secret`: that would
    /// cost each AwxToken four more allocations, and its key here already says it.
    own_name: bool,
}

impl IndexInner {
    fn remove(&mut self, key: &(String, String)) {
        let indexed = self.by_token.remove(key).unwrap_or_default();
        for secret in indexed.secrets {
            let skey = (key.0.clone(), secret);
            if let Some(names) = self.by_secret.get_mut(&skey) {
                names.retain(|n| *n != key.1);
                if names.is_empty() {
                    self.by_secret.remove(&skey);
                }
            }
        }
    }

    fn set(&mut self, token: &AwxToken) {
        let key = key_of(token);
        self.remove(&key);
        let target = token.secret_name();
        let own_name = target == key.1;
        let mut secrets = vec![token.spec.grant.credentials_secret_ref.name.clone(), target];
        secrets.extend(
            token
                .spec
                .awx
                .ca_bundle_secret_ref
                .as_ref()
                .map(|c| c.name.clone()),
        );
        secrets.sort();
        secrets.dedup();
        // A Secret named after the token (its target, or credentials of that name) is found
        // through `own_name`.
        secrets.retain(|s| !(own_name && *s == key.1));
        for secret in &secrets {
            self.by_secret
                .entry((key.0.clone(), secret.clone()))
                .or_default()
                .push(key.1.clone());
        }
        secrets.shrink_to_fit();
        self.by_token.insert(key, Indexed { secrets, own_name });
    }

    fn tokens_of(&self, namespace: &str, name: &str) -> Vec<String> {
        let key = (namespace.to_string(), name.to_string());
        let mut names = self.by_secret.get(&key).cloned().unwrap_or_default();
        if self.by_token.get(&key).is_some_and(|t| t.own_name) {
            names.push(key.1);
        }
        names
    }
}

impl SecretIndex {
    /// Indexes the Secrets `token`'s spec names.
    pub fn set(&self, token: &AwxToken) {
        lock(&self.inner).set(token);
    }

    /// Takes AwxToken `name` out of the index.
    pub fn forget(&self, namespace: &str, name: &str) {
        lock(&self.inner).remove(&(namespace.to_string(), name.to_string()));
    }

    /// Follows the AwxToken watch: deletions and relists. A new or changed AwxToken's
    /// Secrets are indexed by the reconcile its event calls for.
    pub fn update(&self, event: &watcher::Event<CachedToken>) {
        let mut inner = lock(&self.inner);
        match event {
            watcher::Event::Apply(_) => {}
            watcher::Event::InitApply(token) => {
                if let Some(seen) = inner.relisted.as_mut() {
                    seen.insert(key_of(token));
                }
            }
            watcher::Event::Delete(token) => inner.remove(&key_of(token)),
            watcher::Event::Init => inner.relisted = Some(HashSet::new()),
            watcher::Event::InitDone => {
                if let Some(seen) = inner.relisted.take() {
                    let gone: Vec<_> = inner
                        .by_token
                        .keys()
                        .filter(|k| !seen.contains(*k))
                        .cloned()
                        .collect();
                    for key in gone {
                        inner.remove(&key);
                    }
                }
            }
        }
    }

    /// The AwxTokens that read or write Secret `name` in `namespace`.
    pub fn tokens_of(&self, namespace: &str, name: &str) -> Vec<String> {
        lock(&self.inner).tokens_of(namespace, name)
    }
}

/// Maps a Secret event to the AwxTokens it concerns: the owner of a Secret we write, every
/// AwxToken that reads it (credentials or CA bundle), and every AwxToken whose target it is
/// (a conflicting Secret that changes may now be writable). The echo of this process's own
/// write concerns nobody: the reconcile that wrote it knew.
fn affected_tokens(
    index: &SecretIndex,
    ctx: &Context,
    secret: &PartialObjectMeta<Secret>,
) -> Vec<TokenRef> {
    let ns = secret.namespace().unwrap_or_default();
    let name = secret.name_any();
    let mut names = index.tokens_of(&ns, &name);
    // Tokens in other namespaces that read this Secret through their connection.
    let through_connections = lock(&ctx.connection_reads).tokens_of(&ns, &name);
    if names.is_empty()
        && through_connections.is_empty()
        && secret.labels().get(secrets::MANAGED_BY_LABEL).is_none()
    {
        return Vec::new();
    }
    if ctx
        .cluster
        .is_own_write(&ns, &name, secret.resource_version().as_deref())
    {
        return Vec::new();
    }
    if secret
        .labels()
        .get(secrets::MANAGED_BY_LABEL)
        .map(String::as_str)
        == Some(secrets::MANAGED_BY)
        && let Some(owner) = secret.annotations().get(secrets::OWNER_ANNOTATION)
    {
        names.push(owner.clone());
    }
    let mut refs: Vec<(String, String)> = names
        .into_iter()
        .map(|n| (ns.clone(), n))
        .chain(through_connections)
        .collect();
    refs.sort();
    refs.dedup();
    refs.into_iter()
        .map(|(ns, n)| ObjectRef::new(&n).within(&ns))
        .collect()
}

/// What the cache keeps of an AwxToken's metadata: no managed fields, no last-applied copy of
/// the spec (most of an object's bytes, read by nothing here), no apiVersion and kind.
fn slim(token: &mut CachedToken) {
    token.types = None;
    token.managed_fields_mut().clear();
    token
        .annotations_mut()
        .remove("kubectl.kubernetes.io/last-applied-configuration");
}

/// What of an AwxToken calls for a reconcile: its spec (generation), labels, annotations
/// (rotate, skip-revoke), finalizers and deletion. Not its status, which this operator
/// writes itself.
fn worth_a_reconcile(token: &impl kube::Resource) -> Option<u64> {
    let meta = token.meta();
    Some(hash_of(&(
        meta.generation,
        &meta.labels,
        &meta.annotations,
        &meta.finalizers,
        meta.deletion_timestamp
            .as_ref()
            .map(|t| t.0.as_millisecond()),
    )))
}

/// A 64-bit hash of `value`, the same in every run: what this process keeps in place of
/// whole values it only needs to compare (predicates, written statuses, event keys).
pub(crate) fn hash_of<T: std::hash::Hash + ?Sized>(value: &T) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(value)
}

/// Objects per page when a watcher lists AwxTokens or Secrets (at startup, and again whenever
/// a watch has to start over).
const LIST_PAGE: u32 = 100;

/// How this operator lists what it watches in numbers: read from etcd in pages of
/// [`LIST_PAGE`]. A list at any resource version (kube-rs' `any_semantic`, `resourceVersion=0`)
/// is answered from kube-apiserver's watch cache in one piece, whatever the limit (so on the
/// test cluster's v1.20): an operator started over 10,000 AwxTokens then parsed 10,000 full
/// objects at once, managed fields and all, in each of its two AwxToken watchers. In the
/// scale benchmark at N = 1,000, that was 8.8 of a restarted operator's 13 MiB of peak heap.
pub(crate) fn paged_lists() -> watcher::Config {
    watcher::Config::default().page_size(LIST_PAGE)
}

/// Runs the controller until `shutdown` resolves; `ready` is set once the caches are synced.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    ready: Arc<std::sync::atomic::AtomicBool>,
) {
    let client = ctx.cluster.client().clone();
    // AwxTokens and Secrets are both watched as metadata only (see [`CachedToken`]).
    let (tokens, secret_api): (Api<CachedToken>, Api<PartialObjectMeta<Secret>>) = match &namespace
    {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let mut watcher_config = paged_lists();
    if let Some(selector) = &ctx.settings.shard_selector {
        watcher_config = watcher_config.labels(selector);
    }
    let (store, writer) = reflector::store();
    let indexer = ctx.clone();
    let token_events = watcher(tokens, watcher_config)
        .default_backoff()
        .modify(slim)
        .reflect(writer)
        .inspect_ok(move |event| indexer.index.update(event))
        .applied_objects()
        .predicate_filter(worth_a_reconcile, Default::default())
        .map_ok(|mut token| {
            // This object only names what to reconcile (the reconcile reads the AwxToken).
            // The controller keeps that name twice per AwxToken for as long as a reconcile
            // is scheduled, i.e. always: without the uid and resourceVersion, which nothing
            // compares, a name costs two allocations rather than four.
            token.metadata.uid = None;
            token.metadata.resource_version = None;
            token
        });
    let controller = Controller::for_stream(token_events, store.clone());
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
    let mapper_ctx = ctx.clone();
    let (cluster_store, namespaced_store) = (store.clone(), store.clone());
    let (cluster_ctx, namespaced_ctx) = (ctx.clone(), ctx.clone());
    let connection_client = ctx.cluster.client().clone();
    let namespaced_connections = match &namespace {
        Some(ns) => Api::namespaced(connection_client.clone(), ns),
        None => Api::all(connection_client.clone()),
    };
    // An operator that watches one namespace has no rights on cluster-scoped objects.
    let cluster_connections = namespace.is_none().then(|| Api::all(connection_client));
    let connections_task = tokio::spawn(connections::run(ctx.clone(), namespace.clone()));
    // Secrets are watched as metadata only: their data never enters this process's caches,
    // and nothing of them is kept.
    let secret_events = watcher(secret_api, paged_lists())
        .default_backoff()
        .touched_objects();
    controller
        .watches_stream(secret_events, move |secret| {
            affected_tokens(&mapper_ctx.index, &mapper_ctx, &secret)
        })
        .watches_stream(
            connections::spec_changes::<crate::connection::ClusterAwxConnection>(
                cluster_connections,
            ),
            move |c| {
                connections::users(
                    &cluster_ctx,
                    &cluster_store,
                    ConnectionKind::ClusterAwxConnection,
                    None,
                    &c.name_any(),
                )
            },
        )
        .watches_stream(
            connections::spec_changes::<crate::connection::AwxConnection>(Some(
                namespaced_connections,
            )),
            move |c| {
                connections::users(
                    &namespaced_ctx,
                    &namespaced_store,
                    ConnectionKind::AwxConnection,
                    c.namespace().as_deref(),
                    &c.name_any(),
                )
            },
        )
        .reconcile_on(paced_renewals(ctx.clone(), store.clone()))
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
    connections_task.abort();
}

/// How often the pacer is asked for renewals pulled earlier than their reconcile.
const PACER_TICK: Duration = Duration::from_secs(1);

/// AwxTokens to reconcile because a renewal due after theirs pulled their start earlier than
/// the reconcile they scheduled; once a minute the pacer drops tokens gone from the cache.
fn paced_renewals(
    ctx: Arc<Context>,
    store: reflector::Store<CachedToken>,
) -> impl futures::Stream<Item = TokenRef> + Send + 'static {
    futures::stream::unfold(0u64, move |tick| {
        let (ctx, store) = (ctx.clone(), store.clone());
        async move {
            tokio::time::sleep(PACER_TICK).await;
            if tick % 60 == 59 {
                ctx.pacer.retain(|r| store.get(&r.to_ref()).is_some());
            }
            let due = ctx
                .pacer
                .overdue(schedule::add(Timestamp::now(), PACER_TICK));
            if !due.is_empty() {
                debug!(count = due.len(), "renewals to start earlier");
            }
            let due: Vec<TokenRef> = due.iter().map(PacedName::to_ref).collect();
            Some((futures::stream::iter(due), tick + 1))
        }
    })
    .flatten()
}

use futures::{StreamExt as _, TryStreamExt as _};

#[cfg(test)]
mod index_tests {
    use super::*;
    use crate::fixtures as fx;

    fn token(name: &str, credentials: &str) -> AwxToken {
        let mut t = fx::awx_token("http://127.0.0.1:1/");
        t.metadata.name = Some(name.into());
        t.spec.grant.credentials_secret_ref.name = credentials.into();
        t.spec.secret.name = None;
        t
    }

    fn of(index: &SecretIndex, secret: &str) -> Vec<String> {
        let mut names = index.tokens_of(fx::NAMESPACE, secret);
        names.sort();
        names
    }

    /// The metadata of `token`, as the watch gives it.
    fn meta(token: &AwxToken) -> CachedToken {
        use kube::core::PartialObjectMetaExt as _;
        token.metadata.clone().into_response_partial()
    }

    #[test]
    fn reconciles_index_the_spec_and_the_watch_takes_out_what_is_gone() {
        let index = SecretIndex::default();
        index.set(&token("a", "creds"));
        index.set(&token("b", "creds"));
        assert_eq!(of(&index, "creds"), ["a", "b"]);
        assert_eq!(
            of(&index, "a"),
            ["a"],
            "the target (named after the AwxToken)"
        );
        assert!(of(&index, "other").is_empty());
        assert_eq!(
            lock(&index.inner).by_secret.len(),
            1,
            "only the credentials are kept by Secret; a target named after its AwxToken is not"
        );
        // A target of another name is indexed by that name, and not by the AwxToken's.
        let mut named = token("d", "creds");
        named.spec.secret.name = Some("d-token".into());
        index.set(&named);
        assert_eq!(of(&index, "d-token"), ["d"]);
        assert!(of(&index, "d").is_empty());
        index.update(&watcher::Event::Delete(meta(&named)));
        assert!(of(&index, "d-token").is_empty());
        // Credentials named like the AwxToken itself (its target too): found once.
        index.set(&token("e", "e"));
        assert_eq!(of(&index, "e"), ["e"]);
        // Gone when the reconcile found it deleted.
        index.forget(fx::NAMESPACE, "e");
        assert!(of(&index, "e").is_empty());
        // A changed spec moves the token in the index once a reconcile has read it; the
        // watch event alone (metadata) changes nothing.
        index.update(&watcher::Event::Apply(meta(&token("a", "creds-2"))));
        assert_eq!(of(&index, "creds"), ["a", "b"]);
        index.set(&token("a", "creds-2"));
        assert_eq!(of(&index, "creds"), ["b"]);
        assert_eq!(of(&index, "creds-2"), ["a"]);
        index.update(&watcher::Event::Delete(meta(&token("b", "creds"))));
        assert!(of(&index, "creds").is_empty());
        assert!(of(&index, "b").is_empty());
        // A relist keeps what it lists and forgets the rest.
        index.set(&token("c", "creds"));
        index.update(&watcher::Event::Init);
        index.update(&watcher::Event::InitApply(meta(&token("a", "creds-2"))));
        assert_eq!(of(&index, "creds"), ["c"], "kept until the relist is done");
        index.update(&watcher::Event::InitDone);
        assert!(of(&index, "creds").is_empty());
        assert_eq!(of(&index, "creds-2"), ["a"]);
        assert_eq!(lock(&index.inner).by_token.len(), 1);
    }

    #[test]
    fn the_pacer_names_the_object_the_controller_reconciles() {
        let t = token("ci-bot", "creds");
        assert_eq!(
            PacedName::of(&t).to_ref(),
            ObjectRef::new("ci-bot").within(fx::NAMESPACE)
        );
    }

    #[test]
    fn only_the_status_does_not_call_for_a_reconcile() {
        let t = token("a", "creds");
        let mut status_only = t.clone();
        status_only.status = Some(Default::default());
        status_only.metadata.resource_version = Some("4712".into());
        assert_eq!(worth_a_reconcile(&t), worth_a_reconcile(&status_only));
        assert_eq!(
            worth_a_reconcile(&t),
            worth_a_reconcile(&meta(&t)),
            "the same from the metadata the controller caches"
        );
        let mut rotated = t.clone();
        rotated
            .annotations_mut()
            .insert(crate::crd::ROTATE_ANNOTATION.into(), "now".into());
        assert_ne!(worth_a_reconcile(&t), worth_a_reconcile(&rotated));
        let mut respec = t.clone();
        respec.metadata.generation = Some(2);
        assert_ne!(worth_a_reconcile(&t), worth_a_reconcile(&respec));
        let mut deleting = t.clone();
        deleting.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        );
        assert_ne!(worth_a_reconcile(&t), worth_a_reconcile(&deleting));
    }
}
