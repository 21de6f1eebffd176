use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use super::*;

// RFC 7636 appendix B.
const RFC7636_OCTETS: [u8; 32] = [
    116, 24, 223, 180, 151, 153, 224, 37, 79, 250, 96, 125, 216, 173, 187, 186, 22, 212, 37, 77,
    105, 214, 191, 240, 91, 88, 5, 88, 83, 132, 141, 121,
];
const RFC7636_VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const RFC7636_CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

const CODE: &str = "Qm7rT2vX9kLpA4sZ8nB1cD5eF3gH6j";
const ACCESS: &str = "Zx8Yw7Vu6Ts5Rq4Po3Nm2Lk1Ji0Hg";
const REFRESH: &str = "Rf5Gh6Jk7Lm8Np9Qr0St1Uv2Wx3Yz4";
const CLIENT_SECRET: &str = "s3cr3t-of-the-application";

fn unreserved(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

fn assert_no_secret(text: &str) {
    for secret in [CODE, ACCESS, REFRESH, CLIENT_SECRET] {
        assert!(!text.contains(secret), "a secret leaked into: {text}");
    }
}

// ---------------------------------------------------------------- PKCE and state

#[test]
fn pkce_pair_matches_the_rfc7636_appendix_b_vector() {
    let pair = PkcePair::from_octets(&RFC7636_OCTETS);
    assert_eq!(pair.verifier.expose_secret(), RFC7636_VERIFIER);
    assert_eq!(pair.challenge, RFC7636_CHALLENGE);
}

#[test]
fn generated_pkce_pairs_are_43_unreserved_characters_and_differ() {
    let a = PkcePair::generate();
    let b = PkcePair::generate();
    for pair in [&a, &b] {
        let verifier = pair.verifier.expose_secret();
        // RFC 7636 §4.1: 43 to 128 characters of [A-Z a-z 0-9 - . _ ~].
        assert_eq!(verifier.len(), 43);
        assert!(unreserved(verifier), "{verifier}");
        assert_eq!(
            pair.challenge,
            URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
        );
    }
    assert_ne!(a.verifier.expose_secret(), b.verifier.expose_secret());
}

#[test]
fn states_are_fresh_and_url_safe() {
    let (a, b) = (new_state(), new_state());
    assert_eq!(a.len(), 43);
    assert!(unreserved(&a));
    assert_ne!(a, b);
}

#[test]
fn constant_time_eq_compares_whole_values() {
    assert!(constant_time_eq(b"abc", b"abc"));
    assert!(!constant_time_eq(b"abc", b"abd"));
    assert!(!constant_time_eq(b"abc", b"ab"));
    assert!(!constant_time_eq(b"", b"a"));
    assert!(constant_time_eq(b"", b""));
}

#[test]
fn authorize_url_names_every_parameter_on_each_flavor() {
    let base = Url::parse("https://example.com/awx/").unwrap();
    let url = authorize_url(
        &base,
        Flavor::Controller,
        "cid",
        "http://127.0.0.1:8400/callback",
        RFC7636_CHALLENGE,
        "st",
        Scope::Write,
    )
    .unwrap();
    assert_eq!(
        url.as_str(),
        "https://example.com/awx/api/o/authorize/?response_type=code&client_id=cid\
         &redirect_uri=http%3A%2F%2F127.0.0.1%3A8400%2Fcallback&scope=read+write&state=st\
         &code_challenge=E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM&code_challenge_method=S256"
    );
    let url = authorize_url(
        &Url::parse("https://gw.example.com/").unwrap(),
        Flavor::Gateway,
        "cid",
        "http://127.0.0.1:8400/callback",
        "ch",
        "st",
        Scope::Read,
    )
    .unwrap();
    assert_eq!(url.path(), "/o/authorize/");
    assert!(url.query().unwrap().contains("&scope=read&"), "{url}");
}

#[test]
fn redirect_uri_is_the_loopback_ip_with_the_port() {
    assert_eq!(redirect_uri(8400), "http://127.0.0.1:8400/callback");
}

// ---------------------------------------------------------------- checking the callback

fn query(text: &str) -> CallbackQuery {
    CallbackQuery::parse(text)
}

#[test]
fn callback_with_matching_state_gives_the_code() {
    let code = callback_outcome(query(&format!("code={CODE}&state=st-1")), "st-1").unwrap();
    assert_eq!(code.expose_secret(), CODE);
}

#[test]
fn callback_with_another_state_is_refused_whatever_else_it_says() {
    for text in [
        format!("code={CODE}&state=st-2"),
        format!("code={CODE}"),
        "error=access_denied&state=st-2".to_string(),
        format!("code={CODE}&state=st-1x"),
        format!("code={CODE}&state="),
    ] {
        let error = callback_outcome(query(&text), "st-1").unwrap_err();
        assert!(
            matches!(error, LoginError::StateMismatch),
            "{text}: {error:?}"
        );
    }
}

#[test]
fn callback_with_access_denied_is_the_user_declining() {
    let error = callback_outcome(query("error=access_denied&state=st"), "st").unwrap_err();
    assert!(matches!(error, LoginError::Denied), "{error:?}");
}

#[test]
fn callback_with_another_error_reports_it_with_its_description() {
    let error = callback_outcome(
        query("error=unauthorized_client&error_description=nope&state=st"),
        "st",
    )
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "AWX refused the sign-in request (unauthorized_client: nope); the application's \
         authorization grant type must be \"Authorization code\""
    );
    let error = callback_outcome(query("error=invalid_request&state=st"), "st").unwrap_err();
    assert_eq!(
        error.to_string(),
        "AWX refused the sign-in request (invalid_request)"
    );
}

#[test]
fn callback_without_code_or_error_is_missing_code() {
    for text in ["state=st", "state=st&code="] {
        let error = callback_outcome(query(text), "st").unwrap_err();
        assert!(
            matches!(error, LoginError::MissingCode),
            "{text}: {error:?}"
        );
    }
}

// ---------------------------------------------------------------- every failure's message

#[test]
fn denied_message_says_the_user_declined() {
    assert_eq!(
        LoginError::Denied.to_string(),
        "you declined the sign-in in the browser (AWX answered access_denied); nothing was \
         written. Run the command again and choose Authorize"
    );
}

#[test]
fn state_mismatch_message_says_the_answer_was_ignored() {
    assert_eq!(
        LoginError::StateMismatch.to_string(),
        "the browser came back with a state that does not belong to this sign-in (an old \
         browser tab, or another program calling the redirect URI); the answer was ignored and \
         nothing was written. Run the command again"
    );
}

#[test]
fn timeout_message_points_at_the_applications_redirect_uris() {
    let error = LoginError::Timeout {
        waited: Duration::from_secs(300),
        redirect_uri: "http://127.0.0.1:8400/callback".into(),
        client_id: "cid".into(),
    };
    assert_eq!(
        error.to_string(),
        "the browser did not come back to http://127.0.0.1:8400/callback within 5m. If the \
         browser showed an AWX error page (\"Mismatching redirect URI\") after you signed in, \
         the redirect URIs of the OAuth2 application cid do not match: they must include \
         exactly http://127.0.0.1:8400/callback (or http://127.0.0.1/callback, which allows \
         any port). Otherwise sign in faster or pass a longer --timeout"
    );
}

#[test]
fn port_taken_message_says_what_to_do() {
    let error = LoginError::PortTaken {
        port: 8400,
        detail: "Address in use".into(),
    };
    assert_eq!(
        error.to_string(),
        "cannot listen on 127.0.0.1:8400 for the browser: the port is in use (Address in use). \
         Stop what uses it, or pass --port with a free port and register \
         http://127.0.0.1:<that port>/callback as a redirect URI of the application"
    );
}

#[test]
fn invalid_client_at_the_token_endpoint_points_at_the_client_flags() {
    let error = LoginError::from_awx(AwxError::InvalidClient {
        at: "POST https://awx.example.com/api/o/token/".into(),
        status: 401,
        description: None,
    });
    assert_eq!(
        error.to_string(),
        "AWX refused the application's credentials at POST https://awx.example.com/api/o/token/ \
         (invalid_client): check --client-id, and --client-secret-file (a confidential \
         application needs its secret, a public one takes none)"
    );
}

#[test]
fn invalid_grant_for_the_code_says_to_sign_in_again() {
    let error = LoginError::from_awx(AwxError::AuthorizationCodeRejected {
        at: "POST https://awx.example.com/api/o/token/".into(),
        status: 400,
        description: None,
    });
    assert_eq!(
        error.to_string(),
        "POST https://awx.example.com/api/o/token/ refused the authorization code (HTTP 400, \
         invalid_grant): the code was used already or expired (AWX keeps a code 10 minutes), \
         or it was issued to another application, or the PKCE code verifier does not match; \
         sign in again"
    );
}

#[test]
fn tls_failure_points_at_the_ca_bundle_flag() {
    let error = LoginError::from_awx(AwxError::TlsError {
        at: "GET https://awx.example.com/api/gateway/v1/".into(),
        host: "awx.example.com".into(),
        detail: "invalid peer certificate: UnknownIssuer".into(),
    });
    assert_eq!(
        error.to_string(),
        "TLS connection to awx.example.com failed: invalid peer certificate: UnknownIssuer; \
         pass --ca-bundle with the CA certificate that signed AWX's certificate, and check that \
         the host name in --url is one the certificate names"
    );
}

#[test]
fn awx_token_refused_by_an_old_crd_says_to_upgrade_and_that_the_secret_exists() {
    let error = LoginError::WriteAwxToken {
        namespace: "apps".into(),
        name: "awx".into(),
        secret: "awx-sign-in".into(),
        detail: "Unsupported value: \"AuthorizationCode\"".into(),
        unsupported: true,
    };
    assert_eq!(
        error.to_string(),
        "could not write the AwxToken apps/awx: Unsupported value: \"AuthorizationCode\" (the \
         cluster's AwxToken CustomResourceDefinition does not accept grant type \
         AuthorizationCode: install an awx-token-operator release that supports it). The \
         credentials Secret apps/awx-sign-in was written; run the command again once this is \
         fixed"
    );
}

#[test]
fn http_url_is_refused_without_the_flag() {
    assert_eq!(
        LoginError::InsecureUrl {
            url: "http://awx.example.com/".into()
        }
        .to_string(),
        "--url http://awx.example.com/ uses http://: the authorization code and the tokens \
         would cross the network unencrypted. Use https://, or pass --allow-insecure-http"
    );
}

#[test]
fn durations_read_as_the_flags_are_written() {
    assert_eq!(human_duration(Duration::from_secs(300)), "5m");
    assert_eq!(human_duration(Duration::from_secs(90)), "1m30s");
    assert_eq!(human_duration(Duration::from_secs(5400)), "1h30m");
    assert_eq!(human_duration(Duration::from_millis(50)), "50ms");
}

// ---------------------------------------------------------------- the loopback listener

fn http() -> reqwest::Client {
    // Plain HTTP to the loopback listener; reqwest still wants a crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_port_in_use_is_port_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let error = CallbackListener::bind(port).await.err().unwrap();
    assert!(
        matches!(error, LoginError::PortTaken { port: p, .. } if p == port),
        "{error:?}"
    );
}

#[tokio::test]
async fn the_callback_returns_the_code_and_tells_the_browser_it_is_done() {
    let listener = CallbackListener::bind(0).await.unwrap();
    let base = format!("http://127.0.0.1:{}", listener.port());
    assert_eq!(listener.redirect_uri(), format!("{base}/callback"));
    let waiting =
        tokio::spawn(async move { listener.wait("st-ok", Duration::from_secs(60), "cid").await });
    // Other paths (a browser asks for /favicon.ico) do not count.
    let other = http()
        .get(format!("{base}/favicon.ico"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    let page = http()
        .get(format!("{base}/callback?code={CODE}&state=st-ok"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let text = page.text().await.unwrap();
    assert!(text.contains("<h1>Signed in</h1>"), "{text}");
    assert_no_secret(&text);
    let code = waiting.await.unwrap().unwrap();
    assert_eq!(code.expose_secret(), CODE);
}

#[tokio::test]
async fn a_declined_sign_in_ends_the_wait_with_denied() {
    let listener = CallbackListener::bind(0).await.unwrap();
    let url = format!(
        "http://127.0.0.1:{}/callback?error=access_denied&state=st",
        listener.port()
    );
    let waiting =
        tokio::spawn(async move { listener.wait("st", Duration::from_secs(60), "cid").await });
    let page = http().get(url).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("Sign-in declined"));
    let error = waiting.await.unwrap().unwrap_err();
    assert!(matches!(error, LoginError::Denied), "{error:?}");
}

#[tokio::test]
async fn a_callback_with_a_foreign_state_ends_the_wait_with_state_mismatch() {
    let listener = CallbackListener::bind(0).await.unwrap();
    let url = format!(
        "http://127.0.0.1:{}/callback?code={CODE}&state=not-ours",
        listener.port()
    );
    let waiting =
        tokio::spawn(async move { listener.wait("ours", Duration::from_secs(60), "cid").await });
    let page = http().get(url).send().await.unwrap();
    assert_eq!(page.status(), 400);
    let error = waiting.await.unwrap().unwrap_err();
    assert!(matches!(error, LoginError::StateMismatch), "{error:?}");
}

#[tokio::test(start_paused = true)]
async fn no_callback_within_the_timeout_is_a_timeout_naming_the_redirect_uri() {
    let listener = CallbackListener::bind(0).await.unwrap();
    let redirect = listener.redirect_uri();
    let error = listener
        .wait("st", Duration::from_secs(300), "cid")
        .await
        .unwrap_err();
    match error {
        LoginError::Timeout {
            waited,
            redirect_uri,
            client_id,
        } => {
            assert_eq!(waited, Duration::from_secs(300));
            assert_eq!(redirect_uri, redirect);
            assert_eq!(client_id, "cid");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn only_the_first_callback_is_heard() {
    let (sender, mut receiver) = oneshot::channel();
    let shared = Arc::new(CallbackState {
        expected_state: "st".into(),
        reply: std::sync::Mutex::new(Some(sender)),
    });
    let first = callback(
        State(shared.clone()),
        format!("/callback?code={CODE}&state=st").parse().unwrap(),
    )
    .await;
    assert_eq!(first.status(), 200);
    let second = callback(
        State(shared),
        "/callback?code=another&state=st".parse().unwrap(),
    )
    .await;
    assert_eq!(second.status(), 410);
    let heard = receiver.try_recv().unwrap().unwrap();
    assert_eq!(heard.expose_secret(), CODE);
}

// ---------------------------------------------------------------- the exchange

fn credentials(secret: Option<&str>) -> ClientCredentials {
    ClientCredentials {
        client_id: "cid".into(),
        client_secret: secret.map(|s| SecretString::from(s.to_owned())),
    }
}

fn client_for(server: &MockServer) -> AwxClient {
    AwxClient::new(
        Endpoint {
            base_url: Url::parse(&server.uri()).unwrap(),
            ca_bundle_pem: None,
            insecure_skip_tls_verify: false,
            timeout: Duration::from_secs(10),
        },
        RequestLimits::default(),
        None,
    )
    .unwrap()
}

/// Plays the browser: follows the authorize URL's redirect_uri back with `answer(state)`.
fn browser_answering(answer: impl FnOnce(&str) -> String + Send + 'static) -> Browser {
    Browser::Driver(Box::new(move |url: Url| {
        let pairs: std::collections::HashMap<String, String> =
            url.query_pairs().into_owned().collect();
        let target = format!("{}?{}", pairs["redirect_uri"], answer(&pairs["state"]));
        tokio::spawn(async move {
            let _ = http().get(target).send().await;
        });
    }))
}

fn form_of(request: &Request) -> std::collections::HashMap<String, String> {
    url::form_urlencoded::parse(&request.body)
        .into_owned()
        .collect()
}

#[tokio::test]
async fn sign_in_exchanges_the_code_with_the_verifier_of_the_challenge() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/o/token/"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": ACCESS, "refresh_token": REFRESH, "expires_in": 31536000000u64,
            "token_type": "Bearer", "scope": "read write"
        })))
        .expect(1)
        .mount(&server)
        .await;
    let seen_url = Arc::new(Mutex::new(None::<Url>));
    let seen = seen_url.clone();
    let browser = Browser::Driver(Box::new(move |url: Url| {
        *seen.lock().unwrap() = Some(url.clone());
        let pairs: std::collections::HashMap<String, String> =
            url.query_pairs().into_owned().collect();
        let target = format!(
            "{}?code={CODE}&state={}",
            pairs["redirect_uri"], pairs["state"]
        );
        tokio::spawn(async move {
            let _ = http().get(target).send().await;
        });
    }));
    let listener = CallbackListener::bind(0).await.unwrap();
    let redirect = listener.redirect_uri();
    let mut lines = Vec::new();
    let exchanged = sign_in(
        &client_for(&server),
        FlavorArg::Controller,
        &credentials(Some(CLIENT_SECRET)),
        listener,
        browser,
        Duration::from_secs(60),
        Scope::Write,
        &mut |line| lines.push(line),
    )
    .await
    .unwrap();
    assert_eq!(exchanged.flavor, Flavor::Controller);
    assert_eq!(exchanged.refresh_token.expose_secret(), REFRESH);
    assert_eq!(exchanged.scope, "read write");

    let url = seen_url.lock().unwrap().clone().unwrap();
    let pairs: std::collections::HashMap<String, String> = url.query_pairs().into_owned().collect();
    assert_eq!(url.path(), "/api/o/authorize/");
    assert_eq!(pairs["redirect_uri"], redirect);
    assert_eq!(pairs["code_challenge_method"], "S256");
    let requests = server.received_requests().await.unwrap();
    let form = form_of(&requests[0]);
    assert_eq!(form["grant_type"], "authorization_code");
    assert_eq!(form["code"], CODE);
    assert_eq!(form["redirect_uri"], redirect);
    assert_eq!(
        URL_SAFE_NO_PAD.encode(Sha256::digest(form["code_verifier"].as_bytes())),
        pairs["code_challenge"]
    );
    assert!(!form.contains_key("client_id"), "confidential: Basic auth");
    assert!(
        requests[0]
            .headers
            .get("authorization")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("Basic ")
    );
    for line in &lines {
        assert_no_secret(line);
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("Listening for the browser on {redirect}"))),
        "{lines:?}"
    );
}

#[tokio::test]
async fn sign_in_detects_the_gateway_and_names_a_public_client_in_the_body() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/gateway/v1/"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"tokens": "x"})))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/o/token/"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({
            "access_token": ACCESS, "refresh_token": REFRESH, "expires_in": 31536000,
            "token_type": "Bearer", "scope": "read"
        })))
        .expect(1)
        .mount(&server)
        .await;
    let exchanged = sign_in(
        &client_for(&server),
        FlavorArg::Auto,
        &credentials(None),
        CallbackListener::bind(0).await.unwrap(),
        browser_answering(|state| format!("code={CODE}&state={state}")),
        Duration::from_secs(60),
        Scope::Read,
        &mut |_| {},
    )
    .await
    .unwrap();
    assert_eq!(exchanged.flavor, Flavor::Gateway);
    let requests = server.received_requests().await.unwrap();
    let token_request = requests
        .iter()
        .find(|r| r.url.path() == "/o/token/")
        .unwrap();
    assert_eq!(form_of(token_request)["client_id"], "cid");
    assert!(token_request.headers.get("authorization").is_none());
}

async fn exchange_failure(answer: ResponseTemplate) -> LoginError {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/o/token/"))
        .respond_with(answer)
        .mount(&server)
        .await;
    sign_in(
        &client_for(&server),
        FlavorArg::Controller,
        &credentials(Some(CLIENT_SECRET)),
        CallbackListener::bind(0).await.unwrap(),
        browser_answering(|state| format!("code={CODE}&state={state}")),
        Duration::from_secs(60),
        Scope::Write,
        &mut |_| {},
    )
    .await
    .err()
    .unwrap()
}

#[tokio::test]
async fn a_rejected_code_is_code_rejected() {
    let error = exchange_failure(
        ResponseTemplate::new(400).set_body_json(json!({"error": "invalid_grant"})),
    )
    .await;
    assert!(matches!(error, LoginError::CodeRejected(_)), "{error:?}");
    assert!(error.to_string().contains("refused the authorization code"));
    assert_no_secret(&error.to_string());
}

#[tokio::test]
async fn rejected_client_credentials_are_client_rejected() {
    let error = exchange_failure(
        ResponseTemplate::new(401).set_body_json(json!({"error": "invalid_client"})),
    )
    .await;
    assert!(
        matches!(error, LoginError::ClientRejected { .. }),
        "{error:?}"
    );
    assert_no_secret(&error.to_string());
}

#[tokio::test]
async fn an_answer_without_refresh_token_is_refused() {
    let error = exchange_failure(ResponseTemplate::new(200).set_body_json(json!({
        "access_token": ACCESS, "expires_in": 36000, "token_type": "Bearer", "scope": "write"
    })))
    .await;
    assert!(matches!(error, LoginError::NoRefreshToken), "{error:?}");
}

#[tokio::test]
async fn a_declined_sign_in_makes_no_token_request() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .expect(0)
        .mount(&server)
        .await;
    let error = sign_in(
        &client_for(&server),
        FlavorArg::Controller,
        &credentials(Some(CLIENT_SECRET)),
        CallbackListener::bind(0).await.unwrap(),
        browser_answering(|state| format!("error=access_denied&state={state}")),
        Duration::from_secs(60),
        Scope::Write,
        &mut |_| {},
    )
    .await
    .err()
    .unwrap();
    assert!(matches!(error, LoginError::Denied), "{error:?}");
}

// ---------------------------------------------------------------- the cluster objects

fn signed_in(secret: Option<&str>, ca: bool) -> SignIn {
    SignIn {
        namespace: "apps".into(),
        name: "awx".into(),
        url: Url::parse("https://awx.example.com/").unwrap(),
        flavor: Flavor::Controller,
        scope: Scope::Write,
        client_id: "cid".into(),
        client_secret: secret.map(|s| SecretString::from(s.to_owned())),
        refresh_token: SecretString::from(REFRESH.to_owned()),
        refresh_token_issued_at: "2026-12-02T13:00:00Z".parse().unwrap(),
        ca_bundle_pem: ca.then(|| b"-----BEGIN CERTIFICATE-----\n".to_vec()),
        allow_insecure_http: false,
    }
}

#[test]
fn credentials_secret_holds_the_refresh_token_and_client_credentials_only() {
    assert_eq!(
        credentials_secret(&signed_in(Some(CLIENT_SECRET), false)),
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": "awx-sign-in",
                "namespace": "apps",
                "labels": {"app.kubernetes.io/managed-by": "awx-token-operator-login"},
                "annotations": {
                    "awx-token-operator.io/refresh-token-issued-at": "2026-12-02T13:00:00Z"
                },
            },
            "type": "Opaque",
            "stringData": {
                "client_id": "cid",
                "client_secret": CLIENT_SECRET,
                "refresh_token": REFRESH,
            },
        })
    );
    let public = credentials_secret(&signed_in(None, true));
    assert_eq!(
        public["stringData"],
        json!({"client_id": "cid", "refresh_token": REFRESH,
               "ca.crt": "-----BEGIN CERTIFICATE-----\n"})
    );
}

#[test]
fn awx_token_uses_the_authorization_code_grant_with_the_credentials_secret() {
    assert_eq!(
        awx_token(&signed_in(Some(CLIENT_SECRET), false)),
        json!({
            "apiVersion": "awx-token-operator.io/v1alpha1",
            "kind": "AwxToken",
            "metadata": {"name": "awx", "namespace": "apps"},
            "spec": {
                "awx": {"url": "https://awx.example.com", "flavor": "Controller"},
                "grant": {
                    "type": "AuthorizationCode",
                    "credentialsSecretRef": {
                        "name": "awx-sign-in",
                        "clientIdKey": "client_id",
                        "clientSecretKey": "client_secret",
                        "refreshTokenKey": "refresh_token",
                    },
                    "scope": "write",
                },
            },
        })
    );
    let mut with_ca = signed_in(None, true);
    with_ca.allow_insecure_http = true;
    let token = awx_token(&with_ca);
    assert_eq!(
        token["spec"]["awx"],
        json!({"url": "https://awx.example.com", "flavor": "Controller",
               "caBundleSecretRef": {"name": "awx-sign-in", "key": "ca.crt"},
               "allowInsecureHttp": true})
    );
    assert_no_secret(&token.to_string());
}

// ---------------------------------------------------------------- the cluster write

type ApiHandle =
    tower_test::mock::Handle<http::Request<kube::client::Body>, http::Response<kube::client::Body>>;

/// One request the mocked API server saw: method, path and query, body.
struct Seen {
    method: String,
    target: String,
    body: Value,
}

/// Answers each request with the next of `answers` (status, body) and reports what it saw.
fn api_server(answers: Vec<(u16, Value)>) -> (kube::Client, tokio::task::JoinHandle<Vec<Seen>>) {
    let (service, mut handle): (_, ApiHandle) = tower_test::mock::pair();
    let client = kube::Client::new(service, "default");
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        for (status, answer) in answers {
            let Some((request, respond)) = handle.next_request().await else {
                break;
            };
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            seen.push(Seen {
                method: parts.method.to_string(),
                target: parts.uri.path_and_query().unwrap().to_string(),
                body: serde_json::from_slice(&bytes).unwrap(),
            });
            respond.send_response(
                http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(answer.to_string().into_bytes()))
                    .unwrap(),
            );
        }
        seen
    });
    (client, server)
}

#[tokio::test]
async fn the_secret_then_the_awx_token_are_server_side_applied() {
    let sign_in = signed_in(Some(CLIENT_SECRET), false);
    let (client, server) = api_server(vec![
        (200, credentials_secret(&sign_in)),
        (200, awx_token(&sign_in)),
    ]);
    write_to_cluster(client, &sign_in).await.unwrap();
    let seen = server.await.unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].method, "PATCH");
    assert_eq!(
        seen[0].target,
        "/api/v1/namespaces/apps/secrets/awx-sign-in?&force=true&fieldManager=awx-token-operator-login"
    );
    assert_eq!(seen[0].body, credentials_secret(&sign_in));
    assert_eq!(seen[1].method, "PATCH");
    assert_eq!(
        seen[1].target,
        "/apis/awx-token-operator.io/v1alpha1/namespaces/apps/awxtokens/awx?&force=true&fieldManager=awx-token-operator-login"
    );
    assert_eq!(seen[1].body, awx_token(&sign_in));
}

#[tokio::test]
async fn an_awx_token_the_crd_refuses_is_reported_as_unsupported_after_the_secret() {
    let sign_in = signed_in(Some(CLIENT_SECRET), false);
    let refusal = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "AwxToken.awx-token-operator.io \"awx\" is invalid: spec.grant.type: Unsupported value: \"AuthorizationCode\"",
        "reason": "Invalid", "code": 422
    });
    let (client, server) = api_server(vec![(200, credentials_secret(&sign_in)), (422, refusal)]);
    let error = write_to_cluster(client, &sign_in).await.unwrap_err();
    assert_eq!(server.await.unwrap().len(), 2);
    match &error {
        LoginError::WriteAwxToken {
            namespace,
            name,
            secret,
            unsupported,
            ..
        } => {
            assert_eq!(
                (namespace.as_str(), name.as_str(), secret.as_str()),
                ("apps", "awx", "awx-sign-in")
            );
            assert!(unsupported);
        }
        other => panic!("{other:?}"),
    }
    assert_no_secret(&error.to_string());
}

#[tokio::test]
async fn a_tls_handshake_failure_is_reported_with_the_ca_bundle_flag() {
    // A plain HTTP server behind an https:// URL: the handshake fails.
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = plain.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        for mut stream in plain.incoming().flatten() {
            let mut buffer = [0u8; 1024];
            let _ = stream.read(&mut buffer);
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = AwxClient::new(
        Endpoint {
            base_url: Url::parse(&format!("https://{address}/")).unwrap(),
            ca_bundle_pem: None,
            insecure_skip_tls_verify: false,
            timeout: Duration::from_secs(10),
        },
        RequestLimits::default(),
        None,
    )
    .unwrap();
    let error = sign_in(
        &client,
        FlavorArg::Auto,
        &credentials(None),
        CallbackListener::bind(0).await.unwrap(),
        Browser::Print,
        Duration::from_secs(60),
        Scope::Write,
        &mut |_| {},
    )
    .await
    .err()
    .unwrap();
    assert!(matches!(error, LoginError::Tls { .. }), "{error:?}");
    assert!(error.to_string().contains("pass --ca-bundle"), "{error}");
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    login: LoginArgs,
}

fn args(extra: &[&str]) -> LoginArgs {
    use clap::Parser as _;
    let mut argv = vec!["login", "--client-id", "cid", "--name", "awx"];
    argv.extend_from_slice(extra);
    Cli::try_parse_from(argv).unwrap().login
}

#[test]
fn flags_have_the_documented_defaults() {
    let parsed = args(&["--url", "https://awx.example.com"]);
    assert_eq!(parsed.port, 8400);
    assert_eq!(parsed.timeout, Duration::from_secs(300));
    assert_eq!(parsed.flavor, FlavorArg::Auto);
    assert_eq!(parsed.scope, ScopeArg::Write);
    assert!(!parsed.no_browser && !parsed.allow_insecure_http);
    assert!(parsed.client_secret_file.is_none() && parsed.namespace.is_none());
}

#[tokio::test]
async fn an_http_url_is_refused_before_anything_else_happens() {
    let error = run(args(&["--url", "http://awx.example.com"]))
        .await
        .unwrap_err();
    assert!(matches!(error, LoginError::InsecureUrl { .. }), "{error:?}");
}

#[tokio::test]
async fn an_unreadable_client_secret_file_is_named() {
    let error = run(args(&[
        "--url",
        "https://awx.example.com",
        "--client-secret-file",
        "/nonexistent/secret",
    ]))
    .await
    .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("cannot read --client-secret-file /nonexistent/secret: "),
        "{error}"
    );
}
