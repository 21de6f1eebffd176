//! Reconciler test fixture: a scripted Kubernetes API server (a tower-test mock behind a real
//! `kube::Client`) and an AWX on loopback (wiremock).
//!
//! A test lists the Kubernetes calls it expects, in order, each with a canned answer, and
//! mounts AWX answers on the mock server. A run records every Kubernetes and AWX call in one
//! timeline (the reconciler is sequential, so the order is exact) and fails, showing the whole
//! timeline, on an unexpected call, on a scripted call that never came, and on a reconcile
//! that does not finish in time.

use std::{
    collections::VecDeque,
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use base64::Engine as _;
use http::{Method, Request, Response};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{Client, client::Body, runtime::controller::Action};
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tower_test::mock::Handle;
use wiremock::MockServer;

use crate::{
    Error,
    controller::{self, Context, FINALIZER, Settings},
    crd::AwxToken,
    metrics::Metrics,
    secrets,
    state::{STATE_KEY, TokenState},
};

pub const NAMESPACE: &str = "apps";
pub const NAME: &str = "ci-bot";
pub const UID: &str = "3f0e8a52-6c1d-4b7e-9a41-2d5c7e9b1f08";
/// The target Secret named in the spec.
pub const TARGET: &str = "ci-bot-awx";
pub const CREDENTIALS: &str = "awx-bot";
pub const USERNAME: &str = "svc-k8s";
pub const PASSWORD: &str = "Us3rPassw0rdSECRET";
pub const CLIENT_ID: &str = "CLIENTID123";
pub const CLIENT_SECRET: &str = "CliEntS3cretSECRET";

/// Longest a reconcile may take before the test fails instead of hanging.
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest the mocked API server may take to hand back its handle after a run.
const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(5);

type ApiHandle = Handle<Request<Body>, Response<Body>>;

// ------------------------------------------------------------------ objects

/// An AwxToken as the API server returns it: uid, resourceVersion, generation, the finalizer
/// already added, AWX at `awx_url` (plain http on loopback), Password grant, no status yet.
pub fn awx_token(awx_url: &str) -> AwxToken {
    let token = json!({
        "apiVersion": "awx-token-operator.io/v1alpha1",
        "kind": "AwxToken",
        "metadata": {
            "name": NAME,
            "namespace": NAMESPACE,
            "uid": UID,
            "resourceVersion": "4711",
            "generation": 1,
            "creationTimestamp": "2026-03-02T09:15:00Z",
            "finalizers": [FINALIZER],
        },
        "spec": {
            "awx": {
                "url": awx_url,
                "flavor": "Controller",
                "allowInsecureHttp": true,
                "timeoutSeconds": 5,
            },
            "grant": {
                "type": "Password",
                "credentialsSecretRef": {"name": CREDENTIALS},
                "scope": "write",
            },
            "secret": {"name": TARGET},
        },
    });
    serde_json::from_value(token).expect("the fixture AwxToken deserialises")
}

/// `token` with the status last applied (the `status` of a status patch body), as the API
/// server then returns it.
pub fn with_status(token: &AwxToken, status_patch: &Value) -> AwxToken {
    let mut token = token.clone();
    token.status = Some(
        serde_json::from_value(status_patch["status"].clone())
            .expect("a status patch holds an AwxTokenStatus"),
    );
    token.metadata.resource_version = Some(next_resource_version());
    token
}

/// `token` after `kubectl delete`: deletionTimestamp set, finalizer still present.
pub fn deleting(token: &AwxToken) -> AwxToken {
    let mut token = token.clone();
    token.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    token.metadata.deletion_grace_period_seconds = Some(0);
    token.metadata.resource_version = Some(next_resource_version());
    token
}

/// The credentials Secret of [`awx_token`], with all four keys.
pub fn credentials() -> Value {
    let data = |v: &str| base64::engine::general_purpose::STANDARD.encode(v);
    stored(&json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": CREDENTIALS, "namespace": NAMESPACE},
        "type": "Opaque",
        "data": {
            "username": data(USERNAME),
            "password": data(PASSWORD),
            "client_id": data(CLIENT_ID),
            "client_secret": data(CLIENT_SECRET),
        },
    }))
}

/// The state Secret the operator would write for `state`, as the API server stores it.
pub fn state_secret(token: &AwxToken, state: &TokenState) -> Value {
    stored(&to_value(&secrets::render_state(token, state)))
}

/// `object` (a request body or a rendered object) as the API server returns it once stored:
/// with apiVersion/kind, a uid, a new resourceVersion and a creationTimestamp.
pub fn stored(object: &Value) -> Value {
    let mut object = object.clone();
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let meta = &mut object["metadata"];
    if meta.get("uid").is_none() {
        let digest = Sha256::digest(name.as_bytes());
        let hex = hex::encode(&digest[..16]);
        meta["uid"] = json!(format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        ));
        meta["creationTimestamp"] = json!("2026-03-02T09:15:01Z");
    }
    meta["resourceVersion"] = json!(next_resource_version());
    if object.get("apiVersion").is_none() {
        object["apiVersion"] = json!("v1");
    }
    object
}

fn next_resource_version() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(5000);
    NEXT.fetch_add(1, Ordering::Relaxed).to_string()
}

pub fn to_value(object: &impl Serialize) -> Value {
    serde_json::to_value(object).expect("Kubernetes objects serialise")
}

/// A key of a Secret (a request body or stored object), decoded.
pub fn secret_data(secret: &Value, key: &str) -> String {
    let encoded = secret["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("the Secret has no data key {key:?}: {secret}"));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("Secret data is base64");
    String::from_utf8(bytes).expect("the value is UTF-8")
}

/// The token state held in a state Secret (a request body or stored object).
pub fn state_of(secret: &Value) -> TokenState {
    TokenState::decode(secret_data(secret, STATE_KEY).as_bytes()).expect("a readable state")
}

/// The delay of a requeue, `None` for `await_change`. `Action` has no getter, so this reads
/// its Debug form (`Action { requeue_after: Some(3600s) }`).
pub fn requeue_after(action: &Action) -> Option<Duration> {
    let text = format!("{action:?}");
    let inner = text.split("Some(").nth(1)?.split(')').next()?;
    let (number, scale) = [("ns", 1e-9), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0)]
        .iter()
        .find_map(|(unit, scale)| inner.strip_suffix(unit).map(|n| (n, *scale)))
        .unwrap_or_else(|| panic!("unreadable requeue in {text}"));
    let number: f64 = number
        .parse()
        .unwrap_or_else(|_| panic!("unreadable requeue in {text}"));
    Some(Duration::from_secs_f64(number * scale))
}

// ------------------------------------------------------------------ paths

pub fn secret_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NAMESPACE}/secrets/{name}")
}

pub fn state_path() -> String {
    secret_path(&secrets::state_secret_name(NAME))
}

pub fn target_path() -> String {
    secret_path(TARGET)
}

/// Where Secrets are created.
pub fn secrets_path() -> String {
    format!("/api/v1/namespaces/{NAMESPACE}/secrets")
}

// ------------------------------------------------------------------ script

/// One scripted Kubernetes call and its answer.
pub struct Expected {
    method: Method,
    path: String,
    reply: Reply,
}

pub fn get(path: impl Into<String>, reply: Reply) -> Expected {
    Expected {
        method: Method::GET,
        path: path.into(),
        reply,
    }
}

pub fn patch(path: impl Into<String>, reply: Reply) -> Expected {
    Expected {
        method: Method::PATCH,
        path: path.into(),
        reply,
    }
}

pub fn post(path: impl Into<String>, reply: Reply) -> Expected {
    Expected {
        method: Method::POST,
        path: path.into(),
        reply,
    }
}

pub fn put(path: impl Into<String>, reply: Reply) -> Expected {
    Expected {
        method: Method::PUT,
        path: path.into(),
        reply,
    }
}

pub type Answer = (u16, Value);

/// The API server's answer to a scripted call, built from the request.
pub struct Reply(Box<dyn FnOnce(&KubeCall) -> Answer + Send>);

impl Reply {
    /// This object, 200.
    pub fn object(object: Value) -> Self {
        Self(Box::new(move |_| (200, object)))
    }

    /// 404 with the Status the API server sends for a missing object.
    pub fn not_found() -> Self {
        Self(Box::new(|call| {
            let mut parts = call.path.rsplit('/');
            let name = parts.next().unwrap_or_default().to_string();
            let plural = parts.next().unwrap_or_default().to_string();
            (404, not_found_status(&plural, &name))
        }))
    }

    /// Server-side apply or create of the request body: the body as stored, 200 (201 when
    /// `created`).
    pub fn stored(created: bool) -> Self {
        Self(Box::new(move |call| {
            (if created { 201 } else { 200 }, stored(&call.body))
        }))
    }

    /// Whatever `answer` makes of the call.
    pub fn from_fn(answer: impl FnOnce(&KubeCall) -> Answer + Send + 'static) -> Self {
        Self(Box::new(answer))
    }

    /// 409 Conflict, as the API server answers a write whose resourceVersion is stale.
    pub fn conflict() -> Self {
        Self(Box::new(|call| {
            let name = call.path.rsplit('/').next().unwrap_or_default().to_string();
            (
                409,
                json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("Operation cannot be fulfilled on secrets \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
                    "reason": "Conflict", "details": {"name": name, "kind": "secrets"}, "code": 409,
                }),
            )
        }))
    }

    /// A status patch of `token`: the token with the status of the request body.
    pub fn status_of(token: &AwxToken) -> Self {
        let token = token.clone();
        Self(Box::new(move |call| {
            (200, to_value(&with_status(&token, &call.body)))
        }))
    }

    /// The finalizer patch of `token`: the token without finalizers.
    pub fn finalizer_removed(token: &AwxToken) -> Self {
        let mut token = token.clone();
        token.metadata.finalizers = None;
        token.metadata.resource_version = Some(next_resource_version());
        Self::object(to_value(&token))
    }
}

fn not_found_status(plural: &str, name: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": format!("{plural} \"{name}\" not found"),
        "reason": "NotFound",
        "details": {"name": name, "kind": plural},
        "code": 404,
    })
}

// ------------------------------------------------------------------ recorded calls

/// A request the reconciler sent to the Kubernetes API.
#[derive(Clone, Debug)]
pub struct KubeCall {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: Option<String>,
    /// JSON body; `Null` when empty.
    pub body: Value,
}

/// A request the reconciler sent to AWX.
#[derive(Clone, Debug)]
pub struct AwxCall {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl AwxCall {
    /// The form fields of a form body, in order.
    pub fn form(&self) -> Vec<(String, String)> {
        url::form_urlencoded::parse(&self.body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    /// The JSON body; `Null` when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

impl From<wiremock::Request> for AwxCall {
    fn from(r: wiremock::Request) -> Self {
        let header = |name: &str| {
            r.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Self {
            method: r.method.clone(),
            path: r.url.path().to_string(),
            query: r.url.query().unwrap_or_default().to_string(),
            authorization: header("authorization"),
            content_type: header("content-type"),
            body: r.body.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub enum Call {
    Kube(KubeCall),
    Awx(AwxCall),
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Call::Kube(c) => write!(f, "k8s {} {}", c.method, c.path),
            Call::Awx(c) => write!(f, "awx {} {}", c.method, c.path),
        }
    }
}

/// What one reconcile did.
pub struct Run {
    pub result: Result<Action, Error>,
    pub calls: Vec<Call>,
    /// Just before and just after the reconcile: the reconciler's clock read lies between.
    pub started: Timestamp,
    pub finished: Timestamp,
}

impl Run {
    /// Every call as `k8s METHOD path` or `awx METHOD path`, in order.
    pub fn timeline(&self) -> Vec<String> {
        self.calls.iter().map(Call::to_string).collect()
    }

    pub fn action(&self) -> &Action {
        match &self.result {
            Ok(action) => action,
            Err(e) => panic!("the reconcile failed: {e}"),
        }
    }

    /// The Kubernetes calls with this method and path, in order.
    pub fn kube(&self, method: Method, path: &str) -> Vec<&KubeCall> {
        self.calls
            .iter()
            .filter_map(|c| match c {
                Call::Kube(k) if k.method == method && k.path == path => Some(k),
                _ => None,
            })
            .collect()
    }

    /// The AWX calls with this method and path, in order.
    pub fn awx(&self, method: Method, path: &str) -> Vec<&AwxCall> {
        self.calls
            .iter()
            .filter_map(|c| match c {
                Call::Awx(a) if a.method == method && a.path == path => Some(a),
                _ => None,
            })
            .collect()
    }

    /// Fails when any of `values` appears in a Kubernetes call other than a write of the
    /// state or target Secret (status, events, finalizer patches, ...).
    pub fn assert_not_leaked(&self, values: &[&str]) {
        for call in &self.calls {
            let Call::Kube(k) = call else { continue };
            let secret_write = k.path == state_path()
                || k.path == target_path()
                || (k.path == secrets_path() && k.method == Method::POST);
            if secret_write {
                continue;
            }
            let text = k.body.to_string();
            for value in values {
                assert!(
                    !text.contains(value),
                    "a secret value appears in {call}: {text}"
                );
            }
        }
    }
}

// ------------------------------------------------------------------ harness

/// A Context on a mocked Kubernetes API, and an AWX mock server on 127.0.0.1. Kept across
/// reconciles of one test, like the operator's process.
pub struct Harness {
    pub ctx: Arc<Context>,
    handle: Option<ApiHandle>,
    awx: Arc<MockServer>,
    awx_seen: usize,
}

#[derive(Default)]
struct Log {
    calls: Vec<Call>,
    problems: Vec<String>,
    awx_seen: usize,
}

impl Harness {
    pub async fn start() -> Self {
        let (ctx, handle) = operator();
        Self {
            ctx,
            handle: Some(handle),
            awx: Arc::new(MockServer::start().await),
            awx_seen: 0,
        }
    }

    /// A new operator process against the same AWX: nothing kept in memory (failure
    /// history, the event recorder's cache of recent events).
    pub fn restart(&mut self) {
        self.restart_with(Settings::default());
    }

    /// [`Harness::restart`] with other operator settings (flags).
    pub fn restart_with(&mut self, settings: Settings) {
        let (ctx, handle) = operator_with(settings);
        self.ctx = ctx;
        self.handle = Some(handle);
    }

    pub fn awx(&self) -> &MockServer {
        &self.awx
    }

    pub fn awx_url(&self) -> String {
        self.awx.uri()
    }

    /// Reconciles `token` once, answering the Kubernetes calls of `script` in order. The
    /// reconcile first reads the AwxToken (the controller caches its metadata only): that GET
    /// is answered with `token` and checked here, and left out of the run's calls.
    pub async fn reconcile(&mut self, token: &AwxToken, script: Vec<Expected>) -> Run {
        let own_path = format!(
            "/apis/awx-token-operator.io/v1alpha1/namespaces/{}/awxtokens/{}",
            kube::ResourceExt::namespace(token).unwrap_or_default(),
            kube::ResourceExt::name_any(token)
        );
        let script: Vec<Expected> =
            std::iter::once(get(own_path.clone(), Reply::object(to_value(token))))
                .chain(script)
                .collect();
        let handle = self
            .handle
            .take()
            .expect("the mocked API server was lost in an earlier run");
        let log = Arc::new(Mutex::new(Log {
            awx_seen: self.awx_seen,
            ..Log::default()
        }));
        let (stop, stopped) = oneshot::channel();
        let server = tokio::spawn(serve(
            handle,
            script.into(),
            log.clone(),
            self.awx.clone(),
            stopped,
        ));
        let started = Timestamp::now();
        let result = tokio::time::timeout(
            RECONCILE_TIMEOUT,
            controller::reconcile(
                Arc::new(kube::core::PartialObjectMetaExt::into_response_partial(
                    token.metadata.clone(),
                )),
                self.ctx.clone(),
            ),
        )
        .await;
        let finished = Timestamp::now();
        // The receiver is gone only if the server task already ended; its join says why.
        let _ = stop.send(());
        let (handle, missing) = match tokio::time::timeout(SERVER_STOP_TIMEOUT, server).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => panic!("the mocked API server failed: {e}"),
            Err(_) => panic!("the mocked API server did not stop"),
        };
        self.handle = Some(handle);
        record_awx(&self.awx, &log).await;
        let mut log = std::mem::take(&mut *lock(&log));
        match log.calls.first() {
            Some(Call::Kube(first)) if first.method == Method::GET && first.path == own_path => {
                log.calls.remove(0);
            }
            other => panic!(
                "the reconcile did not read the AwxToken first (GET {own_path}); it began with {}",
                other.map_or("nothing".to_string(), Call::to_string)
            ),
        }
        self.awx_seen = log.awx_seen;
        let timeline: String = log.calls.iter().map(|c| format!("\n  {c}")).collect();
        let Ok(result) = result else {
            panic!("reconcile did not finish within {RECONCILE_TIMEOUT:?}; calls:{timeline}");
        };
        if !log.problems.is_empty() || !missing.is_empty() {
            let missing: String = missing
                .iter()
                .map(|e| format!("\n  k8s {} {}", e.method, e.path))
                .collect();
            panic!(
                "{}\nscripted calls never made:{missing}\ncalls:{timeline}\nresult: {result:?}",
                log.problems.join("\n")
            );
        }
        Run {
            result,
            calls: log.calls,
            started,
            finished,
        }
    }
}

fn operator() -> (Arc<Context>, ApiHandle) {
    operator_with(Settings::default())
}

fn operator_with(settings: Settings) -> (Arc<Context>, ApiHandle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, NAMESPACE);
    let ctx = Context::new(client, settings, Arc::new(Metrics::new()));
    (Arc::new(ctx), handle)
}

fn lock(log: &Mutex<Log>) -> std::sync::MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

/// Appends the AWX requests received since the last look to the timeline.
async fn record_awx(awx: &MockServer, log: &Mutex<Log>) {
    let received = awx.received_requests().await.unwrap_or_default();
    let mut log = lock(log);
    let seen = log.awx_seen;
    log.awx_seen = received.len();
    log.calls
        .extend(received.into_iter().skip(seen).map(|r| Call::Awx(r.into())));
}

/// Answers Kubernetes calls from `script` until told to stop; returns the handle and the
/// scripted calls that never came.
async fn serve(
    mut handle: ApiHandle,
    mut script: VecDeque<Expected>,
    log: Arc<Mutex<Log>>,
    awx: Arc<MockServer>,
    mut stop: oneshot::Receiver<()>,
) -> (ApiHandle, Vec<Expected>) {
    loop {
        let next = tokio::select! {
            next = handle.next_request() => next,
            _ = &mut stop => break,
        };
        let Some((request, respond)) = next else {
            break;
        };
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.map(|b| b.to_vec());
        // AWX calls made before this one belong before it in the timeline.
        record_awx(&awx, &log).await;
        let call = KubeCall {
            method: parts.method.clone(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or_default().to_string(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body: match &bytes {
                Ok(b) if b.is_empty() => Value::Null,
                Ok(b) => serde_json::from_slice(b)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(b).into_owned())),
                Err(e) => Value::String(format!("unreadable body: {e}")),
            },
        };
        let (status, answer) = match script.pop_front() {
            Some(expected) if expected.method == call.method && expected.path == call.path => {
                (expected.reply.0)(&call)
            }
            other => {
                let wanted = match &other {
                    Some(e) => format!("{} {}", e.method, e.path),
                    None => "no further call".to_string(),
                };
                let mut log = lock(&log);
                let n = log.calls.len() + 1;
                log.problems.push(format!(
                    "unexpected Kubernetes call #{n}: {} {} (the script wanted {wanted}); body: {}",
                    call.method, call.path, call.body
                ));
                if let Some(e) = other {
                    script.push_front(e);
                }
                (500, unexpected_call_status())
            }
        };
        lock(&log).calls.push(Call::Kube(call));
        let response = Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(answer.to_string().into_bytes()))
            .expect("a valid response");
        respond.send_response(response);
    }
    (handle, script.into())
}

fn unexpected_call_status() -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "unexpected call in a scripted test",
        "reason": "InternalError",
        "code": 500,
    })
}
