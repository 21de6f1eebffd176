//! The workloads of spec.rolloutRestartTargets as the restart logic sees them: when the
//! operator last restarted one, and whether its rollout has finished. Pure functions of the
//! API objects, so the rules (the same `kubectl rollout status` applies) are tested here.

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use kube::ResourceExt;

use crate::{crd::WorkloadKind, state::WorkloadRef};

/// Pod-template annotation whose change restarts a workload; its value is when.
pub const RESTARTED_AT_ANNOTATION: &str = "awx-token-operator.io/restartedAt";

/// One workload, read from the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub id: WorkloadRef,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    /// The operator's last restart of it (any AwxToken's), from the pod template.
    pub restarted_at: Option<Timestamp>,
    /// `None` when its rollout has finished; else what it waits for.
    pub rolling: Option<String>,
}

impl Workload {
    pub fn rollout_done(&self) -> bool {
        self.rolling.is_none()
    }
}

fn restarted_at(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
) -> Option<Timestamp> {
    annotations?.get(RESTARTED_AT_ANNOTATION)?.parse().ok()
}

fn base(kind: WorkloadKind, object: &impl ResourceExt) -> Workload {
    Workload {
        id: WorkloadRef {
            kind,
            name: object.name_any(),
        },
        uid: object.uid(),
        resource_version: object.resource_version(),
        restarted_at: None,
        rolling: None,
    }
}

/// Whether the controller has seen the latest spec: until it has, its status says nothing.
fn unobserved(generation: Option<i64>, observed: Option<i64>) -> Option<String> {
    (observed.unwrap_or(0) < generation.unwrap_or(0))
        .then(|| "its controller has not seen the restart yet".to_string())
}

pub fn deployment(d: &Deployment) -> Workload {
    let mut w = base(WorkloadKind::Deployment, d);
    let spec = d.spec.as_ref();
    w.restarted_at = restarted_at(
        spec.and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref()),
    );
    let status = d.status.clone().unwrap_or_default();
    let want = spec.and_then(|s| s.replicas).unwrap_or(1);
    let updated = status.updated_replicas.unwrap_or(0);
    let total = status.replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    w.rolling = unobserved(d.metadata.generation, status.observed_generation).or_else(|| {
        if updated < want {
            Some(format!("{updated} of {want} replicas updated"))
        } else if total > updated {
            Some(format!("{} old replicas still running", total - updated))
        } else if available < updated {
            Some(format!(
                "{available} of {updated} updated replicas available"
            ))
        } else {
            None
        }
    });
    w
}

pub fn stateful_set(s: &StatefulSet) -> Workload {
    let mut w = base(WorkloadKind::StatefulSet, s);
    let spec = s.spec.as_ref();
    w.restarted_at = restarted_at(
        spec.and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref()),
    );
    let status = s.status.clone().unwrap_or_default();
    let strategy = spec.and_then(|s| s.update_strategy.as_ref());
    if strategy.and_then(|u| u.type_.as_deref()) == Some("OnDelete") {
        // Pods change only when someone deletes them: there is no rollout to wait for.
        return w;
    }
    let want = spec.and_then(|s| s.replicas).unwrap_or(1);
    let partition = strategy
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.partition)
        .unwrap_or(0);
    let ready = status.ready_replicas.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    w.rolling = unobserved(s.metadata.generation, status.observed_generation).or_else(|| {
        if ready < want {
            Some(format!("{ready} of {want} replicas ready"))
        } else if partition > 0 {
            (updated < want - partition)
                .then(|| format!("{updated} of {} replicas updated", want - partition))
        } else if status.update_revision.is_some()
            && status.update_revision != status.current_revision
        {
            Some(format!("{updated} of {want} replicas updated"))
        } else {
            None
        }
    });
    w
}

pub fn daemon_set(d: &DaemonSet) -> Workload {
    let mut w = base(WorkloadKind::DaemonSet, d);
    let spec = d.spec.as_ref();
    w.restarted_at = restarted_at(
        spec.and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref()),
    );
    let strategy = spec.and_then(|s| s.update_strategy.as_ref());
    if strategy.and_then(|u| u.type_.as_deref()) == Some("OnDelete") {
        return w;
    }
    let status = d.status.clone().unwrap_or_default();
    let want = status.desired_number_scheduled;
    let updated = status.updated_number_scheduled.unwrap_or(0);
    let available = status.number_available.unwrap_or(0);
    w.rolling = unobserved(d.metadata.generation, status.observed_generation).or_else(|| {
        if updated < want {
            Some(format!("{updated} of {want} scheduled pods updated"))
        } else if available < want {
            Some(format!("{available} of {want} updated pods available"))
        } else {
            None
        }
    });
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn from<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_deployment_is_rolled_out_when_every_replica_is_updated_and_available() {
        let d = |generation: i64, status: serde_json::Value| -> Deployment {
            from(json!({
                "metadata": {"name": "web", "generation": generation},
                "spec": {
                    "replicas": 3,
                    "selector": {},
                    "template": {"metadata": {"annotations": {
                        RESTARTED_AT_ANNOTATION: "2026-12-02T10:00:00.5Z"}}}
                },
                "status": status
            }))
        };
        let w = deployment(&d(
            4,
            json!({"observedGeneration": 3, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3}),
        ));
        assert_eq!(
            w.restarted_at,
            Some("2026-12-02T10:00:00.5Z".parse().unwrap())
        );
        assert_eq!(
            w.rolling.as_deref(),
            Some("its controller has not seen the restart yet")
        );
        let rolling = |status| deployment(&d(4, status)).rolling;
        assert_eq!(
            rolling(
                json!({"observedGeneration": 4, "replicas": 4, "updatedReplicas": 1, "availableReplicas": 3})
            ),
            Some("1 of 3 replicas updated".into())
        );
        assert_eq!(
            rolling(
                json!({"observedGeneration": 4, "replicas": 4, "updatedReplicas": 3, "availableReplicas": 3})
            ),
            Some("1 old replicas still running".into())
        );
        assert_eq!(
            rolling(
                json!({"observedGeneration": 4, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 2})
            ),
            Some("2 of 3 updated replicas available".into())
        );
        assert_eq!(
            rolling(
                json!({"observedGeneration": 4, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3})
            ),
            None
        );
    }

    #[test]
    fn a_stateful_set_is_rolled_out_when_ready_and_on_its_update_revision() {
        let s = |strategy: serde_json::Value, status: serde_json::Value| -> StatefulSet {
            from(json!({
                "metadata": {"name": "db", "generation": 2},
                "spec": {"replicas": 2, "selector": {}, "serviceName": "db",
                         "template": {}, "updateStrategy": strategy},
                "status": status
            }))
        };
        let rolling = |strategy, status| stateful_set(&s(strategy, status)).rolling;
        let rolling_update = json!({"type": "RollingUpdate"});
        assert_eq!(
            rolling(
                rolling_update.clone(),
                json!({"observedGeneration": 2, "replicas": 2, "readyReplicas": 1,
                "currentRevision": "a", "updateRevision": "b"})
            ),
            Some("1 of 2 replicas ready".into())
        );
        assert_eq!(
            rolling(
                rolling_update.clone(),
                json!({"observedGeneration": 2, "replicas": 2, "readyReplicas": 2,
                "updatedReplicas": 1, "currentRevision": "a", "updateRevision": "b"})
            ),
            Some("1 of 2 replicas updated".into())
        );
        assert_eq!(
            rolling(
                rolling_update,
                json!({"observedGeneration": 2, "replicas": 2, "readyReplicas": 2,
                "updatedReplicas": 2, "currentRevision": "b", "updateRevision": "b"})
            ),
            None
        );
        let partitioned = json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 1}});
        assert_eq!(
            rolling(
                partitioned,
                json!({"observedGeneration": 2, "replicas": 2, "readyReplicas": 2,
                "updatedReplicas": 1, "currentRevision": "a", "updateRevision": "b"})
            ),
            None,
            "only the pods above the partition are updated"
        );
        assert_eq!(
            rolling(
                json!({"type": "OnDelete"}),
                json!({"observedGeneration": 1})
            ),
            None
        );
    }

    #[test]
    fn a_daemon_set_is_rolled_out_when_every_scheduled_pod_is_updated_and_available() {
        let d = |status: serde_json::Value| -> DaemonSet {
            from(json!({
                "metadata": {"name": "agent", "generation": 5},
                "spec": {"selector": {}, "template": {}},
                "status": status
            }))
        };
        let base = json!({"observedGeneration": 5, "currentNumberScheduled": 2,
            "numberMisscheduled": 0, "desiredNumberScheduled": 2, "numberReady": 2});
        let with = |extra: serde_json::Value| {
            let mut s = base.clone();
            s.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            daemon_set(&d(s)).rolling
        };
        assert_eq!(
            with(json!({"updatedNumberScheduled": 1, "numberAvailable": 2})),
            Some("1 of 2 scheduled pods updated".into())
        );
        assert_eq!(
            with(json!({"updatedNumberScheduled": 2, "numberAvailable": 1})),
            Some("1 of 2 updated pods available".into())
        );
        assert_eq!(
            with(json!({"updatedNumberScheduled": 2, "numberAvailable": 2})),
            None
        );
    }
}
