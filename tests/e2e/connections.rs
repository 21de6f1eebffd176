//! Platform-owned connections: a ClusterAwxConnection whose application secret sits in the
//! operator's namespace, shared with the namespaces its selector admits, and a namespaced
//! AwxConnection.

use std::{sync::Arc, time::Duration};

use serde_json::{Value, json};

use crate::chart::{can_i, service_account_token, token_kubeconfig};
use crate::scenarios::{wait_ready, wait_token};
use crate::support::{
    Env, Standin, TestResult, arrivals, condition, free_port, run_tool, sha256_hex, wait_for,
};

/// The label the test's cluster-wide operator selects its AwxTokens by (other scenarios'
/// operators watch their own namespaces only).
const SHARD: &str = "e2e-connections";

fn token_via(ns: &str, name: &str, kind: &str, connection: &str, creds: &str) -> Value {
    json!({"apiVersion": "awx-token-operator.io/v1alpha1", "kind": "AwxToken",
    "metadata": {"name": name, "namespace": ns, "labels": {SHARD: "yes"}},
    "spec": {
        "connectionRef": {"kind": kind, "name": connection},
        "grant": {"type": "Password", "credentialsSecretRef": {"name": creds}},
        "renewal": {"revokeGracePeriod": "1s"},
    }})
}

fn connection_spec(url: &str, app: Option<&str>) -> Value {
    let mut spec = json!({"awx": {"url": url, "allowInsecureHttp": true, "timeoutSeconds": 5}});
    if let Some(app) = app {
        spec["application"] = json!({"name": app});
    }
    spec
}

/// Waits until connection `name` (`kind`, cluster-scoped when `ns` is None) reports `ready`
/// with `tokens` AwxTokens naming it; returns it.
async fn wait_connection(
    env: &Env,
    kind: &str,
    ns: Option<&str>,
    name: &str,
    ready: &str,
    tokens: u64,
) -> Result<Value, String> {
    let mut args = vec!["get", kind, name, "-o", "json"];
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    wait_for(
        &format!("{kind} {name} Ready={ready} with {tokens} tokens"),
        Duration::from_secs(90),
        || {
            let args = args.clone();
            async move {
                let obj: Value =
                    serde_json::from_str(&env.kubectl(&args)?).map_err(|e| e.to_string())?;
                let (status, _, _) = condition(&obj, "Ready").unwrap_or_default();
                Ok((status == ready && obj["status"]["tokens"] == tokens).then_some(obj))
            }
        },
    )
    .await
}

/// Password grants the stand-in answered so far.
async fn grants(awx: &Standin) -> Result<usize, String> {
    Ok(awx
        .requests()
        .await?
        .iter()
        .filter(|r| r["path"] == "/api/o/token/")
        .count())
}

pub async fn connections_cluster_connection_serves_admitted_namespaces_without_their_seeing_its_secret(
    env: Arc<Env>,
) -> TestResult {
    let awx = env.private_standin("connections", "awx")?;
    let ops = env.namespace("e2e-conn-ops").await?;
    let admitted = env.namespace("e2e-conn-in").await?;
    let outside = env.namespace("e2e-conn-out").await?;
    env.kubectl(&["label", "namespace", &admitted, "awx-access=granted"])?;
    let user = format!("{admitted}-bot");
    let password = format!("pw-{}", sha256_hex(&admitted).get(..16).unwrap_or_default());
    awx.create_user(&user, &password).await?;
    let outsider = format!("{outside}-bot");
    awx.create_user(&outsider, &password).await?;
    // The platform team's application, its secret in the operator's namespace only.
    let (id, secret) = awx.create_app("e2e-conn-shared", "password", &user).await?;
    env.credentials(
        &ops,
        "awx-app",
        &[("client_id", &id), ("client_secret", &secret)],
    )?;
    let shared = "e2e-conn-shared";
    let mut spec = connection_spec(&awx.url, Some("awx-app"));
    spec["allowedNamespaces"] = json!({"selector": {"matchLabels": {"awx-access": "granted"}}});
    env.apply(&json!({"apiVersion": "awx-token-operator.io/v1alpha1",
        "kind": "ClusterAwxConnection", "metadata": {"name": shared}, "spec": spec}))?;
    let _op = env.start_operator(
        "",
        &[
            "--shard-selector",
            &format!("{SHARD}=yes"),
            "--lease-namespace",
            &ops,
        ],
    )?;

    // The namespaces' credentials hold only their own login: no client id, no secret.
    for (ns, who) in [(&admitted, &user), (&outside, &outsider)] {
        env.credentials(ns, "login", &[("username", who), ("password", &password)])?;
    }
    for name in ["t1", "t2"] {
        env.apply(&token_via(
            &admitted,
            name,
            "ClusterAwxConnection",
            shared,
            "login",
        ))?;
    }
    env.apply(&token_via(
        &outside,
        "t",
        "ClusterAwxConnection",
        shared,
        "login",
    ))?;
    let mut first = Vec::new();
    for name in ["t1", "t2"] {
        wait_ready(&env, &admitted, name, "True", Some("TokenReady")).await?;
        let token = env
            .secret_value(&admitted, name, "token")
            .await?
            .ok_or("no token")?;
        ensure_eq!(
            awx.whoami(&token).await?,
            Some(user.clone()),
            "{name} works"
        );
        first.push(token);
    }

    // Outside the selector: refused, and AWX never heard of it.
    let refused = wait_ready(&env, &outside, "t", "False", Some("ConnectionRefused")).await?;
    let (_, _, message) = condition(&refused, "Ready").unwrap_or_default();
    ensure_eq!(
        message,
        format!(
            "spec.connectionRef: namespace {outside:?} is not selected by ClusterAwxConnection \
             {shared:?} spec.allowedNamespaces (awx-access=granted); no request was sent"
        ),
        "the refusal"
    );
    ensure_eq!(
        awx.requests_for(&outsider).await?.len(),
        0,
        "requests for the refused namespace's user"
    );
    ensure_eq!(
        grants(&awx).await?,
        2,
        "password grants so far: t1 and t2 only"
    );

    let conn = wait_connection(&env, "clusterawxconnection", None, shared, "True", 3).await?;
    ensure_eq!(conn["status"]["flavor"], "Controller", "flavour detected");
    ensure_eq!(conn["status"]["version"], "24.6.1", "the version AWX says");
    let row = env.kubectl(&["get", "clusterawxconnection", shared, "--no-headers"])?;
    let columns: Vec<&str> = row.split_whitespace().collect();
    ensure_eq!(
        columns,
        vec![shared, awx.url.as_str(), "Controller", "True", "3"],
        "printer columns NAME URL Flavor Ready Tokens"
    );

    // kubectl explain documents the kinds.
    let explained = env.kubectl(&["explain", "clusterawxconnection.spec.allowedNamespaces"])?;
    ensure!(
        explained.contains("Namespaces whose AwxTokens may use this connection"),
        "kubectl explain: {explained}"
    );
    let explained = env.kubectl(&["explain", "awxtoken.spec.connectionRef"])?;
    ensure!(
        explained.contains("ClusterAwxConnection or AwxConnection"),
        "kubectl explain: {explained}"
    );

    // A namespace user: reads its own token Secret, cannot read the application's.
    env.kubectl(&["create", "serviceaccount", "dev", "-n", &admitted])?;
    env.kubectl(&[
        "create",
        "role",
        "secret-reader",
        "--verb=get",
        "--resource=secrets",
        "-n",
        &admitted,
    ])?;
    env.kubectl(&[
        "create",
        "rolebinding",
        "dev-reads",
        "--role=secret-reader",
        &format!("--serviceaccount={admitted}:dev"),
        "-n",
        &admitted,
    ])?;
    let sa_token = service_account_token(&env, &admitted, "dev").await?;
    let dev = token_kubeconfig(&env, "e2e-conn-dev", &sa_token)?;
    ensure!(
        can_i(&env, &dev, &["get", "secret/t1", "-n", &admitted])?,
        "the namespace user may read its token Secret"
    );
    ensure!(
        !can_i(&env, &dev, &["get", "secret/awx-app", "-n", &ops])?,
        "the namespace user may not read the application Secret"
    );
    let read = run_tool(
        &env,
        "kubectl",
        &dev,
        &["get", "secret", "awx-app", "-n", &ops],
        "",
    )?;
    ensure!(
        !read.ok && read.stderr.contains("Forbidden"),
        "a real read of the application Secret is forbidden: {}",
        read.stderr
    );
    let own = run_tool(
        &env,
        "kubectl",
        &dev,
        &[
            "get",
            "secret",
            "t1",
            "-n",
            &admitted,
            "-o",
            "jsonpath={.data.token}",
        ],
        "",
    )?;
    ensure!(own.ok, "the namespace user reads its token: {}", own.stderr);

    // A new application secret: each dependent token is re-issued exactly once, and the
    // replaced tokens are revoked.
    let (id2, secret2) = awx
        .create_app("e2e-conn-shared-2", "password", &user)
        .await?;
    env.credentials(
        &ops,
        "awx-app",
        &[("client_id", &id2), ("client_secret", &secret2)],
    )?;
    for (name, old) in ["t1", "t2"].iter().zip(&first) {
        let new = wait_token(&env, &admitted, name, Some(old)).await?;
        ensure_eq!(
            awx.whoami(&new).await?,
            Some(user.clone()),
            "{name} re-issued works"
        );
    }
    for (name, old) in ["t1", "t2"].iter().zip(&first) {
        wait_for(
            &format!("{name}'s replaced token revoked"),
            Duration::from_secs(60),
            || async { Ok(awx.whoami(old).await?.is_none().then_some(())) },
        )
        .await?;
    }
    ensure_eq!(
        grants(&awx).await?,
        4,
        "password grants: one first issue and one re-issue per token"
    );

    // A connection to nowhere: Ready=False, and its token names it.
    let dead = "e2e-conn-dead";
    let mut spec = connection_spec(&format!("http://127.0.0.1:{}", free_port()), None);
    spec["allowedNamespaces"] = json!({});
    env.apply(&json!({"apiVersion": "awx-token-operator.io/v1alpha1",
        "kind": "ClusterAwxConnection", "metadata": {"name": dead}, "spec": spec}))?;
    let (dead_id, dead_secret) = awx.create_app("e2e-conn-dead", "password", &user).await?;
    env.credentials(
        &admitted,
        "login-and-app",
        &[
            ("username", &user),
            ("password", &password),
            ("client_id", &dead_id),
            ("client_secret", &dead_secret),
        ],
    )?;
    env.apply(&token_via(
        &admitted,
        "d",
        "ClusterAwxConnection",
        dead,
        "login-and-app",
    ))?;
    let conn = wait_connection(&env, "clusterawxconnection", None, dead, "False", 1).await?;
    ensure_eq!(
        condition(&conn, "Ready").unwrap_or_default().1,
        "Unreachable",
        "the dead connection's reason"
    );
    let obj = wait_ready(&env, &admitted, "d", "False", Some("AwxUnreachable")).await?;
    let (_, _, message) = condition(&obj, "Ready").unwrap_or_default();
    ensure!(
        message.ends_with(&format!("(through ClusterAwxConnection {dead:?})")),
        "the token names the connection that failed: {message}"
    );

    // A namespaced AwxConnection: its application in the same namespace.
    let (local_id, local_secret) = awx.create_app("e2e-conn-local", "password", &user).await?;
    env.credentials(
        &admitted,
        "local-app",
        &[("client_id", &local_id), ("client_secret", &local_secret)],
    )?;
    // Its own rate limit: one request a second for its tokens, however many there are.
    let mut spec = connection_spec(&awx.url, Some("local-app"));
    spec["requestsPerSecond"] = json!(1);
    let before = awx.requests().await?.len();
    env.apply(&json!({"apiVersion": "awx-token-operator.io/v1alpha1",
        "kind": "AwxConnection", "metadata": {"name": "local", "namespace": admitted},
        "spec": spec}))?;
    let locals = ["l1", "l2", "l3"];
    for name in locals {
        env.apply(&token_via(
            &admitted,
            name,
            "AwxConnection",
            "local",
            "login",
        ))?;
    }
    for name in locals {
        wait_ready(&env, &admitted, name, "True", Some("TokenReady")).await?;
    }
    let (times, busiest) = arrivals(&awx.requests().await?, before);
    println!(
        "    {} requests through AwxConnection local (1 a second) over {:.1}s",
        times.len(),
        times.last().unwrap_or(&0.0) - times.first().unwrap_or(&0.0)
    );
    ensure!(times.len() > locals.len(), "requests seen: {}", times.len());
    ensure_eq!(busiest, 1, "most requests in any one second");
    for name in locals {
        let token = env
            .secret_value(&admitted, name, "token")
            .await?
            .ok_or("no token")?;
        ensure_eq!(
            awx.whoami(&token).await?,
            Some(user.clone()),
            "{name} works"
        );
    }
    wait_connection(&env, "awxconnection", Some(&admitted), "local", "True", 3).await?;
    // A missing one is named.
    env.apply(&token_via(
        &admitted,
        "m",
        "AwxConnection",
        "missing",
        "login",
    ))?;
    let obj = wait_ready(&env, &admitted, "m", "False", Some("ConnectionNotFound")).await?;
    ensure_eq!(
        condition(&obj, "Ready").unwrap_or_default().2,
        format!(
            "spec.connectionRef: AwxConnection \"missing\" does not exist in namespace \
             {admitted:?}; no request was sent"
        ),
        "the missing connection's message"
    );
    Ok(())
}

/// --require-connection-ref: an inline spec.awx is refused before any request.
pub async fn connections_inline_awx_is_refused_when_connections_are_required(
    env: Arc<Env>,
) -> TestResult {
    let awx = env.private_standin("require-conn", "awx")?;
    let s = crate::scenarios::setup_with(&env, "e2e-conn-req", awx, &["--require-connection-ref"])
        .await?;
    s.password_credentials(&env, "creds").await?;
    env.apply(&crate::scenarios::awx_token(
        &s.ns,
        "inline",
        &s.awx.url,
        "Password",
        "creds",
        json!({}),
    ))?;
    let obj = wait_ready(&env, &s.ns, "inline", "False", Some("InlineAwxRefused")).await?;
    ensure!(
        condition(&obj, "Ready")
            .unwrap_or_default()
            .2
            .contains("--require-connection-ref"),
        "the message names the flag"
    );
    ensure_eq!(s.awx.requests().await?.len(), 0, "requests to AWX");
    Ok(())
}
