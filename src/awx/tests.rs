//! Behaviour of the client against mocked AWX and gateway servers. Answers are the ones
//! docs/awx-protocol.md records, status, body and headers alike.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use wiremock::matchers::{
    any, basic_auth, bearer_token, body_json, body_string, body_string_contains, header, method,
    path,
};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use super::*;

const USERNAME: &str = "svc-k8s";
const PASSWORD: &str = "Us3rPassw0rdSECRET";
const CLIENT_ID: &str = "CLIENTID123";
const CLIENT_SECRET: &str = "CliEntS3cretSECRET";
const ACCESS: &str = "Qm7rT2vX9kLpA4sZ8nB1cD5eF3gH6j";
const REFRESH: &str = "Zx8Yw7Vu6Ts5Rq4Po3Nm2Lk1Ji0Hg";
const SECRETS: [&str; 4] = [PASSWORD, CLIENT_SECRET, ACCESS, REFRESH];

/// AWX's answer to a dead token (docs/awx-protocol.md#verify).
const AWX_401_DETAIL: &str = "Authentication credentials were not provided. To establish a login session, visit /api/login/.";
const AWX_401_CHALLENGE: &str = "Bearer realm=api authorization_url=/api/o/authorize/";

const TEST_CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBsDCCAVegAwIBAgIUE84hqOUpBv2xxyEVOTir7wcWO8QwCgYIKoZIzj0EAwIw
JTEjMCEGA1UEAwwaYXd4LXRva2VuLW9wZXJhdG9yIHRlc3QgQ0EwIBcNMjYxMTI3
MjMwOTEyWhgPMjEyNjExMDMyMzA5MTJaMCUxIzAhBgNVBAMMGmF3eC10b2tlbi1v
cGVyYXRvciB0ZXN0IENBMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE4esRqNuy
0C/2uZXFm6S6O+p065ZfGByiaC2eXV49wawBvVIazMnL+y9/HF1Rej5SwMs/xlUY
uDQHLbtZ4PQfiaNjMGEwHQYDVR0OBBYEFDobvR+aqkyEJSxwinfkXyUbffLiMB8G
A1UdIwQYMBaAFDobvR+aqkyEJSxwinfkXyUbffLiMA8GA1UdEwEB/wQFMAMBAf8w
DgYDVR0PAQH/BAQDAgEGMAoGCCqGSM49BAMCA0cAMEQCIDIvawDiTJqv+QzA8PS4
vMz1wqHvlshon8uvn53xxrBgAiA48DUf+hQhaNrPOs96IXi7WanhBoiaik+WlY3y
1LiTVA==
-----END CERTIFICATE-----
";

/// Signed by `TEST_CA_PEM`, for IP 127.0.0.1 and localhost, valid 2020 to 2120.
const TEST_SERVER_CERT_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBvTCCAWSgAwIBAgICEAAwCgYIKoZIzj0EAwIwJTEjMCEGA1UEAwwaYXd4LXRv
a2VuLW9wZXJhdG9yIHRlc3QgQ0EwIBcNMjAwMTAxMDAwMDAwWhgPMjEyMDAxMDEw
MDAwMDBaMBQxEjAQBgNVBAMMCTEyNy4wLjAuMTBZMBMGByqGSM49AgEGCCqGSM49
AwEHA0IABDhp+knD1iaWQdPXMsw337iRJWk8apD3mGpofwBCzg69q7+aT5116G+o
ZnWylh26kZjGVOCbJI3U3U/EQLq/tRmjgZIwgY8wDAYDVR0TAQH/BAIwADAOBgNV
HQ8BAf8EBAMCB4AwEwYDVR0lBAwwCgYIKwYBBQUHAwEwGgYDVR0RBBMwEYcEfwAA
AYIJbG9jYWxob3N0MB0GA1UdDgQWBBQkuxS8nQSyhisBNjwUs34gKxLxjzAfBgNV
HSMEGDAWgBQ6G70fmqpMhCUscIp35F8lG33y4jAKBggqhkjOPQQDAgNHADBEAiBR
Dso060HXr07hz3BGgFZ5MMxigYM2lcxtJhrnz7a3GgIgeO0ZL2XNceHlBmOxXmq/
x70xy9XXv/xm6rmpFnwPNv0=
-----END CERTIFICATE-----
";

const TEST_SERVER_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgGD4h4FyeAa1S4P6N
AZzzyMZphUWpzmebHMWfDBluR0ehRANCAAQ4afpJw9YmlkHT1zLMN9+4kSVpPGqQ
95hqaH8AQs4Ovau/mk+ddehvqGZ1spYdupGYxlTgmySN1N1PxEC6v7UZ
-----END PRIVATE KEY-----
";

// ---------------------------------------------------------------- helpers

fn endpoint_for(base: &str) -> Endpoint {
    Endpoint {
        base_url: base.parse().unwrap(),
        ca_bundle_pem: None,
        insecure_skip_tls_verify: false,
        timeout: Duration::from_secs(5),
    }
}

fn client_for(server: &MockServer) -> AwxClient {
    AwxClient::new(endpoint_for(&server.uri()), RequestLimits::default(), None).unwrap()
}

fn confidential_client() -> ClientCredentials {
    ClientCredentials {
        client_id: CLIENT_ID.to_owned(),
        client_secret: Some(SecretString::from(CLIENT_SECRET)),
    }
}

fn public_client() -> ClientCredentials {
    ClientCredentials {
        client_id: CLIENT_ID.to_owned(),
        client_secret: None,
    }
}

fn password_grant(client: ClientCredentials) -> TokenGrant {
    TokenGrant::Password {
        client,
        username: USERNAME.to_owned(),
        password: SecretString::from(PASSWORD),
    }
}

fn personal_grant() -> TokenGrant {
    TokenGrant::PersonalAccessToken {
        username: USERNAME.to_owned(),
        password: SecretString::from(PASSWORD),
        description: "AwxToken default/ci-bot".to_owned(),
    }
}

fn access() -> SecretString {
    SecretString::from(ACCESS)
}

fn refresh_token() -> SecretString {
    SecretString::from(REFRESH)
}

fn token_answer(status: u16, expires_in: u64) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .insert_header("Cache-Control", "no-store")
        .set_body_json(json!({
            "access_token": ACCESS, "expires_in": expires_in, "token_type": "Bearer",
            "scope": "write", "refresh_token": REFRESH,
        }))
}

fn oauth_error(status: u16, error: &str, description: Option<&str>) -> ResponseTemplate {
    let body = match description {
        Some(d) => json!({"error": error, "error_description": d}),
        None => json!({"error": error}),
    };
    ResponseTemplate::new(status).set_body_json(body)
}

fn html(status: u16, body: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_raw(body.to_owned(), "text/html; charset=utf-8")
}

fn me_answer() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({
        "count": 1, "next": null, "previous": null,
        "results": [{"id": 7, "type": "user", "username": USERNAME}],
    }))
}

fn dead_token_answer() -> ResponseTemplate {
    ResponseTemplate::new(401)
        .insert_header("WWW-Authenticate", AWX_401_CHALLENGE)
        .set_body_json(json!({"detail": AWX_401_DETAIL}))
}

fn no_authorization_header(request: &Request) -> bool {
    !request.headers.contains_key("authorization")
}

fn no_query_string(request: &Request) -> bool {
    request.url.query().is_none()
}

fn assert_no_secret(text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "a secret leaked into: {text}");
    }
}

/// Checks what every error must satisfy, and returns its message.
fn checked(error: &AwxError) -> String {
    let message = error.to_string();
    assert_no_secret(&message);
    assert_no_secret(&format!("{error:?}"));
    message
}

fn within(actual: Timestamp, earliest: Timestamp, latest: Timestamp) -> bool {
    earliest <= actual && actual <= latest
}

#[derive(Default)]
struct RecordingObserver {
    seen: Mutex<Vec<(&'static str, Option<u16>)>>,
}

impl RequestObserver for RecordingObserver {
    fn observe(&self, endpoint: &'static str, status: Option<u16>, _elapsed: Duration) {
        self.seen.lock().unwrap().push((endpoint, status));
    }
}

// ---------------------------------------------------------------- issue: success

#[tokio::test]
async fn password_grant_on_controller_posts_a_form_with_basic_client_auth() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/o/token/"))
        .and(basic_auth(CLIENT_ID, CLIENT_SECRET))
        .and(header("content-type", "application/x-www-form-urlencoded"))
        .and(header("accept", "application/json"))
        .and(header(
            "user-agent",
            concat!("awx-token-operator/", env!("CARGO_PKG_VERSION")),
        ))
        .and(body_string(format!(
            "grant_type=password&username={USERNAME}&password={PASSWORD}&scope=write"
        )))
        .and(no_query_string)
        .respond_with(token_answer(200, 36000))
        .expect(1)
        .mount(&server)
        .await;

    let before = Timestamp::now();
    let token = client_for(&server)
        .issue(
            Flavor::Controller,
            &password_grant(confidential_client()),
            Scope::Write,
        )
        .await
        .unwrap();
    let after = Timestamp::now();

    assert_eq!(token.access_token.expose_secret(), ACCESS);
    assert_eq!(
        token.refresh_token.as_ref().map(|r| r.expose_secret()),
        Some(REFRESH)
    );
    assert_eq!(token.scope, "write");
    assert_eq!(token.kind, TokenKind::Application);
    assert_eq!(token.user.as_deref(), Some(USERNAME));
    assert_eq!(token.token_id, None);
    let ttl = SignedDuration::from_secs(36000);
    assert!(within(token.expires_at.unwrap(), before + ttl, after + ttl));
}

#[tokio::test]
async fn password_grant_on_gateway_uses_o_token_and_accepts_201() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/o/token/"))
        .and(basic_auth(CLIENT_ID, CLIENT_SECRET))
        .and(body_string_contains("grant_type=password"))
        .respond_with(token_answer(201, 31_536_000))
        .expect(1)
        .mount(&server)
        .await;

    let token = client_for(&server)
        .issue(
            Flavor::Gateway,
            &password_grant(confidential_client()),
            Scope::Write,
        )
        .await
        .unwrap();
    assert_eq!(token.access_token.expose_secret(), ACCESS);
}

#[tokio::test]
async fn base_url_path_prefix_is_kept_with_or_without_trailing_slash() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/awx/api/o/token/"))
        .respond_with(token_answer(200, 60))
        .expect(2)
        .mount(&server)
        .await;

    for base in [
        format!("{}/awx", server.uri()),
        format!("{}/awx/", server.uri()),
    ] {
        let client = AwxClient::new(endpoint_for(&base), RequestLimits::default(), None).unwrap();
        assert_eq!(client.base_url().path(), "/awx/");
        client
            .issue(
                Flavor::Controller,
                &password_grant(confidential_client()),
                Scope::Read,
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn public_client_names_itself_in_the_body_and_sends_no_basic_auth() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/o/token/"))
        .and(no_authorization_header)
        .and(body_string_contains(format!("client_id={CLIENT_ID}")))
        .respond_with(token_answer(200, 60))
        .expect(1)
        .mount(&server)
        .await;

    client_for(&server)
        .issue(
            Flavor::Controller,
            &password_grant(public_client()),
            Scope::Write,
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn client_secret_is_form_encoded_inside_basic_auth() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/o/token/"))
        .and(basic_auth("id%3Awith+space", "s%40cret%2F%3D"))
        .respond_with(token_answer(200, 60))
        .expect(1)
        .mount(&server)
        .await;

    let client = ClientCredentials {
        client_id: "id:with space".to_owned(),
        client_secret: Some(SecretString::from("s@cret/=")),
    };
    client_for(&server)
        .issue(Flavor::Controller, &password_grant(client), Scope::Write)
        .await
        .unwrap();
}

#[tokio::test]
async fn thousand_year_expires_in_gives_an_expiry_in_the_31st_century() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/o/token/"))
        .respond_with(token_answer(200, 31_536_000_000))
        .mount(&server)
        .await;

    let token = client_for(&server)
        .issue(
            Flavor::Controller,
            &password_grant(confidential_client()),
            Scope::Write,
        )
        .await
        .unwrap();
    let year = token
        .expires_at
        .unwrap()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .year();
    let now_year = Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC).year();
    assert!((now_year + 999..=now_year + 1000).contains(&year), "{year}");
}

#[tokio::test]
async fn absent_expires_in_and_scope_leave_expiry_unknown_and_scope_as_requested() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/o/token/"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": ACCESS, "token_type": "Bearer"})),
        )
        .mount(&server)
        .await;

    let token = client_for(&server)
        .issue(
            Flavor::Controller,
            &password_grant(confidential_client()),
            Scope::Read,
        )
        .await
        .unwrap();
    assert_eq!(token.expires_at, None);
    assert_eq!(token.scope, "read");
    assert!(token.refresh_token.is_none());
}

#[tokio::test]
async fn client_credentials_grant_posts_grant_type_and_scope() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/o/token/"))
        .and(basic_auth(CLIENT_ID, CLIENT_SECRET))
        .and(body_string("grant_type=client_credentials&scope=read"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": ACCESS, "expires_in": 3600, "token_type": "Bearer", "scope": "read",
        })))
        .expect(1)
        .mount(&server)
        .await;

    let token = client_for(&server)
        .issue(
            Flavor::Controller,
            &TokenGrant::ClientCredentials {
                client: confidential_client(),
            },
            Scope::Read,
        )
        .await
        .unwrap();
    assert_eq!(token.scope, "read");
    assert_eq!(token.user, None);
    assert!(token.refresh_token.is_none());
}

fn personal_token_created() -> ResponseTemplate {
    ResponseTemplate::new(201)
        .insert_header("Location", "/api/v2/tokens/42/")
        .set_body_json(json!({
            "id": 42, "type": "o_auth2_access_token", "url": "/api/v2/tokens/42/",
            "related": {"user": "/api/v2/users/7/"},
            "summary_fields": {"user": {"id": 7, "username": USERNAME, "first_name": "", "last_name": ""}},
            "created": "2025-01-10T12:00:00.000000Z", "modified": "2025-01-10T12:00:00.100000Z",
            "description": "AwxToken default/ci-bot", "user": 7,
            "token": ACCESS, "refresh_token": null, "application": null,
            "expires": "3024-05-13T12:00:00.000000Z", "scope": "write",
        }))
}

async fn assert_personal_token_created(flavor: Flavor, tokens_path: &str) {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(tokens_path))
        .and(basic_auth(USERNAME, PASSWORD))
        .and(header("content-type", "application/json"))
        .and(body_json(json!({
            "description": "AwxToken default/ci-bot", "application": null, "scope": "write",
        })))
        .respond_with(personal_token_created())
        .expect(1)
        .mount(&server)
        .await;

    let token = client_for(&server)
        .issue(flavor, &personal_grant(), Scope::Write)
        .await
        .unwrap();
    assert_eq!(token.access_token.expose_secret(), ACCESS);
    assert!(token.refresh_token.is_none());
    assert_eq!(token.token_id, Some(42));
    assert_eq!(token.user.as_deref(), Some(USERNAME));
    assert_eq!(token.kind, TokenKind::Personal);
    assert_eq!(token.scope, "write");
    assert_eq!(
        token.expires_at,
        Some("3024-05-13T12:00:00Z".parse().unwrap())
    );
}

#[tokio::test]
async fn personal_token_is_created_on_controller_with_json_and_basic_user_auth() {
    assert_personal_token_created(Flavor::Controller, "/api/v2/tokens/").await;
}

#[tokio::test]
async fn personal_token_is_created_on_gateway_with_json_and_basic_user_auth() {
    assert_personal_token_created(Flavor::Gateway, "/api/gateway/v1/tokens/").await;
}

#[tokio::test]
async fn masked_personal_token_value_is_an_unexpected_response() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/gateway/v1/tokens/"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({
            "id": 5, "token": "$encrypted$", "scope": "write",
        })))
        .mount(&server)
        .await;

    let error = client_for(&server)
        .issue(Flavor::Gateway, &personal_grant(), Scope::Write)
        .await
        .unwrap_err();
    assert_eq!(error.reason(), "UnexpectedResponse");
    assert!(checked(&error).contains("missing or masked"));
}

#[tokio::test]
async fn personal_token_with_an_unreadable_expiry_is_still_returned() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v2/tokens/"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({
            "id": 5, "token": ACCESS, "scope": "write", "expires": "next Tuesday",
        })))
        .mount(&server)
        .await;

    let token = client_for(&server)
        .issue(Flavor::Controller, &personal_grant(), Scope::Write)
        .await
        .unwrap();
    assert_eq!(token.access_token.expose_secret(), ACCESS);
    assert_eq!(token.expires_at, None);
    assert_eq!(token.user.as_deref(), Some(USERNAME));
}

#[tokio::test]
async fn refresh_posts_the_refresh_token_with_client_auth() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/o/token/"))
        .and(basic_auth(CLIENT_ID, CLIENT_SECRET))
        .and(body_string(format!(
            "grant_type=refresh_token&refresh_token={REFRESH}&scope=write"
        )))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "NewAccess000000000000000000000", "expires_in": 36000,
            "token_type": "Bearer", "scope": "write",
            "refresh_token": "NewRefresh00000000000000000000",
        })))
        .expect(1)
        .mount(&server)
        .await;

    let token = client_for(&server)
        .refresh(
            Flavor::Controller,
            &confidential_client(),
            &refresh_token(),
            Scope::Write,
        )
        .await
        .unwrap();
    assert_eq!(
        token.access_token.expose_secret(),
        "NewAccess000000000000000000000"
    );
    assert_eq!(
        token.refresh_token.unwrap().expose_secret(),
        "NewRefresh00000000000000000000"
    );
    assert_eq!(token.kind, TokenKind::Application);
}

// ---------------------------------------------------------------- issue and refresh: errors

async fn token_error(answer: ResponseTemplate, grant: &TokenGrant) -> AwxError {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/o/token/"))
        .respond_with(answer)
        .mount(&server)
        .await;
    client_for(&server)
        .issue(Flavor::Controller, grant, Scope::Write)
        .await
        .unwrap_err()
}

async fn refresh_error(answer: ResponseTemplate) -> AwxError {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/o/token/"))
        .respond_with(answer)
        .mount(&server)
        .await;
    client_for(&server)
        .refresh(
            Flavor::Controller,
            &confidential_client(),
            &refresh_token(),
            Scope::Write,
        )
        .await
        .unwrap_err()
}

#[tokio::test]
async fn invalid_client_blames_the_application_credentials_not_the_password() {
    let answer = oauth_error(401, "invalid_client", None)
        .insert_header("WWW-Authenticate", r#"Bearer error="invalid_client""#);
    let error = token_error(answer, &password_grant(confidential_client())).await;
    assert!(matches!(error, AwxError::InvalidClient { status: 401, .. }));
    assert_eq!(error.reason(), "InvalidClient");
    assert!(!error.is_retryable());
    let message = checked(&error);
    assert!(
        message.contains("client_id or client_secret is wrong"),
        "{message}"
    );
    assert!(message.contains("not the user's password"), "{message}");
}

#[tokio::test]
async fn invalid_credentials_given_blames_username_or_password() {
    let answer = oauth_error(400, "invalid_grant", Some("Invalid credentials given."));
    let error = token_error(answer, &password_grant(confidential_client())).await;
    assert_eq!(error.reason(), "InvalidCredentials");
    assert!(!error.is_retryable());
    assert!(!error.requires_reissue());
    let message = checked(&error);
    assert!(
        message.contains("username or password is wrong"),
        "{message}"
    );
    assert!(message.contains("inactive"), "{message}");
    assert!(message.contains("Invalid credentials given."), "{message}");
}

#[tokio::test]
async fn unauthorized_client_on_client_credentials_says_use_password_or_personal_tokens() {
    let grant = TokenGrant::ClientCredentials {
        client: confidential_client(),
    };
    let error = token_error(oauth_error(400, "unauthorized_client", None), &grant).await;
    assert_eq!(error.reason(), "GrantNotSupported");
    assert!(!error.is_retryable());
    let message = checked(&error);
    assert!(
        message.contains(
            "AWX and AAP gateway applications support only the password and \
             authorization-code grants"
        ),
        "{message}"
    );
    assert!(
        message.contains("use grant type Password (with a \"Resource owner password-based\" application) or PersonalAccessToken"),
        "{message}"
    );
}

#[tokio::test]
async fn unauthorized_client_on_password_grant_points_at_the_application_type() {
    let error = token_error(
        oauth_error(400, "unauthorized_client", None),
        &password_grant(confidential_client()),
    )
    .await;
    assert_eq!(error.reason(), "GrantNotSupported");
    assert!(checked(&error).contains("Resource owner password-based"));
}

#[tokio::test]
async fn invalid_scope_is_reported_with_the_requested_scope() {
    let error = token_error(
        oauth_error(400, "invalid_scope", None),
        &password_grant(confidential_client()),
    )
    .await;
    assert!(matches!(
        error,
        AwxError::InvalidScope {
            scope: "write",
            status: 400,
            ..
        }
    ));
    assert_eq!(error.reason(), "InvalidScope");
    assert!(!error.is_retryable());
    checked(&error);
}

#[tokio::test]
async fn unsupported_grant_type_says_the_server_did_not_accept_the_grant() {
    let error = token_error(
        oauth_error(400, "unsupported_grant_type", None),
        &password_grant(confidential_client()),
    )
    .await;
    assert_eq!(error.reason(), "GrantNotSupported");
    let message = checked(&error);
    assert!(
        message.contains("did not accept the password grant"),
        "{message}"
    );
}

#[tokio::test]
async fn invalid_request_carries_awx_description() {
    let error = token_error(
        oauth_error(
            400,
            "invalid_request",
            Some("Request is missing password parameter."),
        ),
        &password_grant(confidential_client()),
    )
    .await;
    assert_eq!(error.reason(), "InvalidRequest");
    assert!(!error.is_retryable());
    assert!(checked(&error).contains("Request is missing password parameter."));
}

#[tokio::test]
async fn expired_refresh_token_html_403_requires_reissue() {
    let error = refresh_error(html(403, "The refresh token has expired.")).await;
    assert!(matches!(
        error,
        AwxError::RefreshTokenExpired { status: 403, .. }
    ));
    assert_eq!(error.reason(), "RefreshTokenExpired");
    assert!(error.requires_reissue());
    assert!(!error.is_retryable());
    checked(&error);
}

#[tokio::test]
async fn invalid_grant_on_refresh_requires_reissue() {
    let error = refresh_error(oauth_error(400, "invalid_grant", None)).await;
    assert_eq!(error.reason(), "RefreshTokenInvalid");
    assert!(error.requires_reissue());
    assert!(!error.is_retryable());
    checked(&error);
}

#[tokio::test]
async fn server_error_on_refresh_is_retryable_and_hints_at_a_dead_chain() {
    let error = refresh_error(html(500, "<h1>Server Error (500)</h1>")).await;
    assert_eq!(error.reason(), "AwxServerError");
    assert!(error.is_retryable());
    assert!(!error.requires_reissue());
    assert!(checked(&error).contains("new token has to be issued"));
}

#[tokio::test]
async fn external_user_html_403_names_the_setting() {
    let answer = html(
        403,
        "(access_denied) OAuth2 Tokens cannot be created by users associated with an \
         external authentication provider (ldap)",
    );
    let error = token_error(answer, &password_grant(confidential_client())).await;
    assert_eq!(error.reason(), "ExternalUserRefused");
    assert!(!error.is_retryable());
    let message = checked(&error);
    assert!(
        message.contains("ALLOW_OAUTH2_FOR_EXTERNAL_USERS"),
        "{message}"
    );
    assert!(message.contains("(ldap)"), "{message}");
}

async fn personal_token_error(answer: ResponseTemplate) -> AwxError {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v2/tokens/"))
        .respond_with(answer)
        .mount(&server)
        .await;
    client_for(&server)
        .issue(Flavor::Controller, &personal_grant(), Scope::Write)
        .await
        .unwrap_err()
}

#[tokio::test]
async fn external_user_json_403_on_tokens_endpoint_names_the_setting() {
    let error = personal_token_error(ResponseTemplate::new(403).set_body_json(json!({
        "detail": "(access_denied) OAuth2 Tokens cannot be created by users associated with \
                   an external authentication provider (ldap)"
    })))
    .await;
    assert_eq!(error.reason(), "ExternalUserRefused");
    assert!(checked(&error).contains("ALLOW_OAUTH2_FOR_EXTERNAL_USERS"));
}

#[tokio::test]
async fn bad_user_password_on_personal_token_creation_is_invalid_credentials() {
    let error = personal_token_error(
        ResponseTemplate::new(401)
            .insert_header("WWW-Authenticate", AWX_401_CHALLENGE)
            .set_body_json(json!({"detail": "Invalid username/password."})),
    )
    .await;
    assert_eq!(error.reason(), "InvalidCredentials");
    assert!(!error.is_retryable());
    let message = checked(&error);
    assert!(
        message.contains("username or password is wrong"),
        "{message}"
    );
}

#[tokio::test]
async fn read_scoped_refusal_on_personal_token_creation_is_forbidden() {
    let error = personal_token_error(ResponseTemplate::new(403).set_body_json(json!({
        "detail": "You do not have permission to perform this action."
    })))
    .await;
    assert_eq!(error.reason(), "Forbidden");
    assert!(checked(&error).contains("You do not have permission"));
}

#[tokio::test]
async fn html_500_is_a_retryable_server_error_with_an_excerpt() {
    let error = token_error(
        html(
            500,
            "<!doctype html>\n<html>\n  <body>\n    <h1>Server Error (500)</h1>\n  </body>\n</html>",
        ),
        &password_grant(confidential_client()),
    )
    .await;
    assert!(matches!(
        error,
        AwxError::AwxServerError { status: 500, .. }
    ));
    assert!(error.is_retryable());
    let message = checked(&error);
    assert!(message.contains("<h1>Server Error (500)</h1>"), "{message}");
    assert!(!message.contains('\n'), "{message}");
}

#[tokio::test]
async fn bad_gateway_is_a_retryable_server_error() {
    let error = token_error(
        html(502, "<html><body><h1>502 Bad Gateway</h1></body></html>"),
        &password_grant(confidential_client()),
    )
    .await;
    assert!(matches!(
        error,
        AwxError::AwxServerError { status: 502, .. }
    ));
    assert_eq!(error.reason(), "AwxServerError");
    assert!(error.is_retryable());
    checked(&error);
}

#[tokio::test]
async fn html_200_says_awx_answered_html_and_to_check_the_url() {
    let error = token_error(
        html(200, "<html><head><title>Log in</title></head></html>"),
        &password_grant(confidential_client()),
    )
    .await;
    assert_eq!(error.reason(), "UnexpectedResponse");
    assert!(error.is_retryable());
    let message = checked(&error);
    assert!(
        message.contains("answered HTML instead of JSON"),
        "{message}"
    );
    assert!(message.contains("check the URL"), "{message}");
}

#[tokio::test]
async fn truncated_json_is_an_unexpected_response_without_the_partial_token() {
    let error = token_error(
        ResponseTemplate::new(200).set_body_raw(
            format!(r#"{{"access_token": "{ACCESS}", "expires_in": 3"#),
            "application/json",
        ),
        &password_grant(confidential_client()),
    )
    .await;
    assert_eq!(error.reason(), "UnexpectedResponse");
    assert!(checked(&error).contains("not valid JSON"));
}

#[tokio::test]
async fn json_without_access_token_is_an_unexpected_response_naming_the_fields() {
    let error = token_error(
        ResponseTemplate::new(200).set_body_json(json!({
            "token_type": "Bearer", "refresh_token": REFRESH,
        })),
        &password_grant(confidential_client()),
    )
    .await;
    assert_eq!(error.reason(), "UnexpectedResponse");
    let message = checked(&error);
    assert!(message.contains("no access_token"), "{message}");
    assert!(message.contains("refresh_token"), "{message}");
}

#[tokio::test]
async fn missing_endpoint_is_endpoint_not_found() {
    let server = MockServer::start().await;
    let error = client_for(&server)
        .issue(
            Flavor::Gateway,
            &password_grant(confidential_client()),
            Scope::Write,
        )
        .await
        .unwrap_err();
    assert!(matches!(
        error,
        AwxError::EndpointNotFound { status: 404, .. }
    ));
    assert!(!error.is_retryable());
    assert!(checked(&error).contains("/o/token/"));
}

// ---------------------------------------------------------------- transport

#[tokio::test]
async fn slow_server_beyond_the_timeout_is_a_timeout() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(token_answer(200, 60).set_delay(Duration::from_secs(5)))
        .mount(&server)
        .await;
    let mut endpoint = endpoint_for(&server.uri());
    endpoint.timeout = Duration::from_millis(300);
    let client = AwxClient::new(endpoint, RequestLimits::default(), None).unwrap();

    let started = Instant::now();
    let error = client
        .issue(
            Flavor::Controller,
            &password_grant(confidential_client()),
            Scope::Write,
        )
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        matches!(error, AwxError::Timeout { timeout, .. } if timeout == Duration::from_millis(300)),
        "{error:?}"
    );
    assert_eq!(error.reason(), "Timeout");
    assert!(error.is_retryable());
    assert!(checked(&error).contains("300ms"));
}

#[tokio::test]
async fn body_over_one_mebibyte_is_response_too_large() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw(vec![b' '; MAX_BODY_BYTES + 1], "application/json"),
        )
        .mount(&server)
        .await;
    let error = client_for(&server)
        .whoami(Flavor::Controller, &access())
        .await
        .unwrap_err();
    assert!(matches!(
        error,
        AwxError::ResponseTooLarge {
            limit: MAX_BODY_BYTES,
            status: 200,
            ..
        }
    ));
    assert_eq!(error.reason(), "ResponseTooLarge");
    checked(&error);
}

#[tokio::test]
async fn body_of_exactly_one_mebibyte_is_read() {
    let server = MockServer::start().await;
    let mut body = br#"{"results":[{"id":1,"username":"a"}]}"#.to_vec();
    body.resize(MAX_BODY_BYTES, b' ');
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200).set_body_raw(body, "application/json"))
        .mount(&server)
        .await;
    let user = client_for(&server)
        .whoami(Flavor::Controller, &access())
        .await
        .unwrap();
    assert_eq!(user.username, "a");
}

fn unused_local_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn refused_connection_is_awx_unreachable_naming_the_host() {
    let address = unused_local_address();
    let observer = Arc::new(RecordingObserver::default());
    let client = AwxClient::new(
        endpoint_for(&format!("http://{address}/")),
        RequestLimits::default(),
        Some(observer.clone()),
    )
    .unwrap();

    let error = client
        .issue(
            Flavor::Controller,
            &password_grant(confidential_client()),
            Scope::Write,
        )
        .await
        .unwrap_err();
    assert_eq!(error.reason(), "AwxUnreachable", "{error:?}");
    assert!(error.is_retryable());
    let message = checked(&error);
    assert!(message.contains(&address.to_string()), "{message}");
    assert!(message.contains("connection refused"), "{message}");
    assert_eq!(*observer.seen.lock().unwrap(), vec![("token", None)]);
}

#[tokio::test]
async fn redirect_to_another_host_is_refused_and_the_other_host_gets_nothing() {
    let elsewhere = MockServer::start().await;
    Mock::given(any())
        .respond_with(token_answer(200, 60))
        .expect(0)
        .mount(&elsewhere)
        .await;
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(302)
                .insert_header("Location", format!("{}/api/o/token/", elsewhere.uri())),
        )
        .mount(&server)
        .await;

    let error = client_for(&server)
        .issue(
            Flavor::Controller,
            &password_grant(confidential_client()),
            Scope::Write,
        )
        .await
        .unwrap_err();
    assert!(matches!(
        error,
        AwxError::UnexpectedResponse {
            status: Some(302),
            ..
        }
    ));
    let message = checked(&error);
    assert!(message.contains("HTTP 302"), "{message}");
    assert!(message.contains(&elsewhere.uri()), "{message}");
    assert!(elsewhere.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn observer_hears_each_request_with_its_label_and_status() {
    let server = MockServer::start().await;
    Mock::given(path("/api/o/token/"))
        .respond_with(token_answer(200, 60))
        .mount(&server)
        .await;
    Mock::given(path("/api/v2/me/"))
        .respond_with(dead_token_answer())
        .mount(&server)
        .await;
    let observer = Arc::new(RecordingObserver::default());
    let client = AwxClient::new(
        endpoint_for(&server.uri()),
        RequestLimits::default(),
        Some(observer.clone()),
    )
    .unwrap();

    client
        .issue(
            Flavor::Controller,
            &password_grant(confidential_client()),
            Scope::Write,
        )
        .await
        .unwrap();
    let _ = client.whoami(Flavor::Controller, &access()).await;
    assert_eq!(
        *observer.seen.lock().unwrap(),
        vec![("token", Some(200)), ("me", Some(401))]
    );
}

#[tokio::test]
async fn rate_limiter_spaces_requests_out_without_a_burst() {
    let server = MockServer::start().await;
    Mock::given(path("/api/v2/me/"))
        .respond_with(me_answer())
        .expect(6)
        .mount(&server)
        .await;
    let limits = RequestLimits::new(NonZeroU32::new(5), None);
    let client = AwxClient::new(endpoint_for(&server.uri()), limits, None).unwrap();

    let started = Instant::now();
    for _ in 0..6 {
        client.whoami(Flavor::Controller, &access()).await.unwrap();
    }
    // No burst: five gaps of 1.2 / 5 s each.
    assert!(
        started.elapsed() >= Duration::from_millis(1190),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_narrower_gate_spaces_its_requests_at_its_own_rate_and_no_one_else_waits() {
    let server = MockServer::start().await;
    Mock::given(path("/api/v2/me/"))
        .respond_with(me_answer())
        .expect(12)
        .mount(&server)
        .await;
    // The host allows 1000 a second; one connection's requests, 5.
    let host = RequestLimits::new(NonZeroU32::new(1000), None);
    let narrow = host.narrowed(super::rate_gate(NonZeroU32::new(5).unwrap()));
    let through = AwxClient::new(endpoint_for(&server.uri()), narrow, None).unwrap();
    let direct = AwxClient::new(endpoint_for(&server.uri()), host, None).unwrap();

    let started = Instant::now();
    for _ in 0..6 {
        direct.whoami(Flavor::Controller, &access()).await.unwrap();
    }
    let direct_took = started.elapsed();
    let started = Instant::now();
    for _ in 0..6 {
        through.whoami(Flavor::Controller, &access()).await.unwrap();
    }
    let through_took = started.elapsed();
    // Five gaps of 1.2 / 5 s through the connection's gate; the host's own gate spaces six
    // requests 6 ms apart at most.
    assert!(
        through_took >= Duration::from_millis(1190),
        "{through_took:?}"
    );
    assert!(
        direct_took * 4 < through_took,
        "direct {direct_took:?}, through the gate {through_took:?}"
    );
}

#[tokio::test]
async fn version_is_read_from_the_anonymous_ping_and_only_when_plain() {
    for (flavor, ping) in [
        (Flavor::Controller, "/api/v2/ping/"),
        (Flavor::Gateway, "/api/gateway/v1/ping/"),
    ] {
        let cases = [
            (
                ResponseTemplate::new(200).set_body_json(json!({"version": "24.6.1", "ha": false})),
                Some("24.6.1"),
            ),
            (
                ResponseTemplate::new(200).set_body_json(json!({"version": "24.6.1<script>"})),
                None,
            ),
            (
                ResponseTemplate::new(200).set_body_json(json!({"version": "9".repeat(65)})),
                None,
            ),
            (
                ResponseTemplate::new(200).set_body_json(json!({"ha": false})),
                None,
            ),
            (
                ResponseTemplate::new(200)
                    .insert_header("content-type", "text/html")
                    .set_body_string("<html>login</html>"),
                None,
            ),
            (ResponseTemplate::new(500), None),
        ];
        for (answer, expected) in cases {
            let server = MockServer::start().await;
            Mock::given(method("GET"))
                .and(path(ping))
                .respond_with(answer)
                .expect(1)
                .mount(&server)
                .await;
            let client =
                AwxClient::new(endpoint_for(&server.uri()), RequestLimits::default(), None)
                    .unwrap();
            assert_eq!(
                client.version(flavor).await.as_deref(),
                expected,
                "{flavor:?}"
            );
            // Anonymous: no credentials sent.
            let requests = server.received_requests().await.unwrap();
            assert!(requests[0].headers.get("authorization").is_none());
        }
    }
}

/// Arrival times of requests at a mock AWX.
#[derive(Clone, Default)]
struct Arrivals(Arc<Mutex<Vec<Instant>>>);

impl wiremock::Respond for Arrivals {
    fn respond(&self, _request: &Request) -> ResponseTemplate {
        let mut seen = self.0.lock().unwrap();
        seen.push(Instant::now());
        // The first two answers take 2 s: AWX stalls while requests queue up behind them.
        let delay = if seen.len() <= 2 {
            Duration::from_secs(2)
        } else {
            Duration::ZERO
        };
        me_answer().set_delay(delay)
    }
}

/// Defect "--awx-max-rps is exceeded": with requests queued behind a stall, AWX must still
/// never see more than the limit in any one-second window once the stall ends.
#[tokio::test]
async fn a_stall_does_not_turn_queued_requests_into_a_burst() {
    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    Mock::given(path("/api/v2/me/"))
        .respond_with(arrivals.clone())
        .mount(&server)
        .await;
    let limits = RequestLimits::new(NonZeroU32::new(10), Some(2));
    let client = AwxClient::new(endpoint_for(&server.uri()), limits, None).unwrap();
    let token = access();
    let results =
        futures::future::join_all((0..24).map(|_| client.whoami(Flavor::Controller, &token))).await;
    assert!(results.iter().all(Result::is_ok));
    let times = arrivals.0.lock().unwrap().clone();
    assert_eq!(times.len(), 24);
    let busiest = times
        .iter()
        .map(|start| {
            times
                .iter()
                .filter(|t| **t >= *start && **t < *start + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap();
    assert!(busiest <= 10, "{busiest} requests within one second");
}

#[tokio::test]
async fn in_flight_gate_serialises_requests() {
    let server = MockServer::start().await;
    Mock::given(path("/api/v2/me/"))
        .respond_with(me_answer().set_delay(Duration::from_millis(200)))
        .expect(3)
        .mount(&server)
        .await;
    let limits = RequestLimits::new(None, Some(1));
    let client = AwxClient::new(endpoint_for(&server.uri()), limits, None).unwrap();

    let started = Instant::now();
    let token = access();
    let results =
        futures::future::join_all((0..3).map(|_| client.whoami(Flavor::Controller, &token))).await;
    assert!(results.iter().all(Result::is_ok));
    assert!(
        started.elapsed() >= Duration::from_millis(580),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn base_url_with_credentials_or_odd_scheme_is_refused_without_echoing_it() {
    for base in [
        format!("https://admin:{PASSWORD}@awx.example.com/"),
        "ftp://awx.example.com/".to_owned(),
    ] {
        let error =
            AwxClient::new(endpoint_for(&base), RequestLimits::default(), None).unwrap_err();
        assert_eq!(error.reason(), "InvalidEndpoint");
        checked(&error);
    }
}

// ---------------------------------------------------------------- TLS

#[test]
fn ca_bundle_that_is_not_pem_is_invalid() {
    for bundle in [
        b"not a certificate".to_vec(),
        b"-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n".to_vec(),
        b"-----BEGIN CERTIFICATE-----\nMIIB\n".to_vec(),
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_vec(),
    ] {
        let mut endpoint = endpoint_for("https://awx.example.com/");
        endpoint.ca_bundle_pem = Some(bundle);
        let error = AwxClient::new(endpoint, RequestLimits::default(), None).unwrap_err();
        assert!(
            matches!(error, AwxError::InvalidCaBundle { .. }),
            "{error:?}"
        );
        assert_eq!(error.reason(), "InvalidCaBundle");
        assert!(!error.is_retryable());
        assert!(checked(&error).contains("caBundleSecretRef"));
    }
}

#[test]
fn valid_ca_bundle_is_accepted() {
    let mut endpoint = endpoint_for("https://awx.example.com/");
    endpoint.ca_bundle_pem = Some(TEST_CA_PEM.as_bytes().to_vec());
    AwxClient::new(endpoint, RequestLimits::default(), None).unwrap();
}

/// A one-answer-per-connection HTTPS server presenting `TEST_SERVER_CERT_PEM`.
fn spawn_tls_server() -> SocketAddr {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(TEST_SERVER_CERT_PEM.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_slice(TEST_SERVER_KEY_PEM.as_bytes()).unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let config = config.clone();
            std::thread::spawn(move || serve_one_tls_request(config, stream));
        }
    });
    address
}

fn serve_one_tls_request(config: Arc<rustls::ServerConfig>, tcp: std::net::TcpStream) {
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok(connection) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    let mut request = Vec::new();
    let mut buffer = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match tls.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buffer[..n]),
        }
    }
    let body = format!(r#"{{"count":1,"results":[{{"id":7,"username":"{USERNAME}"}}]}}"#);
    let _ = write!(
        tls,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

fn tls_client(address: SocketAddr, ca: Option<&str>, insecure: bool) -> AwxClient {
    let mut endpoint = endpoint_for(&format!("https://{address}/"));
    endpoint.ca_bundle_pem = ca.map(|pem| pem.as_bytes().to_vec());
    endpoint.insecure_skip_tls_verify = insecure;
    AwxClient::new(endpoint, RequestLimits::default(), None).unwrap()
}

#[tokio::test]
async fn untrusted_certificate_is_a_tls_error_pointing_at_the_ca_bundle() {
    let address = spawn_tls_server();
    let error = tls_client(address, None, false)
        .whoami(Flavor::Controller, &access())
        .await
        .unwrap_err();
    assert_eq!(error.reason(), "TlsError", "{error:?}");
    assert!(error.is_retryable());
    let message = checked(&error);
    assert!(message.contains("caBundleSecretRef"), "{message}");
    assert!(message.contains("UnknownIssuer"), "{message}");
}

#[tokio::test]
async fn certificate_signed_by_the_configured_ca_is_trusted() {
    let address = spawn_tls_server();
    let user = tls_client(address, Some(TEST_CA_PEM), false)
        .whoami(Flavor::Controller, &access())
        .await
        .unwrap();
    assert_eq!(user.username, USERNAME);
}

#[tokio::test]
async fn insecure_skip_tls_verify_accepts_an_untrusted_certificate() {
    let address = spawn_tls_server();
    let user = tls_client(address, None, true)
        .whoami(Flavor::Controller, &access())
        .await
        .unwrap();
    assert_eq!(user.id, Some(7));
}

#[tokio::test]
async fn https_to_a_plain_http_server_is_a_tls_error() {
    let server = MockServer::start().await;
    let base = server.uri().replace("http://", "https://");
    let error = AwxClient::new(endpoint_for(&base), RequestLimits::default(), None)
        .unwrap()
        .whoami(Flavor::Controller, &access())
        .await
        .unwrap_err();
    assert_eq!(error.reason(), "TlsError", "{error:?}");
    checked(&error);
}

// ---------------------------------------------------------------- whoami

#[tokio::test]
async fn whoami_sends_bearer_and_reads_the_user_from_the_page() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/me/"))
        .and(bearer_token(ACCESS))
        .respond_with(me_answer())
        .expect(1)
        .mount(&server)
        .await;
    let user = client_for(&server)
        .whoami(Flavor::Controller, &access())
        .await
        .unwrap();
    assert_eq!(
        user,
        AwxUser {
            id: Some(7),
            username: USERNAME.to_owned()
        }
    );
}

#[tokio::test]
async fn whoami_on_gateway_uses_the_gateway_path() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/gateway/v1/me/"))
        .and(bearer_token(ACCESS))
        .respond_with(me_answer())
        .expect(1)
        .mount(&server)
        .await;
    client_for(&server)
        .whoami(Flavor::Gateway, &access())
        .await
        .unwrap();
}

#[tokio::test]
async fn whoami_401_is_token_rejected() {
    let server = MockServer::start().await;
    Mock::given(path("/api/v2/me/"))
        .respond_with(dead_token_answer())
        .mount(&server)
        .await;
    let error = client_for(&server)
        .whoami(Flavor::Controller, &access())
        .await
        .unwrap_err();
    assert!(matches!(error, AwxError::TokenRejected { status: 401, .. }));
    assert_eq!(error.reason(), "TokenRejected");
    assert!(!error.is_retryable());
    checked(&error);
}

// ---------------------------------------------------------------- revoke

fn app_token() -> TokenToRevoke {
    TokenToRevoke {
        access_token: access(),
        refresh_token: Some(refresh_token()),
        token_id: None,
        kind: TokenKind::Application,
    }
}

fn personal_token(id: u64) -> TokenToRevoke {
    TokenToRevoke {
        access_token: access(),
        refresh_token: None,
        token_id: Some(id),
        kind: TokenKind::Personal,
    }
}

fn client_creds() -> RevocationCredentials {
    RevocationCredentials {
        client: Some(confidential_client()),
        user: None,
        bearer: None,
    }
}

fn user_creds() -> RevocationCredentials {
    RevocationCredentials {
        client: None,
        user: Some((USERNAME.to_owned(), SecretString::from(PASSWORD))),
        bearer: None,
    }
}

async fn mount_me(server: &MockServer, me_path: &str, answer: ResponseTemplate) {
    Mock::given(method("GET"))
        .and(path(me_path))
        .and(bearer_token(ACCESS))
        .respond_with(answer)
        .mount(server)
        .await;
}

#[tokio::test]
async fn application_token_is_revoked_by_its_refresh_token_then_verified() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/o/revoke_token/"))
        .and(basic_auth(CLIENT_ID, CLIENT_SECRET))
        .and(header("content-type", "application/x-www-form-urlencoded"))
        .and(body_string(format!(
            "token={REFRESH}&token_type_hint=refresh_token"
        )))
        .and(no_query_string)
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    mount_me(&server, "/api/v2/me/", dead_token_answer()).await;

    client_for(&server)
        .revoke(Flavor::Controller, &app_token(), &client_creds())
        .await
        .unwrap();
}

#[tokio::test]
async fn application_token_without_refresh_token_is_revoked_by_access_token() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/o/revoke_token/"))
        .and(body_string(format!(
            "token={ACCESS}&token_type_hint=access_token"
        )))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    mount_me(&server, "/api/v2/me/", dead_token_answer()).await;

    let token = TokenToRevoke {
        refresh_token: None,
        ..app_token()
    };
    client_for(&server)
        .revoke(Flavor::Controller, &token, &client_creds())
        .await
        .unwrap();
}

#[tokio::test]
async fn revocation_that_leaves_the_token_working_is_not_effective() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/o/revoke_token/"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    mount_me(&server, "/api/v2/me/", me_answer()).await;

    let error = client_for(&server)
        .revoke(Flavor::Controller, &app_token(), &client_creds())
        .await
        .unwrap_err();
    assert_eq!(error.reason(), "RevocationNotEffective");
    assert!(error.is_retryable());
    let message = checked(&error);
    assert!(message.contains("still works"), "{message}");
    assert!(message.contains("/api/o/revoke_token/"), "{message}");
}

#[tokio::test]
async fn gateway_revocation_posts_the_sha256_of_the_token() {
    let server = MockServer::start().await;
    let digest = hex::encode(Sha256::digest(REFRESH.as_bytes()));
    Mock::given(method("POST"))
        .and(path("/o/revoke_token/"))
        .and(basic_auth(CLIENT_ID, CLIENT_SECRET))
        .and(body_string(format!(
            "token=%24sha256%24{digest}&token_type_hint=refresh_token"
        )))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    mount_me(&server, "/api/gateway/v1/me/", dead_token_answer()).await;

    client_for(&server)
        .revoke(Flavor::Gateway, &app_token(), &client_creds())
        .await
        .unwrap();
}

#[tokio::test]
async fn gateway_application_token_with_known_id_is_deleted_then_its_refresh_token_revoked() {
    let server = MockServer::start().await;
    Mock::given(method("DELETE"))
        .and(path("/api/gateway/v1/tokens/9/"))
        .and(bearer_token(ACCESS))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&server)
        .await;
    let digest = hex::encode(Sha256::digest(REFRESH.as_bytes()));
    Mock::given(method("POST"))
        .and(path("/o/revoke_token/"))
        .and(body_string_contains(format!("token=%24sha256%24{digest}")))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    mount_me(&server, "/api/gateway/v1/me/", dead_token_answer()).await;

    let token = TokenToRevoke {
        token_id: Some(9),
        ..app_token()
    };
    client_for(&server)
        .revoke(Flavor::Gateway, &token, &client_creds())
        .await
        .unwrap();
}

#[tokio::test]
async fn personal_token_is_deleted_with_the_users_login() {
    let server = MockServer::start().await;
    Mock::given(method("DELETE"))
        .and(path("/api/v2/tokens/42/"))
        .and(basic_auth(USERNAME, PASSWORD))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&server)
        .await;
    mount_me(&server, "/api/v2/me/", dead_token_answer()).await;

    client_for(&server)
        .revoke(Flavor::Controller, &personal_token(42), &user_creds())
        .await
        .unwrap();
}

#[tokio::test]
async fn personal_token_deletes_itself_when_the_users_login_is_refused() {
    let server = MockServer::start().await;
    Mock::given(method("DELETE"))
        .and(path("/api/v2/tokens/42/"))
        .and(basic_auth(USERNAME, PASSWORD))
        .respond_with(ResponseTemplate::new(403).set_body_json(json!({
            "detail": "You do not have permission to perform this action."
        })))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("DELETE"))
        .and(path("/api/v2/tokens/42/"))
        .and(bearer_token(ACCESS))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&server)
        .await;
    mount_me(&server, "/api/v2/me/", dead_token_answer()).await;

    client_for(&server)
        .revoke(Flavor::Controller, &personal_token(42), &user_creds())
        .await
        .unwrap();
}

#[tokio::test]
async fn personal_token_already_gone_counts_as_revoked() {
    let server = MockServer::start().await;
    Mock::given(method("DELETE"))
        .and(path("/api/v2/tokens/42/"))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({"detail": "Not found."})))
        .expect(1)
        .mount(&server)
        .await;
    mount_me(&server, "/api/v2/me/", dead_token_answer()).await;

    client_for(&server)
        .revoke(Flavor::Controller, &personal_token(42), &user_creds())
        .await
        .unwrap();
}

#[tokio::test]
async fn token_dead_before_revocation_counts_as_revoked() {
    let server = MockServer::start().await;
    // With no user login the token itself is used, and a dead token cannot authenticate.
    Mock::given(method("DELETE"))
        .and(path("/api/v2/tokens/42/"))
        .and(bearer_token(ACCESS))
        .respond_with(dead_token_answer())
        .expect(1)
        .mount(&server)
        .await;
    mount_me(&server, "/api/v2/me/", dead_token_answer()).await;

    client_for(&server)
        .revoke(
            Flavor::Controller,
            &personal_token(42),
            &RevocationCredentials::default(),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn refused_revocation_of_a_live_token_reports_the_refusal() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/o/revoke_token/"))
        .respond_with(oauth_error(401, "invalid_client", None))
        .mount(&server)
        .await;
    mount_me(&server, "/api/v2/me/", me_answer()).await;

    let error = client_for(&server)
        .revoke(Flavor::Controller, &app_token(), &client_creds())
        .await
        .unwrap_err();
    assert_eq!(error.reason(), "InvalidClient");
    checked(&error);
}

#[tokio::test]
async fn revocation_without_any_usable_credential_is_missing_credentials() {
    let server = MockServer::start().await;
    mount_me(&server, "/api/v2/me/", me_answer()).await;
    let error = client_for(&server)
        .revoke(
            Flavor::Controller,
            &app_token(),
            &RevocationCredentials::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(error.reason(), "MissingCredentials");
    assert!(!error.is_retryable());
    checked(&error);
}

// ---------------------------------------------------------------- detect_flavor

#[tokio::test]
async fn gateway_is_detected_by_its_api_root() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/gateway/v1/"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"tokens": "/api/gateway/v1/tokens/"})),
        )
        .mount(&server)
        .await;
    assert_eq!(
        client_for(&server).detect_flavor().await.unwrap(),
        Flavor::Gateway
    );
}

#[tokio::test]
async fn controller_is_detected_by_its_oauth2_root() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/o/"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "authorize": "/api/o/authorize/", "token": "/api/o/token/",
            "revoke_token": "/api/o/revoke_token/",
        })))
        .mount(&server)
        .await;
    assert_eq!(
        client_for(&server).detect_flavor().await.unwrap(),
        Flavor::Controller
    );
}

#[tokio::test]
async fn neither_flavour_answering_is_flavor_not_detected() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/gateway/v1/"))
        .respond_with(html(200, "<html>login</html>"))
        .mount(&server)
        .await;
    let error = client_for(&server).detect_flavor().await.unwrap_err();
    assert_eq!(error.reason(), "FlavorNotDetected");
    assert!(!error.is_retryable());
    let message = checked(&error);
    assert!(
        message.contains("GET /api/gateway/v1/ answered HTML"),
        "{message}"
    );
    assert!(
        message.contains("GET /api/o/ answered HTTP 404"),
        "{message}"
    );
}

#[tokio::test]
async fn server_error_during_detection_is_retryable_not_a_verdict() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(html(503, "<html>Service Unavailable</html>"))
        .mount(&server)
        .await;
    let error = client_for(&server).detect_flavor().await.unwrap_err();
    assert_eq!(error.reason(), "AwxServerError");
    assert!(error.is_retryable());
}

// ---------------------------------------------------------------- secrets

#[test]
fn debug_output_of_credentials_and_tokens_hides_every_secret() {
    let issued = IssuedToken {
        access_token: access(),
        refresh_token: Some(refresh_token()),
        expires_at: None,
        scope: "write".to_owned(),
        token_id: Some(1),
        user: Some(USERNAME.to_owned()),
        kind: TokenKind::Application,
        application: None,
        answered_at: None,
    };
    let outputs = [
        format!("{issued:?}"),
        format!("{:?}", password_grant(confidential_client())),
        format!("{:?}", personal_grant()),
        format!("{:?}", app_token()),
        format!("{:?}", user_creds()),
        format!("{:?}", client_creds()),
    ];
    for output in outputs {
        assert_no_secret(&output);
    }
    assert!(format!("{issued:?}").contains(USERNAME));
}

#[test]
fn every_error_has_a_reason_and_the_refresh_failures_alone_require_reissue() {
    let at = || "POST https://awx.example.com/api/o/token/".to_owned();
    let errors = [
        AwxError::RefreshTokenExpired {
            at: at(),
            status: 403,
        },
        AwxError::RefreshTokenInvalid {
            at: at(),
            status: 400,
            description: None,
        },
        AwxError::InvalidCredentials {
            at: at(),
            status: 400,
            description: None,
        },
        AwxError::Timeout {
            at: at(),
            host: "awx.example.com:443".to_owned(),
            timeout: Duration::from_secs(10),
            sent: true,
        },
    ];
    let reissue: Vec<bool> = errors.iter().map(AwxError::requires_reissue).collect();
    assert_eq!(reissue, vec![true, true, false, false]);
    assert!(errors[3].to_string().contains("10s"));
}

// ---------------------------------------------------------------- properties

/// Any answer at all, to any request: the readers never panic, errors stay short, and a
/// token answer's values never reach an error message whatever the status says.
mod properties {
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    use super::super::{
        AwxError, Scope, common_failure, parse_me, personal_token_answer, personal_token_failure,
        token_answer, token_endpoint_failure, transport::Answer,
    };
    use jiff::Timestamp;
    use secrecy::ExposeSecret as _;

    /// Longest message an answer may produce, `at` included; the controller cuts condition
    /// messages at 2048 characters and events at 1000.
    const MESSAGE_BOUND: usize = 1000;

    use crate::awx::wire::KNOWN_KEYS;

    const GRANT_TYPES: [&str; 3] = ["password", "client_credentials", "refresh_token"];

    fn sent_at() -> Timestamp {
        Timestamp::from_second(1_700_000_000).unwrap()
    }

    fn answer(
        status: u16,
        content_type: Option<String>,
        location: Option<String>,
        body: Vec<u8>,
    ) -> Answer {
        Answer {
            at: "POST https://awx.example.com/api/o/token/".to_owned(),
            status,
            content_type,
            location,
            body,
            sent_at: sent_at(),
            date: None,
        }
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::sample::select(&KNOWN_KEYS[..]).prop_map(str::to_owned),
            1 => any::<String>(),
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                json_object(inner),
            ]
        })
    }

    fn json_object(values: impl Strategy<Value = Value>) -> impl Strategy<Value = Value> {
        prop::collection::btree_map(key(), values, 0..6)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    }

    fn extras() -> impl Strategy<Value = Map<String, Value>> {
        json_object(json_value()).prop_map(|v| match v {
            Value::Object(object) => object,
            _ => Map::new(),
        })
    }

    fn token() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_-]{24,48}"
    }

    fn status() -> impl Strategy<Value = u16> {
        prop_oneof![
            200u16..300,
            100u16..600,
            prop::sample::select(&[400u16, 401, 403, 500][..])
        ]
    }

    fn content_type() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            Just(None),
            Just(Some("application/json".to_owned())),
            Just(Some("text/html; charset=utf-8".to_owned())),
            any::<String>().prop_map(Some),
        ]
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..1024),
            json_value().prop_map(|v| v.to_string().into_bytes()),
            any::<String>().prop_map(String::into_bytes),
            (any::<String>(), any::<String>()).prop_map(|(e, d)| {
                serde_json::json!({"error": e, "error_description": d})
                    .to_string()
                    .into_bytes()
            }),
            any::<String>().prop_map(|d| serde_json::json!({"detail": d}).to_string().into_bytes()),
        ]
    }

    /// `expires_in` as JSON text: any JSON value, or a number of any size.
    fn expires_in_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "-?[0-9]{1,60}(\\.[0-9]{1,12})?([eE][+-]?[0-9]{1,4})?",
            any::<u64>().prop_map(|n| n.to_string()),
            json_value().prop_map(|v| v.to_string()),
        ]
    }

    /// Whether `text` holds 12 consecutive characters of `secret`.
    fn leaks(text: &str, secret: &str) -> bool {
        let chars: Vec<char> = secret.chars().collect();
        chars
            .windows(12)
            .any(|w| text.contains(&w.iter().collect::<String>()))
    }

    fn short(error: &AwxError) -> Result<String, TestCaseError> {
        let message = error.to_string();
        prop_assert!(
            message.chars().count() <= MESSAGE_BOUND,
            "{} characters: {message}",
            message.chars().count()
        );
        prop_assert!(!error.reason().is_empty());
        Ok(message)
    }

    /// A body as a server might send it: whole or cut off, compact or pretty, with an
    /// `expires_in` written as raw JSON text (so numbers of any size reach the parser).
    fn render(object: &Map<String, Value>, expires_in: Option<&str>, pretty: bool) -> String {
        let text = if pretty {
            serde_json::to_string_pretty(object).unwrap()
        } else {
            serde_json::to_string(object).unwrap()
        };
        match expires_in {
            Some(raw) => format!("{{\"expires_in\": {raw},{}", &text[1..]),
            None => text,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_answer_to_any_request_is_classified_without_panicking(
            status in status(),
            content_type in content_type(),
            location in prop::option::of(any::<String>()),
            body in body(),
            grant_type in prop::sample::select(&GRANT_TYPES[..]),
            read in any::<bool>(),
        ) {
            let scope = if read { Scope::Read } else { Scope::Write };
            let answer = answer(status, content_type, location, body);
            if let Err(e) = token_answer(&answer, grant_type, scope, None) {
                short(&e)?;
            }
            if let Err(e) = personal_token_answer(&answer, "svc-k8s", scope) {
                short(&e)?;
            }
            if let Err(e) = parse_me(&answer) {
                short(&e)?;
            }
            short(&token_endpoint_failure(&answer, grant_type, scope))?;
            short(&personal_token_failure(&answer, scope))?;
            let common = common_failure(&answer);
            short(&common)?;
            if (500..600).contains(&status) {
                prop_assert!(common.is_retryable(), "{common}");
            }
        }

        #[test]
        fn token_answers_are_accepted_on_2xx_and_never_quoted_in_errors(
            status in status(),
            content_type in content_type(),
            access in token(),
            refresh in prop::option::of(token()),
            expires_in in prop::option::of(expires_in_text()),
            mut object in extras(),
            pretty in any::<bool>(),
            cut in prop::option::of(any::<prop::sample::Index>()),
            grant_type in prop::sample::select(&GRANT_TYPES[..]),
        ) {
            object.remove("expires_in");
            object.insert("access_token".to_owned(), Value::String(access.clone()));
            object.insert("token_type".to_owned(), Value::String("Bearer".to_owned()));
            match &refresh {
                Some(r) => object.insert("refresh_token".to_owned(), Value::String(r.clone())),
                None => object.remove("refresh_token"),
            };
            let mut text = render(&object, expires_in.as_deref(), pretty);
            if let Some(cut) = cut {
                let mut at = cut.index(text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                text.truncate(at);
            }
            let whole = serde_json::from_str::<Value>(&text).is_ok();
            let answer = answer(status, content_type, None, text.into_bytes());
            match token_answer(&answer, grant_type, Scope::Write, None) {
                Ok(issued) => {
                    prop_assert!((200..300).contains(&status));
                    prop_assert_eq!(issued.access_token.expose_secret(), access.as_str());
                    prop_assert_eq!(
                        issued.refresh_token.as_ref().map(|r| r.expose_secret().to_owned()),
                        refresh
                    );
                    prop_assert!(issued.expires_at.is_none_or(|at| at >= sent_at()));
                }
                Err(e) => {
                    prop_assert!(!((200..300).contains(&status) && whole), "{e}");
                    let message = short(&e)?;
                    let debug = format!("{e:?}");
                    for secret in std::iter::once(&access).chain(refresh.iter()) {
                        prop_assert!(!leaks(&message, secret), "{message}");
                        prop_assert!(!leaks(&debug, secret), "{debug}");
                    }
                }
            }
        }

        #[test]
        fn personal_token_answers_are_accepted_on_2xx_and_never_quoted_in_errors(
            status in status(),
            content_type in content_type(),
            value in token(),
            id in json_value(),
            expires in prop_oneof![
                json_value(),
                Just(Value::String("3024-11-28T09:58:41.123456Z".to_owned())),
            ],
            owner in json_value(),
            mut object in extras(),
            pretty in any::<bool>(),
            cut in prop::option::of(any::<prop::sample::Index>()),
        ) {
            object.insert("token".to_owned(), Value::String(value.clone()));
            object.insert("refresh_token".to_owned(), Value::Null);
            object.insert("id".to_owned(), id.clone());
            object.insert("expires".to_owned(), expires);
            object.insert(
                "summary_fields".to_owned(),
                serde_json::json!({"user": {"username": owner}}),
            );
            let mut text = render(&object, None, pretty);
            if let Some(cut) = cut {
                let mut at = cut.index(text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                text.truncate(at);
            }
            let whole = serde_json::from_str::<Value>(&text).is_ok();
            let answer = answer(status, content_type, None, text.into_bytes());
            match personal_token_answer(&answer, "svc-k8s", Scope::Read) {
                Ok(issued) => {
                    prop_assert!((200..300).contains(&status));
                    prop_assert_eq!(issued.access_token.expose_secret(), value.as_str());
                    prop_assert_eq!(issued.token_id, id.as_u64());
                    let expected_owner = owner.as_str().unwrap_or("svc-k8s");
                    prop_assert_eq!(issued.user.as_deref(), Some(expected_owner));
                }
                Err(e) => {
                    prop_assert!(!((200..300).contains(&status) && whole), "{e}");
                    let message = short(&e)?;
                    let debug = format!("{e:?}");
                    prop_assert!(!leaks(&message, &value), "{message}");
                    prop_assert!(!leaks(&debug, &value), "{debug}");
                }
            }
        }

        #[test]
        fn oauth2_error_codes_map_to_their_reasons_at_any_4xx_status(
            status in 400u16..500,
            content_type in content_type(),
            code in prop::sample::select(&[
                "invalid_client",
                "invalid_grant",
                "unauthorized_client",
                "unsupported_grant_type",
                "invalid_scope",
                "invalid_request",
                "access_denied",
            ][..]),
            description in prop_oneof![
                Just(None),
                any::<String>().prop_map(Some),
                Just(Some("Token cannot be created by users associated with an external authentication provider".to_owned())),
            ],
            grant_type in prop::sample::select(&GRANT_TYPES[..]),
        ) {
            let body = match &description {
                Some(d) => serde_json::json!({"error": code, "error_description": d}),
                None => serde_json::json!({"error": code}),
            };
            let answer = answer(status, content_type, None, body.to_string().into_bytes());
            let error = token_endpoint_failure(&answer, grant_type, Scope::Write);
            let external = description
                .as_deref()
                .is_some_and(|d| d.to_ascii_lowercase().contains("external authentication provider")
                    || d.to_ascii_lowercase().contains("cannot be created by users associated"));
            let expected = match (code, grant_type) {
                ("invalid_client", _) => "InvalidClient",
                ("invalid_grant", "refresh_token") => "RefreshTokenInvalid",
                ("invalid_grant", _) => "InvalidCredentials",
                ("unauthorized_client" | "unsupported_grant_type", _) => "GrantNotSupported",
                ("invalid_scope", _) => "InvalidScope",
                ("invalid_request", _) => "InvalidRequest",
                ("access_denied", _) if external => "ExternalUserRefused",
                _ => "UnexpectedResponse",
            };
            prop_assert_eq!(error.reason(), expected);
            prop_assert_eq!(error.is_retryable(), expected == "UnexpectedResponse");
            prop_assert_eq!(error.requires_reissue(), expected == "RefreshTokenInvalid");
            prop_assert_eq!(error.http_status(), Some(status));
            short(&error)?;
        }

        #[test]
        fn whoami_pages_name_their_user(
            username in any::<String>(),
            id in json_value(),
            mut user in extras(),
            paged in any::<bool>(),
            status in 200u16..300,
        ) {
            // A bare object with "results" is read as a page, as it should be.
            user.remove("results");
            user.insert("username".to_owned(), Value::String(username.clone()));
            user.insert("id".to_owned(), id.clone());
            let body = if paged {
                serde_json::json!({"count": 1, "next": null, "results": [user]})
            } else {
                Value::Object(user)
            };
            let answer = answer(status, None, None, body.to_string().into_bytes());
            match parse_me(&answer) {
                Ok(me) => {
                    prop_assert_eq!(me.username, username);
                    prop_assert_eq!(me.id, id.as_u64());
                }
                Err(e) => {
                    // Only an empty username names nobody.
                    prop_assert!(username.is_empty(), "{e}");
                    short(&e)?;
                }
            }
        }
    }
}
