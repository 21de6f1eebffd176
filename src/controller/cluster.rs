//! What the reconciler reads and writes in Kubernetes, as a trait: the operator runs it on
//! the API server ([`KubeCluster`]); the simulation tests run it in memory.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::{Mutex, PoisonError},
};

use jiff::Timestamp;
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment, StatefulSet},
    core::v1::{Namespace, ObjectReference, Secret},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use tracing::{debug, warn};

use super::{
    FIELD_MANAGER,
    events::{EventPublisher, Publication},
    hash_of,
    workloads::{self, Workload},
};
use crate::{
    Error,
    connection::{ClusterAwxConnection, ConnectionKind, ConnectionRef, ConnectionView},
    crd::{AwxToken, AwxTokenStatus, WorkloadKind},
    state::WorkloadRef,
};

/// An event about an AwxToken. The note never holds a secret value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

impl Event {
    pub fn normal(reason: &'static str, note: impl Into<String>) -> Self {
        Self {
            warning: false,
            reason,
            note: note.into(),
        }
    }
    pub fn warning(reason: &'static str, note: impl Into<String>) -> Self {
        Self {
            warning: true,
            reason,
            note: note.into(),
        }
    }
}

/// The Kubernetes side of a reconcile. Writes that must not overwrite what they did not read
/// fail with [`Error::Conflict`].
pub trait Cluster: Send + Sync {
    /// The connection `r` names, as seen from an AwxToken in `namespace`.
    fn connection(
        &self,
        namespace: &str,
        r: &ConnectionRef,
    ) -> impl Future<Output = Result<Option<ConnectionView>, Error>> + Send;

    /// The labels of a namespace (`None`: it does not exist).
    fn namespace_labels(
        &self,
        namespace: &str,
    ) -> impl Future<Output = Result<Option<BTreeMap<String, String>>, Error>> + Send;

    fn get_secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<Secret>, Error>> + Send;

    /// Creates `secret`; an existing one of that name is a conflict.
    fn create_secret(&self, secret: &Secret) -> impl Future<Output = Result<Secret, Error>> + Send;

    /// Replaces `secret`, if its `resourceVersion` is still the stored one.
    fn replace_secret(&self, secret: &Secret)
    -> impl Future<Output = Result<Secret, Error>> + Send;

    /// Server-side apply (forced, under the operator's field manager); with a
    /// `resourceVersion` set, only if the stored object still has it.
    fn apply_secret(&self, secret: &Secret) -> impl Future<Output = Result<Secret, Error>> + Send;

    /// Writes the status subresource.
    fn apply_status(
        &self,
        token: &AwxToken,
        status: &AwxTokenStatus,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Publishes an event about `token`; failing to is only logged.
    fn publish(&self, token: &AwxToken, event: Event) -> impl Future<Output = ()> + Send;

    /// The workloads of `kind` whose labels match `selector`.
    fn list_workloads(
        &self,
        namespace: &str,
        kind: WorkloadKind,
        selector: &str,
    ) -> impl Future<Output = Result<Vec<Workload>, Error>> + Send;

    /// One workload, if it exists.
    fn workload(
        &self,
        namespace: &str,
        id: &WorkloadRef,
    ) -> impl Future<Output = Result<Option<Workload>, Error>> + Send;

    /// Restarts `workload` by stamping its pod template with `at`, if it is still the version
    /// read (else [`Error::Conflict`]).
    fn restart(
        &self,
        namespace: &str,
        workload: &Workload,
        at: Timestamp,
    ) -> impl Future<Output = Result<Workload, Error>> + Send;

    /// Publishes an event about a workload; failing to is only logged.
    fn publish_on_workload(
        &self,
        namespace: &str,
        workload: &Workload,
        event: Event,
    ) -> impl Future<Output = ()> + Send;
}

/// The API server.
pub struct KubeCluster {
    client: Client,
    events: EventPublisher,
    /// Per Secret (namespace, name), the resource versions this process wrote whose watch
    /// events have not come back yet: those events are its own echo, not news.
    own_writes: Mutex<HashMap<(String, String), Vec<String>>>,
    /// Per AwxToken (a hash of its uid, namespace and name), the last status this process wrote: a hash of it and
    /// the resource version the write gave the object. A reconcile that runs before the cache
    /// has that version would otherwise write the same status again.
    status_writes: Mutex<HashMap<u64, (u64, u64)>>,
}

/// Own writes remembered per Secret; older ones are forgotten (their events then pass).
const OWN_WRITES_KEPT: usize = 4;

impl KubeCluster {
    pub fn new(client: Client, instance: Option<String>) -> Self {
        Self {
            events: EventPublisher::new(client.clone(), FIELD_MANAGER, instance),
            client,
            own_writes: Mutex::default(),
            status_writes: Mutex::default(),
        }
    }

    fn note_write(&self, written: &Secret) {
        let Some(version) = written.resource_version() else {
            return;
        };
        let mut own = self
            .own_writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let versions = own
            .entry((namespace_of(written), written.name_any()))
            .or_default();
        if versions.len() == OWN_WRITES_KEPT {
            versions.remove(0);
        }
        versions.push(version);
    }

    /// Whether a watch event shows a Secret as this process last wrote it (an echo of its
    /// own write). Any event for the Secret forgets the writes up to it.
    pub fn is_own_write(&self, namespace: &str, name: &str, version: Option<&str>) -> bool {
        let mut own = self
            .own_writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let key = (namespace.to_string(), name.to_string());
        let Some(versions) = own.get_mut(&key) else {
            return false;
        };
        let position = version.and_then(|v| versions.iter().position(|w| w == v));
        match position {
            Some(i) => {
                versions.drain(..=i);
                if versions.is_empty() {
                    own.remove(&key);
                }
                true
            }
            None => {
                own.remove(&key);
                false
            }
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn secrets(&self, namespace: &str) -> Api<Secret> {
        Api::namespaced(self.client.clone(), namespace)
    }
}

/// The workloads of kind `K` a list call returns, as `view` sees them.
async fn list_as<K>(
    client: Client,
    namespace: &str,
    params: &ListParams,
    view: fn(&K) -> Workload,
) -> Result<Vec<Workload>, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let list = Api::<K>::namespaced(client, namespace).list(params).await?;
    Ok(list.iter().map(view).collect())
}

/// One workload of kind `K`, if it exists, as `view` sees it.
async fn get_as<K>(
    client: Client,
    namespace: &str,
    name: &str,
    view: fn(&K) -> Workload,
) -> Result<Option<Workload>, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let found = Api::<K>::namespaced(client, namespace)
        .get_opt(name)
        .await?;
    Ok(found.as_ref().map(view))
}

/// A 409 (a precondition or an existing object) as [`Error::Conflict`].
fn conflict_or(e: kube::Error, what: &str) -> Error {
    match &e {
        kube::Error::Api(status) if status.code == 409 => Error::Conflict(what.to_string()),
        _ => Error::Kube(e),
    }
}

fn namespace_of(secret: &Secret) -> String {
    secret.namespace().unwrap_or_default()
}

impl Cluster for KubeCluster {
    async fn connection(
        &self,
        namespace: &str,
        r: &ConnectionRef,
    ) -> Result<Option<ConnectionView>, Error> {
        Ok(match r.kind {
            ConnectionKind::ClusterAwxConnection => {
                Api::<ClusterAwxConnection>::all(self.client.clone())
                    .get_opt(&r.name)
                    .await?
                    .as_ref()
                    .map(ConnectionView::of_cluster)
            }
            ConnectionKind::AwxConnection => {
                Api::<crate::connection::AwxConnection>::namespaced(self.client.clone(), namespace)
                    .get_opt(&r.name)
                    .await?
                    .as_ref()
                    .map(ConnectionView::of_namespaced)
            }
        })
    }

    async fn namespace_labels(
        &self,
        namespace: &str,
    ) -> Result<Option<BTreeMap<String, String>>, Error> {
        let found = Api::<Namespace>::all(self.client.clone())
            .get_metadata_opt(namespace)
            .await?;
        Ok(found.map(|n| n.metadata.labels.unwrap_or_default()))
    }

    async fn get_secret(&self, namespace: &str, name: &str) -> Result<Option<Secret>, Error> {
        Ok(self.secrets(namespace).get_opt(name).await?)
    }

    async fn create_secret(&self, secret: &Secret) -> Result<Secret, Error> {
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        let written = self
            .secrets(&namespace_of(secret))
            .create(&params, secret)
            .await
            .map_err(|e| conflict_or(e, &format!("Secret {} exists", secret.name_any())))?;
        self.note_write(&written);
        Ok(written)
    }

    async fn replace_secret(&self, secret: &Secret) -> Result<Secret, Error> {
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        let written = self
            .secrets(&namespace_of(secret))
            .replace(&secret.name_any(), &params, secret)
            .await
            .map_err(|e| conflict_or(e, &format!("Secret {} changed", secret.name_any())))?;
        self.note_write(&written);
        Ok(written)
    }

    async fn apply_secret(&self, secret: &Secret) -> Result<Secret, Error> {
        let written = self
            .secrets(&namespace_of(secret))
            .patch(
                &secret.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(secret),
            )
            .await
            .map_err(|e| conflict_or(e, &format!("Secret {} changed", secret.name_any())))?;
        self.note_write(&written);
        Ok(written)
    }

    async fn apply_status(&self, token: &AwxToken, status: &AwxTokenStatus) -> Result<(), Error> {
        let api: Api<AwxToken> =
            Api::namespaced(self.client.clone(), &token.namespace().unwrap_or_default());
        let body = serde_json::json!({
            "apiVersion": AwxToken::api_version(&()),
            "kind": AwxToken::kind(&()),
            "status": status,
        });
        let key = hash_of(&(token.uid(), token.namespace(), token.name_any()));
        let digest = hash_of(&body.to_string());
        let cached = token.resource_version().and_then(|v| v.parse::<u64>().ok());
        let written_before = self
            .status_writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .copied();
        if let (Some((same, version)), Some(cached)) = (written_before, cached)
            && same == digest
            && cached < version
        {
            debug!("status already written; the cache has not caught up with it");
            return Ok(());
        }
        let written = api
            .patch_status(
                &token.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await?;
        let mut writes = self
            .status_writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match written
            .resource_version()
            .and_then(|v| v.parse::<u64>().ok())
        {
            Some(version) => writes.insert(key, (digest, version)),
            None => writes.remove(&key),
        };
        Ok(())
    }

    async fn publish(&self, token: &AwxToken, event: Event) {
        let publication = Publication {
            warning: event.warning,
            reason: event.reason,
            note: &event.note,
            action: "Reconcile",
            regarding: &token.object_ref(&()),
        };
        if let Err(e) = self.events.publish(&publication).await {
            warn!(error = %e, "could not publish event");
        }
    }

    async fn list_workloads(
        &self,
        namespace: &str,
        kind: WorkloadKind,
        selector: &str,
    ) -> Result<Vec<Workload>, Error> {
        let client = self.client.clone();
        let params = ListParams::default().labels(selector);
        match kind {
            WorkloadKind::Deployment => {
                list_as(client, namespace, &params, workloads::deployment).await
            }
            WorkloadKind::StatefulSet => {
                list_as(client, namespace, &params, workloads::stateful_set).await
            }
            WorkloadKind::DaemonSet => {
                list_as(client, namespace, &params, workloads::daemon_set).await
            }
        }
    }

    async fn workload(&self, namespace: &str, id: &WorkloadRef) -> Result<Option<Workload>, Error> {
        let client = self.client.clone();
        match id.kind {
            WorkloadKind::Deployment => {
                get_as(client, namespace, &id.name, workloads::deployment).await
            }
            WorkloadKind::StatefulSet => {
                get_as(client, namespace, &id.name, workloads::stateful_set).await
            }
            WorkloadKind::DaemonSet => {
                get_as(client, namespace, &id.name, workloads::daemon_set).await
            }
        }
    }

    async fn restart(
        &self,
        namespace: &str,
        workload: &Workload,
        at: Timestamp,
    ) -> Result<Workload, Error> {
        // A merge patch carrying the version read: two AwxTokens restarting one workload at
        // once restart it once (the second sees the first's stamp when it reads again).
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": workload.resource_version},
            "spec": {"template": {"metadata": {"annotations": {
                workloads::RESTARTED_AT_ANNOTATION: at.to_string(),
            }}}}
        });
        let params = PatchParams::default();
        let client = self.client.clone();
        let name = &workload.id.name;
        let what = format!("{}", workload.id);
        let conflict = |e| conflict_or(e, &what);
        Ok(match workload.id.kind {
            WorkloadKind::Deployment => workloads::deployment(
                &Api::<Deployment>::namespaced(client, namespace)
                    .patch(name, &params, &Patch::Merge(&patch))
                    .await
                    .map_err(conflict)?,
            ),
            WorkloadKind::StatefulSet => workloads::stateful_set(
                &Api::<StatefulSet>::namespaced(client, namespace)
                    .patch(name, &params, &Patch::Merge(&patch))
                    .await
                    .map_err(conflict)?,
            ),
            WorkloadKind::DaemonSet => workloads::daemon_set(
                &Api::<DaemonSet>::namespaced(client, namespace)
                    .patch(name, &params, &Patch::Merge(&patch))
                    .await
                    .map_err(conflict)?,
            ),
        })
    }

    async fn publish_on_workload(&self, namespace: &str, workload: &Workload, event: Event) {
        let reference = ObjectReference {
            api_version: Some("apps/v1".into()),
            kind: Some(format!("{:?}", workload.id.kind)),
            name: Some(workload.id.name.clone()),
            namespace: Some(namespace.to_string()),
            uid: workload.uid.clone(),
            ..ObjectReference::default()
        };
        let publication = Publication {
            warning: event.warning,
            reason: event.reason,
            note: &event.note,
            action: "Restart",
            regarding: &reference,
        };
        if let Err(e) = self.events.publish(&publication).await {
            warn!(error = %e, "could not publish event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(version: &str) -> Secret {
        let mut s = Secret::default();
        s.metadata.namespace = Some("apps".into());
        s.metadata.name = Some("state".into());
        s.metadata.resource_version = Some(version.into());
        s
    }

    #[tokio::test]
    async fn the_echo_of_an_own_write_is_recognised_once_and_news_always_passes() {
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let cluster = KubeCluster::new(Client::try_from(config).unwrap(), None);
        cluster.note_write(&secret("10"));
        cluster.note_write(&secret("11"));
        // Events arrive in order: each echo once.
        assert!(cluster.is_own_write("apps", "state", Some("10")));
        assert!(cluster.is_own_write("apps", "state", Some("11")));
        assert!(
            !cluster.is_own_write("apps", "state", Some("11")),
            "only once"
        );
        // Someone else's write in between: it passes, and the older own writes are forgotten.
        cluster.note_write(&secret("20"));
        assert!(!cluster.is_own_write("apps", "state", Some("15")));
        assert!(!cluster.is_own_write("apps", "state", Some("20")));
        assert!(!cluster.is_own_write("apps", "other", Some("20")));
        assert!(cluster.own_writes.lock().unwrap().is_empty());
    }
}
