//! Consumers of a token: rolloutRestartTargets restart Deployments, StatefulSets and
//! DaemonSets (by name or label) once per token change, never on the first issue or because
//! the operator restarted; a restart owed survives a failed patch and a crash; several
//! AwxTokens feeding one workload share a restart; the replaced token is revoked once the
//! rollout finished, or when a rollout that never finishes times out.
//!
//! The test cluster has no scheduler or kubelet: [`Kubelet`] plays the kubelet's part for
//! pod readiness (it marks pods Running and Ready, at once, later, or never), so the real
//! Deployment, StatefulSet and DaemonSet controllers roll out as they would on a node.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};

use crate::{
    scenarios::{
        READY_TIMEOUT, Setup, poke_and_wait_for_a_look, setup_with, wait_condition, wait_token,
    },
    support::{Env, Operator, TestResult, wait_for},
};

/// Pod label saying when the pods of a restart become ready: "never", or milliseconds.
const RESTARTED_READY: &str = "e2e.awx-token-operator.io/restarted-ready";
const RESTARTED_AT: &str = "awx-token-operator.io/restartedAt";
const CONSUMERS: &str = "ConsumersRestarted";

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Pods made ready, by UID (a StatefulSet's new pod has its predecessor's name): name, when
/// (unix seconds), whether it belongs to a restart.
type ReadyPods = Arc<Mutex<HashMap<String, (String, f64, bool)>>>;

/// An event: involved kind, involved name, type, reason, message.
type EventRow = (String, String, String, String, String);

/// Marks the pods of one namespace Running and Ready, as a kubelet would once their
/// containers pass readiness: pods of the original template at once, pods of a restart as
/// their label says. Remembers when it made each pod ready (unix seconds).
struct Kubelet {
    task: tokio::task::JoinHandle<()>,
    ready: ReadyPods,
}

impl Kubelet {
    fn start(env: &Env, ns: &str) -> Self {
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), ns);
        let ready: ReadyPods = Arc::default();
        let marks = ready.clone();
        let task = tokio::spawn(async move {
            let mut first_seen: HashMap<String, f64> = HashMap::new();
            loop {
                if let Ok(list) = pods.list(&ListParams::default()).await {
                    for pod in list {
                        let name = pod.name_any();
                        let uid = pod.uid().unwrap_or_default();
                        if pod.metadata.deletion_timestamp.is_some()
                            || marks.lock().unwrap().contains_key(&uid)
                        {
                            continue;
                        }
                        let seen = *first_seen.entry(uid.clone()).or_insert_with(unix_now);
                        let restarted = pod.annotations().contains_key(RESTARTED_AT);
                        let delay = if restarted {
                            match pod.labels().get(RESTARTED_READY).map(String::as_str) {
                                Some("never") => continue,
                                Some(ms) => ms.parse::<f64>().unwrap_or(0.0) / 1000.0,
                                None => 0.0,
                            }
                        } else {
                            0.0
                        };
                        if unix_now() < seen + delay {
                            continue;
                        }
                        let now = jiff::Timestamp::now().to_string();
                        let status = json!({"status": {
                            "phase": "Running",
                            "conditions": [
                                {"type": "Ready", "status": "True", "lastTransitionTime": now},
                                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                            ],
                        }});
                        if pods
                            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                            .await
                            .is_ok()
                        {
                            marks
                                .lock()
                                .unwrap()
                                .insert(uid, (name, unix_now(), restarted));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Self { task, ready }
    }

    /// When the last pod of a restart whose name starts with `prefix` was made ready.
    fn last_restarted_ready(&self, prefix: &str) -> Option<f64> {
        self.ready
            .lock()
            .unwrap()
            .values()
            .filter(|(name, _, restarted)| *restarted && name.starts_with(prefix))
            .map(|(_, at, _)| *at)
            .reduce(f64::max)
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn deployment(ns: &str, name: &str, replicas: u32, restarted_ready: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": {"tier": "api"}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, RESTARTED_READY: restarted_ready}},
                "spec": {"containers": [{"name": "c", "image": "consumer:1"}]},
            },
        },
    })
}

/// `kind`/`name`'s generation and the operator's restart stamp on its pod template.
fn workload(env: &Env, ns: &str, kind: &str, name: &str) -> Result<(i64, Option<String>), String> {
    let obj: Value =
        serde_json::from_str(&env.kubectl(&["get", kind, name, "-n", ns, "-o", "json"])?)
            .map_err(|e| e.to_string())?;
    Ok((
        obj["metadata"]["generation"].as_i64().unwrap_or_default(),
        obj["spec"]["template"]["metadata"]["annotations"][RESTARTED_AT]
            .as_str()
            .map(str::to_string),
    ))
}

/// Events in `ns` as (involved kind, involved name, type, reason, message).
fn events(env: &Env, ns: &str) -> Result<Vec<EventRow>, String> {
    let list: Value =
        serde_json::from_str(&env.kubectl(&["get", "events", "-n", ns, "-o", "json"])?)
            .map_err(|e| e.to_string())?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (
                s(&e["involvedObject"]["kind"]),
                s(&e["involvedObject"]["name"]),
                s(&e["type"]),
                s(&e["reason"]),
                s(&e["message"]),
            )
        })
        .collect())
}

async fn wait_event(
    env: &Env,
    ns: &str,
    kind: &str,
    name: &str,
    reason: &str,
) -> Result<String, String> {
    wait_for(
        &format!("event {reason} on {kind} {ns}/{name}"),
        READY_TIMEOUT,
        || async {
            Ok(events(env, ns)?
                .into_iter()
                .find(|(k, n, _, r, _)| k == kind && n == name && r == reason)
                .map(|e| e.4))
        },
    )
    .await
}

/// When the stand-in received the first revocation (unix seconds).
async fn first_revocation(s: &Setup) -> Result<f64, String> {
    s.awx
        .requests()
        .await?
        .iter()
        .filter(|r| {
            r["path"]
                .as_str()
                .is_some_and(|p| p.ends_with("/revoke_token/"))
        })
        .filter_map(|r| r["time"].as_f64())
        .reduce(f64::min)
        .ok_or_else(|| "no revocation reached AWX".to_string())
}

async fn metric(op: &Operator, sample: &str) -> Result<f64, String> {
    Ok(op.metric(sample).await?.unwrap_or(0.0))
}

fn rotate(env: &Env, ns: &str, names: &[&str], value: &str) -> TestResult {
    let mut args = vec!["annotate", "awxt"];
    args.extend(names);
    let annotation = format!("awx-token-operator.io/rotate={value}");
    args.extend(["-n", ns, &annotation, "--overwrite"]);
    env.kubectl(&args)?;
    Ok(())
}

/// One AwxToken restarting a Deployment by name and a StatefulSet and a DaemonSet by label.
/// The first issue restarts nothing; a rotation restarts each exactly once, with events on
/// the AwxToken and on each workload; the replaced token outlives its 2 s grace period until
/// the slow Deployment (each new pod ready 3 s after it appears) has rolled out, and is
/// revoked then; an operator restart restarts nothing.
pub async fn restarts_each_kind_once_and_the_old_token_waits_for_the_rollout(
    env: Arc<Env>,
) -> TestResult {
    let awx = env.private_standin("restarts", "awx")?;
    let mut s = setup_with(&env, "e2e-restarts", awx, &[]).await?;
    let ns = s.ns.clone();
    let kubelet = Kubelet::start(&env, &ns);
    // A node for the DaemonSet (nothing runs on it but this test's kubelet stand-in).
    let node = format!("{ns}-node");
    env.apply(&json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": node, "labels": {"kubernetes.io/hostname": node}}}))?;
    env.apply(&deployment(&ns, "web", 2, "3000"))?;
    env.apply(&json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "db", "namespace": ns, "labels": {"tier": "data"}},
        "spec": {
            "replicas": 2, "serviceName": "db",
            "selector": {"matchLabels": {"app": "db"}},
            "template": {"metadata": {"labels": {"app": "db"}},
                         "spec": {"containers": [{"name": "c", "image": "db:1"}]}},
        },
    }))?;
    env.apply(&json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "agent", "namespace": ns, "labels": {"tier": "data"}},
        "spec": {
            "selector": {"matchLabels": {"app": "agent"}},
            "template": {"metadata": {"labels": {"app": "agent"}},
                         "spec": {"tolerations": [{"operator": "Exists"}],
                                  "nodeSelector": {"kubernetes.io/hostname": node},
                                  "containers": [{"name": "c", "image": "agent:1"}]}},
        },
    }))?;
    // Unrelated workloads of the same kinds that no target selects.
    env.apply(&deployment(&ns, "other", 1, "0"))?;
    let result = async {
        let kinds = [
            ("deployment", "web"),
            ("statefulset", "db"),
            ("daemonset", "agent"),
        ];
        for (kind, name) in kinds {
            wait_for(
                &format!("{kind} {name} rolled out"),
                READY_TIMEOUT,
                || async {
                    let obj: Value = serde_json::from_str(
                        &env.kubectl(&["get", kind, name, "-n", &ns, "-o", "json"])?,
                    )
                    .map_err(|e| e.to_string())?;
                    let st = &obj["status"];
                    let ready = st["readyReplicas"].as_i64().or(st["numberReady"].as_i64());
                    Ok((ready.unwrap_or(0) >= 1
                        && st["observedGeneration"] == obj["metadata"]["generation"])
                        .then_some(()))
                },
            )
            .await?;
        }
        let (_, first) = s
            .issue(
                &env,
                "x",
                "creds",
                json!({
                    "renewal": {"revokeGracePeriod": "2s"},
                    "rolloutRestartTargets": [
                        {"kind": "Deployment", "name": "web"},
                        {"kind": "StatefulSet", "selector": {"matchLabels": {"tier": "data"}}},
                        {"kind": "DaemonSet", "selector": {"matchExpressions": [
                            {"key": "tier", "operator": "In", "values": ["data", "cache"]}]}},
                    ],
                    "rolloutRestart": {"delay": "1s", "minInterval": "5s", "rolloutTimeout": "5m"},
                }),
            )
            .await?;
        wait_condition(&env, &ns, "x", CONSUMERS, "True", "UpToDate").await?;
        for (kind, name) in kinds {
            ensure_eq!(
                workload(&env, &ns, kind, name)?,
                (1, None),
                "{kind} {name} after the first issue"
            );
        }

        rotate(&env, &ns, &["x"], "1")?;
        let second = wait_token(&env, &ns, "x", Some(&first)).await?;
        env.remember_secret(&second);
        wait_condition(&env, &ns, "x", CONSUMERS, "False", "WaitingForRollout").await?;
        for (kind, name) in kinds {
            let (generation, stamp) = workload(&env, &ns, kind, name)?;
            ensure_eq!(generation, 2, "{kind} {name}: restarted once");
            ensure!(stamp.is_some(), "{kind} {name}: stamped");
        }
        ensure_eq!(
            workload(&env, &ns, "deployment", "other")?,
            (1, None),
            "unselected"
        );
        // Past the grace period, with the Deployment still rolling out: the old token lives.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let web: Value = serde_json::from_str(&env.kubectl(&[
            "get",
            "deployment",
            "web",
            "-n",
            &ns,
            "-o",
            "json",
        ])?)
        .map_err(|e| e.to_string())?;
        let rolling = web["status"]["updatedReplicas"].as_i64() != Some(2)
            || web["status"]["availableReplicas"].as_i64() != Some(2)
            || web["status"]["replicas"].as_i64() != Some(2);
        if rolling {
            ensure_eq!(
                s.awx.whoami(&first).await?,
                Some(s.user.clone()),
                "the replaced token works while the rollout goes on, after its grace period"
            );
        }
        wait_for("the replaced token revoked", READY_TIMEOUT, || async {
            Ok(s.awx.whoami(&first).await?.is_none().then_some(()))
        })
        .await?;
        let revoked = first_revocation(&s).await?;
        let rolled_out = kubelet
            .last_restarted_ready("web-")
            .ok_or("no restarted web pod was made ready")?;
        let web_restarted = workload(&env, &ns, "deployment", "web")?
            .1
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .map(|t| t.as_millisecond() as f64 / 1000.0)
            .ok_or("web not stamped")?;
        println!(
            "    web rolled out {:.1} s after its restart; the replaced token was revoked {:.1} s \
             after that (grace period 2 s)",
            rolled_out - web_restarted,
            revoked - rolled_out
        );
        ensure!(
            (revoked - rolled_out).is_sign_positive(),
            "revoked at {revoked:.2}, before the last new web pod was ready ({rolled_out:.2})"
        );
        wait_condition(&env, &ns, "x", CONSUMERS, "True", "UpToDate").await?;
        ensure_eq!(
            s.awx.whoami(&second).await?,
            Some(s.user.clone()),
            "the new token works"
        );
        for (kind, name) in [
            ("Deployment", "web"),
            ("StatefulSet", "db"),
            ("DaemonSet", "agent"),
        ] {
            let on_workload = wait_event(&env, &ns, kind, name, "RestartedForNewToken").await?;
            ensure!(on_workload.contains("AwxToken x"), "{on_workload}");
            ensure_eq!(
                metric(
                    &s.op,
                    &format!(
                        "awx_token_operator_restarts_total{{kind=\"{kind}\",outcome=\"restarted\"}}"
                    )
                )
                .await?,
                1.0,
                "{kind} restarts"
            );
        }
        let all = events(&env, &ns)?;
        let on_token: Vec<&String> = all
            .iter()
            .filter(|e| e.0 == "AwxToken" && e.3 == "WorkloadsRestarted")
            .map(|e| &e.4)
            .collect();
        for id in ["Deployment/web", "StatefulSet/db", "DaemonSet/agent"] {
            ensure!(
                on_token.iter().any(|m| m.contains(id)),
                "a WorkloadsRestarted event naming {id}: {on_token:?}"
            );
        }
        ensure!(
            all.iter()
                .any(|e| e.0 == "AwxToken" && e.3 == "RolloutFinished" && e.2 == "Normal"),
            "a RolloutFinished event"
        );
        // The rotation has a reason of its own, not the first issue's.
        for (reason, note) in [
            ("TokenIssued", "Token issued (first issue)"),
            (
                "TokenRotated",
                "Token rotated (rotation requested by annotation)",
            ),
        ] {
            ensure!(
                all.iter()
                    .any(|e| e.0 == "AwxToken" && e.1 == "x" && e.3 == reason && e.4 == note),
                "a {reason} event: {:?}",
                all.iter().filter(|e| e.0 == "AwxToken").collect::<Vec<_>>()
            );
        }
        ensure_eq!(
            metric(
                &s.op,
                "awx_token_operator_rollouts_total{outcome=\"finished\"}"
            )
            .await?,
            1.0,
            "rollouts finished"
        );

        // An operator restart (and a look after it) restarts nothing.
        s.op.restart()?;
        poke_and_wait_for_a_look(&env, &ns, "x", "after-restart").await?;
        for (kind, name) in kinds {
            ensure_eq!(
                workload(&env, &ns, kind, name)?.0,
                2,
                "{kind} {name} after an operator restart"
            );
        }
        Ok(())
    }
    .await;
    let _ = env.kubectl(&["delete", "node", &node, "--wait=false"]);
    result
}

/// Two AwxTokens feed one Deployment and rotate together: one restart, after both changed
/// (the second finds the first's restart stamped after its own change). A change soon after
/// waits for minInterval.
pub async fn restarts_two_tokens_feeding_one_workload_share_one_restart(
    env: Arc<Env>,
) -> TestResult {
    let awx = env.private_standin("restarts-shared", "awx")?;
    let s = setup_with(&env, "e2e-restarts-shared", awx, &[]).await?;
    let ns = s.ns.clone();
    let _kubelet = Kubelet::start(&env, &ns);
    env.apply(&deployment(&ns, "shared", 1, "0"))?;
    let spec = json!({
        "rolloutRestartTargets": [{"kind": "Deployment", "name": "shared"}],
        "rolloutRestart": {"delay": "10s", "minInterval": "25s"},
    });
    let (_, a) = s.issue(&env, "a", "creds-a", spec.clone()).await?;
    let (_, b) = s.issue(&env, "b", "creds-b", spec).await?;
    rotate(&env, &ns, &["a", "b"], "1")?;
    let a2 = wait_token(&env, &ns, "a", Some(&a)).await?;
    let b2 = wait_token(&env, &ns, "b", Some(&b)).await?;
    env.remember_secret(&a2);
    env.remember_secret(&b2);
    for name in ["a", "b"] {
        wait_condition(&env, &ns, name, CONSUMERS, "True", "UpToDate").await?;
    }
    ensure_eq!(
        workload(&env, &ns, "deployment", "shared")?.0,
        2,
        "one restart for two token changes"
    );
    let restarted = metric(
        &s.op,
        "awx_token_operator_restarts_total{kind=\"Deployment\",outcome=\"restarted\"}",
    )
    .await?;
    let shared = metric(
        &s.op,
        "awx_token_operator_restarts_total{kind=\"Deployment\",outcome=\"already_restarted\"}",
    )
    .await?;
    ensure_eq!(
        (restarted, shared),
        (1.0, 1.0),
        "restarted, already restarted"
    );
    for (old, name) in [(&a, "a"), (&b, "b")] {
        wait_for(
            &format!("{name}'s replaced token revoked"),
            READY_TIMEOUT,
            || async { Ok(s.awx.whoami(old).await?.is_none().then_some(())) },
        )
        .await?;
    }

    // Another change soon after: the restart waits for minInterval (25 s) since the last one.
    let stamp = |w: (i64, Option<String>)| -> Result<f64, String> {
        w.1.ok_or("not stamped")?
            .parse::<jiff::Timestamp>()
            .map(|t| t.as_millisecond() as f64 / 1000.0)
            .map_err(|e| e.to_string())
    };
    let last = stamp(workload(&env, &ns, "deployment", "shared")?)?;
    rotate(&env, &ns, &["a"], "2")?;
    let a3 = wait_token(&env, &ns, "a", Some(&a2)).await?;
    env.remember_secret(&a3);
    wait_condition(&env, &ns, "a", CONSUMERS, "False", "RestartPending").await?;
    wait_condition(&env, &ns, "a", CONSUMERS, "True", "UpToDate").await?;
    let shared = workload(&env, &ns, "deployment", "shared")?;
    ensure_eq!(shared.0, 3, "one more restart");
    let next = stamp(shared)?;
    println!(
        "    restarts of one workload {:.1} s apart (minInterval 25s)",
        next - last
    );
    ensure!(
        (25.0..).contains(&(next - last)),
        "restarted {:.1} s after the last restart: minInterval is 25 s",
        next - last
    );
    Ok(())
}

/// An operator that may not patch Deployments (RBAC) owes the restart: Warning events and a
/// RestartFailed condition, retried under backoff, the replaced token kept. It crashes; the
/// next process, allowed to patch, makes the restart from the state: exactly one.
pub async fn restarts_owed_survive_a_forbidden_patch_and_a_crash(env: Arc<Env>) -> TestResult {
    let awx = env.private_standin("restarts-owed", "awx")?;
    let mut s = setup_with(&env, "e2e-restarts-owed", awx, &[]).await?;
    let ns = s.ns.clone();
    let _kubelet = Kubelet::start(&env, &ns);
    env.apply(&deployment(&ns, "web", 1, "0"))?;
    // The operator's rights in this namespace, but only get and list on Deployments, for a
    // user it then impersonates.
    let user = format!("{ns}-operator");
    let role = |apps_verbs: &[&str]| {
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "operator", "namespace": ns},
            "rules": [
                {"apiGroups": ["awx-token-operator.io"], "resources": ["awxtokens"], "verbs": ["get", "list", "watch", "patch"]},
                {"apiGroups": ["awx-token-operator.io"], "resources": ["awxtokens/status"], "verbs": ["patch"]},
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch", "create", "update", "patch"]},
                {"apiGroups": ["events.k8s.io", ""], "resources": ["events"], "verbs": ["create", "patch"]},
                {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": apps_verbs},
            ],
        })
    };
    env.apply(&role(&["get", "list"]))?;
    env.apply(&json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "operator", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "operator"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }))?;
    let kubeconfig = impersonating_kubeconfig(&env, &ns, &user)?;
    s.op.kill();
    let mut limited = env.start_operator_as(&ns, &[], &kubeconfig, &[])?;
    let (_, first) = s
        .issue(
            &env,
            "x",
            "creds",
            json!({
                "renewal": {"revokeGracePeriod": "1s"},
                "rolloutRestartTargets": [{"kind": "Deployment", "name": "web"}],
                "rolloutRestart": {"delay": "0s"},
            }),
        )
        .await?;
    rotate(&env, &ns, &["x"], "1")?;
    let second = wait_token(&env, &ns, "x", Some(&first)).await?;
    env.remember_secret(&second);
    let obj = wait_condition(&env, &ns, "x", CONSUMERS, "False", "RestartFailed").await?;
    let message = crate::support::condition(&obj, CONSUMERS)
        .map(|c| c.2)
        .unwrap_or_default();
    ensure!(
        message.contains("Deployment/web") && message.contains("forbidden"),
        "{message}"
    );
    let warning = wait_event(&env, &ns, "AwxToken", "x", "RestartFailed").await?;
    ensure!(warning.contains("Deployment/web"), "{warning}");
    wait_for("a second failed attempt", READY_TIMEOUT, || async {
        let failed = metric(
            &limited,
            "awx_token_operator_restarts_total{kind=\"Deployment\",outcome=\"failed\"}",
        )
        .await?;
        Ok((failed >= 2.0).then_some(()))
    })
    .await?;
    ensure_eq!(
        workload(&env, &ns, "deployment", "web")?,
        (1, None),
        "not restarted"
    );
    ensure_eq!(
        s.awx.whoami(&first).await?,
        Some(s.user.clone()),
        "the replaced token waits for the restart owed, past its grace period"
    );

    limited.kill();
    env.apply(&role(&["get", "list", "patch"]))?;
    let after = env.start_operator_as(&ns, &[], &kubeconfig, &[])?;
    wait_condition(&env, &ns, "x", CONSUMERS, "True", "UpToDate").await?;
    let (generation, stamp) = workload(&env, &ns, "deployment", "web")?;
    ensure_eq!(generation, 2, "restarted once, by the next process");
    ensure!(stamp.is_some(), "stamped");
    ensure_eq!(
        metric(
            &after,
            "awx_token_operator_restarts_total{kind=\"Deployment\",outcome=\"restarted\"}"
        )
        .await?,
        1.0,
        "restarts by the next process"
    );
    wait_for("the replaced token revoked", READY_TIMEOUT, || async {
        Ok(s.awx.whoami(&first).await?.is_none().then_some(()))
    })
    .await?;
    Ok(())
}

/// A restart whose new pods never become ready: after the grace period a Warning says the
/// rollout is late and the old token still works; at rolloutTimeout it is revoked anyway,
/// with a Warning, a RolloutTimedOut condition and a counter.
pub async fn restarts_a_rollout_that_never_finishes_keeps_the_old_token_until_the_timeout(
    env: Arc<Env>,
) -> TestResult {
    let awx = env.private_standin("restarts-stuck", "awx")?;
    let s = setup_with(&env, "e2e-restarts-stuck", awx, &[]).await?;
    let ns = s.ns.clone();
    let _kubelet = Kubelet::start(&env, &ns);
    env.apply(&deployment(&ns, "stuck", 1, "never"))?;
    let (_, first) = s
        .issue(
            &env,
            "x",
            "creds",
            json!({
                "renewal": {"revokeGracePeriod": "3s"},
                "rolloutRestartTargets": [{"kind": "Deployment", "name": "stuck"}],
                "rolloutRestart": {"delay": "0s", "rolloutTimeout": "20s"},
            }),
        )
        .await?;
    rotate(&env, &ns, &["x"], "1")?;
    let second = wait_token(&env, &ns, "x", Some(&first)).await?;
    env.remember_secret(&second);
    let late = wait_event(&env, &ns, "AwxToken", "x", "RolloutNotFinished").await?;
    ensure!(
        late.contains("Deployment/stuck") && late.contains("stays valid"),
        "{late}"
    );
    ensure_eq!(
        s.awx.whoami(&first).await?,
        Some(s.user.clone()),
        "the replaced token works while the rollout is late"
    );
    let obj = wait_condition(&env, &ns, "x", CONSUMERS, "False", "RolloutTimedOut").await?;
    let message = crate::support::condition(&obj, CONSUMERS)
        .map(|c| c.2)
        .unwrap_or_default();
    ensure!(
        message.contains("20s") && message.contains("Deployment/stuck"),
        "{message}"
    );
    wait_event(&env, &ns, "AwxToken", "x", "RolloutTimedOut").await?;
    let revoked = first_revocation(&s).await?;
    let stamp = workload(&env, &ns, "deployment", "stuck")?
        .1
        .ok_or("not restarted")?;
    let restarted_at = stamp
        .parse::<jiff::Timestamp>()
        .map_err(|e| e.to_string())?
        .as_millisecond() as f64
        / 1000.0;
    ensure!(
        (20.0..).contains(&(revoked - restarted_at)),
        "revoked {:.1} s after the restart: before the 20 s rollout timeout",
        revoked - restarted_at
    );
    ensure!(
        s.awx.whoami(&first).await?.is_none(),
        "the replaced token is revoked after the timeout"
    );
    ensure_eq!(
        s.op.metric("awx_token_operator_rollouts_total{outcome=\"timed_out\"}")
            .await?,
        Some(1.0),
        "rollouts timed out"
    );
    Ok(())
}

/// A kubeconfig like the admin one that impersonates `user` (RBAC then applies to it).
fn impersonating_kubeconfig(env: &Env, ns: &str, user: &str) -> Result<PathBuf, String> {
    let path = env.run_dir.join(format!("{ns}-impersonating.kubeconfig"));
    let raw = env.kubectl(&[
        "config",
        "view",
        "--raw",
        "--flatten",
        "--minify",
        "-o",
        "json",
    ])?;
    let mut config: Value = serde_json::from_str(&raw).map_err(|e| e.to_string())?;
    config["users"][0]["user"]["as"] = json!(user);
    std::fs::write(&path, config.to_string()).map_err(|e| e.to_string())?;
    Ok(path)
}
