//! `awx-token-operator login`: one browser sign-in with the OAuth2 authorization-code grant and
//! PKCE (RFC 6749 §4.1, RFC 7636, RFC 8252 loopback redirect), after which the cluster holds a
//! refresh token and the application's credentials, never a password
//! (docs/awx-protocol.md#authorization-code-with-pkce).
//!
//! The steps, each its own function: make the PKCE pair and `state`; listen on the loopback
//! redirect URI (before the URL is shown, so the browser can never come back to nothing);
//! open the browser or print the URL; take exactly one callback and check it; exchange the
//! code; write a credentials Secret and an AwxToken that uses it.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::sync::oneshot;
use url::Url;

use crate::awx::{AwxClient, AwxError, ClientCredentials, Endpoint, Flavor, RequestLimits, Scope};

/// Key of the credentials Secret holding the refresh token of the sign-in.
pub const REFRESH_TOKEN_KEY: &str = "refresh_token";
/// Key of the credentials Secret holding the OAuth2 application's client_id.
pub const CLIENT_ID_KEY: &str = "client_id";
/// Key of the credentials Secret holding the application's client_secret (absent for public
/// applications).
pub const CLIENT_SECRET_KEY: &str = "client_secret";
/// Key of the credentials Secret holding the PEM CA bundle given with `--ca-bundle`.
pub const CA_BUNDLE_KEY: &str = "ca.crt";
/// Annotation on the credentials Secret: when the refresh token was issued (RFC 3339). AWX
/// never tells a refresh token's age, and it dies REFRESH_TOKEN_EXPIRE_SECONDS (about 30 days)
/// after issue (docs/awx-protocol.md#refresh-expiry).
pub const REFRESH_TOKEN_ISSUED_AT_ANNOTATION: &str =
    "awx-token-operator.io/refresh-token-issued-at";
/// The grant type the AwxToken names.
pub const GRANT_TYPE: &str = "AuthorizationCode";
/// Server-side apply field manager of the objects `login` writes.
pub const FIELD_MANAGER: &str = "awx-token-operator-login";
/// The path of the loopback redirect URI.
pub const CALLBACK_PATH: &str = "/callback";

const AWXTOKEN_GROUP: &str = "awx-token-operator.io";
const AWXTOKEN_VERSION: &str = "v1alpha1";

/// Which API the server speaks (`auto` probes as the operator does).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlavorArg {
    Auto,
    Controller,
    Gateway,
}

/// The token scope asked for.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeArg {
    Read,
    Write,
}

impl ScopeArg {
    fn scope(self) -> Scope {
        match self {
            Self::Read => Scope::Read,
            Self::Write => Scope::Write,
        }
    }
}

/// Sign in once through the browser (authorization-code grant with PKCE) and write an AwxToken
/// whose credentials Secret holds a refresh token, never a password.
#[derive(clap::Args, Debug)]
pub struct LoginArgs {
    /// Base URL of AWX or of the AAP gateway, e.g. https://awx.example.com.
    #[arg(long)]
    pub url: Url,
    /// client_id of the AWX OAuth2 application (grant type "Authorization code"), whose
    /// redirect URIs include http://127.0.0.1:PORT/callback (or http://127.0.0.1/callback).
    #[arg(long)]
    pub client_id: String,
    /// File holding the application's client_secret (confidential applications; public ones
    /// have none).
    #[arg(long)]
    pub client_secret_file: Option<PathBuf>,
    /// Namespace of the AwxToken (default: the kubeconfig context's namespace).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Name of the AwxToken; the credentials Secret is NAME-sign-in.
    #[arg(long)]
    pub name: String,
    /// PEM file of CA certificates that signed AWX's certificate (also stored in the
    /// credentials Secret for the operator).
    #[arg(long)]
    pub ca_bundle: Option<PathBuf>,
    /// Which API the server speaks.
    #[arg(long, value_enum, default_value = "auto")]
    pub flavor: FlavorArg,
    /// Port of the loopback redirect URI http://127.0.0.1:PORT/callback.
    #[arg(long, default_value_t = 8400)]
    pub port: u16,
    /// Print the sign-in URL instead of opening a browser.
    #[arg(long)]
    pub no_browser: bool,
    /// How long to wait for the browser to come back.
    #[arg(long, default_value = "5m", value_parser = crate::spec::parse_duration)]
    pub timeout: Duration,
    /// Token scope.
    #[arg(long, value_enum, default_value = "write")]
    pub scope: ScopeArg,
    /// Allow a plain http:// URL (the code and tokens then cross the network unencrypted).
    #[arg(long)]
    pub allow_insecure_http: bool,
}

/// Why the sign-in failed. No message holds a token, a code or a secret.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error(
        "you declined the sign-in in the browser (AWX answered access_denied); nothing was \
         written. Run the command again and choose Authorize"
    )]
    Denied,
    #[error(
        "the browser came back with a state that does not belong to this sign-in (an old \
         browser tab, or another program calling the redirect URI); the answer was ignored and \
         nothing was written. Run the command again"
    )]
    StateMismatch,
    #[error(
        "the browser did not come back to {redirect_uri} within {}. If the browser showed an \
         AWX error page (\"Mismatching redirect URI\") after you signed in, the redirect URIs \
         of the OAuth2 application {client_id} do not match: they must include exactly \
         {redirect_uri} (or http://127.0.0.1{CALLBACK_PATH}, which allows any port). Otherwise \
         sign in faster or pass a longer --timeout",
        human_duration(*.waited)
    )]
    Timeout {
        waited: Duration,
        redirect_uri: String,
        client_id: String,
    },
    #[error(
        "cannot listen on 127.0.0.1:{port} for the browser: the port is in use ({detail}). \
         Stop what uses it, or pass --port with a free port and register \
         http://127.0.0.1:<that port>{CALLBACK_PATH} as a redirect URI of the application"
    )]
    PortTaken { port: u16, detail: String },
    #[error("cannot listen on 127.0.0.1:{port} for the browser: {detail}")]
    Listen { port: u16, detail: String },
    #[error("AWX refused the sign-in request ({error}{}){}", suffix(.description), authorization_hint(.error))]
    AuthorizationFailed {
        error: String,
        description: Option<String>,
    },
    #[error("the browser came back without an authorization code or an error")]
    MissingCode,
    #[error(
        "AWX refused the application's credentials at {at} (invalid_client): check --client-id, \
         and --client-secret-file (a confidential application needs its secret, a public one \
         takes none)"
    )]
    ClientRejected { at: String },
    #[error("{0}")]
    CodeRejected(AwxError),
    #[error(
        "TLS connection to {host} failed: {detail}; pass --ca-bundle with the CA certificate \
         that signed AWX's certificate, and check that the host name in --url is one the \
         certificate names"
    )]
    Tls { host: String, detail: String },
    #[error("{0}")]
    Awx(AwxError),
    #[error(
        "AWX answered the code exchange without a refresh token; the AwxToken needs one to \
         keep the sign-in alive"
    )]
    NoRefreshToken,
    #[error(
        "--url {url} uses http://: the authorization code and the tokens would cross the \
         network unencrypted. Use https://, or pass --allow-insecure-http"
    )]
    InsecureUrl { url: String },
    #[error("--url {url} is not usable: {detail}")]
    BadUrl { url: String, detail: String },
    #[error("cannot read {what} {path}: {detail}")]
    ReadFile {
        what: &'static str,
        path: String,
        detail: String,
    },
    #[error("{what} is empty")]
    EmptyFile { what: String },
    #[error("cannot reach the Kubernetes cluster from the kubeconfig: {0}")]
    Kubeconfig(String),
    #[error(
        "could not write the credentials Secret {namespace}/{name}: {detail}; the sign-in \
         succeeded but nothing is stored: run the command again"
    )]
    WriteSecret {
        namespace: String,
        name: String,
        detail: String,
    },
    #[error(
        "could not write the AwxToken {namespace}/{name}: {detail}{}. The credentials Secret \
         {namespace}/{secret} was written; run the command again once this is fixed",
        crd_hint(*.unsupported)
    )]
    WriteAwxToken {
        namespace: String,
        name: String,
        secret: String,
        detail: String,
        /// The API server refused the object's shape (the CRD predates this grant type).
        unsupported: bool,
    },
}

/// `5m`, `90s`, `2h`, `1h30m`: as the duration flags are written.
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let mut out = String::new();
    for (n, unit) in [(h, "h"), (m, "m"), (s, "s")] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    out
}

fn suffix(text: &Option<String>) -> String {
    match text {
        Some(t) if !t.is_empty() => format!(": {t}"),
        _ => String::new(),
    }
}

fn authorization_hint(error: &str) -> &'static str {
    match error {
        "unauthorized_client" => {
            "; the application's authorization grant type must be \"Authorization code\""
        }
        "invalid_scope" => "; only the scopes read and write exist",
        _ => "",
    }
}

fn crd_hint(unsupported: bool) -> &'static str {
    if unsupported {
        " (the cluster's AwxToken CustomResourceDefinition does not accept grant type \
         AuthorizationCode: install an awx-token-operator release that supports it)"
    } else {
        ""
    }
}

impl LoginError {
    /// What a failed token-endpoint or probe request means for someone at a terminal.
    fn from_awx(error: AwxError) -> Self {
        match error {
            AwxError::InvalidClient { at, .. } => Self::ClientRejected { at },
            AwxError::AuthorizationCodeRejected { .. } => Self::CodeRejected(error),
            AwxError::TlsError { host, detail, .. } => Self::Tls { host, detail },
            other => Self::Awx(other),
        }
    }
}

// ---------------------------------------------------------------- PKCE and state

/// A PKCE verifier and its S256 challenge (RFC 7636 §4.1, §4.2).
pub struct PkcePair {
    pub verifier: SecretString,
    pub challenge: String,
}

impl PkcePair {
    /// From 32 random octets: the verifier is their base64url encoding (43 characters), the
    /// challenge the base64url SHA-256 of the verifier, both without padding.
    pub fn from_octets(octets: &[u8; 32]) -> Self {
        let verifier = URL_SAFE_NO_PAD.encode(octets);
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        Self {
            verifier: SecretString::from(verifier),
            challenge,
        }
    }

    pub fn generate() -> Self {
        let mut octets = [0u8; 32];
        rand::rng().fill_bytes(&mut octets);
        Self::from_octets(&octets)
    }
}

/// A fresh `state`: 32 random octets, base64url.
pub fn new_state() -> String {
    let mut octets = [0u8; 32];
    rand::rng().fill_bytes(&mut octets);
    URL_SAFE_NO_PAD.encode(octets)
}

/// Compares without an early exit on the first differing byte, so the time taken does not
/// tell how much of a guessed state was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The loopback redirect URI for `port`.
pub fn redirect_uri(port: u16) -> String {
    format!("http://127.0.0.1:{port}{CALLBACK_PATH}")
}

/// The URL the browser opens: the flavour's authorize endpoint with the request's parameters.
pub fn authorize_url(
    base: &Url,
    flavor: Flavor,
    client_id: &str,
    redirect_uri: &str,
    challenge: &str,
    state: &str,
    scope: Scope,
) -> Result<Url, LoginError> {
    let mut url = base
        .join(flavor.authorize_path())
        .map_err(|e| LoginError::BadUrl {
            url: base.to_string(),
            detail: e.to_string(),
        })?;
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", client_id)
        .append_pair("redirect_uri", redirect_uri)
        .append_pair("scope", scope_words(scope))
        .append_pair("state", state)
        .append_pair("code_challenge", challenge)
        .append_pair("code_challenge_method", "S256");
    Ok(url)
}

/// The scope words to ask for; `write` includes `read` (docs/awx-protocol.md#password-grant).
fn scope_words(scope: Scope) -> &'static str {
    match scope {
        Scope::Read => "read",
        Scope::Write => "read write",
    }
}

// ---------------------------------------------------------------- the callback

/// What the browser brought back on the redirect URI.
#[derive(Default)]
pub struct CallbackQuery {
    pub code: Option<SecretString>,
    pub state: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

impl CallbackQuery {
    pub fn parse(query: &str) -> Self {
        let mut out = Self::default();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let value = value.into_owned();
            match key.as_ref() {
                "code" => out.code = Some(SecretString::from(value)),
                "state" => out.state = Some(value),
                "error" => out.error = Some(value),
                "error_description" => out.error_description = Some(value),
                _ => {}
            }
        }
        out
    }
}

/// The code, or why there is none. `state` is checked first: an answer that is not ours says
/// nothing, not even that the user declined.
pub fn callback_outcome(
    query: CallbackQuery,
    expected_state: &str,
) -> Result<SecretString, LoginError> {
    let state_matches = query
        .state
        .as_deref()
        .is_some_and(|s| constant_time_eq(s.as_bytes(), expected_state.as_bytes()));
    if !state_matches {
        return Err(LoginError::StateMismatch);
    }
    match (query.error, query.code) {
        (Some(error), _) if error == "access_denied" => Err(LoginError::Denied),
        (Some(error), _) => Err(LoginError::AuthorizationFailed {
            error,
            description: query.error_description,
        }),
        (None, Some(code)) if !code.expose_secret().is_empty() => Ok(code),
        (None, _) => Err(LoginError::MissingCode),
    }
}

/// The page the browser shows after the redirect.
fn callback_page(outcome: &Result<SecretString, LoginError>) -> Response {
    let (status, title, text) = match outcome {
        Ok(_) => (
            StatusCode::OK,
            "Signed in",
            "awx-token-operator received the sign-in. You can close this tab and return to the terminal.",
        ),
        Err(LoginError::Denied) => (
            StatusCode::OK,
            "Sign-in declined",
            "You declined the sign-in. Nothing was stored. You can close this tab.",
        ),
        Err(LoginError::StateMismatch) => (
            StatusCode::BAD_REQUEST,
            "Not this sign-in",
            "This answer does not belong to the sign-in in progress and was ignored.",
        ),
        Err(_) => (
            StatusCode::BAD_REQUEST,
            "Sign-in failed",
            "The sign-in failed; the terminal says why. You can close this tab.",
        ),
    };
    let page = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{title}</title></head>\
         <body><h1>{title}</h1><p>{text}</p></body></html>"
    );
    (status, Html(page)).into_response()
}

type Outcome = Result<SecretString, LoginError>;

struct CallbackState {
    expected_state: String,
    /// Taken by the first callback: exactly one is heard.
    reply: Mutex<Option<oneshot::Sender<Outcome>>>,
}

async fn callback(State(shared): State<Arc<CallbackState>>, uri: Uri) -> Response {
    let sender = shared.reply.lock().ok().and_then(|mut slot| slot.take());
    let Some(sender) = sender else {
        return (
            StatusCode::GONE,
            Html("<!DOCTYPE html><p>This sign-in was already answered.</p>".to_string()),
        )
            .into_response();
    };
    let query = CallbackQuery::parse(uri.query().unwrap_or(""));
    let outcome = callback_outcome(query, &shared.expected_state);
    let page = callback_page(&outcome);
    // The waiting side may have given up (timeout); the page is the same either way.
    let _ = sender.send(outcome);
    page
}

/// The loopback listener of the redirect URI, bound before the sign-in URL is shown.
pub struct CallbackListener {
    listener: tokio::net::TcpListener,
    port: u16,
}

impl CallbackListener {
    /// Listens on 127.0.0.1:`port` (0: a free port, for tests).
    pub async fn bind(port: u16) -> Result<Self, LoginError> {
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let listener =
            tokio::net::TcpListener::bind(address)
                .await
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::AddrInUse => LoginError::PortTaken {
                        port,
                        detail: e.to_string(),
                    },
                    _ => LoginError::Listen {
                        port,
                        detail: e.to_string(),
                    },
                })?;
        let port = listener
            .local_addr()
            .map_err(|e| LoginError::Listen {
                port,
                detail: e.to_string(),
            })?
            .port();
        Ok(Self { listener, port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn redirect_uri(&self) -> String {
        redirect_uri(self.port)
    }

    /// Serves the redirect URI until the first callback (whose outcome is returned) or until
    /// `timeout` passes. Any other path gets 404 and does not count.
    pub async fn wait(
        self,
        expected_state: &str,
        timeout: Duration,
        client_id: &str,
    ) -> Result<SecretString, LoginError> {
        let redirect_uri = self.redirect_uri();
        let (sender, receiver) = oneshot::channel();
        let shared = Arc::new(CallbackState {
            expected_state: expected_state.to_owned(),
            reply: Mutex::new(Some(sender)),
        });
        let app = Router::new()
            .route(CALLBACK_PATH, axum::routing::get(callback))
            .with_state(shared);
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let port = self.port;
        let mut server = tokio::spawn(async move {
            axum::serve(self.listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await
        });
        let outcome = tokio::select! {
            answer = receiver => answer.unwrap_or(Err(LoginError::MissingCode)),
            _ = tokio::time::sleep(timeout) => Err(LoginError::Timeout {
                waited: timeout,
                redirect_uri,
                client_id: client_id.to_owned(),
            }),
            served = &mut server => Err(LoginError::Listen {
                port,
                detail: match served {
                    Ok(Ok(())) => "the listener stopped".into(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                },
            }),
        };
        // Let the page reach the browser, then stop listening; a browser holding the
        // connection open does not keep the command waiting.
        stop.cancel();
        if tokio::time::timeout(Duration::from_secs(2), &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
        outcome
    }
}

// ---------------------------------------------------------------- what goes to the cluster

/// Everything the cluster objects are made from.
pub struct SignIn {
    pub namespace: String,
    pub name: String,
    pub url: Url,
    pub flavor: Flavor,
    pub scope: Scope,
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    pub refresh_token: SecretString,
    pub refresh_token_issued_at: jiff::Timestamp,
    pub ca_bundle_pem: Option<Vec<u8>>,
    pub allow_insecure_http: bool,
}

/// The credentials Secret's name for an AwxToken.
pub fn credentials_secret_name(name: &str) -> String {
    format!("{name}-sign-in")
}

/// The credentials Secret: the refresh token and the application's credentials, no password.
pub fn credentials_secret(sign_in: &SignIn) -> Value {
    let mut data = serde_json::Map::new();
    data.insert(CLIENT_ID_KEY.into(), Value::from(sign_in.client_id.clone()));
    if let Some(secret) = &sign_in.client_secret {
        data.insert(
            CLIENT_SECRET_KEY.into(),
            Value::from(secret.expose_secret().to_owned()),
        );
    }
    data.insert(
        REFRESH_TOKEN_KEY.into(),
        Value::from(sign_in.refresh_token.expose_secret().to_owned()),
    );
    if let Some(pem) = &sign_in.ca_bundle_pem {
        data.insert(
            CA_BUNDLE_KEY.into(),
            Value::from(String::from_utf8_lossy(pem).into_owned()),
        );
    }
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": credentials_secret_name(&sign_in.name),
            "namespace": sign_in.namespace,
            "labels": {"app.kubernetes.io/managed-by": FIELD_MANAGER},
            "annotations": {
                REFRESH_TOKEN_ISSUED_AT_ANNOTATION: sign_in.refresh_token_issued_at.to_string(),
            },
        },
        "type": "Opaque",
        "stringData": data,
    })
}

/// The AwxToken, as plain JSON: grant type AuthorizationCode with the credentials Secret.
pub fn awx_token(sign_in: &SignIn) -> Value {
    let secret = credentials_secret_name(&sign_in.name);
    let mut awx = json!({
        "url": sign_in.url.as_str().trim_end_matches('/'),
        "flavor": sign_in.flavor.as_str(),
    });
    if sign_in.ca_bundle_pem.is_some() {
        awx["caBundleSecretRef"] = json!({"name": secret, "key": CA_BUNDLE_KEY});
    }
    if sign_in.allow_insecure_http {
        awx["allowInsecureHttp"] = Value::Bool(true);
    }
    json!({
        "apiVersion": format!("{AWXTOKEN_GROUP}/{AWXTOKEN_VERSION}"),
        "kind": "AwxToken",
        "metadata": {"name": sign_in.name, "namespace": sign_in.namespace},
        "spec": {
            "awx": awx,
            "grant": {
                "type": GRANT_TYPE,
                "credentialsSecretRef": {
                    "name": secret,
                    "clientIdKey": CLIENT_ID_KEY,
                    "clientSecretKey": CLIENT_SECRET_KEY,
                    "refreshTokenKey": REFRESH_TOKEN_KEY,
                },
                "scope": sign_in.scope.as_str(),
            },
        },
    })
}

/// Writes the Secret, then the AwxToken, with server-side apply.
pub async fn write_to_cluster(client: kube::Client, sign_in: &SignIn) -> Result<(), LoginError> {
    use kube::api::{Api, DynamicObject, Patch, PatchParams};
    use kube::core::{ApiResource, GroupVersionKind};

    let params = PatchParams::apply(FIELD_MANAGER).force();
    let secret_name = credentials_secret_name(&sign_in.name);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), &sign_in.namespace);
    secrets
        .patch(
            &secret_name,
            &params,
            &Patch::Apply(credentials_secret(sign_in)),
        )
        .await
        .map_err(|e| LoginError::WriteSecret {
            namespace: sign_in.namespace.clone(),
            name: secret_name.clone(),
            detail: e.to_string(),
        })?;

    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(AWXTOKEN_GROUP, AWXTOKEN_VERSION, "AwxToken"),
        "awxtokens",
    );
    let tokens: Api<DynamicObject> = Api::namespaced_with(client, &sign_in.namespace, &resource);
    tokens
        .patch(&sign_in.name, &params, &Patch::Apply(awx_token(sign_in)))
        .await
        .map_err(|e| {
            let unsupported = matches!(&e, kube::Error::Api(s) if s.code == 422 || s.code == 404);
            LoginError::WriteAwxToken {
                namespace: sign_in.namespace.clone(),
                name: sign_in.name.clone(),
                secret: secret_name.clone(),
                detail: e.to_string(),
                unsupported,
            }
        })?;
    Ok(())
}

// ---------------------------------------------------------------- the command

fn read_file(what: &'static str, path: &PathBuf) -> Result<Vec<u8>, LoginError> {
    std::fs::read(path).map_err(|e| LoginError::ReadFile {
        what,
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// The client secret: the file's content without its trailing newline.
fn read_client_secret(path: &PathBuf) -> Result<SecretString, LoginError> {
    let bytes = read_file("--client-secret-file", path)?;
    let text = String::from_utf8(bytes).map_err(|_| LoginError::ReadFile {
        what: "--client-secret-file",
        path: path.display().to_string(),
        detail: "it is not UTF-8 text".into(),
    })?;
    let secret = text.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        return Err(LoginError::EmptyFile {
            what: format!("--client-secret-file {}", path.display()),
        });
    }
    Ok(SecretString::from(secret.to_owned()))
}

/// The sign-in up to the exchanged token, without the cluster: everything but the last step.
pub struct Exchanged {
    pub flavor: Flavor,
    pub refresh_token: SecretString,
    pub issued_at: jiff::Timestamp,
    pub scope: String,
}

/// How the browser part is done: open a browser, print the URL, or (in tests) hand the URL to
/// code that plays the browser.
pub enum Browser {
    Open,
    Print,
    Driver(Box<dyn FnOnce(Url) + Send>),
}

/// Runs the sign-in against AWX and exchanges the code; `say` gets each progress line.
#[allow(clippy::too_many_arguments)]
pub async fn sign_in(
    client: &AwxClient,
    flavor_arg: FlavorArg,
    credentials: &ClientCredentials,
    listener: CallbackListener,
    browser: Browser,
    timeout: Duration,
    scope: Scope,
    say: &mut dyn FnMut(String),
) -> Result<Exchanged, LoginError> {
    let flavor = match flavor_arg {
        FlavorArg::Controller => Flavor::Controller,
        FlavorArg::Gateway => Flavor::Gateway,
        FlavorArg::Auto => client.detect_flavor().await.map_err(LoginError::from_awx)?,
    };
    say(format!(
        "AWX at {} speaks the {} API ({}).",
        client.base_url(),
        flavor,
        match flavor {
            Flavor::Controller => "AWX 24.x: /api/o/authorize/ and /api/o/token/",
            Flavor::Gateway => "AAP gateway: /o/authorize/ and /o/token/",
        }
    ));
    let pkce = PkcePair::generate();
    let state = new_state();
    let redirect = listener.redirect_uri();
    let url = authorize_url(
        client.base_url(),
        flavor,
        &credentials.client_id,
        &redirect,
        &pkce.challenge,
        &state,
        scope,
    )?;
    say(format!(
        "Listening for the browser on {redirect} (the application {} must list exactly this \
         redirect URI, or http://127.0.0.1{CALLBACK_PATH}).",
        credentials.client_id
    ));
    match browser {
        Browser::Open => match webbrowser::open(url.as_str()) {
            Ok(()) => say(format!(
                "Opened your browser; sign in to AWX there and choose Authorize. If nothing \
                 opened, go to:\n\n    {url}\n"
            )),
            Err(e) => say(format!(
                "Could not open a browser ({e}). Open this URL, sign in and choose \
                 Authorize:\n\n    {url}\n"
            )),
        },
        Browser::Print => say(format!(
            "Open this URL in a browser, sign in to AWX and choose Authorize:\n\n    {url}\n"
        )),
        Browser::Driver(drive) => drive(url),
    }
    say(format!(
        "Waiting up to {} for the browser...",
        human_duration(timeout)
    ));
    let code = listener
        .wait(&state, timeout, &credentials.client_id)
        .await?;
    say("The browser came back with an authorization code; exchanging it.".into());
    let issued_at = jiff::Timestamp::now();
    let token = client
        .exchange_code(flavor, credentials, &code, &redirect, &pkce.verifier, scope)
        .await
        .map_err(LoginError::from_awx)?;
    // The access token is dropped, not revoked: revoking or deleting it would break its
    // refresh token (AWX then fails every refresh with 500, docs/awx-protocol.md#delete-token).
    // The operator's first refresh deletes it.
    let refresh_token = token.refresh_token.ok_or(LoginError::NoRefreshToken)?;
    Ok(Exchanged {
        flavor,
        refresh_token,
        issued_at,
        scope: token.scope,
    })
}

/// `awx-token-operator login`.
pub async fn run(args: LoginArgs) -> Result<(), LoginError> {
    let mut say = |line: String| println!("{line}");
    match args.url.scheme() {
        "https" => {}
        "http" if args.allow_insecure_http => {}
        "http" => {
            return Err(LoginError::InsecureUrl {
                url: args.url.to_string(),
            });
        }
        other => {
            return Err(LoginError::BadUrl {
                url: args.url.to_string(),
                detail: format!("the scheme must be https (or http), not {other}"),
            });
        }
    }
    let client_secret = args
        .client_secret_file
        .as_ref()
        .map(read_client_secret)
        .transpose()?;
    let ca_bundle_pem = args
        .ca_bundle
        .as_ref()
        .map(|p| read_file("--ca-bundle", p))
        .transpose()?;
    let kube_client = kube::Client::try_default()
        .await
        .map_err(|e| LoginError::Kubeconfig(e.to_string()))?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| kube_client.default_namespace().to_owned());

    let client = AwxClient::new(
        Endpoint {
            base_url: args.url.clone(),
            ca_bundle_pem: ca_bundle_pem.clone(),
            insecure_skip_tls_verify: false,
            timeout: Duration::from_secs(30),
        },
        RequestLimits::default(),
        None,
    )
    .map_err(LoginError::from_awx)?;
    let credentials = ClientCredentials {
        client_id: args.client_id.clone(),
        client_secret: client_secret.clone(),
    };
    // Listen before the URL is shown: the browser must never come back to a closed port.
    let listener = CallbackListener::bind(args.port).await?;
    let browser = if args.no_browser {
        Browser::Print
    } else {
        Browser::Open
    };
    let scope = args.scope.scope();
    let exchanged = sign_in(
        &client,
        args.flavor,
        &credentials,
        listener,
        browser,
        args.timeout,
        scope,
        &mut say,
    )
    .await?;
    say(format!(
        "Signed in (scope {}). Writing to namespace {namespace}:",
        exchanged.scope
    ));
    let sign_in = SignIn {
        namespace: namespace.clone(),
        name: args.name.clone(),
        url: client.base_url().clone(),
        flavor: exchanged.flavor,
        scope,
        client_id: args.client_id.clone(),
        client_secret,
        refresh_token: exchanged.refresh_token,
        refresh_token_issued_at: exchanged.issued_at,
        ca_bundle_pem,
        allow_insecure_http: args.allow_insecure_http,
    };
    write_to_cluster(kube_client, &sign_in).await?;
    let keys = if sign_in.client_secret.is_some() {
        format!("{CLIENT_ID_KEY}, {CLIENT_SECRET_KEY}, {REFRESH_TOKEN_KEY}")
    } else {
        format!("{CLIENT_ID_KEY}, {REFRESH_TOKEN_KEY}")
    };
    say(format!(
        "  Secret {} ({keys}; no password)",
        credentials_secret_name(&sign_in.name)
    ));
    say(format!(
        "  AwxToken {} (grant {GRANT_TYPE}, scope {})",
        sign_in.name,
        scope.as_str()
    ));
    say(format!(
        "The operator keeps the sign-in alive from here. Check it with:\n\n    kubectl get awxtoken -n {namespace} {}\n",
        sign_in.name
    ));
    Ok(())
}

#[cfg(test)]
mod tests;
