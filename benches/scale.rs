//! Scale benchmark: N AwxTokens created at once against the real test cluster and the AWX
//! stand-in. Prints how long they take to become Ready, the operator's memory, AWX requests
//! and Kubernetes writes per token, and the writes and requests of a minute of steady state.
//!
//!   tests/env/with-env.sh cargo bench --bench scale            # N = 1000
//!   AWXTO_BENCH_N=10000 tests/env/with-env.sh cargo bench --bench scale
//!
//! Numbers, not assertions: performance targets belong here, not in timed tests.

#[allow(dead_code, unused_macros)]
#[path = "../tests/e2e/support.rs"]
mod support;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use serde_json::json;
use support::Env;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(run()) {
        eprintln!("benchmark failed: {e}");
        std::process::exit(1);
    }
}

/// Kubernetes writes (POST, PUT, PATCH, DELETE) by resource, from kube-apiserver's own metrics.
fn writes(env: &Env) -> Result<BTreeMap<String, f64>, String> {
    let text = env.kubectl(&["get", "--raw", "/metrics"])?;
    let mut by_resource = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let label = |key: &str| {
            labels
                .split(&format!("{key}=\""))
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or_default()
                .to_string()
        };
        if !matches!(
            label("verb").as_str(),
            "POST" | "PUT" | "PATCH" | "DELETE" | "APPLY" | "CREATE" | "UPDATE"
        ) {
            continue;
        }
        let resource = match label("subresource").as_str() {
            "" => label("resource"),
            sub => format!("{}/{sub}", label("resource")),
        };
        if matches!(
            resource.as_str(),
            "secrets" | "awxtokens" | "awxtokens/status" | "events" | "leases"
        ) {
            *by_resource.entry(resource).or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    Ok(by_resource)
}

fn delta(after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn ready_count(env: &Env, ns: &str) -> Result<usize, String> {
    let out = env.kubectl(&[
        "get",
        "awxt",
        "-n",
        ns,
        "-o",
        "jsonpath={range .items[*]}{.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
    ])?;
    Ok(out.lines().filter(|l| *l == "True").count())
}

async fn run() -> Result<(), String> {
    let n: usize = std::env::var("AWXTO_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let steady = Duration::from_secs(
        std::env::var("AWXTO_BENCH_STEADY_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60),
    );
    let env = Env::start().await?;
    let result = bench(&env, n, steady).await;
    env.stop();
    result
}

async fn bench(env: &Env, n: usize, steady: Duration) -> Result<(), String> {
    let ns = env.namespace("bench").await?;
    let awx = env.private_standin("bench", "awx")?;
    awx.create_user("bench-bot", "bench-password").await?;
    let (id, secret) = awx.create_app("bench", "password", "bench-bot").await?;
    env.credentials(
        &ns,
        "creds",
        &[
            ("username", "bench-bot"),
            ("password", "bench-password"),
            ("client_id", &id),
            ("client_secret", &secret),
        ],
    )?;
    let op = env.start_operator_as(
        &ns,
        &[
            "--awx-max-rps",
            "0",
            "--awx-max-in-flight",
            "16",
            "--concurrency",
            "32",
        ],
        &env.kubeconfig,
        &[("RUST_LOG".to_string(), "info".to_string())],
    )?;
    let pid = op.pid().ok_or("operator not running")?;
    support::wait_for(
        "the operator to be ready",
        Duration::from_secs(60),
        || async {
            let r = reqwest::get(format!("http://127.0.0.1:{}/readyz", op.port)).await;
            Ok(r.is_ok_and(|r| r.status() == 200).then_some(()))
        },
    )
    .await?;
    let idle_rss = rss_mib(pid);
    let writes_before = writes(env)?;
    let awx_before = awx.requests().await?.len();

    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(250) {
        let docs: Vec<String> = chunk
            .iter()
            .map(|i| {
                json!({"apiVersion": "awx-token-operator.io/v1alpha1", "kind": "AwxToken",
                    "metadata": {"name": format!("b{i:05}"), "namespace": ns},
                    "spec": {"awx": {"url": awx.url, "allowInsecureHttp": true},
                        "grant": {"type": "Password", "credentialsSecretRef": {"name": "creds"}}}})
                .to_string()
            })
            .collect();
        env.kubectl_stdin(&["apply", "-f", "-"], &docs.join("\n"))?;
    }
    let created = started.elapsed();
    let mut peak_rss = rss_mib(pid);
    let mut half = None;
    loop {
        let ready = ready_count(env, &ns).await?;
        peak_rss = peak_rss.max(rss_mib(pid));
        if half.is_none() && ready * 2 >= n {
            half = Some(started.elapsed());
        }
        if ready == n {
            break;
        }
        if started.elapsed() > Duration::from_secs(3600) {
            return Err(format!("only {ready} of {n} Ready after an hour"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let all_ready = started.elapsed();
    let after_issue = writes(env)?;
    let writes_issue = delta(&after_issue, &writes_before);
    let awx_issue = awx.requests().await?.len() - awx_before;

    tokio::time::sleep(steady).await;
    let steady_writes = delta(&writes(env)?, &after_issue);
    let awx_steady = awx.requests().await?.len() - awx_before - awx_issue;
    let steady_rss = rss_mib(pid);

    let per_token = |m: &BTreeMap<String, f64>| {
        m.iter()
            .map(|(k, v)| format!("{k} {:.2}", v / n as f64))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let total_writes: f64 = writes_issue.values().sum();
    println!(
        "\nscale benchmark: {n} AwxTokens (Password grant, one AWX stand-in, debug-free logging)"
    );
    println!(
        "  applied with kubectl in          {:>8.1} s",
        created.as_secs_f64()
    );
    println!(
        "  half Ready after                 {:>8.1} s",
        half.unwrap_or_default().as_secs_f64()
    );
    println!(
        "  all Ready after                  {:>8.1} s  ({:.1} tokens/s)",
        all_ready.as_secs_f64(),
        n as f64 / all_ready.as_secs_f64()
    );
    println!(
        "  operator RSS idle / peak / after {:>8.1} / {:.1} / {:.1} MiB",
        idle_rss, peak_rss, steady_rss
    );
    println!(
        "  AWX requests per token           {:>8.2}",
        awx_issue as f64 / n as f64
    );
    println!(
        "  Kubernetes writes per token      {:>8.2}  ({})",
        total_writes / n as f64,
        per_token(&writes_issue)
    );
    println!(
        "  steady state over {:>3} s: {} Kubernetes writes ({:?}), {} AWX requests",
        steady.as_secs(),
        steady_writes.values().sum::<f64>() + 0.0,
        steady_writes,
        awx_steady
    );
    Ok(())
}
