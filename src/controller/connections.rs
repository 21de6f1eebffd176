//! The connections' own reconcile, and which AwxTokens a connection's change concerns.
//!
//! A ClusterAwxConnection or AwxConnection reports in its status whether AWX answers at its
//! URL and in which flavour (detected once per connection, not per token), how many AwxTokens
//! use it and the last error. AWX is asked at most once per [`PROBE_EVERY`] per connection,
//! and again at once when its spec changes; a failed probe is retried after [`RETRY_EVERY`].
//! The AwxTokens themselves are re-reconciled when a connection's spec changes (its generation),
//! when it is deleted, and when one of its Secrets changes (`ConnectionReads` in the parent).

use std::{
    collections::HashMap,
    fmt::Debug,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt, stream::BoxStream};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        reflector::{self, ObjectRef, Store},
        watcher::{self, watcher},
    },
};
use serde::{Serialize, de::DeserializeOwned};
use tracing::{debug, info};

use super::{Context, FIELD_MANAGER, awx_api::Connection, cluster::Cluster, lock};
use crate::{
    Error,
    awx::Flavor,
    connection::{
        AwxConnection, AwxConnectionStatus, ClusterAwxConnection, ConnectionKind, ConnectionView,
    },
    crd::{AwxToken, FlavorSpec},
};

/// How often AWX is asked again whether it answers at a healthy connection's URL.
pub const PROBE_EVERY: Duration = Duration::from_secs(300);
/// How soon a failed probe is tried again.
pub const RETRY_EVERY: Duration = Duration::from_secs(30);

/// What the two connection kinds have in common for their reconcile.
pub trait ConnectionObject:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug + Send + Sync + 'static
{
    const KIND: ConnectionKind;
    fn view(&self) -> ConnectionView;
    fn status(&self) -> Option<&AwxConnectionStatus>;
    /// The API for this object (cluster-wide or in its namespace).
    fn api_for(&self, client: kube::Client) -> Api<Self>;
}

impl ConnectionObject for ClusterAwxConnection {
    const KIND: ConnectionKind = ConnectionKind::ClusterAwxConnection;
    fn view(&self) -> ConnectionView {
        ConnectionView::of_cluster(self)
    }
    fn status(&self) -> Option<&AwxConnectionStatus> {
        self.status.as_ref()
    }
    fn api_for(&self, client: kube::Client) -> Api<Self> {
        Api::all(client)
    }
}

impl ConnectionObject for AwxConnection {
    const KIND: ConnectionKind = ConnectionKind::AwxConnection;
    fn view(&self) -> ConnectionView {
        ConnectionView::of_namespaced(self)
    }
    fn status(&self) -> Option<&AwxConnectionStatus> {
        self.status.as_ref()
    }
    fn api_for(&self, client: kube::Client) -> Api<Self> {
        Api::namespaced(client, &self.namespace().unwrap_or_default())
    }
}

/// Connections whose spec changed (a new generation) or that were deleted: what concerns
/// their AwxTokens. Status writes do not pass. `None`: an empty stream.
pub fn spec_changes<K: ConnectionObject>(
    api: Option<Api<K>>,
) -> BoxStream<'static, Result<K, watcher::Error>> {
    let Some(api) = api else {
        return futures::stream::empty().boxed();
    };
    let seen: Mutex<HashMap<String, Option<i64>>> = Mutex::default();
    watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .filter_map(move |event| {
            let passed = match event {
                Err(e) => Some(Err(e)),
                Ok(watcher::Event::Apply(c) | watcher::Event::InitApply(c)) => {
                    let uid = c.uid().unwrap_or_default();
                    let generation = c.meta().generation;
                    let old = lock(&seen).insert(uid, generation);
                    (old != Some(generation)).then_some(Ok(c))
                }
                Ok(watcher::Event::Delete(c)) => {
                    lock(&seen).remove(&c.uid().unwrap_or_default());
                    Some(Ok(c))
                }
                Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
            };
            futures::future::ready(passed)
        })
        .boxed()
}

/// The AwxTokens of this process (in `store`, its shard) that name connection `name` of
/// `kind` (in `namespace`, for the namespaced kind).
pub fn users(
    ctx: &Context,
    store: &Store<super::CachedToken>,
    kind: ConnectionKind,
    namespace: Option<&str>,
    name: &str,
) -> Vec<super::TokenRef> {
    let key = (
        kind,
        namespace.unwrap_or_default().to_string(),
        name.to_string(),
    );
    lock(&ctx.connection_users)
        .naming(&key)
        .map(|(ns, name)| ObjectRef::new(name).within(ns))
        .filter(|r| store.get(r).is_some())
        .collect()
}

/// What the connections' reconcile shares.
struct Shared {
    ctx: Arc<Context>,
    /// uid → the last probe.
    probes: Mutex<HashMap<String, Probe>>,
}

/// A probe of a connection: the generation it was made for, when, and what AWX answered.
type Probe = (
    Option<i64>,
    Instant,
    Result<(Flavor, Option<String>), String>,
);

/// A connection as the AwxTokens name it: kind, namespace (the namespaced kind only), name.
type ConnectionKey = (ConnectionKind, String, String);

/// An AwxToken by namespace and name.
type TokenName = (String, String);

/// Which connection each AwxToken names (by uid), from a watch of every AwxToken, whatever
/// this process's shard: a connection's token count is the same in every shard. It also
/// tells the controller which AwxTokens a connection's change concerns ([`users`]): the
/// controller caches metadata only.
#[derive(Default)]
pub struct Users {
    by_token: HashMap<String, (ConnectionKey, TokenName)>,
    /// During a relist: the AwxTokens listed so far.
    relisted: Option<HashMap<String, (ConnectionKey, TokenName)>>,
}

impl Users {
    fn key_of(token: &AwxToken) -> Option<ConnectionKey> {
        let r = token.spec.connection_ref.as_ref()?;
        let namespace = match r.kind {
            ConnectionKind::ClusterAwxConnection => String::new(),
            ConnectionKind::AwxConnection => token.namespace().unwrap_or_default(),
        };
        Some((r.kind, namespace, r.name.clone()))
    }

    fn entry_of(token: &AwxToken) -> Option<(ConnectionKey, TokenName)> {
        let name = (token.namespace().unwrap_or_default(), token.name_any());
        Some((Self::key_of(token)?, name))
    }

    fn update(&mut self, event: &watcher::Event<AwxToken>) {
        match event {
            watcher::Event::Apply(t) => {
                let uid = t.uid().unwrap_or_default();
                match Self::entry_of(t) {
                    Some(entry) => self.by_token.insert(uid, entry),
                    None => self.by_token.remove(&uid),
                };
            }
            watcher::Event::Delete(t) => {
                self.by_token.remove(&t.uid().unwrap_or_default());
            }
            watcher::Event::Init => self.relisted = Some(HashMap::new()),
            watcher::Event::InitApply(t) => {
                if let (Some(listed), Some(entry)) = (self.relisted.as_mut(), Self::entry_of(t)) {
                    listed.insert(t.uid().unwrap_or_default(), entry);
                }
            }
            watcher::Event::InitDone => {
                if let Some(listed) = self.relisted.take() {
                    self.by_token = listed;
                }
            }
        }
    }

    /// The AwxTokens that name connection `key`.
    fn naming<'a>(&'a self, key: &'a ConnectionKey) -> impl Iterator<Item = &'a TokenName> + 'a {
        self.by_token
            .values()
            .filter(move |(k, _)| k == key)
            .map(|(_, token)| token)
    }

    fn count(&self, key: &ConnectionKey) -> u32 {
        self.naming(key).count() as u32
    }
}

/// The connections, and those of them to reconcile: a new generation only. A status write
/// (this process's, or another's) wakes nothing, so two processes never take turns
/// rewriting it.
fn primary<K: ConnectionObject>(
    api: Api<K>,
) -> (
    Store<K>,
    impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
) {
    let (store, writer) = reflector::store();
    let changes = watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(kube::runtime::predicates::generation, Default::default());
    (store, changes)
}

/// Runs the reconcile of both connection kinds (the cluster-scoped one only when the operator
/// watches every namespace) until the process ends. AwxToken events of tokens that name a
/// connection wake it, so its token count follows.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    let client = ctx.cluster.client().clone();
    let shared = Arc::new(Shared {
        ctx,
        probes: Mutex::default(),
    });
    let token_api: Api<AwxToken> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // Every AwxToken (no shard selector), for the count; each event wakes its connection.
    let counter = shared.clone();
    let token_events = watcher(token_api, super::paged_lists())
        .default_backoff()
        .inspect_ok(move |event| lock(&counter.ctx.connection_users).update(event))
        .touched_objects()
        .filter_map(|t| futures::future::ready(t.ok().and_then(|t| Users::key_of(&t))))
        .boxed();
    let (to_namespaced, namespaced_wakes) = futures::channel::mpsc::unbounded();
    let (to_cluster, cluster_wakes) = futures::channel::mpsc::unbounded();
    let fan_out = token_events.for_each(move |(kind, ns, name)| {
        // A closed channel: its controller has stopped, and the process with it.
        match kind {
            ConnectionKind::AwxConnection => {
                let _ = to_namespaced.unbounded_send(ObjectRef::new(&name).within(&ns));
            }
            ConnectionKind::ClusterAwxConnection => {
                let _ = to_cluster.unbounded_send(ObjectRef::new(&name));
            }
        }
        futures::future::ready(())
    });
    let namespaced_api: Api<AwxConnection> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (store, changes) = primary(namespaced_api);
    let namespaced = Controller::for_stream(changes, store)
        .reconcile_on(namespaced_wakes)
        .run(reconcile::<AwxConnection>, error_policy, shared.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                debug!(error = %e, "AwxConnection controller event");
            }
        });
    if namespace.is_some() {
        futures::join!(fan_out, namespaced);
        return;
    }
    let (store, changes) = primary(Api::<ClusterAwxConnection>::all(client));
    let cluster = Controller::for_stream(changes, store)
        .reconcile_on(cluster_wakes)
        .run(reconcile::<ClusterAwxConnection>, error_policy, shared)
        .for_each(|r| async move {
            if let Err(e) = r {
                debug!(error = %e, "ClusterAwxConnection controller event");
            }
        });
    futures::join!(fan_out, namespaced, cluster);
}

fn error_policy<K: ConnectionObject>(_: Arc<K>, error: &Error, _: Arc<Shared>) -> Action {
    debug!(%error, "connection reconcile failed");
    Action::requeue(RETRY_EVERY)
}

async fn reconcile<K: ConnectionObject>(obj: Arc<K>, shared: Arc<Shared>) -> Result<Action, Error> {
    let uid = obj.uid().unwrap_or_default();
    let generation = obj.meta().generation;
    let namespace = obj.namespace();
    let key = (
        K::KIND,
        match K::KIND {
            ConnectionKind::ClusterAwxConnection => String::new(),
            ConnectionKind::AwxConnection => namespace.clone().unwrap_or_default(),
        },
        obj.name_any(),
    );
    let tokens = lock(&shared.ctx.connection_users).count(&key);
    let last = lock(&shared.probes).get(&uid).cloned();
    let outcome = match last {
        Some((g, at, outcome))
            if g == generation
                && at.elapsed()
                    < if outcome.is_ok() {
                        PROBE_EVERY
                    } else {
                        RETRY_EVERY
                    } =>
        {
            outcome
        }
        _ => {
            let outcome = probe(&*obj, &shared.ctx).await;
            info!(kind = ?K::KIND, name = %obj.name_any(), ok = outcome.is_ok(), "probed AWX for a connection");
            lock(&shared.probes).insert(uid.clone(), (generation, Instant::now(), outcome.clone()));
            outcome
        }
    };
    let old = obj.status().cloned().unwrap_or_default();
    let (status, reason, message) = match &outcome {
        Ok((flavor, _)) => (
            "True",
            "Reachable",
            format!("AWX answers at {} as {flavor}", obj.view().awx.url),
        ),
        Err(e) => ("False", "Unreachable", e.clone()),
    };
    let mut condition = Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(jiff::Timestamp::now()),
    };
    if let Some(prev) = old.conditions.iter().find(|c| c.type_ == "Ready")
        && prev.status == condition.status
    {
        condition.last_transition_time = prev.last_transition_time.clone();
    }
    let new = AwxConnectionStatus {
        conditions: vec![condition],
        flavor: outcome.as_ref().ok().map(|(f, _)| f.as_str().to_string()),
        version: outcome.as_ref().ok().and_then(|(_, v)| v.clone()),
        tokens,
        last_error: outcome.as_ref().err().cloned(),
        observed_generation: generation,
    };
    if new != old {
        let body = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": new,
        });
        obj.api_for(shared.ctx.cluster.client().clone())
            .patch_status(
                &obj.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await?;
    }
    let probed_at = lock(&shared.probes).get(&uid).map(|p| p.1);
    let every = if outcome.is_ok() {
        PROBE_EVERY
    } else {
        RETRY_EVERY
    };
    let next = probed_at.map_or(every, |at| every.saturating_sub(at.elapsed()));
    Ok(Action::requeue(next.max(Duration::from_secs(1))))
}

/// Asks AWX at the connection's URL for its flavour and version; Err says what went wrong, for a person.
async fn probe<K: ConnectionObject>(
    obj: &K,
    ctx: &Context,
) -> Result<(Flavor, Option<String>), String> {
    let view = obj.view();
    let awx = &view.awx;
    let url =
        crate::spec::parse_url(&awx.url, awx.allow_insecure_http).map_err(|e| e.to_string())?;
    let secrets_namespace = match K::KIND {
        ConnectionKind::ClusterAwxConnection => ctx.settings.connections.operator_namespace.clone(),
        ConnectionKind::AwxConnection => obj.namespace().unwrap_or_default(),
    };
    let ca_bundle = match &awx.ca_bundle_secret_ref {
        None => None,
        Some(ca) => {
            let secret = ctx
                .cluster
                .get_secret(&secrets_namespace, &ca.name)
                .await
                .map_err(|e| format!("the CA bundle Secret {:?} cannot be read: {e}", ca.name))?;
            let pem = secret
                .and_then(|s| s.data)
                .and_then(|d| d.get(&ca.key).map(|v| v.0.clone()))
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    format!(
                        "Secret {:?} in namespace {secrets_namespace:?} has no CA bundle under key {:?}",
                        ca.name, ca.key
                    )
                })?;
            Some(pem)
        }
    };
    if let Some(app) = &view.application {
        let secret = ctx
            .cluster
            .get_secret(&secrets_namespace, &app.name)
            .await
            .map_err(|e| format!("the application Secret {:?} cannot be read: {e}", app.name))?;
        let has_id = secret
            .and_then(|s| s.data)
            .is_some_and(|d| d.get(&app.client_id_key).is_some_and(|v| !v.0.is_empty()));
        if !has_id {
            return Err(format!(
                "Secret {:?} in namespace {secrets_namespace:?} has no application client id under key {:?}",
                app.name, app.client_id_key
            ));
        }
    }
    let at = Connection {
        host: crate::spec::host_of(&url),
        url,
        insecure_skip_tls_verify: awx.insecure_skip_tls_verify,
        timeout: Duration::from_secs(u64::from(awx.timeout_seconds.clamp(1, 300))),
        ca_bundle,
        narrower: view.requests_per_second.and_then(|rps| {
            Some((
                crate::connection::limit_key(K::KIND, obj.namespace().as_deref(), &obj.name_any()),
                std::num::NonZeroU32::new(rps)?,
            ))
        }),
    };
    let (detected, version) = ctx.awx.probe(&at).await.map_err(|e| e.to_string())?;
    match (awx.flavor, detected) {
        (FlavorSpec::Auto, _)
        | (FlavorSpec::Controller, Flavor::Controller)
        | (FlavorSpec::Gateway, Flavor::Gateway) => Ok((detected, version)),
        (wanted, f) => Err(format!(
            "spec.awx.flavor is {wanted:?}, but the server at {} answers as {f}",
            awx.url
        )),
    }
}
