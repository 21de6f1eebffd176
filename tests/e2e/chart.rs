//! The Helm chart, the plain manifests in deploy/ and the examples, against the test cluster:
//! lint and render, server-side dry runs, install/upgrade/uninstall, and the operator running
//! with exactly the rights the chart grants (its ServiceAccount's token), wired as the chart's
//! Deployment wires it.
//!
//! The test API server is Kubernetes 1.20: it rejects the CEL rules of the chart's CRD, so the
//! suite applies `awx-token-operator crd --without-cel` (Env::start) and installs with
//! `--skip-crds`. It has no prometheus-operator, so the ServiceMonitor and the PrometheusRule
//! are left out of dry runs; the rules are checked and unit-tested with promtool instead, and
//! the dashboard's and the rules' queries against the names the operator exports.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::support::{
    Env, Operator, TestResult, condition, repo_root, run_tool, sha256_hex, skip, wait_for,
};

pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(60);
const VERSION: &str = env!("CARGO_PKG_VERSION");

pub(crate) fn chart_dir() -> String {
    repo_root()
        .join("charts/awx-token-operator")
        .display()
        .to_string()
}

/// helm as the cluster admin; Err carries helm's message.
pub(crate) fn helm(env: &Env, args: &[&str]) -> Result<String, String> {
    let r = run_tool(env, "helm", &env.kubeconfig, args, "")?;
    if r.ok {
        Ok(r.stdout)
    } else {
        Err(format!(
            "helm {} failed: {}",
            args.join(" "),
            r.stderr.trim()
        ))
    }
}

/// The documents of a YAML stream (empty ones dropped).
pub(crate) fn documents(yaml: &str) -> Result<Vec<Value>, String> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = Value::deserialize(doc).map_err(|e| format!("invalid YAML: {e}"))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

pub(crate) fn find<'a>(docs: &'a [Value], kind: &str, namespace: Option<&str>) -> Vec<&'a Value> {
    docs.iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["namespace"].as_str() == namespace)
        .collect()
}

/// (kind, namespace) of every document, sorted.
fn kinds(docs: &[Value]) -> Vec<(String, String)> {
    let mut k: Vec<_> = docs
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap_or_default().to_string(),
                d["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    k.sort();
    k
}

fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<_> = pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    v.sort();
    v
}

/// The Kubernetes version of the test API server, e.g. v1.20.2.
fn server_version(env: &Env) -> Result<String, String> {
    let v: Value = serde_json::from_str(&env.kubectl(&["version", "-o", "json"])?)
        .map_err(|e| e.to_string())?;
    v["serverVersion"]["gitVersion"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| "no serverVersion".into())
}

/// `kubectl apply --dry-run=server` of `docs` (as one List); every object must be accepted.
fn server_dry_run(env: &Env, docs: &[Value], what: &str) -> TestResult {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": docs});
    let out = env
        .kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &list.to_string())
        .map_err(|e| format!("{what}: {e}"))?;
    let accepted = out
        .lines()
        .filter(|l| l.ends_with("(server dry run)"))
        .count();
    ensure_eq!(
        accepted,
        docs.len(),
        "{what}: objects accepted by the server dry run ({out})"
    );
    Ok(())
}

/// Every `--flag` that `awx-token-operator run` accepts.
fn operator_flags(env: &Env) -> Result<BTreeSet<String>, String> {
    let out = Command::new(&env.operator_bin)
        .args(["run", "--help"])
        .output()
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches(',').to_string())
        .collect())
}

/// Every RBAC rule of the rendered text has a comment right above it.
fn rules_are_commented(text: &str) -> TestResult {
    let lines: Vec<&str> = text.lines().collect();
    let mut rules = 0;
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("- apiGroups:") {
            rules += 1;
            let above = lines[..i].iter().rev().find(|l| !l.trim().is_empty());
            ensure!(
                above.is_some_and(|l| l.trim_start().starts_with('#')),
                "RBAC rule without a comment above it: {line}"
            );
        }
    }
    ensure!(rules > 0, "no RBAC rule rendered");
    Ok(())
}

pub(crate) fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// What every rendering of the Deployment must hold.
fn check_deployment(
    d: &Value,
    fullname: &str,
    watch: Option<&str>,
    flags: &BTreeSet<String>,
) -> TestResult {
    let pod = &d["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    // Longer than --shutdown-grace (35 s), itself longer than an AWX request's 30 s timeout.
    ensure_eq!(
        pod["terminationGracePeriodSeconds"],
        json!(45),
        "terminationGracePeriodSeconds"
    );
    ensure_eq!(
        pod["serviceAccountName"],
        json!(fullname),
        "serviceAccountName"
    );
    ensure!(
        c["image"]
            .as_str()
            .is_some_and(|i| i.ends_with(&format!(":{VERSION}"))),
        "image tag defaults to appVersion = crate version {VERSION}: {}",
        c["image"]
    );
    let args = strings(&c["args"]);
    ensure_eq!(args.first().map(String::as_str), Some("run"), "subcommand");
    for want in [
        "--http-addr=0.0.0.0:8080".to_string(),
        "--leader-elect".to_string(),
        format!("--lease-name={fullname}"),
    ] {
        ensure!(args.contains(&want), "args lack {want}: {args:?}");
    }
    let namespace_args: Vec<_> = args
        .iter()
        .filter(|a| a.starts_with("--namespace"))
        .collect();
    let want_namespace: Vec<String> = watch
        .map(|ns| format!("--namespace={ns}"))
        .into_iter()
        .collect();
    ensure_eq!(
        namespace_args,
        want_namespace.iter().collect::<Vec<_>>(),
        "watched namespace (none: all namespaces)"
    );
    for arg in args.iter().skip(1) {
        let flag = arg.split('=').next().unwrap_or_default();
        ensure!(
            flags.contains(flag),
            "the Deployment passes {flag}, which `awx-token-operator run` does not know"
        );
    }
    let env_vars = c["env"].as_array().cloned().unwrap_or_default();
    for (name, path) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        ensure!(
            env_vars
                .iter()
                .any(|e| e["name"] == name && e["valueFrom"]["fieldRef"]["fieldPath"] == path),
            "{name} from the downward API ({path}): {env_vars:?}"
        );
    }
    ensure_eq!(
        c["ports"],
        json!([{"name": "http-metrics", "containerPort": 8080, "protocol": "TCP"}]),
        "container port"
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        ensure_eq!(
            c[probe]["httpGet"],
            json!({"path": path, "port": "http-metrics"}),
            "{probe}"
        );
    }
    let sc = &c["securityContext"];
    for (field, want) in [
        ("runAsNonRoot", json!(true)),
        ("runAsUser", json!(65532)),
        ("readOnlyRootFilesystem", json!(true)),
        ("allowPrivilegeEscalation", json!(false)),
        ("capabilities", json!({"drop": ["ALL"]})),
        ("seccompProfile", json!({"type": "RuntimeDefault"})),
    ] {
        ensure_eq!(sc[field], want, "container securityContext.{field}");
    }
    ensure_eq!(
        pod["securityContext"]["runAsNonRoot"],
        json!(true),
        "pod securityContext.runAsNonRoot"
    );
    Ok(())
}

/// The rules of the (Cluster)Role that grants the operator its rights over Secrets.
fn secret_verbs(role: &Value) -> Vec<String> {
    role["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["apiGroups"] == json!([""]) && r["resources"] == json!(["secrets"]))
        .flat_map(|r| strings(&r["verbs"]))
        .collect()
}

/// helm lint and helm template with default and non-default values; the rendered manifests
/// pass a server-side dry run; typos in values fail at render time thanks to the schema.
pub async fn chart_lint_template_and_server_dry_run(env: Arc<Env>) -> TestResult {
    let chart = chart_dir();
    let ops = env.namespace("chart-render-ops").await?;
    let apps = env.namespace("chart-render-apps").await?;
    let kube_version = server_version(&env)?;
    let flags = operator_flags(&env)?;
    let fullname = "chart-render-awx-token-operator";
    let watch = format!("watchNamespace={apps}");
    let monitoring = [
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.dashboard.enabled=true",
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "podDisruptionBudget.enabled=true",
        "--set-json",
        r#"allowedAwxHosts=["awx.example.com","*.aap.example.com:8443"]"#,
    ];
    let mut everything = vec!["--set", &watch];
    everything.extend(monitoring);
    everything.extend([
        "--set",
        "replicas=3",
        "--set",
        "logFormat=text",
        "--set",
        "leaderElection.leaseDuration=30",
        "--set",
        "rbac.rolloutRestartTargets=false",
        "--set",
        "rbac.ownerReferencesPermissionEnforcement=true",
        "--set-json",
        r#"shardSelector="sharding.fluxcd.io/key=shard-1""#,
    ]);
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("default", vec![]),
        ("namespaced", vec!["--set", &watch]),
        ("monitoring", monitoring.to_vec()),
        ("everything", everything),
    ];
    for (case, values) in &cases {
        let mut lint = vec!["lint", "--strict", &chart, "--namespace", &ops];
        lint.extend(values);
        helm(&env, &lint).map_err(|e| format!("{case}: {e}"))?;

        let mut template = vec![
            "template",
            "chart-render",
            &chart,
            "--namespace",
            &ops,
            "--kube-version",
            &kube_version,
        ];
        template.extend(values);
        let text = helm(&env, &template).map_err(|e| format!("{case}: {e}"))?;
        let docs = documents(&text)?;
        rules_are_commented(&text).map_err(|e| format!("{case}: {e}"))?;
        let namespaced = values.contains(&watch.as_str());
        let deployment = find(&docs, "Deployment", Some(&ops));
        ensure_eq!(deployment.len(), 1, "{case}: one Deployment");
        check_deployment(
            deployment[0],
            fullname,
            namespaced.then_some(apps.as_str()),
            &flags,
        )
        .map_err(|e| format!("{case}: {e}"))?;

        let mut expected = vec![
            ("ServiceAccount", ops.as_str()),
            ("Role", ops.as_str()),
            ("RoleBinding", ops.as_str()),
            ("Service", ops.as_str()),
            ("Deployment", ops.as_str()),
        ];
        if namespaced {
            expected.extend([("Role", apps.as_str()), ("RoleBinding", apps.as_str())]);
        } else {
            expected.extend([("ClusterRole", ""), ("ClusterRoleBinding", "")]);
        }
        if values.contains(&"metrics.serviceMonitor.enabled=true") {
            expected.extend([
                ("ServiceMonitor", ops.as_str()),
                ("PodDisruptionBudget", ops.as_str()),
                ("ConfigMap", ops.as_str()),
                ("PrometheusRule", ops.as_str()),
            ]);
            // The per-AwxToken series' own `namespace` label wins over the target's.
            let monitor = find(&docs, "ServiceMonitor", Some(&ops))[0];
            ensure_eq!(
                monitor["spec"]["endpoints"][0]["honorLabels"],
                json!(true),
                "{case}: ServiceMonitor honorLabels"
            );
        }
        ensure_eq!(kinds(&docs), owned(&expected), "{case}: rendered objects");

        // Least privilege, as rendered: Secrets never deleted (updated only as the conditional
        // replace of the state Secret); Leases only in the
        // release namespace; the operator's role binds the chart's ServiceAccount.
        let role = if namespaced {
            find(&docs, "Role", Some(&apps))[0]
        } else {
            find(&docs, "ClusterRole", None)[0]
        };
        let mut want_verbs = vec!["get", "list", "watch", "create", "update", "patch"];
        if values.contains(&"rbac.ownerReferencesPermissionEnforcement=true") {
            want_verbs.push("delete");
        }
        ensure_eq!(secret_verbs(role), want_verbs, "{case}: Secret verbs");
        let rendered_rules = role["rules"].to_string();
        ensure!(
            !rendered_rules.contains("leases") && !rendered_rules.contains("\"*\""),
            "{case}: no Lease rights outside the release namespace, no wildcards: {rendered_rules}"
        );
        ensure_eq!(
            rendered_rules.contains("deployments"),
            !values.contains(&"rbac.rolloutRestartTargets=false"),
            "{case}: workload patch right follows rbac.rolloutRestartTargets"
        );
        let lease_role = find(&docs, "Role", Some(&ops))[0];
        ensure!(
            lease_role["rules"].to_string().contains(fullname),
            "{case}: Lease get/patch limited to the release's Lease: {}",
            lease_role["rules"]
        );
        for binding in docs.iter().filter(|d| {
            d["kind"]
                .as_str()
                .is_some_and(|k| k.ends_with("RoleBinding"))
        }) {
            ensure_eq!(
                binding["subjects"],
                json!([{"kind": "ServiceAccount", "name": fullname, "namespace": ops}]),
                "{case}: binding subject"
            );
        }
        if values.contains(&"podDisruptionBudget.enabled=true") {
            let pdb = find(&docs, "PodDisruptionBudget", Some(&ops))[0];
            ensure_eq!(
                pdb["apiVersion"],
                json!("policy/v1beta1"),
                "{case}: PDB API of Kubernetes {kube_version}"
            );
        }
        if values.iter().any(|v| v.starts_with("shardSelector")) {
            ensure!(
                strings(&deployment[0]["spec"]["template"]["spec"]["containers"][0]["args"])
                    .contains(&"--shard-selector=sharding.fluxcd.io/key=shard-1".to_string()),
                "{case}: shardSelector becomes --shard-selector"
            );
        }
        if values.iter().any(|v| v.starts_with("allowedAwxHosts")) {
            ensure!(
                strings(&deployment[0]["spec"]["template"]["spec"]["containers"][0]["args"])
                    .contains(
                        &"--allowed-awx-hosts=awx.example.com,*.aap.example.com:8443".to_string()
                    ),
                "{case}: allowedAwxHosts becomes one comma-separated flag"
            );
        }

        // The test API server has no prometheus-operator CRDs: the ServiceMonitor and the
        // PrometheusRule are left out of the dry run.
        let to_apply: Vec<Value> = docs
            .iter()
            .filter(|d| d["kind"] != "ServiceMonitor" && d["kind"] != "PrometheusRule")
            .cloned()
            .collect();
        server_dry_run(&env, &to_apply, case)?;
    }

    // values.schema.json turns typos and wrong values into errors at render time.
    for (set, needle) in [
        ("replica=3", "replica"),
        ("leaderElection.enable=false", "enable"),
        (
            "securityContext.readOnlyRootFileSystem=false",
            "readOnlyRootFileSystem",
        ),
        ("metrics.serviceMonitor.enable=true", "enable"),
        ("metrics.prometheusRule.enable=true", "enable"),
        ("metrics.dashboard.enabled=yes", "enabled"),
        ("logFormat=xml", "logFormat"),
        (
            "allowedAwxHosts[0]=https://awx.example.com",
            "allowedAwxHosts",
        ),
        ("concurrency=0", "concurrency"),
    ] {
        let r = run_tool(
            &env,
            "helm",
            &env.kubeconfig,
            &["template", "typo", &chart, "--set", set],
            "",
        )?;
        ensure!(!r.ok, "helm template --set {set} must fail");
        ensure!(
            r.stderr.contains("schema") && r.stderr.contains(needle),
            "helm template --set {set}: the error names the schema and {needle}: {}",
            r.stderr.trim()
        );
    }
    let r = run_tool(
        &env,
        "helm",
        &env.kubeconfig,
        &[
            "template",
            "unsafe",
            &chart,
            "--set",
            "replicas=2",
            "--set",
            "leaderElection.enabled=false",
        ],
        "",
    )?;
    ensure!(
        !r.ok && r.stderr.contains("needs leaderElection.enabled"),
        "two replicas without leader election must be refused: {}",
        r.stderr.trim()
    );
    Ok(())
}

/// helm install (CRD applied beforehand without CEL, --skip-crds), upgrade with other values,
/// uninstall; the CRD and the AwxTokens stay.
pub async fn chart_install_upgrade_uninstall_keeps_the_crd(env: Arc<Env>) -> TestResult {
    let chart = chart_dir();
    let ops = env.namespace("chart-life-ops").await?;
    let apps = env.namespace("chart-life-apps").await?;
    let release = "chart-life";
    let fullname = "chart-life-awx-token-operator";
    let crd = env.kubectl(&[
        "get",
        "crd",
        "awxtokens.awx-token-operator.io",
        "-o",
        "json",
    ])?;
    ensure!(
        !crd.contains("x-kubernetes-validations"),
        "the suite's CRD is the one without CEL rules"
    );

    let out = helm(
        &env,
        &["install", release, &chart, "-n", &ops, "--skip-crds"],
    )?;
    ensure!(out.contains("STATUS: deployed"), "helm install: {out}");
    let get = |args: &[&str]| -> Result<Value, String> {
        let mut full = vec!["get"];
        full.extend(args);
        full.extend(["-o", "json"]);
        serde_json::from_str(&env.kubectl(&full)?).map_err(|e| e.to_string())
    };
    let deployment = get(&["deployment", fullname, "-n", &ops])?;
    ensure_eq!(deployment["spec"]["replicas"], json!(2), "default replicas");
    get(&["serviceaccount", fullname, "-n", &ops])?;
    get(&["clusterrole", fullname])?;
    get(&["clusterrolebinding", fullname])?;
    get(&["role", &format!("{fullname}-leader-election"), "-n", &ops])?;
    get(&["service", &format!("{fullname}-metrics"), "-n", &ops])?;
    // The API server accepts the pod template: kube-controller-manager creates the pods
    // (they stay Pending: the test cluster has no scheduler or kubelet).
    wait_for("the chart's two pods", READY_TIMEOUT, || async {
        let pods = get(&[
            "pods",
            "-n",
            &ops,
            "-l",
            &format!("app.kubernetes.io/instance={release}"),
        ])?;
        Ok((pods["items"].as_array().map(Vec::len) == Some(2)).then_some(()))
    })
    .await?;

    let out = helm(
        &env,
        &[
            "upgrade",
            release,
            &chart,
            "-n",
            &ops,
            "--skip-crds",
            "--set",
            &format!("watchNamespace={apps}"),
            "--set",
            "replicas=3",
            "--set",
            "podDisruptionBudget.enabled=true",
            "--set",
            "logLevel=debug",
            "--set-json",
            r#"allowedAwxHosts=["awx.example.com"]"#,
        ],
    )?;
    ensure!(out.contains("REVISION: 2"), "helm upgrade: {out}");
    let deployment = get(&["deployment", fullname, "-n", &ops])?;
    ensure_eq!(
        deployment["spec"]["replicas"],
        json!(3),
        "upgraded replicas"
    );
    let args = strings(&deployment["spec"]["template"]["spec"]["containers"][0]["args"]);
    for want in [
        format!("--namespace={apps}"),
        "--log-level=debug".into(),
        "--allowed-awx-hosts=awx.example.com".into(),
    ] {
        ensure!(args.contains(&want), "upgraded args lack {want}: {args:?}");
    }
    ensure!(
        env.kubectl(&["get", "clusterrole", fullname]).is_err(),
        "a namespaced install keeps no ClusterRole"
    );
    ensure!(
        env.kubectl(&["get", "clusterrolebinding", fullname])
            .is_err(),
        "a namespaced install keeps no ClusterRoleBinding"
    );
    get(&["role", fullname, "-n", &apps])?;
    get(&["rolebinding", fullname, "-n", &apps])?;
    let pdb = get(&["poddisruptionbudget", fullname, "-n", &ops])?;
    ensure_eq!(pdb["spec"]["minAvailable"], json!(1), "PDB");

    // An AwxToken (no operator runs here, so it stays as it is) outlives the release.
    env.apply(
        &json!({"apiVersion": "awx-token-operator.io/v1alpha1", "kind": "AwxToken",
        "metadata": {"name": "survivor", "namespace": apps},
        "spec": {"awx": {"url": "https://awx.example.com"},
                 "grant": {"type": "Password", "credentialsSecretRef": {"name": "none"}}}}),
    )?;
    let out = helm(&env, &["uninstall", release, "-n", &ops])?;
    ensure!(out.contains("uninstalled"), "helm uninstall: {out}");
    for (kind, name, ns) in [
        ("deployment", fullname.to_string(), ops.as_str()),
        ("serviceaccount", fullname.to_string(), ops.as_str()),
        ("role", format!("{fullname}-leader-election"), ops.as_str()),
        ("role", fullname.to_string(), apps.as_str()),
        ("poddisruptionbudget", fullname.to_string(), ops.as_str()),
    ] {
        ensure!(
            env.kubectl(&["get", kind, &name, "-n", ns]).is_err(),
            "{kind} {ns}/{name} survived helm uninstall"
        );
    }
    get(&["crd", "awxtokens.awx-token-operator.io"])?;
    get(&["awxtoken", "survivor", "-n", &apps])?;
    Ok(())
}

/// A token for the ServiceAccount: the TokenRequest API (`kubectl create token`), else the
/// token Secret kube-controller-manager creates for it (Kubernetes up to 1.23).
pub(crate) async fn service_account_token(env: &Env, ns: &str, sa: &str) -> Result<String, String> {
    if let Ok(token) = env.kubectl(&["create", "token", sa, "-n", ns, "--duration=1h"]) {
        return Ok(token.trim().to_string());
    }
    let secret = wait_for(
        &format!("the token Secret of ServiceAccount {ns}/{sa}"),
        READY_TIMEOUT,
        || async {
            let sa: Value = serde_json::from_str(&env.kubectl(&[
                "get",
                "serviceaccount",
                sa,
                "-n",
                ns,
                "-o",
                "json",
            ])?)
            .map_err(|e| e.to_string())?;
            Ok(sa["secrets"][0]["name"].as_str().map(str::to_string))
        },
    )
    .await?;
    let encoded = env.kubectl(&[
        "get",
        "secret",
        &secret,
        "-n",
        ns,
        "-o",
        "jsonpath={.data.token}",
    ])?;
    let token = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| e.to_string())?;
    String::from_utf8(token).map_err(|e| e.to_string())
}

/// A kubeconfig for the test cluster that authenticates with `token` only.
pub(crate) fn token_kubeconfig(env: &Env, name: &str, token: &str) -> Result<PathBuf, String> {
    let admin: Value =
        serde_json::from_str(&env.kubectl(&["config", "view", "--raw", "--minify", "-o", "json"])?)
            .map_err(|e| e.to_string())?;
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": "test", "user": name}}],
        "current-context": name,
    });
    let path = env.run_dir.join(format!("{name}.kubeconfig"));
    fs::write(&path, config.to_string()).map_err(|e| e.to_string())?;
    Ok(path)
}

/// The operator as the chart's Deployment runs it: its ServiceAccount's token, the container's
/// flags (but --namespace and --http-addr, which the harness sets), POD_NAME and POD_NAMESPACE
/// as the downward API fills them.
struct ChartOperator {
    op: Operator,
    kubeconfig: PathBuf,
    fullname: String,
    pod_name: String,
}

/// A release installed in `ops`: its Deployment as Helm applied it, and a token of the
/// ServiceAccount the pods run as.
pub(crate) struct Release {
    pub deployment: Value,
    pub fullname: String,
    pub token: String,
}

/// `helm install` of the chart (`--skip-crds`) with `values`, and a token for its
/// ServiceAccount (recorded for the leak check).
pub(crate) async fn install_release(
    env: &Env,
    release: &str,
    ops: &str,
    values: &[&str],
) -> Result<Release, String> {
    let chart = chart_dir();
    let mut install = vec!["install", release, &chart, "-n", ops, "--skip-crds"];
    install.extend(values);
    helm(env, &install)?;
    let manifest = helm(env, &["get", "manifest", release, "-n", ops])?;
    let docs = documents(&manifest)?;
    let deployment = find(&docs, "Deployment", Some(ops))
        .first()
        .copied()
        .ok_or("no Deployment in the release")?
        .clone();
    let fullname = deployment["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let token = service_account_token(env, ops, &sa).await?;
    env.remember_secret(&token);
    Ok(Release {
        deployment,
        fullname,
        token,
    })
}

async fn install_and_run(
    env: &Env,
    release: &str,
    ops: &str,
    apps: &str,
    values: &[&str],
) -> Result<ChartOperator, String> {
    let Release {
        deployment,
        fullname,
        token,
    } = install_release(env, release, ops, values).await?;
    let pod = &deployment["spec"]["template"]["spec"];
    let kubeconfig = token_kubeconfig(env, &format!("{release}-sa"), &token)?;

    let container = &pod["containers"][0];
    let args: Vec<String> = strings(&container["args"])
        .into_iter()
        .filter(|a| a != "run" && !a.starts_with("--namespace") && !a.starts_with("--http-addr"))
        .collect();
    let pod_name = format!("{fullname}-7d9f8c6b5-x2x4q");
    let mut vars = Vec::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap_or_default().to_string();
        let value = match (
            var["value"].as_str(),
            var["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            (Some(v), _) => v.to_string(),
            (None, Some("metadata.name")) => pod_name.clone(),
            (None, Some("metadata.namespace")) => ops.to_string(),
            _ => return Err(format!("cannot emulate env var {var}")),
        };
        vars.push((name, value));
    }
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let op = env.start_operator_as(apps, &arg_refs, &kubeconfig, &vars)?;
    Ok(ChartOperator {
        op,
        kubeconfig,
        fullname,
        pod_name,
    })
}

/// An AWX user with a password application, its credentials Secret `creds` in `ns`.
async fn awx_bot(
    env: &Env,
    awx: &crate::support::Standin,
    ns: &str,
) -> Result<(String, String), String> {
    let user = format!("{ns}-bot");
    let password = format!("pw-{}", sha256_hex(ns).get(..16).unwrap_or_default());
    awx.create_user(&user, &password).await?;
    let (id, secret) = awx
        .create_app(&format!("{ns}-app"), "password", &user)
        .await?;
    env.credentials(
        ns,
        "creds",
        &[
            ("username", &user),
            ("password", &password),
            ("client_id", &id),
            ("client_secret", &secret),
        ],
    )?;
    Ok((user, password))
}

pub(crate) fn awx_token(ns: &str, name: &str, url: &str, extra: Value) -> Value {
    let mut doc = json!({"apiVersion": "awx-token-operator.io/v1alpha1", "kind": "AwxToken",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"awx": {"url": url, "allowInsecureHttp": true, "timeoutSeconds": 5},
                 "grant": {"type": "Password", "credentialsSecretRef": {"name": "creds"}}}});
    if let (Some(spec), Value::Object(extra)) = (doc["spec"].as_object_mut(), extra) {
        spec.extend(extra);
    }
    doc
}

pub(crate) async fn wait_ready(
    env: &Env,
    ns: &str,
    name: &str,
    status: &str,
    reason: &str,
) -> Result<Value, String> {
    let last = std::sync::Mutex::new(None);
    wait_for(
        &format!("{ns}/{name} Ready={status} {reason}"),
        READY_TIMEOUT,
        || async {
            let Some(obj) = env.awx_token(ns, name).await? else {
                return Ok(None);
            };
            let cond = condition(&obj, "Ready");
            *last.lock().map_err(|e| e.to_string())? = cond.clone();
            Ok(cond
                .filter(|(s, r, _)| s == status && r == reason)
                .map(|_| obj))
        },
    )
    .await
    .map_err(|e| {
        format!(
            "{e}; last Ready condition: {:?}",
            last.lock().map(|l| l.clone())
        )
    })
}

/// Nothing in the operator's log says a Kubernetes request was refused.
pub(crate) fn log_shows_no_refusal(log_path: &Path) -> TestResult {
    let log = fs::read_to_string(log_path).map_err(|e| e.to_string())?;
    ensure!(!log.is_empty(), "empty operator log");
    for needle in [
        "forbidden",
        "could not publish event",
        "could not restart",
        "could not release the leader lease",
    ] {
        ensure!(
            !log.to_lowercase().contains(needle),
            "the operator log ({}) contains {needle:?}: the chart's RBAC is missing a right",
            log_path.display()
        );
    }
    Ok(())
}

/// `kubectl auth can-i` as the identity of `kubeconfig`: true for yes.
pub(crate) fn can_i(env: &Env, kubeconfig: &Path, args: &[&str]) -> Result<bool, String> {
    let mut full = vec!["auth", "can-i"];
    full.extend(args);
    let r = run_tool(env, "kubectl", kubeconfig, &full, "")?;
    match r.stdout.trim() {
        "yes" => Ok(true),
        "no" => Ok(false),
        other => Err(format!(
            "kubectl auth can-i {}: {other} {}",
            args.join(" "),
            r.stderr.trim()
        )),
    }
}

/// A namespaced install: the operator, with only the chart's rights, issues, rotates (and
/// restarts the workload), refuses a host outside allowedAwxHosts, holds its Lease in the
/// release namespace, and revokes on delete; the same identity is refused everywhere else.
pub async fn chart_rbac_namespaced_install_runs_the_operator(env: Arc<Env>) -> TestResult {
    let ops = env.namespace("chart-rbac-ops").await?;
    let apps = env.namespace("chart-rbac-apps").await?;
    let other = env.namespace("chart-rbac-other").await?;
    let awx = env.standin("awx")?;
    let awx_host = awx
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let (user, _) = awx_bot(&env, &awx, &apps).await?;
    env.apply(&json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "consumer", "namespace": apps},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "consumer"}},
                 "template": {"metadata": {"labels": {"app": "consumer"}},
                              "spec": {"containers": [{"name": "c", "image": "example.invalid/consumer:1"}]}}}}))?;

    let hosts = format!(r#"allowedAwxHosts=["{awx_host}"]"#);
    let mut c = install_and_run(
        &env,
        "chart-rbac",
        &ops,
        &apps,
        &[
            "--set",
            &format!("watchNamespace={apps}"),
            "--set-json",
            &hosts,
        ],
    )
    .await?;

    env.apply(&awx_token(
        &apps,
        "ci-bot",
        &awx.url,
        json!({"rolloutRestartTargets": [{"kind": "Deployment", "name": "consumer"}]}),
    ))?;
    env.apply(&awx_token(
        &apps,
        "elsewhere",
        "http://127.0.0.2:9/",
        json!({}),
    ))?;
    wait_ready(&env, &apps, "ci-bot", "True", "TokenReady").await?;
    let first = env
        .secret_value(&apps, "ci-bot", "token")
        .await?
        .ok_or("no token")?;
    ensure_eq!(
        awx.whoami(&first).await?,
        Some(user.clone()),
        "the token works as the user"
    );
    ensure!(
        env.secret(&apps, "awx-token-operator-state-ci-bot")
            .await?
            .is_some(),
        "the state Secret was written"
    );
    wait_ready(&env, &apps, "elsewhere", "False", "HostNotAllowed").await?;

    let lease: Value = serde_json::from_str(&env.kubectl(&[
        "get",
        "lease",
        &c.fullname,
        "-n",
        &ops,
        "-o",
        "json",
    ])?)
    .map_err(|e| e.to_string())?;
    ensure_eq!(
        lease["spec"]["holderIdentity"],
        json!(c.pod_name),
        "the Lease in the release namespace, held as POD_NAME"
    );
    wait_for("a TokenIssued event", READY_TIMEOUT, || async {
        let events: Value =
            serde_json::from_str(&env.kubectl(&["get", "events", "-n", &apps, "-o", "json"])?)
                .map_err(|e| e.to_string())?;
        Ok(events["items"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["reason"] == "TokenIssued"))
            .then_some(()))
    })
    .await?;

    // Rotation: a new token, and the named Deployment restarted by a patch.
    env.kubectl(&[
        "annotate",
        "awxt",
        "ci-bot",
        "-n",
        &apps,
        "awx-token-operator.io/rotate=1",
    ])?;
    let second = wait_for("a rotated token", READY_TIMEOUT, || async {
        Ok(env
            .secret_value(&apps, "ci-bot", "token")
            .await?
            .filter(|t| *t != first))
    })
    .await?;
    wait_for(
        "the consumer Deployment restarted",
        READY_TIMEOUT,
        || async {
            let d = env.kubectl(&["get", "deployment", "consumer", "-n", &apps, "-o", "json"])?;
            Ok(d.contains("awx-token-operator.io/restartedAt")
                .then_some(()))
        },
    )
    .await?;

    // Delete: the finalizer revokes both tokens, then lets go.
    env.kubectl(&[
        "delete",
        "awxt",
        "ci-bot",
        "elsewhere",
        "-n",
        &apps,
        "--wait=false",
    ])?;
    wait_for("both AwxTokens gone", READY_TIMEOUT, || async {
        let gone = env.awx_token(&apps, "ci-bot").await?.is_none()
            && env.awx_token(&apps, "elsewhere").await?.is_none();
        Ok(gone.then_some(()))
    })
    .await?;
    ensure_eq!(
        awx.live_tokens(&user).await?,
        Vec::<String>::new(),
        "every token revoked on delete"
    );
    ensure_eq!(awx.whoami(&second).await?, None, "the last token revoked");
    // SIGTERM: the leader hands its Lease back (a patch) before it exits.
    c.op.terminate().await?;
    log_shows_no_refusal(&c.op.log)?;
    let log = fs::read_to_string(&c.op.log).map_err(|e| e.to_string())?;
    ensure!(
        log.contains("released the leader lease"),
        "the Lease released on SIGTERM"
    );

    // Least privilege: the same identity gets nothing outside its namespaces and verbs.
    env.credentials(
        &other,
        "not-yours",
        &[("password", "other-namespace-secret")],
    )?;
    let r = run_tool(
        &env,
        "kubectl",
        &c.kubeconfig,
        &["get", "secret", "not-yours", "-n", &other],
        "",
    )?;
    ensure!(
        !r.ok && r.stderr.contains("Forbidden"),
        "a Secret in another namespace must be refused with 403: {}",
        r.stderr.trim()
    );
    let lease_resource = format!("leases/{}", c.fullname);
    for (args, want) in [
        (vec!["get", "secrets", "-n", &apps], true),
        (vec!["patch", "secrets", "-n", &apps], true),
        (vec!["update", "secrets", "-n", &apps], true),
        (vec!["delete", "secrets", "-n", &apps], false),
        (vec!["get", "secrets", "-n", &other], false),
        (vec!["list", "secrets", "-n", &other], false),
        (vec!["list", "secrets", "--all-namespaces"], false),
        (
            vec!["list", "awxtokens.awx-token-operator.io", "-n", &apps],
            true,
        ),
        (
            vec!["list", "awxtokens.awx-token-operator.io", "-n", &other],
            false,
        ),
        (
            vec!["update", "awxtokens.awx-token-operator.io", "-n", &apps],
            false,
        ),
        (
            vec!["create", "awxtokens.awx-token-operator.io", "-n", &apps],
            false,
        ),
        (
            vec!["delete", "awxtokens.awx-token-operator.io", "-n", &apps],
            false,
        ),
        (vec!["patch", "deployments.apps", "-n", &other], false),
        // Restart targets are read (who restarted them, whether the rollout finished).
        (vec!["get", "deployments.apps", "-n", &apps], true),
        (vec!["list", "statefulsets.apps", "-n", &apps], true),
        (vec!["get", "daemonsets.apps", "-n", &other], false),
        (vec!["delete", "deployments.apps", "-n", &apps], false),
        (vec!["update", "deployments.apps", "-n", &apps], false),
        (vec!["patch", &lease_resource, "-n", &ops], true),
        (vec!["patch", "leases/someone-elses", "-n", &ops], false),
        (vec!["create", "leases", "-n", &apps], false),
        (vec!["get", "secrets", "-n", &ops], false),
    ] {
        ensure_eq!(
            can_i(&env, &c.kubeconfig, &args)?,
            want,
            "kubectl auth can-i {}",
            args.join(" ")
        );
    }
    Ok(())
}

/// A cluster-wide install: the ClusterRoleBinding gives the chart's identity what the
/// operator needs in any namespace.
pub async fn chart_rbac_cluster_wide_install_runs_the_operator(env: Arc<Env>) -> TestResult {
    let ops = env.namespace("chart-cw-ops").await?;
    let apps = env.namespace("chart-cw-apps").await?;
    let awx = env.standin("awx")?;
    let (user, _) = awx_bot(&env, &awx, &apps).await?;
    let c = install_and_run(&env, "chart-cw", &ops, &apps, &[]).await?;
    env.apply(&awx_token(&apps, "ci-bot", &awx.url, json!({})))?;
    wait_ready(&env, &apps, "ci-bot", "True", "TokenReady").await?;
    let token = env
        .secret_value(&apps, "ci-bot", "token")
        .await?
        .ok_or("no token")?;
    ensure_eq!(
        awx.whoami(&token).await?,
        Some(user),
        "the token works as the user"
    );
    log_shows_no_refusal(&c.op.log)?;
    ensure!(
        can_i(
            &env,
            &c.kubeconfig,
            &["list", "secrets", "--all-namespaces"]
        )?,
        "cluster-wide: Secrets are readable in every namespace (why watchNamespace exists)"
    );
    ensure!(
        !can_i(&env, &c.kubeconfig, &["delete", "secrets", "-n", &apps])?,
        "cluster-wide: still no Secret deletion"
    );
    for rule in [
        &["watch", "clusterawxconnections.awx-token-operator.io"][..],
        &[
            "watch",
            "awxconnections.awx-token-operator.io",
            "--all-namespaces",
        ],
        &[
            "patch",
            "clusterawxconnections.awx-token-operator.io",
            "--subresource=status",
        ],
        &["get", "namespaces"],
    ] {
        ensure!(
            can_i(&env, &c.kubeconfig, rule)?,
            "cluster-wide: may {}",
            rule.join(" ")
        );
    }
    ensure!(
        !can_i(&env, &c.kubeconfig, &["list", "namespaces"])?,
        "cluster-wide: namespaces are read one by one, never listed"
    );
    Ok(())
}

/// The relative path from `from` (a directory) to `to`, both absolute: kustomize refuses
/// absolute paths to bases.
fn relative_path(from: &Path, to: &Path) -> Result<PathBuf, String> {
    let from = fs::canonicalize(from).map_err(|e| e.to_string())?;
    let to = fs::canonicalize(to).map_err(|e| e.to_string())?;
    let common = from
        .components()
        .zip(to.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut rel = PathBuf::new();
    for _ in from.components().skip(common) {
        rel.push("..");
    }
    for c in to.components().skip(common) {
        rel.push(c);
    }
    Ok(rel)
}

/// Every file in examples/ and the plain manifests of deploy/ (through kustomize) pass a
/// server-side dry run; the examples' AwxTokens also pass the operator's own validation (the
/// CEL rules a 1.20 server does not enforce).
pub async fn chart_examples_and_plain_manifests_pass_server_dry_run(env: Arc<Env>) -> TestResult {
    let ns = env.namespace("chart-examples").await?;
    // awx-resource-operator's AnsibleJob, as a schemaless stand-in for its CRD.
    env.apply(
        &json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "ansiblejobs.tower.ansible.com"},
        "spec": {"group": "tower.ansible.com", "scope": "Namespaced",
                 "names": {"kind": "AnsibleJob", "listKind": "AnsibleJobList",
                           "plural": "ansiblejobs", "singular": "ansiblejob"},
                 "versions": [{"name": "v1alpha1", "served": true, "storage": true,
                               "schema": {"openAPIV3Schema": {"type": "object",
                                   "x-kubernetes-preserve-unknown-fields": true}}}]}}),
    )?;
    env.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/ansiblejobs.tower.ansible.com",
        "--timeout=30s",
    ])?;

    let dir = repo_root().join("examples");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    ensure!(files.len() >= 9, "examples: {files:?}");
    let mut token_count = 0;
    for file in &files {
        let name = file.display().to_string();
        let text = fs::read_to_string(file).map_err(|e| e.to_string())?;
        let docs = documents(&text)?;
        for doc in &docs {
            ensure!(
                doc["metadata"]["namespace"].is_null(),
                "{name}: examples leave the namespace to kubectl -n"
            );
            if doc["kind"] == "AwxToken" {
                token_count += 1;
                let mut token: awx_token_operator::crd::AwxToken =
                    serde_json::from_value(doc.clone()).map_err(|e| format!("{name}: {e}"))?;
                if let Some(both) = awx_token_operator::connection::exclusive(&token.spec) {
                    return Err(format!("{name}: {both}"));
                }
                if token.spec.connection_ref.is_some() {
                    // The connection's awx block takes the place of the token's.
                    token.spec.awx.url = "https://awx.example.com".into();
                }
                awx_token_operator::spec::validate(&token.spec)
                    .map_err(|e| format!("{name}: the operator rejects the spec: {e}"))?;
            }
        }
        let out = env
            .kubectl(&["apply", "--dry-run=server", "-n", &ns, "-f", &name])
            .map_err(|e| format!("{name}: {e}"))?;
        ensure_eq!(
            out.lines()
                .filter(|l| l.ends_with("(server dry run)"))
                .count(),
            docs.len(),
            "{name}: objects accepted ({out})"
        );
    }
    ensure!(token_count >= 9, "AwxTokens in examples: {token_count}");

    // deploy/ as a kustomize base, moved to a namespace of this scenario by an overlay.
    let target = env.namespace("chart-deploy").await?;
    let overlay = env.run_dir.join("chart-deploy-overlay");
    fs::create_dir_all(&overlay).map_err(|e| e.to_string())?;
    let base = relative_path(&overlay, &repo_root().join("deploy"))?;
    fs::write(
        overlay.join("kustomization.yaml"),
        format!("resources:\n  - {}\nnamespace: {target}\n", base.display()),
    )
    .map_err(|e| e.to_string())?;
    let built = env.kubectl(&["kustomize", &overlay.display().to_string()])?;
    let docs = documents(&built)?;
    ensure_eq!(
        kinds(&docs),
        owned(&[
            ("Namespace", ""),
            // AwxToken, ClusterAwxConnection, AwxConnection.
            ("CustomResourceDefinition", ""),
            ("CustomResourceDefinition", ""),
            ("CustomResourceDefinition", ""),
            ("ServiceAccount", &target),
            ("ClusterRole", ""),
            ("ClusterRoleBinding", ""),
            ("Role", &target),
            ("RoleBinding", &target),
            ("Deployment", &target),
            ("Service", &target),
        ]),
        "deploy/ objects"
    );
    // The CRDs in deploy/ carry CEL rules, which a 1.20 server rejects: left out here
    // (tests/check-generated.sh keeps it identical to crds/).
    let to_apply: Vec<Value> = docs
        .into_iter()
        .filter(|d| d["kind"] != "CustomResourceDefinition")
        .collect();
    server_dry_run(&env, &to_apply, "deploy/")?;
    Ok(())
}

/// The metric names a PromQL expression selects: its identifiers that are not functions or
/// aggregations (followed by `(` or by `by`/`without`), keywords, label names (inside `{}` or
/// the `()` after by/without/on/ignoring/group_left/group_right), strings, numbers or
/// durations, or Grafana variables.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    const LABEL_LISTS: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: [&str; 5] = ["bool", "and", "or", "unless", "offset"];
    let chars: Vec<char> = expr.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    // The index after the closing `close` (quoted strings inside skipped).
    let skip_to = |mut i: usize, close: char| {
        while i < chars.len() && chars[i] != close {
            if matches!(chars[i], '"' | '\'' | '`') {
                let quote = chars[i];
                i += 1;
                while i < chars.len() && chars[i] != quote {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
            }
            i += 1;
        }
        i + 1
    };
    let mut names = BTreeSet::new();
    let mut previous = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if matches!(c, '"' | '\'' | '`') {
            i = skip_to(i + 1, c);
            previous.clear();
        } else if c == '{' {
            i = skip_to(i + 1, '}');
        } else if c == '[' {
            i = skip_to(i + 1, ']');
        } else if c == '(' && LABEL_LISTS.contains(&previous.as_str()) {
            i = skip_to(i + 1, ')');
            previous.clear();
        } else if c.is_ascii_digit() || c == '.' || c == '$' {
            i += 1;
            while i < chars.len() && (ident(chars[i]) || chars[i] == '.') {
                i += 1;
            }
            previous.clear();
        } else if ident(c) {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let rest: String = chars[j..].iter().take(8).collect();
            let called = rest.starts_with('(')
                || ["by", "without"].iter().any(|k| {
                    rest.strip_prefix(k)
                        .is_some_and(|r| r.starts_with(|c: char| c == '(' || c.is_whitespace()))
                });
            if !called
                && !LABEL_LISTS.contains(&word.as_str())
                && !KEYWORDS.contains(&word.as_str())
            {
                names.insert(word.clone());
            }
            previous = word;
        } else {
            i += 1;
            previous.clear();
        }
    }
    names
}

/// The documents helm renders for release "alerts" in namespace "ops" with `values`.
fn render_alerts_release(env: &Env, values: &[&str]) -> Result<Vec<Value>, String> {
    let chart = chart_dir();
    let mut args = vec!["template", "alerts", &chart, "--namespace", "ops"];
    args.extend(values);
    documents(&helm(env, &args)?)
}

const DASHBOARD_AND_RULE: [&str; 4] = [
    "--set",
    "metrics.dashboard.enabled=true",
    "--set",
    "metrics.prometheusRule.enabled=true",
];

/// The dashboard ConfigMap is what Grafana's sidecar loads, and every query of the dashboard
/// and of the alerts names only series the operator exports (families without samples
/// included); the alerts' selector follows the value.
pub async fn chart_dashboard_and_alerts_query_only_exported_metrics(env: Arc<Env>) -> TestResult {
    // The extractor itself, on expressions of the kinds the dashboard and the rules use.
    for (expr, want) in [
        (
            r#"histogram_quantile(0.99, sum by (endpoint, le) (rate(a_bucket{job=~"$job"}[$__rate_interval])))"#,
            vec!["a_bucket"],
        ),
        (
            "(max by (namespace, name) (b{job=\"x\"}) - time() < 86400) and on (namespace, name) (max(c) < time())",
            vec!["b", "c"],
        ),
        (
            "absent(up{job=\"x\",pod=~\"a|}\"} == 1) or sum without (pod) (d) > bool 0 unless e offset 5m",
            vec!["d", "e", "up"],
        ),
    ] {
        let want: BTreeSet<String> = want.into_iter().map(str::to_string).collect();
        ensure_eq!(promql_metric_names(expr), want, "metric names of {expr}");
    }

    let exported = awx_token_operator::metrics::Metrics::new()
        .series_names()
        .clone();
    let docs = render_alerts_release(&env, &DASHBOARD_AND_RULE)?;

    // The dashboard, as the sidecar finds it.
    let maps = find(&docs, "ConfigMap", Some("ops"));
    ensure_eq!(maps.len(), 1, "one dashboard ConfigMap");
    let map = maps[0];
    ensure_eq!(
        map["metadata"]["labels"]["grafana_dashboard"],
        json!("1"),
        "the sidecar's label"
    );
    let data = map["data"].as_object().ok_or("the ConfigMap has no data")?;
    ensure_eq!(
        data.keys().collect::<Vec<_>>(),
        vec!["awx-token-operator.json"],
        "ConfigMap keys"
    );
    let text = data["awx-token-operator.json"]
        .as_str()
        .ok_or("dashboard is not a string")?;
    let dashboard: Value =
        serde_json::from_str(text).map_err(|e| format!("the dashboard is not JSON: {e}"))?;
    let file = fs::read_to_string(
        repo_root().join("charts/awx-token-operator/dashboards/awx-token-operator.json"),
    )
    .map_err(|e| e.to_string())?;
    ensure_eq!(
        text.trim_end(),
        file.trim_end(),
        "the ConfigMap carries the dashboard file unchanged"
    );
    ensure_eq!(
        dashboard["uid"],
        json!("awx-token-operator"),
        "dashboard uid"
    );
    let panels = dashboard["panels"].as_array().ok_or("no panels")?;
    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    let mut queries = 0;
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default();
        ensure!(!title.is_empty(), "a panel without a title: {panel}");
        ensure!(
            ids.insert(panel["id"].as_u64().ok_or("a panel without an id")?),
            "panel id {} twice",
            panel["id"]
        );
        if panel["type"] == "row" {
            continue;
        }
        ensure_eq!(
            panel["datasource"]["uid"],
            json!("${datasource}"),
            "{title}: the datasource variable"
        );
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        ensure!(!targets.is_empty(), "{title}: no query");
        for target in &targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            let names = promql_metric_names(expr);
            ensure!(
                !names.is_empty(),
                "{title}: a query without a metric: {expr:?}"
            );
            ensure!(
                expr.matches("awx_token_operator_").count()
                    == expr.matches("{job=~\"$job\"}").count(),
                "{title}: every series selected by the job variable: {expr}"
            );
            used.extend(names);
            queries += 1;
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(query) = variable["query"]["query"].as_str() {
            let metric = query
                .strip_prefix("label_values(")
                .and_then(|q| q.split(',').next())
                .ok_or_else(|| {
                    format!("variable query {query:?} is not label_values(metric, label)")
                })?;
            used.insert(metric.trim().to_string());
        }
    }
    ensure!(queries >= 20, "dashboard queries: {queries}");
    let unknown: Vec<_> = used.iter().filter(|n| !exported.contains(*n)).collect();
    ensure_eq!(
        unknown,
        Vec::<&String>::new(),
        "dashboard series the operator does not export"
    );
    for shown in [
        "awx_token_operator_tokens_issued_total",
        "awx_token_operator_tokens_renewed_total",
        "awx_token_operator_revocations_total",
        "awx_token_operator_renewal_failures_total",
        "awx_token_operator_verifications_total",
        "awx_token_operator_restarts_total",
        "awx_token_operator_awx_requests_total",
        "awx_token_operator_awx_request_duration_seconds_bucket",
        "awx_token_operator_objects_in_backoff",
        "awx_token_operator_token_expiry_timestamp_seconds",
        "awx_token_operator_leader",
        "awx_token_operator_reconcile_errors_total",
    ] {
        ensure!(used.contains(shown), "the dashboard does not show {shown}");
    }

    // The alerts.
    let rules = find(&docs, "PrometheusRule", Some("ops"));
    ensure_eq!(rules.len(), 1, "one PrometheusRule");
    ensure_eq!(
        rules[0]["apiVersion"],
        json!("monitoring.coreos.com/v1"),
        "PrometheusRule API"
    );
    let mut alerts = Vec::new();
    for rule in rules[0]["spec"]["groups"][0]["rules"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let alert = rule["alert"].as_str().unwrap_or_default().to_string();
        let expr = rule["expr"].as_str().unwrap_or_default();
        let names = promql_metric_names(expr);
        ensure!(!names.is_empty(), "{alert}: no metric in {expr:?}");
        for name in &names {
            ensure!(
                exported.contains(name) || name == "up",
                "{alert}: {name} is neither exported by the operator nor Prometheus's up"
            );
        }
        ensure_eq!(
            expr.matches('{').count(),
            expr.matches("{job=\"alerts-awx-token-operator-metrics\"}")
                .count(),
            "{alert}: every selector is the release's job: {expr}"
        );
        for annotation in ["summary", "description"] {
            ensure!(
                rule["annotations"][annotation]
                    .as_str()
                    .is_some_and(|a| a.len() > 20),
                "{alert}: no {annotation}"
            );
        }
        ensure!(
            matches!(
                rule["labels"]["severity"].as_str(),
                Some("warning" | "critical")
            ),
            "{alert}: severity {}",
            rule["labels"]["severity"]
        );
        alerts.push(alert);
    }
    ensure_eq!(
        alerts,
        vec![
            "AwxTokenExpiresWithinADay",
            "AwxTokenRenewalFailing",
            "AwxTokenObjectsInBackoff",
            "AwxTokenOperatorDown",
            "AwxTokenOperatorNoLeader",
        ],
        "alerts"
    );

    // Another scrape job: the selector value replaces the release's job everywhere.
    let mut values = DASHBOARD_AND_RULE.to_vec();
    values.extend([
        "--set-json",
        r#"metrics.prometheusRule.selector="job=\"awx\",namespace=\"ops\"""#,
    ]);
    let docs = render_alerts_release(&env, &values)?;
    let rule = find(&docs, "PrometheusRule", Some("ops"))[0];
    for r in rule["spec"]["groups"][0]["rules"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let expr = r["expr"].as_str().unwrap_or_default();
        ensure!(
            expr.contains("{job=\"awx\",namespace=\"ops\"}") && !expr.contains("-metrics"),
            "{}: the selector value: {expr}",
            r["alert"]
        );
    }
    // Off by default.
    let docs = render_alerts_release(&env, &[])?;
    ensure!(
        find(&docs, "ConfigMap", Some("ops")).is_empty()
            && find(&docs, "PrometheusRule", Some("ops")).is_empty(),
        "dashboard and alerts are off by default"
    );
    Ok(())
}

/// The rendered PrometheusRule's spec passes `promtool check rules`, and
/// tests/e2e/prometheus-rule-tests.yaml (each alert firing on some series and not on others,
/// with its exact labels and annotations) passes `promtool test rules`. Skipped, saying so,
/// without promtool, except under CI (whose .ci/run installs it), where it fails.
pub async fn chart_alerts_pass_promtool_check_and_unit_tests(env: Arc<Env>) -> TestResult {
    let promtool = |dir: &Path, args: &[&str]| {
        Command::new("promtool")
            .args(args)
            .current_dir(dir)
            .output()
    };
    let dir = env.run_dir.join("chart-alerts");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    if let Err(e) = promtool(&dir, &["--version"]) {
        if std::env::var_os("CI").is_some() {
            return Err(format!(
                "promtool: {e} (.ci/run installs Debian's prometheus)"
            ));
        }
        return skip(format!("promtool: {e} (apt-get install prometheus)"));
    }
    let docs = render_alerts_release(&env, &DASHBOARD_AND_RULE)?;
    let rule = find(&docs, "PrometheusRule", Some("ops"))
        .first()
        .copied()
        .ok_or("no PrometheusRule")?;
    let spec = serde_yaml::to_string(&rule["spec"]).map_err(|e| e.to_string())?;
    fs::write(dir.join("rules.yaml"), spec).map_err(|e| e.to_string())?;
    fs::copy(
        repo_root().join("tests/e2e/prometheus-rule-tests.yaml"),
        dir.join("prometheus-rule-tests.yaml"),
    )
    .map_err(|e| e.to_string())?;
    for (args, want) in [
        (["check", "rules", "rules.yaml"], "SUCCESS: 5 rules found"),
        (["test", "rules", "prometheus-rule-tests.yaml"], "SUCCESS"),
    ] {
        let out = promtool(&dir, &args).map_err(|e| e.to_string())?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            out.status.success() && text.contains(want),
            "promtool {}: {text}",
            args.join(" ")
        );
    }
    Ok(())
}
