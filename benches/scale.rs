//! Scale benchmark: N AwxTokens against the real test cluster and the AWX stand-in, in a
//! cluster that also holds 20,000 unrelated Secrets (some of them changing all the while).
//!
//!   tests/env/with-env.sh cargo bench --bench scale -- --tokens 1000
//!
//! It measures, in one run: the direct limit (a plain HTTP client sending the stand-in the
//! requests the operator sends per token, at the operator's concurrency), the operator
//! issuing N tokens (created with a concurrent client, so creation is not what is measured),
//! Kubernetes writes and AWX requests per token, the operator's memory and CPU, a steady
//! state, the latency of one new AwxToken while N are managed, an operator restarted over
//! them (until it has reconciled each once: its time and peak RSS), the same issuance by two
//! shards, and a renewal wave: the N tokens given a short rotateEvery renew together under
//! `--awx-max-rps`, with their Kubernetes writes, the busiest second at AWX, the renewals
//! later than promised and the peak RSS of that operator (started over the N). It prints a table and then `name: value` lines. Numbers, not
//! assertions: performance targets belong here, not in timed tests; compare the ratio,
//! measured in the same run, not seconds across machines.
//!
//! Options (or environment variables): `--tokens N` (`AWXTO_BENCH_N`, default 1000),
//! `--unrelated N` (`AWXTO_BENCH_UNRELATED`, default 20000), `--steady-secs S`
//! (`AWXTO_BENCH_STEADY_SECS`, default 60), `--users U` (`AWXTO_BENCH_USERS`, default 16),
//! `--wave-rps R` (`AWXTO_BENCH_WAVE_RPS`, default 20: the wave operator's `--awx-max-rps`),
//! `--skip shards,wave` (`AWXTO_BENCH_SKIP`): leaves those parts out (their figures print as
//! "not run"), for an N whose second issuance or wave would take hours on a small machine.

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
    wave_rps: u64,
    /// Parts left out: "shards", "wave".
    skip: Vec<String>,
}

/// The value after `flag`, else the environment variable `var`.
fn option_text(args: &[String], flag: &str, var: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .or_else(|| std::env::var(var).ok())
}

fn option(args: &[String], flag: &str, var: &str, default: u64) -> u64 {
    option_text(args, flag, var)
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
        wave_rps: option(&args, "--wave-rps", "AWXTO_BENCH_WAVE_RPS", WAVE_RPS).max(1),
        skip: option_text(&args, "--skip", "AWXTO_BENCH_SKIP")
            .map(|v| v.split(',').map(str::to_owned).collect())
            .unwrap_or_default(),
    };
    if let Some(unknown) = options
        .skip
        .iter()
        .find(|part| !matches!(part.as_str(), "shards" | "wave"))
    {
        eprintln!("--skip takes shards and/or wave, not {unknown:?}");
        std::process::exit(2);
    }
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
    labelled_awx_token(ns, name, url, creds, json!({}))
}

fn labelled_awx_token(
    ns: &str,
    name: &str,
    url: &str,
    creds: &str,
    labels: Value,
) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "awx-token-operator.io/v1alpha1", "kind": "AwxToken",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
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

/// Every object `api` lists, a page of 500 at a time: one list of 10,000 AwxTokens can take
/// the API server past its one-minute request timeout on a busy machine. A page that times
/// out is asked again (a few times), from where the list stood.
async fn list_all(api: &Api<DynamicObject>) -> Result<Vec<DynamicObject>, String> {
    const PAGE: u32 = 500;
    const TRIES: u32 = 5;
    let mut items = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let mut params = ListParams::default().limit(PAGE);
        if let Some(token) = &next {
            params = params.continue_token(token);
        }
        let mut tries = 0;
        let page = loop {
            tries += 1;
            match api.list(&params).await {
                Ok(page) => break page,
                Err(kube::Error::Api(e)) if e.code == 504 && tries < TRIES => {
                    eprintln!(
                        "listing timed out at the API server ({}); asking again",
                        e.message
                    );
                }
                Err(e) => return Err(e.to_string()),
            }
        };
        items.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => next = Some(token),
            None => return Ok(items),
        }
    }
}

/// How long the benchmark waits between two lists of `n` AwxTokens: half a second per 1,000
/// (at least half a second). Each look lists them all, so at N = 10,000 a look every half
/// second would keep a core of this 2-core machine busy serving the benchmark's own lists.
fn poll_interval(n: usize) -> Duration {
    Duration::from_millis((n as u64 / 2).max(500))
}

async fn ready_count(api: &Api<DynamicObject>) -> Result<usize, String> {
    Ok(list_all(api)
        .await?
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

/// The most of `times` (seconds) that fall into any one-second window `[t, t + 1)`.
fn peak_per_second(times: &mut [f64]) -> usize {
    times.sort_by(f64::total_cmp);
    let mut peak = 0;
    let mut first = 0;
    for (last, t) in times.iter().enumerate() {
        while times[first] <= t - 1.0 {
            first += 1;
        }
        peak = peak.max(last + 1 - first);
    }
    peak
}

/// How long `n` renewals of `requests_per_renewal` requests take as the pacer plans them under
/// `rps` requests a second (src/controller/pace.rs): the limiter spaces requests 1.2/rps apart
/// and the pacer keeps it `LOAD` busy; the last ends `LEAD` before its renewal time.
fn paced_wave(n: usize, requests_per_renewal: f64, rps: u64) -> Duration {
    use awx_token_operator::controller::pace::{LEAD, LOAD};
    Duration::from_secs_f64(n as f64 * requests_per_renewal * 1.2 / LOAD / rps.max(1) as f64) + LEAD
}

/// The renewal wave's `rotateEvery`, in whole seconds. Long enough that (1) the earliest
/// renewal time, issue plus rotateEvery less at most a tenth of it of jitter, comes `lead`
/// after `now`, when every AwxToken's status shows it; (2) no token renewed in the wave
/// comes due again before the wave is over: neither after the spread of the issue times nor
/// after `n` renewals of `requests_per_renewal` requests at `rps` ([`paced_wave`]), each with
/// `margin` to spare.
fn wave_rotate_every(
    since_first_issue: Duration,
    issue_spread: Duration,
    lead: Duration,
    margin: Duration,
    n: usize,
    requests_per_renewal: f64,
    rps: u64,
) -> u64 {
    let wave = paced_wave(n, requests_per_renewal, rps).as_secs_f64();
    let starts_after_lead = (since_first_issue + lead).as_secs_f64() / 0.9;
    let outlasts_the_wave = (wave + margin.as_secs_f64()) / 0.9;
    let outlasts_the_spread = (issue_spread + margin).as_secs_f64() / 0.8;
    starts_after_lead
        .max(outlasts_the_wave)
        .max(outlasts_the_spread)
        .ceil() as u64
}

/// Label whose value names an AwxToken's shard (the Flux convention the operator follows).
const SHARD_KEY: &str = "sharding.fluxcd.io/key";
/// The requests per second the renewal wave's operator may send AWX, unless `--wave-rps`.
const WAVE_RPS: u64 = 20;
/// How long a replaced token stays valid in the wave: short, so that its revocation (part of
/// a renewal's cost) falls inside the wave.
const WAVE_GRACE: Duration = Duration::from_secs(15);
/// A renewal is late when the new token's `status.issuedAt` is more than this after the
/// `status.renewalTime` promised for it. Both are whole seconds (truncated), so this is at
/// least one second of true lateness.
const LATE_TOLERANCE_SECS: i64 = 2;

/// The operator's flags in every phase: the same in-flight limit and concurrency, and `rps`
/// requests per second to AWX (0: unlimited).
fn operator_flags(rps: u64) -> Vec<String> {
    [
        "--awx-max-rps",
        &rps.to_string(),
        "--awx-max-in-flight",
        &IN_FLIGHT.to_string(),
        "--concurrency",
        "32",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn start_operator(env: &Env, ns: &str, flags: &[String]) -> Result<support::Operator, String> {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    env.start_operator_as(
        ns,
        &flags,
        &env.kubeconfig,
        &[("RUST_LOG".to_string(), "info".to_string())],
    )
}

async fn wait_ready(op: &support::Operator) -> Result<(), String> {
    support::wait_for(
        "the operator to be ready",
        Duration::from_secs(120),
        || async {
            let r = reqwest::get(format!("http://127.0.0.1:{}/readyz", op.port)).await;
            Ok(r.is_ok_and(|r| r.status() == 200).then_some(()))
        },
    )
    .await
}

/// The bench users' credential Secrets in `ns`, `creds-00` and on.
fn credentials(env: &Env, ns: &str, users: &[User]) -> Result<(), String> {
    for (u, user) in users.iter().enumerate() {
        env.credentials(
            ns,
            &format!("creds-{u:02}"),
            &[
                ("username", user.name.as_str()),
                ("password", user.password.as_str()),
                ("client_id", user.client_id.as_str()),
                ("client_secret", user.client_secret.as_str()),
            ],
        )?;
    }
    Ok(())
}

/// Kubernetes writes as kube-apiserver counts them, read together with the churn's own
/// count (the churn holds `quiet` around each of its writes).
struct WriteMeter {
    quiet: Arc<tokio::sync::Mutex<()>>,
    churned: Arc<AtomicU64>,
}

impl WriteMeter {
    async fn read(&self, env: &Env) -> Result<(BTreeMap<String, f64>, f64), String> {
        let _quiet = self.quiet.lock().await;
        Ok((writes(env)?, self.churned.load(Ordering::SeqCst) as f64))
    }

    /// The writes since `before` (taken by `read`), less the churn's.
    async fn since(
        &self,
        env: &Env,
        before: &(BTreeMap<String, f64>, f64),
    ) -> Result<BTreeMap<String, f64>, String> {
        let (after, churn) = self.read(env).await?;
        Ok(delta(
            &after,
            &before.0,
            &BTreeMap::from([("secrets", churn - before.1)]),
        ))
    }
}

/// How long one issuance took: creating the AwxTokens, then until half and all were Ready.
struct Issuance {
    created: Duration,
    half_ready: Duration,
    all_ready: Duration,
}

/// Creates `tokens` (in one namespace of their own) with the concurrent client, then waits
/// until all of them are Ready; `sample` runs at each look.
async fn issue_all(
    api: &Api<DynamicObject>,
    tokens: Vec<DynamicObject>,
    mut sample: impl FnMut(),
) -> Result<Issuance, String> {
    let n = tokens.len();
    let started = Instant::now();
    concurrently(tokens, |token| {
        let api = api.clone();
        async move {
            api.create(&PostParams::default(), &token)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    })
    .await?;
    let created = started.elapsed();
    let mut half_ready = None;
    loop {
        let ready = ready_count(api).await?;
        sample();
        if half_ready.is_none() && ready * 2 >= n {
            half_ready = Some(started.elapsed());
        }
        if ready == n {
            break;
        }
        if started.elapsed() > Duration::from_secs(3600) {
            return Err(format!("only {ready} of {n} Ready after an hour"));
        }
        tokio::time::sleep(poll_interval(n)).await;
    }
    Ok(Issuance {
        created,
        half_ready: half_ready.unwrap_or_default(),
        all_ready: started.elapsed(),
    })
}

/// The same issuance as the benchmark's main one (N AwxTokens, the same users, stand-in and
/// operator flags), in a namespace of its own, by two operators: each started with
/// `--shard-selector sharding.fluxcd.io/key=shard-K` and the AwxTokens labelled half-half.
/// Returns tokens per second and AWX requests per token.
async fn two_shards(
    env: &Env,
    awx: &support::Standin,
    users: &[User],
    n: usize,
) -> Result<(f64, f64), String> {
    let ns = env.namespace("bench-shards").await?;
    credentials(env, &ns, users)?;
    let mut shards = Vec::new();
    for shard in ["shard-0", "shard-1"] {
        let mut flags = operator_flags(0);
        flags.extend(["--shard-selector".into(), format!("{SHARD_KEY}={shard}")]);
        shards.push(start_operator(env, &ns, &flags)?);
    }
    for op in &shards {
        wait_ready(op).await?;
    }
    let awx_before = awx.requests().await?.len();
    let api: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), &ns, &awx_token_resource());
    let tokens = (0..n)
        .map(|i| {
            labelled_awx_token(
                &ns,
                &format!("s{i:05}"),
                &awx.url,
                &format!("creds-{:02}", i % users.len()),
                json!({SHARD_KEY: format!("shard-{}", i % 2)}),
            )
        })
        .collect();
    let issued = issue_all(&api, tokens, || ()).await?;
    let requests = awx.requests().await?.len() - awx_before;
    Ok((
        n as f64 / issued.all_ready.as_secs_f64(),
        requests as f64 / n as f64,
    ))
}

/// What an operator restarted over existing AwxTokens costs before any is due.
struct Restart {
    /// From the process's start until every AwxToken was reconciled once.
    settled: Duration,
    /// Peak RSS (MiB, `VmHWM`) by then.
    peak_rss: f64,
    /// AWX requests meanwhile: none is due, so any is a token issued again.
    awx_requests: usize,
}

/// Starts an operator limited to `rps` AWX requests a second in `ns`, which holds `count`
/// Ready AwxTokens none of which is due, and waits until its metrics count `count`
/// successful reconciles: proof it has read and booked every one.
async fn restarted(
    env: &Env,
    ns: &str,
    awx: &support::Standin,
    count: usize,
    rps: u64,
) -> Result<Restart, String> {
    let awx_before = awx.requests().await?.len();
    let started = Instant::now();
    let mut op = start_operator(env, ns, &operator_flags(rps))?;
    let pid = op.pid().ok_or("operator not running")?;
    wait_ready(&op).await?;
    support::wait_for(
        "the restarted operator to reconcile every AwxToken once",
        Duration::from_secs(600),
        || async {
            let ok = op
                .metric("awx_token_operator_reconciles_total{result=\"ok\"}")
                .await?
                .unwrap_or(0.0);
            Ok((ok >= count as f64).then_some(()))
        },
    )
    .await?;
    let settled = started.elapsed();
    let peak_rss = proc_status(pid, "VmHWM:");
    op.terminate().await?;
    Ok(Restart {
        settled,
        peak_rss,
        awx_requests: awx.requests().await?.len() - awx_before,
    })
}

/// The AwxTokens of `names`, by name.
async fn named(
    api: &Api<DynamicObject>,
    names: &[String],
) -> Result<BTreeMap<String, DynamicObject>, String> {
    Ok(list_all(api)
        .await?
        .into_iter()
        .filter_map(|t| Some((t.metadata.name.clone()?, t)))
        .filter(|(name, _)| names.contains(name))
        .collect())
}

/// When the operator sent each AWX request answered (or failed) between `from` and `to`, in
/// seconds, from its JSON log: each request is logged when it ends, with how long it took.
fn sent_between(
    log: &std::path::Path,
    from: jiff::Timestamp,
    to: jiff::Timestamp,
) -> Result<Vec<f64>, String> {
    let text = std::fs::read_to_string(log).map_err(|e| format!("{}: {e}", log.display()))?;
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|e| {
            matches!(
                e["fields"]["message"].as_str(),
                Some("AWX answered" | "AWX request failed")
            )
        })
        .filter_map(|e| {
            let ended: jiff::Timestamp = e["timestamp"].as_str()?.parse().ok()?;
            let took = e["fields"]["elapsed_ms"].as_u64()?;
            let sent = ended.as_millisecond() - i64::try_from(took).ok()?;
            (from.as_millisecond() <= sent && sent <= to.as_millisecond())
                .then_some(sent as f64 / 1000.0)
        })
        .collect())
}

fn status_time(token: &DynamicObject, field: &str) -> Option<jiff::Timestamp> {
    token.data["status"][field].as_str()?.parse().ok()
}

/// What the renewal wave measured.
struct Wave {
    rotate_every: u64,
    /// From the first promised renewal time to the last.
    due_within: Duration,
    /// From the window's opening to the last revocation.
    took: Duration,
    /// Password grants AWX received in the window (one per renewal if none renewed twice).
    grants: usize,
    /// Every AWX request in the window: grants, listings, tagging, revocations.
    requests: usize,
    peak_rps: usize,
    /// The same by the operator's clock: when it sent them, from its log.
    peak_sent_rps: usize,
    late: usize,
    /// The largest `status.issuedAt - status.renewalTime`, in seconds (negative: early).
    latest: i64,
    writes: BTreeMap<String, f64>,
    /// The wave operator's peak RSS (MiB): an operator that started over N existing
    /// AwxTokens, under a rate limit (so with the pacer's book), and renewed them all.
    peak_rss: f64,
}

/// N tokens issued together renew together: a fresh operator limited to `rps` requests per
/// second, the `names` AwxTokens given a short `rotateEvery` (and a short revoke grace
/// period); once every status promises its renewal time (`status.renewalTime`), the window
/// opens and lasts until every token holds a new one and the replaced one is revoked.
async fn renewal_wave(
    env: &Env,
    ns: &str,
    awx: &support::Standin,
    names: &[String],
    requests_per_issue: f64,
    rps: u64,
    meter: &WriteMeter,
) -> Result<Wave, String> {
    let n = names.len();
    let mut flags = operator_flags(rps);
    flags.extend(["--log-format".into(), "json".into()]);
    let op = start_operator(env, ns, &flags)?;
    wait_ready(&op).await?;
    let api: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), ns, &awx_token_resource());
    let issued: BTreeMap<String, jiff::Timestamp> = named(&api, names)
        .await?
        .iter()
        .map(|(name, t)| {
            status_time(t, "issuedAt")
                .map(|at| (name.clone(), at))
                .ok_or_else(|| format!("{name} has no status.issuedAt"))
        })
        .collect::<Result<_, _>>()?;
    let (Some(first), Some(last)) = (issued.values().min(), issued.values().max()) else {
        return Err("no AwxTokens for the renewal wave".into());
    };
    let age = |from: &jiff::Timestamp, to: jiff::Timestamp| {
        Duration::try_from(to.duration_since(*from)).unwrap_or_default()
    };
    // A renewal issues a token and revokes one; revoking takes no more requests than issuing.
    let requests_per_renewal = 2.0 * requests_per_issue;
    // Renewals are paced (src/controller/pace.rs): the earliest starts up to the whole wave's
    // length before its renewal time, and that start too must come after every status shows
    // its promise.
    let wave_length = paced_wave(n, requests_per_renewal, rps);
    let lead = Duration::from_secs(20) + Duration::from_millis(20 * n as u64) + wave_length;
    let rotate_every = wave_rotate_every(
        age(first, jiff::Timestamp::now()),
        age(first, *last),
        lead,
        WAVE_GRACE + Duration::from_secs(30),
        n,
        requests_per_renewal,
        rps,
    );
    let patch = json!({"spec": {"renewal": {
        "rotateEvery": format!("{rotate_every}s"),
        "revokeGracePeriod": format!("{}s", WAVE_GRACE.as_secs())}}});
    concurrently(names.to_vec(), |name| {
        let (api, patch) = (api.clone(), patch.clone());
        async move {
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    })
    .await?;
    // Every status describes the new spec: its renewalTime is the operator's promise.
    let waiting = Instant::now();
    let promised: BTreeMap<String, jiff::Timestamp> = loop {
        let tokens = named(&api, names).await?;
        let settled = tokens.values().all(|t| {
            t.metadata.generation.is_some()
                && t.data["status"]["observedGeneration"].as_i64() == t.metadata.generation
        });
        if settled && tokens.len() == n {
            break tokens
                .iter()
                .filter_map(|(name, t)| Some((name.clone(), status_time(t, "renewalTime")?)))
                .collect();
        }
        if waiting.elapsed() > lead * 3 {
            return Err(format!(
                "not every AwxToken promised its renewal within {:.0} s",
                (lead * 3).as_secs_f64()
            ));
        }
        tokio::time::sleep(poll_interval(n)).await;
    };
    let before = meter.read(env).await?;
    let seq_before = awx
        .requests()
        .await?
        .iter()
        .filter_map(|r| r["seq"].as_u64())
        .max()
        .unwrap_or(0);
    let opened = jiff::Timestamp::now();
    let started = Instant::now();
    let (Some(first_due), Some(last_due)) = (promised.values().min(), promised.values().max())
    else {
        return Err("no renewal time promised".into());
    };
    if promised.len() != n || *first_due <= opened {
        return Err(format!(
            "the wave was not ready in time: {} of {n} promised, the first for {first_due}, \
             the window opened at {opened}",
            promised.len()
        ));
    }
    let wave_estimate = paced_wave(n, requests_per_renewal, rps);
    let deadline = age(&opened, *last_due) + 2 * wave_estimate + Duration::from_secs(120);
    let renewed = loop {
        let tokens = named(&api, names).await?;
        let renewed: BTreeMap<String, jiff::Timestamp> = tokens
            .iter()
            .filter(|(_, t)| t.data["status"]["pendingRevocations"].as_u64().unwrap_or(0) == 0)
            .filter_map(|(name, t)| Some((name.clone(), status_time(t, "issuedAt")?)))
            .filter(|(name, at)| issued.get(name) != Some(at))
            .collect();
        if renewed.len() == n {
            break renewed;
        }
        if started.elapsed() > deadline {
            return Err(format!(
                "renewal wave: {} of {n} renewed and revoked after {:.0} s",
                renewed.len(),
                started.elapsed().as_secs_f64()
            ));
        }
        tokio::time::sleep(poll_interval(n).max(Duration::from_secs(1))).await;
    };
    let took = started.elapsed();
    let closed = jiff::Timestamp::now();
    // The last revocation's own writes (its event follows the status) land before the count.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let writes = meter.since(env, &before).await?;
    let requests: Vec<Value> = awx
        .requests()
        .await?
        .into_iter()
        .filter(|r| r["seq"].as_u64().is_some_and(|s| s > seq_before))
        .collect();
    let grants = requests
        .iter()
        .filter(|r| {
            r["method"] == "POST"
                && r["path"].as_str().is_some_and(|p| p.ends_with("/o/token/"))
                && r["grant_type"] == "password"
        })
        .count();
    let mut times: Vec<f64> = requests.iter().filter_map(|r| r["time"].as_f64()).collect();
    let lateness: Vec<i64> = renewed
        .iter()
        .filter_map(|(name, at)| Some(at.duration_since(*promised.get(name)?).as_secs()))
        .collect();
    let mut sent = sent_between(&op.log, opened, closed)?;
    let peak_rss = op.pid().map_or(0.0, |pid| proc_status(pid, "VmHWM:"));
    drop(op);
    Ok(Wave {
        rotate_every,
        due_within: age(first_due, *last_due),
        took,
        grants,
        requests: requests.len(),
        peak_rps: peak_per_second(&mut times),
        peak_sent_rps: peak_per_second(&mut sent),
        late: lateness
            .iter()
            .filter(|l| **l > LATE_TOLERANCE_SECS)
            .count(),
        latest: lateness.iter().copied().max().unwrap_or(0),
        writes,
        peak_rss,
    })
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
        users.push(User {
            name,
            password,
            client_id,
            client_secret,
        });
    }
    credentials(env, &ns, &users)?;

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
    let meter = WriteMeter {
        quiet: Arc::default(),
        churned: Arc::default(),
    };
    let churn = {
        let (client, stop, churned, noise, quiet) = (
            env.client.clone(),
            stop.clone(),
            meter.churned.clone(),
            noise.clone(),
            meter.quiet.clone(),
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

    let mut op = start_operator(env, &ns, &operator_flags(0))?;
    let pid = op.pid().ok_or("operator not running")?;
    wait_ready(&op).await?;
    let idle_rss = proc_status(pid, "VmRSS:");
    let cpu_before = cpu_seconds(pid);
    let before_issue = meter.read(env).await?;
    let awx_before = awx.requests().await?.len();

    let api: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), &ns, &awx_token_resource());
    let url = awx.url.clone();
    let names: Vec<String> = (0..n).map(|i| format!("b{i:05}")).collect();
    let tokens = names
        .iter()
        .enumerate()
        .map(|(i, name)| awx_token(&ns, name, &url, &format!("creds-{:02}", i % o.users)))
        .collect();
    let mut peak_rss = proc_status(pid, "VmRSS:");
    let issued = issue_all(&api, tokens, || {
        peak_rss = peak_rss.max(proc_status(pid, "VmRSS:"));
    })
    .await?;
    let cpu_issue = cpu_seconds(pid) - cpu_before;
    let after_issue = meter.read(env).await?;
    let writes_issue = delta(
        &after_issue.0,
        &before_issue.0,
        &BTreeMap::from([("secrets", after_issue.1 - before_issue.1)]),
    );
    let awx_issue = awx.requests().await?.len() - awx_before;

    // Steady state: nothing is due, nothing changes but the unrelated Secrets.
    let steady_started = Instant::now();
    while steady_started.elapsed() < o.steady {
        peak_rss = peak_rss.max(proc_status(pid, "VmRSS:"));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let steady_writes = meter.since(env, &after_issue).await?;
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
    op.terminate().await?;

    // A restart: an operator started over the N (and the latency samples) under the rate limit,
    // so it also books every renewal with the pacer, until it has reconciled each once.
    let restart = restarted(env, &ns, &awx, n + LATENCY_SAMPLES, o.wave_rps).await?;

    // The same issuance by two shards, then the renewal wave of the N tokens issued above.
    let skipped = |part: &str| o.skip.iter().any(|p| p == part);
    let shards = if skipped("shards") {
        None
    } else {
        Some(two_shards(env, &awx, &users, n).await?)
    };
    let wave = if skipped("wave") {
        None
    } else {
        Some(
            renewal_wave(
                env,
                &ns,
                &awx,
                &names,
                awx_issue as f64 / n as f64,
                o.wave_rps,
                &meter,
            )
            .await?,
        )
    };
    stop.store(true, Ordering::SeqCst);
    let _ = churn.await;

    let rate = n as f64 / issued.all_ready.as_secs_f64();
    let total_writes: f64 = writes_issue.values().sum();
    let by_kind = |m: &BTreeMap<String, f64>| {
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
        issued.created.as_secs_f64()
    );
    println!(
        "| half Ready after | {:.1} s |",
        issued.half_ready.as_secs_f64()
    );
    println!(
        "| all Ready after | {:.1} s ({rate:.1} tokens/s) |",
        issued.all_ready.as_secs_f64()
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
        by_kind(&writes_issue)
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
    println!(
        "| operator restarted over the {} (`--awx-max-rps {}`): every one reconciled after / \
         peak RSS / AWX requests | {:.1} s / {:.1} MiB / {} |",
        n + LATENCY_SAMPLES,
        o.wave_rps,
        restart.settled.as_secs_f64(),
        restart.peak_rss,
        restart.awx_requests
    );
    match shards {
        Some((shards_2, shards_2_requests)) => println!(
            "| 1 / 2 shards (two operators, `--shard-selector`, half each) | {rate:.1} / \
             {shards_2:.1} tokens/s ({:.2}; direct limit {direct:.1}; {shards_2_requests:.2} AWX \
             requests per token with 2) |",
            shards_2 / rate
        ),
        None => println!("| 1 / 2 shards | not run (--skip shards) |"),
    }
    match &wave {
        Some(wave) => {
            let wave_writes: f64 = wave.writes.values().sum();
            println!(
                "| renewal wave: {n} due within {:.0} s (rotateEvery {}s, `--awx-max-rps {}`) | \
                 all renewed and the old revoked in {:.1} s; {} grants, {:.2} AWX requests per \
                 renewal |",
                wave.due_within.as_secs_f64(),
                wave.rotate_every,
                o.wave_rps,
                wave.took.as_secs_f64(),
                wave.grants,
                wave.requests as f64 / n as f64
            );
            println!(
                "| Kubernetes writes per renewal | {:.2} ({}) |",
                wave_writes / n as f64,
                by_kind(&wave.writes)
            );
            println!(
                "| wave: most AWX requests in any one second, received / sent | {} / {} (limit \
                 {}) |",
                wave.peak_rps, wave.peak_sent_rps, o.wave_rps
            );
            println!(
                "| renewals more than {LATE_TOLERANCE_SECS} s after `status.renewalTime` | {} \
                 of {n} (latest {:+} s) |",
                wave.late, wave.latest
            );
            println!(
                "| wave operator (started over the {n}, rate-limited) peak RSS | {:.1} MiB |",
                wave.peak_rss
            );
        }
        None => println!("| renewal wave | not run (--skip wave) |"),
    }
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
    println!("restart_settled_s: {:.1}", restart.settled.as_secs_f64());
    println!("restart_peak_rss_mib: {:.1}", restart.peak_rss);
    println!("restart_awx_requests: {}", restart.awx_requests);
    println!("shards_1_tokens_per_s: {rate:.2}");
    if let Some((shards_2, _)) = shards {
        println!("shards_2_tokens_per_s: {shards_2:.2}");
        println!("shards_ratio: {:.3}", shards_2 / rate);
    }
    if let Some(wave) = &wave {
        let wave_writes: f64 = wave.writes.values().sum();
        println!("k8s_writes_per_renewal: {:.3}", wave_writes / n as f64);
        println!("wave_rps_limit: {}", o.wave_rps);
        println!("wave_peak_rps: {}", wave.peak_rps);
        println!("wave_peak_sent_rps: {}", wave.peak_sent_rps);
        println!("late_renewals: {}", wave.late);
        println!("latest_renewal_s: {}", wave.latest);
        println!("wave_peak_rss_mib: {:.1}", wave.peak_rss);
    }
    Ok(())
}
