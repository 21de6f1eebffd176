//! The reconciler against a scripted Kubernetes API and a mocked AWX: the exact calls of a
//! first issue, a steady state, a renewal, a revocation, a deletion, a credential failure,
//! a conflicting writer and a predecessor's state.

use std::time::Duration;

use base64::Engine as _;
use http::Method;
use jiff::{SignedDuration, Timestamp};
use kube::runtime::controller::Action;
use secrecy::ExposeSecret as _;
use serde_json::{Value, json};
use wiremock::{
    Mock, ResponseTemplate,
    matchers::{method, path},
};

use super::FINALIZER;
use crate::{
    crd::{AwxToken, ROTATE_ANNOTATION, SKIP_REVOKE_ANNOTATION},
    fixtures::{self as fx, Harness, Reply, Run, get, patch, post, put},
    state::{FailureRecord, Sensitive, TokenState},
};

const ACCESS: &str = "Qm7rT2vX9kLpA4sZ8nB1cD5eF3gH6j";
const REFRESH: &str = "Zx8Yw7Vu6Ts5Rq4Po3Nm2Lk1Ji0Hg";
const NEW_ACCESS: &str = "Hd3kP9sLq2Wm7Xv4Bn8Tz1Rc6Yf5Ga";
const NEW_REFRESH: &str = "Jp4Ls8Kd2Nf6Hq1Wz9Xc3Vb7Mt5Re0";
const OLD_ACCESS: &str = "Ub5Gy2Oe8Ri4Aw1Qs7Dk3Fj9Hl6Zx0";
const OLD_REFRESH: &str = "Vn1Mc5Xb9Zl3Kj7Hg2Fd6Sa4Pq8Wo0";
const SECRET_VALUES: [&str; 8] = [
    fx::PASSWORD,
    fx::CLIENT_SECRET,
    ACCESS,
    REFRESH,
    NEW_ACCESS,
    NEW_REFRESH,
    OLD_ACCESS,
    OLD_REFRESH,
];
/// AWX's default access token lifetime: 1000 years.
const AWX_DEFAULT_EXPIRES_IN: u64 = 31_536_000_000;

const STATE: &str = "/api/v1/namespaces/apps/secrets/awx-token-operator-state-ci-bot";
const SECRETS: &str = "/api/v1/namespaces/apps/secrets";
const TARGET: &str = "/api/v1/namespaces/apps/secrets/ci-bot-awx";
const CREDENTIALS: &str = "/api/v1/namespaces/apps/secrets/awx-bot";
const AWX_TOKEN: &str = "/apis/awx-token-operator.io/v1alpha1/namespaces/apps/awxtokens/ci-bot";
const STATUS: &str = "/apis/awx-token-operator.io/v1alpha1/namespaces/apps/awxtokens/ci-bot/status";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/apps/events";

// ------------------------------------------------------------------ AWX answers

/// `POST /api/o/token/` success (docs/awx-protocol.md#token-answer).
async fn awx_issues(h: &Harness, access: &str, refresh: &str, expires_in: u64) {
    let answer = ResponseTemplate::new(200)
        .insert_header("cache-control", "no-store")
        .insert_header("pragma", "no-cache")
        .set_body_json(json!({
            "access_token": access,
            "expires_in": expires_in,
            "token_type": "Bearer",
            "scope": "write",
            "refresh_token": refresh,
        }));
    Mock::given(method("POST"))
        .and(path("/api/o/token/"))
        .respond_with(answer)
        .up_to_n_times(1)
        .mount(h.awx())
        .await;
}

/// The user sees no application (`GET /api/v2/applications/`, docs/awx-protocol.md#list-permissions),
/// so the operator runs the grant; then `GET /api/v2/tokens/` lists the one application token
/// AWX just created, untagged, as `id`, and `PATCH /api/v2/tokens/{id}/` accepts its tag
/// (docs/awx-protocol.md#interrupted-requests).
async fn awx_lists_the_new_token(h: &Harness, id: u64) {
    Mock::given(method("GET"))
        .and(path("/api/v2/applications/"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"count": 0, "next": null, "previous": null, "results": []})),
        )
        .mount(h.awx())
        .await;
    let created = Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    Mock::given(method("GET"))
        .and(path("/api/v2/tokens/"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "count": 1, "next": null, "previous": null,
            "results": [{"id": id, "type": "o_auth2_access_token", "user": 7, "application": 3,
                         "description": "", "created": created, "scope": "write"}],
        })))
        .mount(h.awx())
        .await;
    Mock::given(method("PATCH"))
        .and(path(format!("/api/v2/tokens/{id}/")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": id})))
        .mount(h.awx())
        .await;
}

/// `POST /api/o/revoke_token/` success: 200, empty body (docs/awx-protocol.md#revoke-token); then `GET /api/v2/me/` with the
/// revoked token: 401 (docs/awx-protocol.md#verify).
async fn awx_revokes(h: &Harness) {
    Mock::given(method("POST"))
        .and(path("/api/o/revoke_token/"))
        .respond_with(
            ResponseTemplate::new(200).insert_header("content-type", "text/html; charset=utf-8"),
        )
        .mount(h.awx())
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v2/me/"))
        .respond_with(
            ResponseTemplate::new(401)
                .insert_header(
                    "www-authenticate",
                    "Bearer realm=api authorization_url=/api/o/authorize/",
                )
                .set_body_json(json!({"detail": "Authentication credentials were not provided. To establish a login session, visit /api/login/."})),
        )
        .mount(h.awx())
        .await;
}

fn client_basic_auth() -> String {
    let pair = format!("{}:{}", fx::CLIENT_ID, fx::CLIENT_SECRET);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

fn form(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

// ------------------------------------------------------------------ helpers

/// What the API server holds after a step.
struct World {
    token: AwxToken,
    state: Value,
    target: Value,
    /// The resourceVersion the API server gave the state Secret it created.
    created_version: String,
}

/// The calls of a first issue: the marker created, the token recorded, the event, the
/// Secret, the status.
fn first_issue_script(token: &AwxToken) -> Vec<fx::Expected> {
    vec![
        get(STATE, Reply::not_found()),
        get(TARGET, Reply::not_found()),
        get(CREDENTIALS, Reply::object(fx::credentials())),
        post(SECRETS, Reply::stored(true)),
        put(STATE, Reply::stored(false)),
        post(EVENTS, Reply::stored(true)),
        patch(TARGET, Reply::stored(false)),
        patch(STATUS, Reply::status_of(token)),
    ]
}

/// Reconciles a fresh AwxToken to its first token (`ACCESS`), answering each call as the API
/// server would; returns the run and what the API server then holds.
async fn issue_first(h: &mut Harness) -> (Run, World) {
    let token = fx::awx_token(&h.awx_url());
    awx_issues(h, ACCESS, REFRESH, AWX_DEFAULT_EXPIRES_IN).await;
    awx_lists_the_new_token(h, 41).await;
    let created = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut script = first_issue_script(&token);
    script[3] = post(
        SECRETS,
        Reply::from_fn({
            let created = created.clone();
            move |call| {
                let stored = fx::stored(&call.body);
                *created.lock().unwrap() = stored["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                (201, stored)
            }
        }),
    );
    let run = h.reconcile(&token, script).await;
    let world = World {
        token: fx::with_status(&token, last_body(&run, Method::PATCH, STATUS)),
        state: fx::stored(last_body(&run, Method::PUT, STATE)),
        target: fx::stored(last_body(&run, Method::PATCH, TARGET)),
        created_version: created.lock().unwrap().clone(),
    };
    (run, world)
}

fn last_body<'a>(run: &'a Run, method: Method, path: &str) -> &'a Value {
    &run.kube(method.clone(), path)
        .last()
        .unwrap_or_else(|| panic!("no {method} {path} in {:?}", run.timeline()))
        .body
}

fn condition<'a>(status_patch: &'a Value, type_: &str) -> &'a Value {
    status_patch["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status_patch}"))
}

fn assert_server_side_apply(run: &Run, path: &str) {
    for call in run.kube(Method::PATCH, path) {
        assert_eq!(
            call.content_type.as_deref(),
            Some("application/apply-patch+yaml"),
            "{path}"
        );
        let mut query: Vec<_> = call.query.split('&').filter(|p| !p.is_empty()).collect();
        query.sort_unstable();
        assert_eq!(
            query,
            ["fieldManager=awx-token-operator", "force=true"],
            "{path}"
        );
    }
}

fn between(t: Timestamp, from: Timestamp, to: Timestamp) -> bool {
    from <= t && t <= to
}

/// The samples of the metrics exposition whose series starts with `prefix`: the series with
/// its labels, and the value.
fn series(h: &Harness, prefix: &str) -> Vec<(String, f64)> {
    h.ctx
        .metrics
        .render()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn unix_seconds(t: Timestamp) -> f64 {
    t.as_millisecond() as f64 / 1000.0
}

const FAILING_SINCE: &str = "awx_token_operator_renewal_failing_since_timestamp_seconds{namespace=\"apps\",name=\"ci-bot\"}";

fn ago(hours: i64) -> Timestamp {
    Timestamp::now() - SignedDuration::from_hours(hours)
}

/// The state Secret as stored, with `state` in it.
fn state_object(token: &AwxToken, state: &TokenState) -> Value {
    fx::state_secret(token, state)
}

// ------------------------------------------------------------------ scenarios

#[tokio::test]
async fn first_issue_marks_the_request_stores_the_token_then_writes_the_secret() {
    let mut h = Harness::start().await;
    let (run, world) = issue_first(&mut h).await;

    assert_eq!(
        run.timeline(),
        [
            format!("k8s GET {STATE}"),
            format!("k8s GET {TARGET}"),
            format!("k8s GET {CREDENTIALS}"),
            format!("k8s POST {SECRETS}"),
            "awx POST /api/o/token/".to_string(),
            "awx GET /api/v2/applications/".to_string(),
            "awx GET /api/v2/tokens/".to_string(),
            "awx PATCH /api/v2/tokens/41/".to_string(),
            format!("k8s PUT {STATE}"),
            format!("k8s POST {EVENTS}"),
            format!("k8s PATCH {TARGET}"),
            format!("k8s PATCH {STATUS}"),
        ]
    );

    let request = &run.awx(Method::POST, "/api/o/token/")[0];
    assert_eq!(
        request.content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        request.authorization.as_deref(),
        Some(client_basic_auth().as_str())
    );
    assert_eq!(
        request.form(),
        form(&[
            ("grant_type", "password"),
            ("username", fx::USERNAME),
            ("password", fx::PASSWORD),
            ("scope", "write"),
        ])
    );

    // The request is recorded (in a new state Secret owned by the AwxToken's UID) before it
    // is sent, and cleared with the write that stores its answer.
    let created = &run.kube(Method::POST, SECRETS)[0].body;
    assert_eq!(
        created["metadata"]["name"],
        "awx-token-operator-state-ci-bot"
    );
    assert_eq!(created["metadata"]["ownerReferences"][0]["uid"], fx::UID);
    assert_eq!(
        created["metadata"]["annotations"]["awx-token-operator.io/awx-token-uid"],
        fx::UID
    );
    let marker = fx::state_of(created)
        .issuing
        .expect("the marker is saved before the request");
    assert!(marker.tag.starts_with("awxto-") && !marker.personal && !marker.gateway);
    assert_eq!(marker.holder, h.ctx.settings.identity);
    // The grant's token came untagged: the one new application token of the user is tagged
    // with the request's tag, and its id is kept, so a lost answer later is found by the tag.
    assert!(!marker.tagged);
    let tagged = &run.awx(Method::PATCH, "/api/v2/tokens/41/")[0];
    assert_eq!(
        tagged.json()["description"],
        json!(format!("awx-token-operator apps/ci-bot [{}]", marker.tag))
    );
    let listed = &run.awx(Method::GET, "/api/v2/tokens/")[0];
    assert!(
        listed
            .query
            .contains(&format!("user__username={}", fx::USERNAME))
            && listed.query.contains("application__isnull=false"),
        "{}",
        listed.query
    );
    // The token is recorded by a replace conditional on the version the create returned.
    let replaced = &run.kube(Method::PUT, STATE)[0].body;
    assert_eq!(
        replaced["metadata"]["resourceVersion"],
        json!(world.created_version)
    );
    let state = fx::state_of(replaced);
    assert!(state.issuing.is_none());
    let current = state.current.as_ref().expect("a current token");
    assert_eq!(current.token.access_token.expose(), ACCESS);
    assert_eq!(
        current.token.refresh_token.as_ref().map(Sensitive::expose),
        Some(REFRESH)
    );
    assert!(between(current.issued_at, run.started, run.finished));
    assert!(state.retiring.is_empty() && state.failure.is_none());

    let event = last_body(&run, Method::POST, EVENTS);
    assert_eq!(event["type"], "Normal");
    assert_eq!(event["reason"], "TokenIssued");
    assert_eq!(event["note"], "Token issued (first issue)");
    assert_eq!(event["reportingController"], "awx-token-operator");
    assert_eq!(event["regarding"]["kind"], "AwxToken");
    assert_eq!(event["regarding"]["uid"], fx::UID);

    let target = last_body(&run, Method::PATCH, TARGET);
    assert_eq!(target["metadata"]["name"], fx::TARGET);
    let keys: Vec<_> = target["data"]
        .as_object()
        .map(|d| d.keys().cloned().collect())
        .unwrap_or_default();
    assert_eq!(keys, ["host", "token"]);
    assert_eq!(fx::secret_data(target, "token"), ACCESS);
    assert_eq!(fx::secret_data(target, "host"), h.awx_url());
    assert_eq!(
        target["metadata"]["ownerReferences"],
        json!([{
            "apiVersion": "awx-token-operator.io/v1alpha1",
            "kind": "AwxToken",
            "name": fx::NAME,
            "uid": fx::UID,
            "controller": true,
        }])
    );
    assert_eq!(
        target["metadata"]["annotations"]["awx-token-operator.io/awx-token-uid"],
        fx::UID
    );
    // A new Secret: no resourceVersion to hold the write to.
    assert!(target["metadata"].get("resourceVersion").is_none());
    assert_server_side_apply(&run, TARGET);
    assert_server_side_apply(&run, STATUS);

    let ready = last_body(&run, Method::PATCH, STATUS);
    let ready_condition = condition(ready, "Ready");
    assert_eq!(ready_condition["status"], "True");
    assert_eq!(ready_condition["reason"], "TokenReady");
    assert_eq!(condition(ready, "RenewalFailed")["status"], "False");
    let status = &ready["status"];
    assert_eq!(status["secretName"], fx::TARGET);
    assert_eq!(status["user"], fx::USERNAME);
    assert_eq!(status["scope"], "write");
    assert_eq!(status["flavor"], "Controller");
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(
        status["renewalTime"],
        json!(
            current
                .renewal_time
                .strftime("%Y-%m-%dT%H:%M:%SZ")
                .to_string()
        )
    );
    assert!(status.get("failedAttempts").is_none());
    assert!(status.get("pendingRevocations").is_none());
    run.assert_not_leaked(&SECRET_VALUES);
    assert_eq!(
        world.token.status.as_ref().map(|s| s.failed_attempts),
        Some(0)
    );
    // Renewal is about 24h away (rotateEvery); the requeue is clamped to 1h.
    assert_eq!(run.action(), &Action::requeue(Duration::from_secs(3600)));
}

#[tokio::test]
async fn first_issue_requeues_at_the_renewal_time_when_it_is_within_the_hour() {
    let mut h = Harness::start().await;
    let token = fx::awx_token(&h.awx_url());
    // 30 minutes of lifetime, less than renewBefore (1h): renewal at two thirds of it.
    awx_issues(&h, ACCESS, REFRESH, 1800).await;
    let run = h.reconcile(&token, first_issue_script(&token)).await;
    let state = fx::state_of(last_body(&run, Method::PUT, STATE));
    let renewal = state.current.expect("a current token").renewal_time;
    // A lone token's renewal is paced to start one slot of the rate limit, and the lead of a
    // grant's round trip, early.
    let slot = super::pace::slot(super::Settings::default().awx_max_rps.unwrap());
    let start = crate::schedule::sub(crate::schedule::sub(renewal, super::pace::LEAD), slot);
    let requeue = fx::requeue_after(run.action()).expect("a requeue");
    let earliest = Duration::try_from(start.duration_since(run.finished)).unwrap();
    let latest = Duration::try_from(start.duration_since(run.started)).unwrap();
    assert!(
        (earliest..=latest).contains(&requeue),
        "requeue in {requeue:?}, paced start in {earliest:?}..{latest:?}"
    );
    // Two thirds of 30 minutes, less at most 10% of it as jitter, less the lead and the slot.
    assert!(
        (Duration::from_secs(1070)..=Duration::from_secs(1195)).contains(&requeue),
        "{requeue:?}"
    );
}

#[tokio::test]
async fn healthy_resource_is_only_read_on_the_next_reconcile() {
    let mut h = Harness::start().await;
    let (_, world) = issue_first(&mut h).await;

    let run = h
        .reconcile(
            &world.token,
            vec![
                get(STATE, Reply::object(world.state.clone())),
                get(TARGET, Reply::object(world.target.clone())),
                get(CREDENTIALS, Reply::object(fx::credentials())),
            ],
        )
        .await;

    assert_eq!(
        run.timeline(),
        [
            format!("k8s GET {STATE}"),
            format!("k8s GET {TARGET}"),
            format!("k8s GET {CREDENTIALS}"),
        ]
    );
    assert_eq!(run.action(), &Action::requeue(Duration::from_secs(3600)));
}

#[tokio::test]
async fn a_status_is_not_written_again_while_the_cache_still_shows_the_object_before_it() {
    let mut h = Harness::start().await;
    let (_, world) = issue_first(&mut h).await;
    let reads = || {
        vec![
            get(STATE, Reply::object(world.state.clone())),
            get(TARGET, Reply::object(world.target.clone())),
            get(CREDENTIALS, Reply::object(fx::credentials())),
        ]
    };
    // A reconcile woken by an echo before the status write's own: the cache still holds the
    // object without that status.
    let before = fx::awx_token(&h.awx_url());
    let run = h.reconcile(&before, reads()).await;
    assert_eq!(
        run.timeline(),
        [
            format!("k8s GET {STATE}"),
            format!("k8s GET {TARGET}"),
            format!("k8s GET {CREDENTIALS}"),
        ]
    );

    // A newer object whose status somebody else changed: the status is written again.
    let mut changed = fx::with_status(&world.token, &json!({"status": {}}));
    changed.metadata.resource_version = world
        .token
        .metadata
        .resource_version
        .as_ref()
        .map(|v| (v.parse::<u64>().unwrap() + 1).to_string());
    let mut script = reads();
    script.push(patch(STATUS, Reply::status_of(&changed)));
    let run = h.reconcile(&changed, script).await;
    assert_eq!(run.timeline().last(), Some(&format!("k8s PATCH {STATUS}")));
    let written = last_body(&run, Method::PATCH, STATUS);
    assert_eq!(condition(written, "Ready")["reason"], "TokenReady");
    assert_eq!(written["status"]["secretName"], fx::TARGET);
}

#[tokio::test]
async fn renewal_issues_a_new_token_and_keeps_the_old_one_until_the_grace_period_ends() {
    let mut h = Harness::start().await;
    let (_, world) = issue_first(&mut h).await;
    // The token was issued 25 hours ago: past rotateEvery (24h).
    let mut state = fx::state_of(&world.state);
    let current = state.current.as_mut().expect("a current token");
    current.issued_at = ago(25);
    current.renewal_time = ago(1);
    let token = world.token;
    // A day later, and maybe another process: kube's event recorder would turn a repeat of
    // the same event within 6 minutes into a PATCH of the first one.
    h.restart();
    awx_issues(&h, NEW_ACCESS, NEW_REFRESH, AWX_DEFAULT_EXPIRES_IN).await;

    let run = h
        .reconcile(
            &token,
            vec![
                get(STATE, Reply::object(state_object(&token, &state))),
                get(TARGET, Reply::object(world.target.clone())),
                get(CREDENTIALS, Reply::object(fx::credentials())),
                put(STATE, Reply::stored(false)),
                put(STATE, Reply::stored(false)),
                post(EVENTS, Reply::stored(true)),
                patch(TARGET, Reply::stored(false)),
                patch(STATUS, Reply::status_of(&token)),
            ],
        )
        .await;

    // Marker, token, event, Secret, status: four writes and an event per renewal.
    assert_eq!(
        run.timeline(),
        [
            format!("k8s GET {STATE}"),
            format!("k8s GET {TARGET}"),
            format!("k8s GET {CREDENTIALS}"),
            format!("k8s PUT {STATE}"),
            "awx POST /api/o/token/".to_string(),
            // The application's id is known since the first issue (once per process).
            "awx GET /api/v2/tokens/".to_string(),
            format!("k8s PUT {STATE}"),
            format!("k8s POST {EVENTS}"),
            format!("k8s PATCH {TARGET}"),
            format!("k8s PATCH {STATUS}"),
        ]
    );
    let saved = fx::state_of(last_body(&run, Method::PUT, STATE));
    let current = saved.current.as_ref().expect("a current token");
    assert_eq!(current.token.access_token.expose(), NEW_ACCESS);
    assert_eq!(saved.retiring.len(), 1);
    let retiring = &saved.retiring[0];
    assert_eq!(retiring.token.access_token.expose(), ACCESS);
    assert_eq!(
        retiring.token.refresh_token.as_ref().map(Sensitive::expose),
        Some(REFRESH)
    );
    // revokeGracePeriod defaults to 5m.
    let grace = SignedDuration::from_mins(5);
    assert!(between(
        retiring.revoke_after,
        run.started + grace,
        run.finished + grace
    ));
    let event = last_body(&run, Method::POST, EVENTS);
    assert_eq!(event["reason"], "TokenRenewed");
    assert_eq!(event["note"], "Token renewed (renewal time reached)");
    // The Secret existed: the write holds only if it is still the version read.
    let target = last_body(&run, Method::PATCH, TARGET);
    assert_eq!(fx::secret_data(target, "token"), NEW_ACCESS);
    assert_eq!(
        target["metadata"]["resourceVersion"],
        world.target["metadata"]["resourceVersion"]
    );
    let ready = last_body(&run, Method::PATCH, STATUS);
    assert_eq!(condition(ready, "Ready")["status"], "True");
    assert_eq!(ready["status"]["pendingRevocations"], 1);
    run.assert_not_leaked(&SECRET_VALUES);
    // Next wake: the end of the grace period.
    let requeue = fx::requeue_after(run.action()).expect("a requeue");
    assert!(
        (Duration::from_secs(299)..=Duration::from_secs(300)).contains(&requeue),
        "{requeue:?}"
    );
}

#[tokio::test]
async fn a_conflicting_writer_is_merged_not_overwritten() {
    let mut h = Harness::start().await;
    let (_, world) = issue_first(&mut h).await;
    let token = world.token;
    let mut state = fx::state_of(&world.state);
    state.current.as_mut().unwrap().issued_at = ago(25);
    let mut old = state.current.clone().unwrap().retire(ago(-1));
    old.token.access_token = Sensitive::new(OLD_ACCESS);
    old.token.refresh_token = Some(Sensitive::new(OLD_REFRESH));
    state.retiring.push(old);
    awx_issues(&h, NEW_ACCESS, NEW_REFRESH, AWX_DEFAULT_EXPIRES_IN).await;
    // While the request is in flight, another process revokes the old token and removes it
    // (a new version of the state Secret, with the marker still there).
    let marked = std::sync::Arc::new(std::sync::Mutex::new(Value::Null));
    let remember = {
        let marked = marked.clone();
        move |call: &fx::KubeCall| {
            *marked.lock().unwrap() = call.body.clone();
            (200, fx::stored(&call.body))
        }
    };
    let written_by_other = {
        let token = token.clone();
        move |_: &fx::KubeCall| {
            let mut other = fx::state_of(&marked.lock().unwrap());
            other.retiring.clear();
            (200, fx::state_secret(&token, &other))
        }
    };
    let run = h
        .reconcile(
            &token,
            vec![
                get(STATE, Reply::object(state_object(&token, &state))),
                get(TARGET, Reply::object(world.target.clone())),
                get(CREDENTIALS, Reply::object(fx::credentials())),
                put(STATE, Reply::from_fn(remember)),
                put(STATE, Reply::conflict()),
                get(STATE, Reply::from_fn(written_by_other)),
                put(STATE, Reply::stored(false)),
                post(EVENTS, Reply::stored(true)),
                patch(TARGET, Reply::stored(false)),
                patch(STATUS, Reply::status_of(&token)),
            ],
        )
        .await;
    let saved = fx::state_of(last_body(&run, Method::PUT, STATE));
    assert_eq!(
        saved.current.as_ref().unwrap().token.access_token.expose(),
        NEW_ACCESS
    );
    // The other writer's revocation stays; the replaced token joins it as retiring.
    let retiring: Vec<_> = saved
        .retiring
        .iter()
        .map(|r| r.token.access_token.expose())
        .collect();
    assert_eq!(retiring, [ACCESS]);
    assert!(saved.issuing.is_none());
    assert_eq!(run.awx(Method::POST, "/api/o/token/").len(), 1);
}

#[tokio::test]
async fn replaced_token_is_revoked_and_verified_dead_after_the_grace_period() {
    let mut h = Harness::start().await;
    let (_, world) = issue_first(&mut h).await;
    let mut state = fx::state_of(&world.state);
    let current = state.current.clone().expect("a current token");
    let mut old = current.retire(ago(0) - SignedDuration::from_secs(1));
    old.token.access_token = Sensitive::new(OLD_ACCESS);
    old.token.refresh_token = Some(Sensitive::new(OLD_REFRESH));
    state.retiring.push(old);
    let mut token = world.token;
    if let Some(status) = token.status.as_mut() {
        status.pending_revocations = 1;
    }
    awx_revokes(&h).await;

    let run = h
        .reconcile(
            &token,
            vec![
                get(STATE, Reply::object(state_object(&token, &state))),
                get(TARGET, Reply::object(world.target.clone())),
                get(CREDENTIALS, Reply::object(fx::credentials())),
                put(STATE, Reply::stored(false)),
                patch(STATUS, Reply::status_of(&token)),
            ],
        )
        .await;

    assert_eq!(
        run.timeline(),
        [
            format!("k8s GET {STATE}"),
            format!("k8s GET {TARGET}"),
            format!("k8s GET {CREDENTIALS}"),
            "awx POST /api/o/revoke_token/".to_string(),
            "awx GET /api/v2/me/".to_string(),
            // No event: a revocation is routine.
            format!("k8s PUT {STATE}"),
            format!("k8s PATCH {STATUS}"),
        ]
    );
    let revoke = &run.awx(Method::POST, "/api/o/revoke_token/")[0];
    assert_eq!(
        revoke.authorization.as_deref(),
        Some(client_basic_auth().as_str())
    );
    assert_eq!(
        revoke.form(),
        form(&[("token", OLD_REFRESH), ("token_type_hint", "refresh_token")])
    );
    let check = &run.awx(Method::GET, "/api/v2/me/")[0];
    assert_eq!(
        check.authorization.as_deref(),
        Some(format!("Bearer {OLD_ACCESS}").as_str())
    );
    let saved = fx::state_of(last_body(&run, Method::PUT, STATE));
    assert_eq!(
        saved,
        TokenState {
            current: Some(current),
            ..TokenState::default()
        }
    );
    let ready = last_body(&run, Method::PATCH, STATUS);
    assert_eq!(condition(ready, "Ready")["status"], "True");
    assert!(ready["status"].get("pendingRevocations").is_none());
    run.assert_not_leaked(&SECRET_VALUES);
    assert_eq!(run.action(), &Action::requeue(Duration::from_secs(3600)));
    assert_eq!(
        series(&h, "awx_token_operator_revocations_total"),
        [(
            "awx_token_operator_revocations_total{flavor=\"Controller\",outcome=\"revoked\"}"
                .into(),
            1.0
        )]
    );
}

#[tokio::test]
async fn a_refused_revocation_is_counted_as_failed_and_retried_later() {
    let mut h = Harness::start().await;
    let (_, world) = issue_first(&mut h).await;
    let mut state = fx::state_of(&world.state);
    let mut old = state
        .current
        .clone()
        .expect("a current token")
        .retire(ago(0) - SignedDuration::from_secs(1));
    old.token.access_token = Sensitive::new(OLD_ACCESS);
    old.token.refresh_token = Some(Sensitive::new(OLD_REFRESH));
    state.retiring.push(old);
    let mut token = world.token;
    if let Some(status) = token.status.as_mut() {
        status.pending_revocations = 1;
    }
    Mock::given(method("POST"))
        .and(path("/api/o/revoke_token/"))
        .respond_with(ResponseTemplate::new(500).set_body_string("<h1>Server Error (500)</h1>"))
        .mount(h.awx())
        .await;

    let run = h
        .reconcile(
            &token,
            vec![
                get(STATE, Reply::object(state_object(&token, &state))),
                get(TARGET, Reply::object(world.target.clone())),
                get(CREDENTIALS, Reply::object(fx::credentials())),
                put(STATE, Reply::stored(false)),
                post(EVENTS, Reply::stored(true)),
            ],
        )
        .await;

    assert_eq!(run.awx(Method::POST, "/api/o/revoke_token/").len(), 1);
    assert_eq!(event_reason(&run), "RevocationFailed");
    let saved = fx::state_of(last_body(&run, Method::PUT, STATE));
    assert_eq!(saved.retiring.len(), 1);
    assert_eq!(saved.retiring[0].failed_attempts, 1);
    // The status already says one revocation is pending: nothing to write there.
    assert!(run.kube(Method::PATCH, STATUS).is_empty());
    let requeue = fx::requeue_after(run.action()).expect("a requeue");
    assert!(
        (Duration::from_secs(4)..=Duration::from_secs(6)).contains(&requeue),
        "retried after the first backoff: {requeue:?}"
    );
    assert_eq!(
        series(&h, "awx_token_operator_revocations_total"),
        [(
            "awx_token_operator_revocations_total{flavor=\"Controller\",outcome=\"failed\"}".into(),
            1.0
        )]
    );
    // A failed revocation is not a failure to obtain a token: the object is not in backoff.
    assert_eq!(
        series(&h, "awx_token_operator_objects_in_backoff"),
        [("awx_token_operator_objects_in_backoff".into(), 0.0)]
    );
    assert!(series(&h, "awx_token_operator_renewal_failing_since").is_empty());
}

#[tokio::test]
async fn a_predecessors_state_is_taken_over_not_adopted() {
    let mut h = Harness::start().await;
    let (_, world) = issue_first(&mut h).await;
    // The AwxToken was deleted and created again under the same name; the garbage collector
    // has not removed the old state Secret (owned by the old UID) yet.
    let mut reborn = fx::awx_token(&h.awx_url());
    reborn.metadata.uid = Some("9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a".into());
    awx_issues(&h, NEW_ACCESS, NEW_REFRESH, AWX_DEFAULT_EXPIRES_IN).await;
    let run = h
        .reconcile(
            &reborn,
            vec![
                get(STATE, Reply::object(world.state.clone())),
                get(TARGET, Reply::object(world.target.clone())),
                get(CREDENTIALS, Reply::object(fx::credentials())),
                put(STATE, Reply::stored(false)),
                put(STATE, Reply::stored(false)),
                post(EVENTS, Reply::stored(true)),
                patch(TARGET, Reply::stored(false)),
                patch(STATUS, Reply::status_of(&reborn)),
            ],
        )
        .await;
    // Taken over by the first state write, only if it is still the version read; its
    // tokens are not carried over, and it is owned by the new UID from then on.
    let first = &run.kube(Method::PUT, STATE)[0].body;
    assert_eq!(
        first["metadata"]["resourceVersion"],
        world.state["metadata"]["resourceVersion"]
    );
    assert_eq!(
        first["metadata"]["ownerReferences"][0]["uid"],
        "9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a"
    );
    let marked = fx::state_of(first);
    assert!(marked.current.is_none() && marked.issuing.is_some());
    // A token of its own, never the predecessor's.
    let saved = fx::state_of(last_body(&run, Method::PUT, STATE));
    assert_eq!(
        saved.current.as_ref().unwrap().token.access_token.expose(),
        NEW_ACCESS
    );
    assert!(saved.retiring.is_empty());
    let target = last_body(&run, Method::PATCH, TARGET);
    assert_eq!(fx::secret_data(target, "token"), NEW_ACCESS);
    assert_eq!(
        target["metadata"]["ownerReferences"][0]["uid"],
        "9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a"
    );
    // Taken over: not held to the predecessor's version.
    assert!(target["metadata"].get("resourceVersion").is_none());
    assert_eq!(event_reason(&run), "TokenIssued");
}

fn event_reason(run: &Run) -> String {
    last_body(run, Method::POST, EVENTS)["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn delete_revokes_the_current_token_then_removes_the_finalizer() {
    let mut h = Harness::start().await;
    let (_, world) = issue_first(&mut h).await;
    let token = fx::deleting(&world.token);
    awx_revokes(&h).await;

    let run = h
        .reconcile(
            &token,
            vec![
                get(STATE, Reply::object(world.state.clone())),
                get(TARGET, Reply::object(world.target.clone())),
                get(CREDENTIALS, Reply::object(fx::credentials())),
                put(STATE, Reply::stored(false)),
                patch(AWX_TOKEN, Reply::finalizer_removed(&token)),
            ],
        )
        .await;

    assert_eq!(
        run.timeline(),
        [
            format!("k8s GET {STATE}"),
            format!("k8s GET {TARGET}"),
            format!("k8s GET {CREDENTIALS}"),
            "awx POST /api/o/revoke_token/".to_string(),
            "awx GET /api/v2/me/".to_string(),
            format!("k8s PUT {STATE}"),
            format!("k8s PATCH {AWX_TOKEN}"),
        ]
    );
    assert_eq!(
        run.awx(Method::POST, "/api/o/revoke_token/")[0].form(),
        form(&[("token", REFRESH), ("token_type_hint", "refresh_token")])
    );
    assert_eq!(
        fx::state_of(last_body(&run, Method::PUT, STATE)),
        TokenState::default()
    );
    assert_finalizer_removed(&run);
    assert_eq!(run.action(), &Action::await_change());
}

#[tokio::test]
async fn delete_with_skip_revoke_removes_the_finalizer_without_asking_awx() {
    let mut h = Harness::start().await;
    let (_, world) = issue_first(&mut h).await;
    let mut token = fx::deleting(&world.token);
    token
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(SKIP_REVOKE_ANNOTATION.into(), "true".into());

    let run = h
        .reconcile(
            &token,
            vec![patch(AWX_TOKEN, Reply::finalizer_removed(&token))],
        )
        .await;

    assert_eq!(run.timeline(), [format!("k8s PATCH {AWX_TOKEN}")]);
    assert_finalizer_removed(&run);
    assert_eq!(run.action(), &Action::await_change());
}

#[tokio::test]
async fn delete_sends_nothing_to_a_host_outside_the_allow_list() {
    let mut h = Harness::start().await;
    let (_, world) = issue_first(&mut h).await;
    // The operator now allows only another host: the URL the tokens were issued at is out.
    h.restart_with(super::Settings {
        allowed_hosts: Some(vec!["awx.example.com".to_string()]),
        ..super::Settings::default()
    });
    let token = fx::deleting(&world.token);

    let run = h
        .reconcile(
            &token,
            vec![
                get(STATE, Reply::object(world.state.clone())),
                get(TARGET, Reply::object(world.target.clone())),
                get(CREDENTIALS, Reply::object(fx::credentials())),
                post(EVENTS, Reply::stored(true)),
                patch(STATUS, Reply::status_of(&token)),
            ],
        )
        .await;

    assert!(
        run.calls.iter().all(|c| matches!(c, fx::Call::Kube(_))),
        "{:?}",
        run.timeline()
    );
    let error = run
        .result
        .as_ref()
        .expect_err("the finalizer must stay")
        .to_string();
    assert!(error.contains("--allowed-awx-hosts"), "{error}");
    assert!(error.contains(SKIP_REVOKE_ANNOTATION), "{error}");
    let status = last_body(&run, Method::PATCH, STATUS);
    assert_eq!(condition(status, "Ready")["reason"], "RevokeFailed");
}

fn assert_finalizer_removed(run: &Run) {
    let call = &run.kube(Method::PATCH, AWX_TOKEN)[0];
    assert_eq!(
        call.content_type.as_deref(),
        Some("application/json-patch+json")
    );
    assert_eq!(
        call.body,
        json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
            {"op": "remove", "path": "/metadata/finalizers/0"},
        ])
    );
}

/// An AuthorizationCode AwxToken whose credentials Secret keeps the refresh token under `key`
/// (`refreshTokenKey`), and that Secret: the application's client id and secret and `tokens`
/// (plain values, base64-encoded here), no user's login.
fn sign_in(awx_url: &str, key: &str, tokens: &[(&str, &str)]) -> (AwxToken, Value) {
    let mut token = fx::awx_token(awx_url);
    token.spec.grant.type_ = crate::crd::GrantType::AuthorizationCode;
    token.spec.grant.credentials_secret_ref.refresh_token_key = key.into();
    let mut secret = fx::credentials();
    let application = [
        ("client_id", fx::CLIENT_ID),
        ("client_secret", fx::CLIENT_SECRET),
    ];
    secret["data"] = application
        .iter()
        .chain(tokens)
        .map(|(k, v)| {
            let encoded = base64::engine::general_purpose::STANDARD.encode(v);
            (k.to_string(), Value::from(encoded))
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    (token, secret)
}

#[tokio::test]
async fn a_sign_in_refreshes_the_refresh_token_under_the_key_its_spec_names() {
    let mut h = Harness::start().await;
    let (token, credentials) = sign_in(
        &h.awx_url(),
        "rt",
        &[("refresh_token", OLD_REFRESH), ("rt", REFRESH)],
    );
    // AWX refuses the refresh (it expired): enough to see what was sent.
    Mock::given(method("POST"))
        .and(path("/api/o/token/"))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            json!({"error": "invalid_grant", "error_description": "Invalid refresh token"}),
        ))
        .mount(h.awx())
        .await;
    let run = h
        .reconcile(
            &token,
            vec![
                get(STATE, Reply::not_found()),
                get(TARGET, Reply::not_found()),
                get(CREDENTIALS, Reply::object(credentials)),
                // The refused refresh, recorded: not retried until the Secret changes.
                post(SECRETS, Reply::stored(true)),
                post(EVENTS, Reply::stored(true)),
                patch(STATUS, Reply::status_of(&token)),
            ],
        )
        .await;
    let refreshes = run.awx(Method::POST, "/api/o/token/");
    assert_eq!(refreshes.len(), 1, "{:?}", run.timeline());
    assert_eq!(
        refreshes[0].form(),
        form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", REFRESH),
            ("scope", "write")
        ]),
        "the value under \"rt\", not the one under the default key"
    );
    let ready = condition(last_body(&run, Method::PATCH, STATUS), "Ready");
    assert_eq!(ready["reason"], "SignInExpired", "{ready}");
    let saved = fx::state_of(&fx::stored(last_body(&run, Method::POST, SECRETS)));
    let failure = saved.failure.as_ref().expect("a failure record");
    assert_eq!(
        (failure.reason.as_str(), failure.retryable),
        ("SignInExpired", false)
    );
    run.assert_not_leaked(&SECRET_VALUES);
}

#[tokio::test]
async fn a_sign_in_without_its_refresh_token_key_is_refused_before_awx() {
    let mut h = Harness::start().await;
    let (token, credentials) = sign_in(&h.awx_url(), "rt", &[("refresh_token", REFRESH)]);
    let run = h
        .reconcile(
            &token,
            vec![
                get(STATE, Reply::not_found()),
                get(TARGET, Reply::not_found()),
                get(CREDENTIALS, Reply::object(credentials)),
                patch(STATUS, Reply::status_of(&token)),
            ],
        )
        .await;
    assert!(
        run.timeline().iter().all(|call| !call.starts_with("awx")),
        "nothing is sent to AWX: {:?}",
        run.timeline()
    );
    let ready = condition(last_body(&run, Method::PATCH, STATUS), "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "CredentialsNotFound");
    assert_eq!(
        ready["message"],
        "Secret \"awx-bot\" has no key \"rt\" (or it is empty); it must hold the refresh token of a sign-in"
    );
    run.assert_not_leaked(&SECRET_VALUES);
}

#[tokio::test]
async fn rejected_credentials_fail_once_and_then_wait_for_a_change() {
    let mut h = Harness::start().await;
    let token = fx::awx_token(&h.awx_url());
    Mock::given(method("POST"))
        .and(path("/api/o/token/"))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            json!({"error": "invalid_grant", "error_description": "Invalid credentials given."}),
        ))
        .mount(h.awx())
        .await;

    let run = h
        .reconcile(
            &token,
            vec![
                get(STATE, Reply::not_found()),
                get(TARGET, Reply::not_found()),
                get(CREDENTIALS, Reply::object(fx::credentials())),
                post(SECRETS, Reply::stored(true)),
                put(STATE, Reply::stored(false)),
                post(EVENTS, Reply::stored(true)),
                patch(STATUS, Reply::status_of(&token)),
            ],
        )
        .await;

    assert_eq!(
        run.timeline(),
        [
            format!("k8s GET {STATE}"),
            format!("k8s GET {TARGET}"),
            format!("k8s GET {CREDENTIALS}"),
            // The refused password reaches AWX once: nothing else is asked with it.
            format!("k8s POST {SECRETS}"),
            "awx POST /api/o/token/".to_string(),
            format!("k8s PUT {STATE}"),
            format!("k8s POST {EVENTS}"),
            format!("k8s PATCH {STATUS}"),
        ]
    );
    // The failure is kept with the state, the marker cleared (a refusal created nothing).
    let stored_state = fx::stored(last_body(&run, Method::PUT, STATE));
    let saved = fx::state_of(&stored_state);
    assert!(saved.issuing.is_none() && saved.interrupted.is_empty());
    let failure = saved.failure.as_ref().expect("a failure record");
    assert_eq!((failure.attempts, failure.retryable), (1, false));
    assert_eq!(failure.reason, "InvalidCredentials");
    let failed = last_body(&run, Method::PATCH, STATUS);
    let ready = condition(failed, "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "InvalidCredentials");
    assert!(
        ready["message"]
            .as_str()
            .is_some_and(|m| m.contains("Invalid credentials given.")),
        "{ready}"
    );
    assert_eq!(failed["status"]["failedAttempts"], 1);
    assert_eq!(failed["status"]["lastFailureMessage"], ready["message"]);
    // The failure's time as Kubernetes stores times: whole seconds.
    let last_failure_time: Timestamp = failed["status"]["lastFailureTime"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .expect("status.lastFailureTime");
    assert_eq!(last_failure_time.as_second(), failure.at.as_second());
    assert_eq!(
        failure.since,
        Some(failure.at),
        "the first failure starts the streak"
    );
    let since_series = (FAILING_SINCE.to_string(), unix_seconds(failure.at));
    assert_eq!(
        series(&h, "awx_token_operator_renewal_failing_since"),
        std::slice::from_ref(&since_series)
    );
    assert_eq!(
        series(&h, "awx_token_operator_objects_in_backoff"),
        [("awx_token_operator_objects_in_backoff".into(), 1.0)]
    );
    let event = last_body(&run, Method::POST, EVENTS);
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "InvalidCredentials");
    run.assert_not_leaked(&SECRET_VALUES);
    assert_eq!(run.action(), &Action::await_change());

    // A reconcile of the cached object from before the failure (its own writes woke it, a
    // restart, a resync): no new attempt, and its status write puts the failure back instead
    // of erasing it.
    h.restart();
    let run = h
        .reconcile(
            &token,
            vec![
                get(STATE, Reply::object(stored_state.clone())),
                get(TARGET, Reply::not_found()),
                get(CREDENTIALS, Reply::object(fx::credentials())),
                patch(STATUS, Reply::status_of(&token)),
            ],
        )
        .await;
    assert!(run.awx(Method::POST, "/api/o/token/").is_empty());
    // A new process reports the streak from the state, not from its own start.
    assert_eq!(
        series(&h, "awx_token_operator_renewal_failing_since"),
        [since_series]
    );
    let rewritten = last_body(&run, Method::PATCH, STATUS);
    assert_eq!(rewritten["status"]["failedAttempts"], 1);
    assert_eq!(
        condition(rewritten, "Ready")["reason"],
        "InvalidCredentials"
    );
    assert_eq!(run.action(), &Action::await_change());

    // With the status up to date: only reads.
    let token = fx::with_status(&token, rewritten);
    let run = h
        .reconcile(
            &token,
            vec![
                get(STATE, Reply::object(stored_state)),
                get(TARGET, Reply::not_found()),
                get(CREDENTIALS, Reply::object(fx::credentials())),
            ],
        )
        .await;
    assert_eq!(run.timeline().len(), 3, "{:?}", run.timeline());
    assert_eq!(run.action(), &Action::await_change());
}

#[tokio::test]
async fn a_rotation_during_an_outage_tries_once_then_backs_off() {
    let mut h = Harness::start().await;
    let (_, world) = issue_first(&mut h).await;
    let mut token = world.token;
    token
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(ROTATE_ANNOTATION.into(), "1".into());
    Mock::given(method("POST"))
        .and(path("/api/o/token/"))
        .respond_with(ResponseTemplate::new(500).set_body_string("<h1>Server Error (500)</h1>"))
        .mount(h.awx())
        .await;
    let run = h
        .reconcile(
            &token,
            vec![
                get(STATE, Reply::object(world.state.clone())),
                get(TARGET, Reply::object(world.target.clone())),
                get(CREDENTIALS, Reply::object(fx::credentials())),
                put(STATE, Reply::stored(false)),
                put(STATE, Reply::stored(false)),
                post(EVENTS, Reply::stored(true)),
                patch(STATUS, Reply::status_of(&token)),
            ],
        )
        .await;
    assert_eq!(run.awx(Method::POST, "/api/o/token/").len(), 1);
    let stored_state = fx::stored(last_body(&run, Method::PUT, STATE));
    let saved = fx::state_of(&stored_state);
    // A complete 500 created nothing: no marker kept, no warning about a lost token.
    assert!(saved.issuing.is_none() && saved.interrupted.is_empty());
    assert_eq!(
        saved.failure.as_ref().unwrap().rotation.as_deref(),
        Some("1")
    );
    assert_eq!(event_reason(&run), "AwxServerError");
    // Ready stays True: the Secret's token still works. The failure has its own condition.
    let status = last_body(&run, Method::PATCH, STATUS);
    assert_eq!(condition(status, "Ready")["status"], "True");
    assert_eq!(condition(status, "RenewalFailed")["status"], "True");
    assert_eq!(
        condition(status, "RenewalFailed")["reason"],
        "AwxServerError"
    );
    let requeue = fx::requeue_after(run.action()).expect("a requeue");
    assert!(
        (Duration::from_secs(4)..=Duration::from_secs(6)).contains(&requeue),
        "{requeue:?}"
    );

    // Woken at once again (its own writes): the rotation waits for the backoff.
    let token = fx::with_status(&token, status);
    let run = h
        .reconcile(
            &token,
            vec![
                get(STATE, Reply::object(stored_state)),
                get(TARGET, Reply::object(world.target.clone())),
                get(CREDENTIALS, Reply::object(fx::credentials())),
            ],
        )
        .await;
    assert_eq!(run.timeline().len(), 3, "{:?}", run.timeline());
}

#[tokio::test]
async fn a_token_issued_for_new_credentials_answers_the_rotate_annotation_too() {
    let mut h = Harness::start().await;
    let (_, world) = issue_first(&mut h).await;
    let mut token = world.token;
    token
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(ROTATE_ANNOTATION.into(), "7".into());
    // A rotation was asked for and its attempt (at once) failed; then the credentials
    // changed, which are tried at once in turn.
    let before = "the credentials before the change";
    let mut state = fx::state_of(&world.state);
    let current = state.current.as_mut().expect("a current token");
    current.inputs = before.into();
    state.failure = Some(FailureRecord {
        attempts: 1,
        at: Timestamp::now() - SignedDuration::from_secs(1),
        since: Some(Timestamp::now() - SignedDuration::from_secs(1)),
        reason: "AwxServerError".into(),
        message: "AWX answered 500".into(),
        retryable: true,
        inputs: before.into(),
        rotation: Some("7".into()),
    });
    awx_issues(&h, NEW_ACCESS, NEW_REFRESH, AWX_DEFAULT_EXPIRES_IN).await;
    let run = h
        .reconcile(
            &token,
            vec![
                get(STATE, Reply::object(state_object(&token, &state))),
                get(TARGET, Reply::object(world.target.clone())),
                get(CREDENTIALS, Reply::object(fx::credentials())),
                put(STATE, Reply::stored(false)),
                put(STATE, Reply::stored(false)),
                post(EVENTS, Reply::stored(true)),
                patch(TARGET, Reply::stored(false)),
                patch(STATUS, Reply::status_of(&token)),
            ],
        )
        .await;
    // One new token, issued after the annotation was set: it is the rotation asked for, not
    // a token to replace at once (its success cleared the failure the value met, so nothing
    // would hold that second grant back).
    assert_eq!(run.awx(Method::POST, "/api/o/token/").len(), 1);
    let saved = fx::state_of(last_body(&run, Method::PUT, STATE));
    assert_eq!(
        saved
            .current
            .as_ref()
            .map(|c| c.token.access_token.expose()),
        Some(NEW_ACCESS)
    );
    assert_eq!(saved.rotated_for.as_deref(), Some("7"));
    assert_eq!(event_reason(&run), "TokenReissued");
    let status = last_body(&run, Method::PATCH, STATUS);
    assert_eq!(status["status"]["rotatedFor"], "7");
    run.assert_not_leaked(&SECRET_VALUES);

    // Woken again by its own writes: nothing is due.
    let token = fx::with_status(&token, status);
    let run = h
        .reconcile(
            &token,
            vec![
                get(STATE, Reply::object(state_object(&token, &saved))),
                get(
                    TARGET,
                    Reply::object(fx::stored(last_body(&run, Method::PATCH, TARGET))),
                ),
                get(CREDENTIALS, Reply::object(fx::credentials())),
            ],
        )
        .await;
    assert_eq!(run.timeline().len(), 3, "{:?}", run.timeline());
}

#[tokio::test]
async fn a_further_failure_keeps_the_start_of_the_streak() {
    let mut h = Harness::start().await;
    let (_, world) = issue_first(&mut h).await;
    let mut token = world.token;
    token
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(ROTATE_ANNOTATION.into(), "1".into());
    let start = ago(2);
    let mut state = fx::state_of(&world.state);
    state.failure = Some(FailureRecord {
        attempts: 3,
        at: ago(1),
        since: Some(start),
        reason: "AwxServerError".into(),
        message: "AWX answered 500".into(),
        retryable: true,
        inputs: state
            .current
            .as_ref()
            .expect("a current token")
            .inputs
            .clone(),
        rotation: Some("1".into()),
    });
    Mock::given(method("POST"))
        .and(path("/api/o/token/"))
        .respond_with(ResponseTemplate::new(500).set_body_string("<h1>Server Error (500)</h1>"))
        .mount(h.awx())
        .await;
    let run = h
        .reconcile(
            &token,
            vec![
                get(STATE, Reply::object(state_object(&token, &state))),
                get(TARGET, Reply::object(world.target.clone())),
                get(CREDENTIALS, Reply::object(fx::credentials())),
                put(STATE, Reply::stored(false)),
                put(STATE, Reply::stored(false)),
                post(EVENTS, Reply::stored(true)),
                patch(STATUS, Reply::status_of(&token)),
            ],
        )
        .await;
    // The backoff after three failures an hour ago is over: one more attempt, refused.
    assert_eq!(run.awx(Method::POST, "/api/o/token/").len(), 1);
    let saved = fx::state_of(last_body(&run, Method::PUT, STATE));
    let failure = saved.failure.expect("a failure record");
    assert_eq!(failure.attempts, 4);
    assert!(
        failure.at > start + SignedDuration::from_hours(1),
        "{failure:?}"
    );
    assert_eq!(failure.since, Some(start));
    assert_eq!(
        series(&h, "awx_token_operator_renewal_failing_since"),
        [(FAILING_SINCE.to_string(), unix_seconds(start))]
    );
    assert_eq!(
        series(&h, "awx_token_operator_renewal_failures_total"),
        [(
            "awx_token_operator_renewal_failures_total{reason=\"AwxServerError\"}".into(),
            1.0
        )]
    );
}

// ------------------------------------------------------------------ interrupted requests

/// A token row as AWX lists it at `GET /api/v2/tokens/` (docs/awx-protocol.md#fields).
fn listed(id: u64, application: Option<u64>, created: Timestamp, description: &str) -> Value {
    json!({
        "id": id, "type": "o_auth2_access_token", "user": 7, "application": application,
        "description": description, "scope": "write",
        "created": created.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
    })
}

/// AWX's token list over `rows`, paginated by the request's `page_size` and `page`
/// (docs/awx-protocol.md#pagination). It applies no field filter, as a server that ignores
/// one would: what is deleted must not depend on the filters alone. `refuse` answers every
/// listing with that status instead.
async fn awx_lists(h: &Harness, rows: Vec<Value>, refuse: Option<u16>) {
    Mock::given(method("GET"))
        .and(path("/api/v2/tokens/"))
        .respond_with(move |request: &wiremock::Request| {
            if let Some(status) = refuse {
                return ResponseTemplate::new(status).set_body_json(
                    json!({"detail": "You do not have permission to perform this action."}),
                );
            }
            let param = |name: &str| {
                request
                    .url
                    .query_pairs()
                    .find(|(k, _)| k == name)
                    .and_then(|(_, v)| v.parse::<usize>().ok())
            };
            let size = param("page_size").unwrap_or(25);
            let page = param("page").unwrap_or(1);
            let start = (page - 1) * size;
            if page > 1 && start >= rows.len() {
                return ResponseTemplate::new(404)
                    .set_body_json(json!({"detail": "Invalid page."}));
            }
            let results: Vec<Value> = rows.iter().skip(start).take(size).cloned().collect();
            let next =
                (start + size < rows.len()).then(|| format!("/api/v2/tokens/?page={}", page + 1));
            ResponseTemplate::new(200).set_body_json(json!({
                "count": rows.len(), "next": next, "previous": null, "results": results,
            }))
        })
        .mount(h.awx())
        .await;
    Mock::given(method("DELETE"))
        .respond_with(ResponseTemplate::new(204))
        .mount(h.awx())
        .await;
}

const APP: u64 = 3;

/// A Ready AwxToken whose state holds token 41 and the marker of an untagged password grant
/// of application 3, started `started` ago, whose answer was lost.
async fn interrupted(h: &mut Harness, started: SignedDuration) -> (World, TokenState, Timestamp) {
    let (_, world) = issue_first(h).await;
    h.awx().reset().await;
    let mut state = fx::state_of(&world.state);
    let at = Timestamp::now() - started;
    state.interrupted.push(crate::state::IssueIntent {
        tag: "awxto-00000000000000aa".into(),
        started_at: at,
        personal: false,
        gateway: false,
        refresh: false,
        holder: h.ctx.settings.identity.clone(),
        tagged: false,
        username: Some(fx::USERNAME.into()),
        client_id: Some(fx::CLIENT_ID.into()),
        application: Some(APP),
        clock_offset: Some(0),
        searched: false,
        search_error: None,
        claimed_at: None,
        search_attempts: 0,
        search_after: None,
    });
    (world, state, at)
}

/// One reconcile that looks: an event only when it found something to delete.
async fn search_once(h: &mut Harness, world: &World, state: &TokenState, found: bool) -> Run {
    let mut script = vec![
        get(STATE, Reply::object(state_object(&world.token, state))),
        get(TARGET, Reply::object(world.target.clone())),
        get(CREDENTIALS, Reply::object(fx::credentials())),
        // The claim, then the outcome.
        put(STATE, Reply::stored(false)),
        put(STATE, Reply::stored(false)),
        patch(STATUS, Reply::status_of(&world.token)),
    ];
    if found {
        script.insert(4, post(EVENTS, Reply::stored(true)));
    }
    h.reconcile(&world.token, script).await
}

fn deleted(run: &Run) -> Vec<String> {
    run.timeline()
        .into_iter()
        .filter(|c| c.starts_with("awx DELETE"))
        .collect()
}

#[tokio::test]
async fn an_interrupted_grant_s_token_is_found_by_user_application_and_time_and_deleted() {
    let mut h = Harness::start().await;
    let (world, state, at) = interrupted(&mut h, SignedDuration::from_secs(30)).await;
    let soon = at + SignedDuration::from_secs(1);
    awx_lists(
        &h,
        vec![
            listed(
                41,
                Some(APP),
                soon,
                "awx-token-operator apps/ci-bot [awxto-1]",
            ),
            // Made by the lost request: same user and application, untagged, in the window.
            listed(42, Some(APP), soon, ""),
        ],
        None,
    )
    .await;

    let run = search_once(&mut h, &world, &state, true).await;

    assert_eq!(deleted(&run), ["awx DELETE /api/v2/tokens/42/"]);
    let untagged = run
        .awx(Method::GET, "/api/v2/tokens/")
        .into_iter()
        .find(|c| c.query.contains("created__gte"))
        .expect("a listing by creation time");
    for filter in [
        format!("user__username={}", fx::USERNAME),
        format!("application={APP}"),
        "application__isnull=false".into(),
    ] {
        assert!(
            untagged.query.contains(&filter),
            "{filter} in {}",
            untagged.query
        );
    }
    let delete = &run.awx(Method::DELETE, "/api/v2/tokens/42/")[0];
    assert!(
        delete
            .authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Basic ")),
        "deleted with the user's login"
    );
    assert_eq!(
        last_body(&run, Method::POST, EVENTS)["reason"],
        "InterruptedIssueCleaned"
    );
    // AWX may still be finishing the request: looked for once more, when it cannot be.
    let saved = fx::state_of(last_body(&run, Method::PUT, STATE));
    let marker = &saved.interrupted[0];
    assert!(marker.searched);
    assert_eq!(
        marker.search_after,
        Some(at + SignedDuration::from_secs(120 + 2 * 5))
    );
    assert_eq!(saved.current, state.current, "the held token is untouched");
    let status = last_body(&run, Method::PATCH, STATUS);
    assert_eq!(condition(status, "CleanupPending")["status"], "True");
    assert_eq!(condition(status, "Ready")["status"], "True");
    run.assert_not_leaked(&SECRET_VALUES);
}

#[tokio::test]
async fn an_interrupted_grant_that_created_nothing_deletes_nothing_and_is_done_when_too_late() {
    let mut h = Harness::start().await;
    // Started 10 minutes ago: AWX cannot be finishing it, so one look settles it.
    let (world, state, _) = interrupted(&mut h, SignedDuration::from_mins(10)).await;
    awx_lists(&h, vec![], None).await;

    let run = h
        .reconcile(
            &world.token,
            vec![
                get(STATE, Reply::object(state_object(&world.token, &state))),
                get(TARGET, Reply::object(world.target.clone())),
                get(CREDENTIALS, Reply::object(fx::credentials())),
                put(STATE, Reply::stored(false)),
                put(STATE, Reply::stored(false)),
            ],
        )
        .await;

    assert!(deleted(&run).is_empty());
    assert!(run.kube(Method::POST, EVENTS).is_empty(), "nothing to tell");
    let saved = fx::state_of(last_body(&run, Method::PUT, STATE));
    assert!(saved.interrupted.is_empty(), "the marker is settled");
    // Nothing changed for the status: the token was Ready and no search is left.
    assert_eq!(saved.current, state.current);
}

#[tokio::test]
async fn tokens_of_another_application_personal_or_outside_the_window_are_kept() {
    let mut h = Harness::start().await;
    let (world, state, at) = interrupted(&mut h, SignedDuration::from_secs(30)).await;
    let soon = at + SignedDuration::from_secs(1);
    awx_lists(
        &h,
        vec![
            listed(50, Some(APP + 1), soon, ""),
            listed(51, None, soon, ""),
            listed(52, Some(APP), at - SignedDuration::from_secs(60), ""),
            listed(53, Some(APP), at + SignedDuration::from_secs(600), ""),
            listed(54, Some(APP), soon, "made by a person"),
        ],
        None,
    )
    .await;

    let run = search_once(&mut h, &world, &state, false).await;

    assert!(deleted(&run).is_empty(), "{:?}", deleted(&run));
    let saved = fx::state_of(last_body(&run, Method::PUT, STATE));
    assert!(
        saved.interrupted[0].searched,
        "looked once, once more later"
    );
}

#[tokio::test]
async fn a_refused_listing_keeps_the_marker_and_retries_with_backoff() {
    let mut h = Harness::start().await;
    let (world, state, _) = interrupted(&mut h, SignedDuration::from_secs(30)).await;
    awx_lists(&h, vec![], Some(403)).await;

    let run = h
        .reconcile(
            &world.token,
            vec![
                get(STATE, Reply::object(state_object(&world.token, &state))),
                get(TARGET, Reply::object(world.target.clone())),
                get(CREDENTIALS, Reply::object(fx::credentials())),
                put(STATE, Reply::stored(false)),
                put(STATE, Reply::stored(false)),
                patch(STATUS, Reply::status_of(&world.token)),
            ],
        )
        .await;

    assert!(deleted(&run).is_empty());
    let saved = fx::state_of(last_body(&run, Method::PUT, STATE));
    let marker = &saved.interrupted[0];
    assert!(!marker.searched);
    assert_eq!(marker.search_attempts, 1);
    let after = marker.search_after.expect("a retry time");
    assert!(
        between(
            after,
            Timestamp::now() + SignedDuration::from_secs(2),
            Timestamp::now() + SignedDuration::from_secs(10)
        ),
        "backoff: {after}"
    );
    assert!(
        marker
            .search_error
            .as_deref()
            .is_some_and(|e| e.contains("403")),
        "{:?}",
        marker.search_error
    );
    let status = last_body(&run, Method::PATCH, STATUS);
    let pending = condition(status, "CleanupPending");
    assert_eq!(pending["status"], "True");
    assert_eq!(pending["reason"], "SearchFailing");
    assert_eq!(
        condition(status, "Ready")["status"],
        "True",
        "the Secret still works"
    );
    run.assert_not_leaked(&SECRET_VALUES);
}

#[tokio::test]
async fn the_lost_token_is_found_on_the_second_page() {
    let mut h = Harness::start().await;
    let (world, state, at) = interrupted(&mut h, SignedDuration::from_secs(30)).await;
    let soon = at + SignedDuration::from_secs(1);
    // 200 tokens of other AwxTokens of the same user and application, tagged, then the lost one.
    let mut rows: Vec<Value> = (100..300)
        .map(|id| {
            listed(
                id,
                Some(APP),
                soon,
                &format!("awx-token-operator apps/o{id} [awxto-{id}]"),
            )
        })
        .collect();
    rows.push(listed(300, Some(APP), soon, ""));
    awx_lists(&h, rows, None).await;

    let run = search_once(&mut h, &world, &state, true).await;

    assert_eq!(deleted(&run), ["awx DELETE /api/v2/tokens/300/"]);
    let pages: Vec<String> = run
        .awx(Method::GET, "/api/v2/tokens/")
        .into_iter()
        .filter(|c| c.query.contains("created__gte"))
        .map(|c| c.query.clone())
        .collect();
    assert_eq!(pages.len(), 2, "{pages:?}");
    assert!(pages[1].contains("page=2") && pages[1].contains("page_size=200"));
}

#[tokio::test]
async fn a_lost_token_too_close_to_a_held_one_of_unknown_id_is_kept_and_reported() {
    let mut h = Harness::start().await;
    // The last look (AWX cannot be finishing the request any more).
    let (world, mut state, at) = interrupted(&mut h, SignedDuration::from_mins(10)).await;
    let current = state.current.as_mut().expect("a current token");
    current.token.token_id = None;
    current.issued_at = at + SignedDuration::from_secs(2);
    awx_lists(
        &h,
        vec![listed(42, Some(APP), at + SignedDuration::from_secs(1), "")],
        None,
    )
    .await;

    let run = h
        .reconcile(
            &world.token,
            vec![
                get(STATE, Reply::object(state_object(&world.token, &state))),
                get(TARGET, Reply::object(world.target.clone())),
                get(CREDENTIALS, Reply::object(fx::credentials())),
                put(STATE, Reply::stored(false)),
                post(EVENTS, Reply::stored(true)),
                put(STATE, Reply::stored(false)),
                // The status follows the held token changed above (no id, issue time).
                patch(STATUS, Reply::status_of(&world.token)),
            ],
        )
        .await;

    assert!(deleted(&run).is_empty(), "the held token may be either");
    let event = last_body(&run, Method::POST, EVENTS);
    assert_eq!(event["reason"], "InterruptedIssue");
    assert_eq!(event["type"], "Warning");
    let note = event["note"].as_str().unwrap_or_default();
    assert!(
        note.contains(&format!(
            "AWX token(s) 42 of user {} were created then",
            fx::USERNAME
        )),
        "{note}"
    );
    assert!(!note.contains("  "), "{note}");
    let saved = fx::state_of(last_body(&run, Method::PUT, STATE));
    assert!(saved.interrupted.is_empty(), "reported: nothing more to do");
    run.assert_not_leaked(&SECRET_VALUES);
}

#[tokio::test]
async fn another_process_request_in_flight_is_waited_for_without_a_search_and_reported() {
    let mut h = Harness::start().await;
    let (world, mut state, _) = interrupted(&mut h, SignedDuration::from_secs(30)).await;
    // Another process is asking AWX right now (or was killed while it did).
    let mut other = state.interrupted[0].clone();
    other.holder = "operator-b/0002".into();
    other.started_at = Timestamp::now() - SignedDuration::from_secs(1);
    state.issuing = Some(other);
    awx_lists(&h, vec![listed(42, Some(APP), Timestamp::now(), "")], None).await;
    // A reconcile that only looks and reports.
    let look = |state: &TokenState| {
        vec![
            get(STATE, Reply::object(state_object(&world.token, state))),
            get(TARGET, Reply::object(world.target.clone())),
            get(CREDENTIALS, Reply::object(fx::credentials())),
            patch(STATUS, Reply::status_of(&world.token)),
        ]
    };

    let run = h.reconcile(&world.token, look(&state)).await;

    // Token 42 may be the other request's: nothing is listed, nothing deleted.
    assert!(
        run.timeline().iter().all(|c| !c.starts_with("awx")),
        "{:?}",
        run.timeline()
    );
    let status = last_body(&run, Method::PATCH, STATUS);
    assert_eq!(condition(status, "CleanupPending")["status"], "True");
    assert_eq!(
        condition(status, "CleanupPending")["reason"],
        "SearchPending"
    );
    // Woken when the other request can no longer be in flight (timeout 5 s + 10 s, from a
    // second ago).
    let requeue = fx::requeue_after(run.action()).expect("a requeue");
    assert!(
        (Duration::from_secs(13)..=Duration::from_secs(14)).contains(&requeue),
        "{requeue:?}"
    );

    // Without a lost request of its own, the other process's marker alone says so too.
    state.interrupted.clear();
    let run = h.reconcile(&world.token, look(&state)).await;
    let status = last_body(&run, Method::PATCH, STATUS);
    let pending = condition(status, "CleanupPending");
    assert_eq!(pending["status"], "True");
    assert_eq!(pending["reason"], "RequestInFlight");
    assert!(
        pending["message"]
            .as_str()
            .is_some_and(|m| m.contains("by operator-b/0002 has not recorded its answer")),
        "{pending}"
    );
    assert!(run.timeline().iter().all(|c| !c.starts_with("awx")));
}

/// The refresh of a sign-in succeeds (`access`, `refresh`) and AWX says who signed in.
async fn awx_refreshes_the_sign_in(h: &Harness, access: &str, refresh: &str) {
    awx_issues(h, access, refresh, 36_000).await;
    Mock::given(method("GET"))
        .and(path("/api/v2/me/"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(
                json!({"count": 1, "results": [{"id": 7, "username": fx::USERNAME}]}),
            ),
        )
        .mount(h.awx())
        .await;
}

/// AWX answers 401 to the personal token's creation with the sign-in's access token.
async fn awx_refuses_the_bearer(h: &Harness) {
    Mock::given(method("POST"))
        .and(path("/api/v2/tokens/"))
        .respond_with(
            ResponseTemplate::new(401)
                .set_body_json(json!({"detail": "Authentication credentials were not provided."})),
        )
        .mount(h.awx())
        .await;
}

/// A first reconcile of `token` in which the sign-in is refreshed (to `ACCESS` and
/// `NEW_REFRESH`) and AWX then refuses its access token: it ends in a retryable failure with
/// the sign-in kept in the state.
async fn refused_after_refresh(h: &mut Harness, token: &AwxToken, credentials: &Value) -> Run {
    awx_refreshes_the_sign_in(h, ACCESS, NEW_REFRESH).await;
    awx_refuses_the_bearer(h).await;
    h.reconcile(
        token,
        vec![
            get(STATE, Reply::not_found()),
            get(TARGET, Reply::not_found()),
            get(CREDENTIALS, Reply::object(credentials.clone())),
            // The refreshed pair, then who signed in, the request's marker, the failure.
            post(SECRETS, Reply::stored(true)),
            put(STATE, Reply::stored(false)),
            put(STATE, Reply::stored(false)),
            put(STATE, Reply::stored(false)),
            post(EVENTS, Reply::stored(true)),
            patch(STATUS, Reply::status_of(token)),
        ],
    )
    .await
}

/// A sign-in whose access token AWX refuses although it was just refreshed (the user was
/// disabled, or a person deleted the new token at once) is not left for the next scheduled
/// refresh, weeks away: it is a failure with a backoff, and the attempt after it refreshes the
/// sign-in first.
#[tokio::test]
async fn a_sign_in_refused_right_after_its_refresh_is_retried_after_a_backoff() {
    let mut h = Harness::start().await;
    let (token, credentials) =
        sign_in(&h.awx_url(), "refresh_token", &[("refresh_token", REFRESH)]);
    let run = refused_after_refresh(&mut h, &token, &credentials).await;
    // One refresh and one refused request: the sign-in is not refreshed again at once.
    assert_eq!(run.awx(Method::POST, "/api/o/token/").len(), 1);
    let created = run.awx(Method::POST, "/api/v2/tokens/");
    assert_eq!(created.len(), 1, "{:?}", run.timeline());
    assert_eq!(
        created[0].authorization.as_deref(),
        Some(format!("Bearer {ACCESS}").as_str())
    );
    let saved = fx::state_of(last_body(&run, Method::PUT, STATE));
    let session = saved.session.clone().expect("the sign-in is kept");
    assert_eq!(
        (
            session.refresh_token.to_secret().expose_secret(),
            session.rejected
        ),
        (NEW_REFRESH, true),
        "the rotated refresh token is kept, to be refreshed before the next attempt"
    );
    assert!(saved.issuing.is_none(), "a refused request created nothing");
    let failure = saved.failure.clone().expect("a failure record");
    assert_eq!(
        (failure.reason.as_str(), failure.retryable, failure.attempts),
        ("InvalidCredentials", true, 1)
    );
    let command = format!(
        "awx-token-operator login --url {} --client-id {} --namespace apps --name ci-bot \
         --allow-insecure-http",
        h.awx_url(),
        fx::CLIENT_ID
    );
    assert!(
        failure.message.ends_with(&format!(
            "it is refreshed and tried again after a backoff. If this repeats, check that the \
             user can still sign in to AWX, or sign in again with: {command}"
        )),
        "{}",
        failure.message
    );
    let status = last_body(&run, Method::PATCH, STATUS);
    assert_eq!(condition(status, "Ready")["reason"], "InvalidCredentials");
    let requeue = fx::requeue_after(run.action()).expect("a requeue");
    assert!(
        (Duration::from_secs(4)..=Duration::from_secs(6)).contains(&requeue),
        "the first backoff: {requeue:?}"
    );
    run.assert_not_leaked(&SECRET_VALUES);

    // After the backoff: the sign-in is refreshed first, then the personal token is created
    // with the new access token.
    let mut state = saved;
    if let Some(f) = state.failure.as_mut() {
        f.at = ago(1);
    }
    h.awx().reset().await;
    awx_refreshes_the_sign_in(&h, NEW_ACCESS, OLD_REFRESH).await;
    Mock::given(method("POST"))
        .and(path("/api/v2/tokens/"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({
            "id": 5, "token": OLD_ACCESS, "refresh_token": null, "application": null,
            "scope": "write", "expires": "3025-01-01T00:00:00Z",
        })))
        .mount(h.awx())
        .await;
    let token = fx::with_status(&token, status);
    let run = h
        .reconcile(
            &token,
            vec![
                get(STATE, Reply::object(state_object(&token, &state))),
                get(TARGET, Reply::not_found()),
                get(CREDENTIALS, Reply::object(credentials)),
                // The refreshed pair, the marker, the new token, then the Secret.
                put(STATE, Reply::stored(false)),
                put(STATE, Reply::stored(false)),
                put(STATE, Reply::stored(false)),
                post(EVENTS, Reply::stored(true)),
                patch(TARGET, Reply::stored(false)),
                patch(STATUS, Reply::status_of(&token)),
            ],
        )
        .await;
    let refreshes = run.awx(Method::POST, "/api/o/token/");
    assert_eq!(refreshes.len(), 1, "{:?}", run.timeline());
    assert_eq!(
        refreshes[0].form(),
        form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", NEW_REFRESH),
            ("scope", "write")
        ]),
        "the rotated refresh token from the state"
    );
    let created = run.awx(Method::POST, "/api/v2/tokens/");
    assert_eq!(created.len(), 1, "{:?}", run.timeline());
    assert_eq!(
        created[0].authorization.as_deref(),
        Some(format!("Bearer {NEW_ACCESS}").as_str())
    );
    let saved = fx::state_of(last_body(&run, Method::PUT, STATE));
    assert!(saved.failure.is_none(), "{:?}", saved.failure);
    assert!(!saved.session.expect("the sign-in is kept").rejected);
    assert_eq!(
        fx::secret_data(last_body(&run, Method::PATCH, TARGET), "token"),
        OLD_ACCESS
    );
    let status = last_body(&run, Method::PATCH, STATUS);
    assert_eq!(condition(status, "Ready")["status"], "True");
    run.assert_not_leaked(&SECRET_VALUES);
}

/// A sign-in whose access token a person deleted in AWX: AWX refuses the token, and then fails
/// (500) on every refresh of the pair (docs/awx-protocol.md#delete-token). The failure says to
/// sign in again, with the command, and is retried with a backoff (AWX may just be down).
#[tokio::test]
async fn a_sign_in_whose_access_token_was_deleted_says_to_sign_in_again() {
    let mut h = Harness::start().await;
    let (token, credentials) =
        sign_in(&h.awx_url(), "refresh_token", &[("refresh_token", REFRESH)]);
    // The sign-in's pair from a refresh two hours ago, as the state keeps it.
    let run = refused_after_refresh(&mut h, &token, &credentials).await;
    let mut state = fx::state_of(last_body(&run, Method::PUT, STATE));
    state.failure = None;
    if let Some(s) = state.session.as_mut() {
        s.refreshed_at = ago(2);
        s.rejected = false;
    }

    h.awx().reset().await;
    awx_refuses_the_bearer(&h).await;
    Mock::given(method("POST"))
        .and(path("/api/o/token/"))
        .respond_with(ResponseTemplate::new(500).set_body_string("<h1>Server Error (500)</h1>"))
        .mount(h.awx())
        .await;
    let run = h
        .reconcile(
            &token,
            vec![
                get(STATE, Reply::object(state_object(&token, &state))),
                get(TARGET, Reply::not_found()),
                get(CREDENTIALS, Reply::object(credentials)),
                // The marker; the refused token, to be refreshed; the failed refresh.
                put(STATE, Reply::stored(false)),
                put(STATE, Reply::stored(false)),
                put(STATE, Reply::stored(false)),
                post(EVENTS, Reply::stored(true)),
                patch(STATUS, Reply::status_of(&token)),
            ],
        )
        .await;
    let awx: Vec<String> = run
        .timeline()
        .into_iter()
        .filter(|c| c.starts_with("awx"))
        .collect();
    assert_eq!(
        awx,
        ["awx POST /api/v2/tokens/", "awx POST /api/o/token/"],
        "one refused request, one refresh, and nothing more"
    );
    let saved = fx::state_of(last_body(&run, Method::PUT, STATE));
    assert!(saved.issuing.is_none(), "a refused request created nothing");
    assert!(saved.session.expect("the sign-in is kept").rejected);
    let failure = saved.failure.expect("a failure record");
    assert_eq!(
        (failure.reason.as_str(), failure.retryable),
        ("AwxServerError", true)
    );
    assert!(
        failure.message.ends_with(&format!(
            "; for a sign-in that means signing in again with: awx-token-operator login --url \
             {} --client-id {} --namespace apps --name ci-bot --allow-insecure-http",
            h.awx_url(),
            fx::CLIENT_ID
        )),
        "{}",
        failure.message
    );
    let status = last_body(&run, Method::PATCH, STATUS);
    assert_eq!(condition(status, "Ready")["reason"], "AwxServerError");
    let requeue = fx::requeue_after(run.action()).expect("a requeue");
    assert!(
        (Duration::from_secs(4)..=Duration::from_secs(6)).contains(&requeue),
        "the first backoff: {requeue:?}"
    );
    run.assert_not_leaked(&SECRET_VALUES);
}

/// A sign-in that can no longer be renewed still has an access token AWX keeps alive (for
/// 1000 years by default): it is revoked, with its refresh token, and checked dead.
#[tokio::test]
async fn an_expired_sign_in_s_access_token_is_revoked() {
    let mut h = Harness::start().await;
    let (token, credentials) =
        sign_in(&h.awx_url(), "refresh_token", &[("refresh_token", REFRESH)]);
    // A sign-in in the state, from an earlier run whose token creation AWX refused.
    let run = refused_after_refresh(&mut h, &token, &credentials).await;
    let mut state = fx::state_of(last_body(&run, Method::PUT, STATE));
    if let Some(f) = state.failure.as_mut() {
        f.at = ago(1);
    }

    // Its refresh token expired: the refresh is refused.
    h.awx().reset().await;
    Mock::given(method("POST"))
        .and(path("/api/o/token/"))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            json!({"error": "invalid_grant", "error_description": "Invalid refresh token"}),
        ))
        .mount(h.awx())
        .await;
    Mock::given(method("POST"))
        .and(path("/api/o/revoke_token/"))
        .respond_with(ResponseTemplate::new(200))
        .mount(h.awx())
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v2/me/"))
        .respond_with(
            ResponseTemplate::new(401)
                .set_body_json(json!({"detail": "Authentication credentials were not provided."})),
        )
        .mount(h.awx())
        .await;
    let run = h
        .reconcile(
            &token,
            vec![
                get(STATE, Reply::object(state_object(&token, &state))),
                get(TARGET, Reply::not_found()),
                get(CREDENTIALS, Reply::object(credentials)),
                // The failure, with the pair retired; its revocation.
                put(STATE, Reply::stored(false)),
                post(EVENTS, Reply::stored(true)),
                put(STATE, Reply::stored(false)),
                patch(STATUS, Reply::status_of(&token)),
            ],
        )
        .await;
    let failed = fx::state_of(&run.kube(Method::PUT, STATE)[0].body);
    assert!(failed.session.is_none(), "the sign-in is gone");
    assert_eq!(failed.retiring.len(), 1);
    assert_eq!(
        failed.retiring[0].token.client_id.as_deref(),
        Some(fx::CLIENT_ID),
        "revoked by the application that issued it"
    );
    let revoked = run.awx(Method::POST, "/api/o/revoke_token/");
    assert_eq!(revoked.len(), 1, "{:?}", run.timeline());
    assert_eq!(
        revoked[0].form(),
        form(&[("token", NEW_REFRESH), ("token_type_hint", "refresh_token")]),
        "the refresh token, which takes its access token with it"
    );
    let checked = run.awx(Method::GET, "/api/v2/me/");
    assert_eq!(
        checked.last().and_then(|c| c.authorization.as_deref()),
        Some(format!("Bearer {ACCESS}").as_str()),
        "the access token is checked dead"
    );
    let saved = fx::state_of(last_body(&run, Method::PUT, STATE));
    assert!(saved.retiring.is_empty(), "{:?}", saved.retiring);
    assert_eq!(
        saved
            .failure
            .as_ref()
            .map(|f| (f.reason.as_str(), f.retryable)),
        Some(("SignInExpired", false))
    );
    run.assert_not_leaked(&SECRET_VALUES);
}
