//! Scale benchmark: N AwxTokens against the real test cluster and the AWX stand-in, in a
//! cluster that also holds 20,000 unrelated Secrets (some of them changing all the while).
//!
//!   tests/env/with-env.sh cargo bench --bench scale -- --tokens 1000
//!
//! It measures, in one run: the direct limit (a plain HTTP client sending the stand-in the
//! requests the operator sends per token, at the operator's concurrency), the operator
//! issuing N tokens (created with a concurrent client, so creation is not what is measured),
//! Kubernetes writes and AWX requests per token, the operator's memory and CPU, a steady
//! state, and the latency of one new AwxToken while N are managed. It prints a table and
//! then `name: value` lines. Numbers, not assertions: performance targets belong here, not
//! in timed tests; compare the ratio, measured in the same run, not seconds across machines.
//!
//! Options (or environment variables): `--tokens N` (`AWXTO_BENCH_N`, default 1000),
//! `--unrelated N` (`AWXTO_BENCH_UNRELATED`, default 20000), `--steady-secs S`
//! (`AWXTO_BENCH_STEADY_SECS`, default 60), `--users U` (`AWXTO_BENCH_USERS`, default 16).

#[allow(dead_code, unused_macros)]
#[path = "../tests/e2e/support.rs"]
mod support;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use support::Env;

/// How many requests the operator may have in flight at AWX, and the direct client too.
const IN_FLIGHT: usize = 16;
/// Concurrent writes of the benchmark's own client (creating objects).
const WRITERS: usize = 32;
/// Writes per second to unrelated Secrets while the benchmark runs.
const CHURN_PER_SEC: u64 = 20;
/// Samples of one new AwxToken's latency.
const LATENCY_SAMPLES: usize = 100;

struct Options {
    tokens: usize,
    unrelated: usize,
    steady: Duration,
    users: usize,
}

fn option(args: &[String], flag: &str, var: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .or_else(|| std::env::var(var).ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let options = Options {
        tokens: option(&args, "--tokens", "AWXTO_BENCH_N", 1000) as usize,
        unrelated: option(&args, "--unrelated", "AWXTO_BENCH_UNRELATED", 20_000) as usize,
        steady: Duration::from_secs(option(
            &args,
            "--steady-secs",
            "AWXTO_BENCH_STEADY_SECS",
            60,
        )),
        users: option(&args, "--users", "AWXTO_BENCH_USERS", 16).max(1) as usize,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(run(options)) {
        eprintln!("benchmark failed: {e}");
        std::process::exit(1);
    }
}

async fn run(options: Options) -> Result<(), String> {
    let env = Env::start().await?;
    let result = bench(&env, &options).await;
    env.stop();
    result
}

/// Kubernetes writes (POST, PUT, PATCH, DELETE) by resource, from kube-apiserver's metrics.
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

/// `after - before`, less the benchmark's own writes (`own`, by resource).
fn delta(
    after: &BTreeMap<String, f64>,
    before: &BTreeMap<String, f64>,
    own: &BTreeMap<&str, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| {
            let mine = own.get(k.as_str()).copied().unwrap_or(0.0);
            (k.clone(), v - before.get(k).copied().unwrap_or(0.0) - mine)
        })
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

fn proc_status(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// User plus system CPU seconds of a process.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command (in parentheses): fields 14 and 15 of the whole line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

fn awx_token_resource() -> ApiResource {
    ApiResource {
        group: "awx-token-operator.io".into(),
        version: "v1alpha1".into(),
        api_version: "awx-token-operator.io/v1alpha1".into(),
        kind: "AwxToken".into(),
        plural: "awxtokens".into(),
    }
}

fn awx_token(ns: &str, name: &str, url: &str, creds: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "awx-token-operator.io/v1alpha1", "kind": "AwxToken",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"awx": {"url": url, "allowInsecureHttp": true},
            "grant": {"type": "Password", "credentialsSecretRef": {"name": creds}}}}))
    .expect("an AwxToken")
}

/// Runs `items` through `f`, `WRITERS` at a time.
async fn concurrently<T, F, Fut>(items: Vec<T>, f: F) -> Result<(), String>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let results: Vec<Result<(), String>> = stream::iter(items.into_iter().map(f))
        .buffer_unordered(WRITERS)
        .collect()
        .await;
    results.into_iter().collect()
}

async fn ready_count(api: &Api<DynamicObject>) -> Result<usize, String> {
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(list
        .items
        .iter()
        .filter(|o| {
            o.data["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        })
        .count())
}

/// One bench user: its login and its application.
struct User {
    name: String,
    password: String,
    client_id: String,
    client_secret: String,
}

/// What the operator sends AWX for one new token, sent directly: the password grant, the
/// listing that finds the new token's row, and the PATCH that tags it (with the new token).
async fn direct_issue(
    http: &reqwest::Client,
    url: &str,
    user: &User,
    application: u64,
    i: usize,
) -> Result<(), String> {
    let answer: Value = http
        .post(format!("{url}/api/o/token/"))
        .basic_auth(&user.client_id, Some(&user.client_secret))
        .form(&[
            ("grant_type", "password"),
            ("username", user.name.as_str()),
            ("password", user.password.as_str()),
            ("scope", "write"),
        ])
        .send()
        .await
        .map_err(|e| e.to_string())?
        .error_for_status()
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let token = answer["access_token"].as_str().ok_or("no access_token")?;
    let now = jiff::Timestamp::now().as_second();
    let at =
        |s: i64| jiff::Timestamp::from_second(s).map_or_else(|_| String::new(), |t| t.to_string());
    let (from, to) = (at(now - 5), at(now + 5));
    let mut list = url::Url::parse(&format!("{url}/api/v2/tokens/")).map_err(|e| e.to_string())?;
    list.query_pairs_mut()
        .append_pair("user__username", &user.name)
        .append_pair("application", &application.to_string())
        .append_pair("created__gte", &from)
        .append_pair("created__lte", &to)
        .append_pair("order_by", "id")
        .append_pair("page_size", "200");
    let listed: Value = http
        .get(list)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let id = listed["results"]
        .as_array()
        .and_then(|rows| {
            rows.iter()
                .find(|r| r["description"].as_str().unwrap_or_default().is_empty())
        })
        .and_then(|r| r["id"].as_u64())
        .ok_or("the new token is not listed")?;
    http.patch(format!("{url}/api/v2/tokens/{id}/"))
        .bearer_auth(token)
        .json(&json!({"description": format!("direct [{i}]")}))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .error_for_status()
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The application id of `user`'s application, as the operator looks it up.
async fn application_id(http: &reqwest::Client, url: &str, user: &User) -> Result<u64, String> {
    let listed: Value = http
        .get(format!("{url}/api/v2/applications/"))
        .basic_auth(&user.name, Some(&user.password))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    listed["results"]
        .as_array()
        .and_then(|rows| {
            rows.iter()
                .find(|r| r["client_id"] == user.client_id.as_str())
        })
        .and_then(|r| r["id"].as_u64())
        .ok_or_else(|| format!("no application for {}", user.name))
}

/// Tokens per second a plain client gets from the stand-in, `IN_FLIGHT` at a time, each
/// worker one user (as the operator runs one grant per user and application at a time).
async fn direct_limit(url: &str, users: &[User], count: usize) -> Result<f64, String> {
    let http = reqwest::Client::new();
    let mut apps = Vec::new();
    for user in users {
        apps.push(application_id(&http, url, user).await?);
    }
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers = users.len().min(IN_FLIGHT);
    let results: Vec<Result<(), String>> = stream::iter(0..workers)
        .map(|w| {
            let (http, next, user, app) = (http.clone(), next.clone(), &users[w], apps[w]);
            async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst) as usize;
                    if i >= count {
                        return Ok(());
                    }
                    direct_issue(&http, url, user, app, i).await?;
                }
            }
        })
        .buffer_unordered(workers)
        .collect()
        .await;
    results.into_iter().collect::<Result<(), String>>()?;
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn bench(env: &Env, o: &Options) -> Result<(), String> {
    let n = o.tokens;
    let ns = env.namespace("bench").await?;
    let awx = env.private_standin("bench", "awx")?;
    let mut users = Vec::new();
    for u in 0..o.users {
        let name = format!("bench-bot-{u:02}");
        let password = format!("bench-password-{u:02}");
        awx.create_user(&name, &password).await?;
        let (client_id, client_secret) = awx
            .create_app(&format!("bench-{u:02}"), "password", &name)
            .await?;
        env.credentials(
            &ns,
            &format!("creds-{u:02}"),
            &[
                ("username", name.as_str()),
                ("password", password.as_str()),
                ("client_id", client_id.as_str()),
                ("client_secret", client_secret.as_str()),
            ],
        )?;
        users.push(User {
            name,
            password,
            client_id,
            client_secret,
        });
    }

    // The unrelated Secrets, in namespaces of their own.
    let noise_namespaces = 20.min(o.unrelated.max(1));
    for k in 0..noise_namespaces {
        env.namespace(&format!("noise-{k:02}")).await?;
    }
    let started = Instant::now();
    let noise: Vec<(String, String)> = (0..o.unrelated)
        .map(|i| {
            (
                format!("noise-{:02}", i % noise_namespaces),
                format!("unrelated-{i:05}"),
            )
        })
        .collect();
    concurrently(noise.clone(), |(ns, name)| {
        let api: Api<Secret> = Api::namespaced(env.client.clone(), &ns);
        async move {
            let secret: Secret = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"app": "unrelated"}},
                "stringData": {"config": "x".repeat(200)}}))
            .map_err(|e| e.to_string())?;
            api.create(&PostParams::default(), &secret)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    })
    .await?;
    let unrelated_time = started.elapsed();

    // The direct limit, before the operator starts (the same stand-in, users and requests).
    let direct_count = n.min(1000);
    let direct = direct_limit(&awx.url, &users, direct_count).await?;

    // Churn on the unrelated Secrets for the rest of the run; its writes are subtracted.
    let stop = Arc::new(AtomicBool::new(false));
    let churned = Arc::new(AtomicU64::new(0));
    // Held by each churn write and by each reading of the counts: a reading sees the churn
    // counter and the API server's metrics agree.
    let quiet = Arc::new(tokio::sync::Mutex::new(()));
    let churn = {
        let (client, stop, churned, noise, quiet) = (
            env.client.clone(),
            stop.clone(),
            churned.clone(),
            noise.clone(),
            quiet.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / CHURN_PER_SEC));
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) && !noise.is_empty() {
                tick.tick().await;
                let (ns, name) = &noise[(i * 7919) % noise.len()];
                i += 1;
                let api: Api<Secret> = Api::namespaced(client.clone(), ns);
                let patch = json!({"stringData": {"generation": i.to_string()}});
                let _quiet = quiet.lock().await;
                if api
                    .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .is_ok()
                {
                    churned.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };

    let op = env.start_operator_as(
        &ns,
        &[
            "--awx-max-rps",
            "0",
            "--awx-max-in-flight",
            &IN_FLIGHT.to_string(),
            "--concurrency",
            "32",
        ],
        &env.kubeconfig,
        &[("RUST_LOG".to_string(), "info".to_string())],
    )?;
    let pid = op.pid().ok_or("operator not running")?;
    support::wait_for(
        "the operator to be ready",
        Duration::from_secs(120),
        || async {
            let r = reqwest::get(format!("http://127.0.0.1:{}/readyz", op.port)).await;
            Ok(r.is_ok_and(|r| r.status() == 200).then_some(()))
        },
    )
    .await?;
    let idle_rss = proc_status(pid, "VmRSS:");
    let cpu_before = cpu_seconds(pid);
    let (writes_before, churn_before) = {
        let _quiet = quiet.lock().await;
        (writes(env)?, churned.load(Ordering::SeqCst) as f64)
    };
    let awx_before = awx.requests().await?.len();

    let api: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), &ns, &awx_token_resource());
    let started = Instant::now();
    let url = awx.url.clone();
    concurrently((0..n).collect(), |i| {
        let (api, url, ns) = (api.clone(), url.clone(), ns.clone());
        let creds = format!("creds-{:02}", i % o.users);
        async move {
            api.create(
                &PostParams::default(),
                &awx_token(&ns, &format!("b{i:05}"), &url, &creds),
            )
            .await
            .map(drop)
            .map_err(|e| e.to_string())
        }
    })
    .await?;
    let created = started.elapsed();
    let mut peak_rss = proc_status(pid, "VmRSS:");
    let mut half = None;
    loop {
        let ready = ready_count(&api).await?;
        peak_rss = peak_rss.max(proc_status(pid, "VmRSS:"));
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
    let cpu_issue = cpu_seconds(pid) - cpu_before;
    let (after_issue, churn_at_issue) = {
        let _quiet = quiet.lock().await;
        (writes(env)?, churned.load(Ordering::SeqCst) as f64)
    };
    let churn_issue = churn_at_issue - churn_before;
    let own_issue = BTreeMap::from([("secrets", churn_issue)]);
    let writes_issue = delta(&after_issue, &writes_before, &own_issue);
    let awx_issue = awx.requests().await?.len() - awx_before;

    // Steady state: nothing is due, nothing changes but the unrelated Secrets.
    let churn_steady_before = churn_at_issue;
    let steady_started = Instant::now();
    while steady_started.elapsed() < o.steady {
        peak_rss = peak_rss.max(proc_status(pid, "VmRSS:"));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (after_steady, churn_at_steady) = {
        let _quiet = quiet.lock().await;
        (writes(env)?, churned.load(Ordering::SeqCst) as f64)
    };
    let churn_steady = churn_at_steady - churn_steady_before;
    let steady_writes = delta(
        &after_steady,
        &after_issue,
        &BTreeMap::from([("secrets", churn_steady)]),
    );
    let awx_steady = awx.requests().await?.len() - awx_before - awx_issue;

    // One new AwxToken at a time while N are managed: until its Secret holds a token.
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &ns);
    let mut latencies = Vec::new();
    for k in 0..LATENCY_SAMPLES {
        let name = format!("late-{k:03}");
        let t0 = Instant::now();
        api.create(
            &PostParams::default(),
            &awx_token(&ns, &name, &url, &format!("creds-{:02}", k % o.users)),
        )
        .await
        .map_err(|e| e.to_string())?;
        loop {
            let held = secrets
                .get_opt(&name)
                .await
                .map_err(|e| e.to_string())?
                .is_some_and(|s| s.data.is_some_and(|d| d.contains_key("token")));
            if held {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                return Err(format!("{name} got no token in 60 s"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    let after_rss = proc_status(pid, "VmRSS:");
    let peak_rss = peak_rss.max(proc_status(pid, "VmHWM:"));
    stop.store(true, Ordering::SeqCst);
    let _ = churn.await;

    let rate = n as f64 / all_ready.as_secs_f64();
    let total_writes: f64 = writes_issue.values().sum();
    let per_token = |m: &BTreeMap<String, f64>| {
        m.iter()
            .map(|(k, v)| format!("{k} {:.2}", v / n as f64))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let cores = std::thread::available_parallelism().map_or(0, |c| c.get());
    println!(
        "\nscale benchmark: {n} AwxTokens (Password grant, {} AWX users, one AWX stand-in \
         hashing passwords at the e2e suite's cost), {} unrelated Secrets, {cores} cores",
        o.users, o.unrelated
    );
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| unrelated Secrets created in | {:.1} s |",
        unrelated_time.as_secs_f64()
    );
    println!(
        "| direct limit ({direct_count} tokens, {} at a time) | {direct:.1} tokens/s |",
        users.len().min(IN_FLIGHT)
    );
    println!(
        "| AwxTokens created (concurrent client) in | {:.1} s |",
        created.as_secs_f64()
    );
    println!(
        "| half Ready after | {:.1} s |",
        half.unwrap_or_default().as_secs_f64()
    );
    println!(
        "| all Ready after | {:.1} s ({rate:.1} tokens/s) |",
        all_ready.as_secs_f64()
    );
    println!("| operator / direct | {:.2} |", rate / direct);
    println!(
        "| operator RSS idle / peak / after | {idle_rss:.1} / {peak_rss:.1} / {after_rss:.1} MiB |"
    );
    println!("| operator CPU while issuing | {cpu_issue:.1} s |");
    println!(
        "| AWX requests per token | {:.2} |",
        awx_issue as f64 / n as f64
    );
    println!(
        "| Kubernetes writes per token | {:.2} ({}) |",
        total_writes / n as f64,
        per_token(&writes_issue)
    );
    println!(
        "| steady state, {} s | {} writes ({steady_writes:?}), {awx_steady} AWX requests |",
        o.steady.as_secs(),
        steady_writes.values().fold(0.0, |a, b| a + b)
    );
    println!(
        "| one new AwxToken among {n}: p50 / p99 | {:.0} / {:.0} ms |",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    println!("tokens: {n}");
    println!("cores: {cores}");
    println!("ratio: {:.3}", rate / direct);
    println!("direct_tokens_per_s: {direct:.2}");
    println!("operator_tokens_per_s: {rate:.2}");
    println!("awx_requests_per_token: {:.3}", awx_issue as f64 / n as f64);
    println!("k8s_writes_per_token: {:.3}", total_writes / n as f64);
    println!("peak_rss_mib: {peak_rss:.1}");
    println!("cpu_seconds: {cpu_issue:.1}");
    println!("steady_awx_requests: {awx_steady}");
    println!(
        "steady_writes: {}",
        steady_writes.values().fold(0.0, |a, b| a + b)
    );
    println!("p50_new_token_ms: {:.0}", percentile(&latencies, 0.5));
    println!("p99_new_token_ms: {:.0}", percentile(&latencies, 0.99));
    Ok(())
}
