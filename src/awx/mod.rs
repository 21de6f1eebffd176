//! The AWX client: issues, refreshes, revokes and checks API tokens of AWX 24.x and of the
//! AAP 2.5+ platform gateway. It knows nothing of Kubernetes.
//!
//! The wire protocol it follows is described in docs/awx-protocol.md; comments cite its
//! sections. Tokens, passwords and client secrets are held in [`SecretString`] and never
//! reach a `Debug` or `Display` output, an error or a log line.

mod error;
mod tls;
mod transport;
mod wire;

#[cfg(test)]
mod tests;

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use reqwest::header::HeaderValue;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{Map, Value, json};
use url::Url;

pub use error::{AwxError, Outcome};
pub use transport::MAX_BODY_BYTES;

use transport::{Answer, Body, Call, Transport};

/// Which token API the server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flavor {
    /// AWX 24.x: `/api/o/...` and `/api/v2/...`.
    Controller,
    /// The AAP 2.5+ platform gateway: `/o/...` and `/api/gateway/v1/...`.
    Gateway,
}

impl Flavor {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Controller => "Controller",
            Self::Gateway => "Gateway",
        }
    }

    /// The authorize endpoint of the browser sign-in (docs/awx-protocol.md#authorize-endpoint).
    pub fn authorize_path(self) -> &'static str {
        match self {
            Self::Controller => "api/o/authorize/",
            Self::Gateway => "o/authorize/",
        }
    }

    fn token_path(self) -> &'static str {
        match self {
            Self::Controller => "api/o/token/",
            Self::Gateway => "o/token/",
        }
    }

    fn revoke_path(self) -> &'static str {
        match self {
            Self::Controller => "api/o/revoke_token/",
            Self::Gateway => "o/revoke_token/",
        }
    }

    fn tokens_path(self) -> &'static str {
        match self {
            Self::Controller => "api/v2/tokens/",
            Self::Gateway => "api/gateway/v1/tokens/",
        }
    }

    fn token_detail_path(self, id: u64) -> String {
        format!("{}{id}/", self.tokens_path())
    }

    fn me_path(self) -> &'static str {
        match self {
            Self::Controller => "api/v2/me/",
            Self::Gateway => "api/gateway/v1/me/",
        }
    }

    /// The anonymous endpoint that says the server's version (docs/awx-protocol.md#version).
    fn ping_path(self) -> &'static str {
        match self {
            Self::Controller => "api/v2/ping/",
            Self::Gateway => "api/gateway/v1/ping/",
        }
    }

    /// The endpoint whose 200 JSON answer identifies the flavour (docs/awx-protocol.md#detect-flavour).
    fn discovery_path(self) -> &'static str {
        match self {
            Self::Controller => "api/o/",
            Self::Gateway => "api/gateway/v1/",
        }
    }
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An OAuth2 scope. `write` implies `read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Read,
    Write,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where AWX is and how to talk to it.
#[derive(Clone)]
pub struct Endpoint {
    /// The AWX address, with any path prefix it is served under (`https://host/awx/`).
    pub base_url: Url,
    /// PEM CA certificates trusted in addition to the system store.
    pub ca_bundle_pem: Option<Vec<u8>>,
    /// Accept any certificate. The connection is then encrypted but not authenticated.
    pub insecure_skip_tls_verify: bool,
    /// For each request, from sending it to having read the whole answer.
    pub timeout: Duration,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("base_url", &self.base_url.as_str())
            .field(
                "ca_bundle_pem",
                &self
                    .ca_bundle_pem
                    .as_ref()
                    .map(|pem| format!("{} bytes", pem.len())),
            )
            .field("insecure_skip_tls_verify", &self.insecure_skip_tls_verify)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Gates shared by every client of one AWX host; every request passes both before it is
/// sent: first the in-flight gate, then the rate limiter. In that order a stall (AWX slow
/// to answer) holds requests at the in-flight gate, where they do not use up rate slots; the
/// other way round, requests queued behind a stall would each have taken a slot and would
/// all leave together when it ends, a burst AWX would see.
#[derive(Clone, Default)]
pub struct RequestLimits {
    rate: Option<Arc<RateGate>>,
    in_flight: Option<Arc<tokio::sync::Semaphore>>,
    /// A second rate, shared by fewer requests (those of one connection), passed first.
    narrower: Option<Arc<RateGate>>,
}

/// A rate gate of its own for a group of requests (a connection's `requestsPerSecond`),
/// spaced as [`RequestLimits::new`] spaces them.
pub fn rate_gate(rps: NonZeroU32) -> Arc<RateGate> {
    let spacing = Duration::from_secs(1).mul_f64(1.20) / rps.get();
    let quota = governor::Quota::with_period(spacing.max(Duration::from_micros(1)))
        .unwrap_or_else(|| governor::Quota::per_second(rps))
        .allow_burst(NonZeroU32::MIN);
    Arc::new(governor::RateLimiter::direct_with_clock(quota, TokioClock))
}

/// A GCRA rate limiter on tokio's clock (so tests with paused time see it exactly).
pub type RateGate = governor::RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    TokioClock,
    governor::middleware::NoOpMiddleware<std::time::Instant>,
>;

/// tokio's clock as a governor clock: real time, or the paused time of a test.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioClock;

impl governor::clock::Clock for TokioClock {
    type Instant = std::time::Instant;
    fn now(&self) -> Self::Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// Held while a request is in flight.
pub struct Admission {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl RequestLimits {
    /// At most `max_rps` requests in any one second (no burst; requests spaced 20% wider than
    /// 1/rps, so that up to 200 ms of network and server-side delay, as seen on a loaded
    /// 2-core machine, cannot squeeze more than `max_rps` into one second at AWX) and at most
    /// `max_in_flight` at once. `None`: no limit.
    pub fn new(max_rps: Option<NonZeroU32>, max_in_flight: Option<usize>) -> Self {
        Self {
            rate: max_rps.map(rate_gate),
            in_flight: max_in_flight.map(|n| Arc::new(tokio::sync::Semaphore::new(n.max(1)))),
            narrower: None,
        }
    }

    /// These limits, and `gate` before them: requests pass both.
    pub fn narrowed(&self, gate: Arc<RateGate>) -> Self {
        Self {
            narrower: Some(gate),
            ..self.clone()
        }
    }

    /// Waits until a request may be sent: an in-flight slot first, then a rate slot.
    pub async fn admit(&self) -> Admission {
        // A closed semaphore means the caller shut the gate down; carry on without it rather
        // than fail every request.
        let permit = match &self.in_flight {
            Some(gate) => gate.clone().acquire_owned().await.ok(),
            None => None,
        };
        for rate in self.narrower.iter().chain(&self.rate) {
            while let Err(not_until) = rate.check() {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(&TokioClock));
                tokio::time::sleep(wait.max(Duration::from_micros(1))).await;
            }
        }
        Admission { _permit: permit }
    }
}

impl fmt::Debug for RequestLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestLimits")
            .field("rate", &self.rate.as_ref().map(|_| "limited"))
            .field(
                "in_flight",
                &self.in_flight.as_ref().map(|s| s.available_permits()),
            )
            .finish()
    }
}

/// Told about every request: a fixed endpoint label (`token`, `revoke_token`, `tokens`,
/// `tokens_detail`, `me`, `discovery`, `ping`), the HTTP status (`None` when no answer came) and the
/// time from sending to having read the answer.
pub trait RequestObserver: Send + Sync {
    fn observe(&self, endpoint: &'static str, status: Option<u16>, elapsed: Duration);
}

/// An OAuth2 application's credentials. Public applications have no secret.
#[derive(Debug, Clone)]
pub struct ClientCredentials {
    pub client_id: String,
    pub client_secret: Option<SecretString>,
}

/// How to get a new token.
#[derive(Debug, Clone)]
pub enum TokenGrant {
    /// OAuth2 resource-owner password grant (RFC 6749 §4.3) at the token endpoint.
    Password {
        client: ClientCredentials,
        username: String,
        password: SecretString,
    },
    /// OAuth2 client credentials grant (RFC 6749 §4.4). AWX and the gateway refuse it; other
    /// OAuth2 servers may not.
    ClientCredentials { client: ClientCredentials },
    /// A personal access token created through the REST API with the user's login.
    PersonalAccessToken {
        username: String,
        password: SecretString,
        description: String,
    },
    /// A personal access token created through the REST API with a write-scoped token of the
    /// user as bearer (a browser sign-in's access token): no password involved.
    PersonalAccessTokenAs {
        bearer: SecretString,
        /// The user the bearer acts as, as far as known (empty when not).
        username: String,
        description: String,
    },
}

/// Whether a token belongs to an OAuth2 application or is a personal access token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    Application,
    Personal,
}

/// A token as AWX handed it out.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub access_token: SecretString,
    /// Only application tokens have one.
    pub refresh_token: Option<SecretString>,
    /// Counted from when the request was sent; `None` when the server did not say.
    pub expires_at: Option<jiff::Timestamp>,
    pub scope: String,
    /// The token's id in the REST API, when known (tokens created through the REST API).
    pub token_id: Option<u64>,
    /// The owner's username, when known.
    pub user: Option<String>,
    pub kind: TokenKind,
    /// The id of its application, when AWX said (tokens created through the REST API).
    pub application: Option<u64>,
    /// AWX's clock when it answered (its `Date` header), when it said.
    pub answered_at: Option<jiff::Timestamp>,
}

/// How a REST call authenticates: the user's login, or a token of the user.
#[derive(Clone, Copy)]
pub enum Login<'a> {
    Password {
        username: &'a str,
        password: &'a SecretString,
    },
    Bearer(&'a SecretString),
}

impl fmt::Debug for Login<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Password { username, .. } => write!(f, "Password({username})"),
            Self::Bearer(_) => f.write_str("Bearer([redacted])"),
        }
    }
}

impl Login<'_> {
    fn header(&self) -> Result<HeaderValue, AwxError> {
        match self {
            Self::Password { username, password } => wire::user_basic_auth(username, password),
            Self::Bearer(token) => wire::bearer_auth(token),
        }
    }
}

/// A token as AWX lists it; its value is never shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedToken {
    pub id: u64,
    pub user: Option<u64>,
    pub application: Option<u64>,
    pub created: Option<jiff::Timestamp>,
    pub description: String,
}

/// Which of the user's tokens to list (AWX filters them, docs/awx-protocol.md#filters).
#[derive(Debug, Clone, Default)]
pub struct TokenQuery<'a> {
    pub username: Option<&'a str>,
    pub application: Option<u64>,
    /// Only personal tokens (`true`) or only application tokens (`false`).
    pub personal: Option<bool>,
    pub created_from: Option<jiff::Timestamp>,
    pub created_to: Option<jiff::Timestamp>,
    pub description_contains: Option<&'a str>,
}

impl TokenQuery<'_> {
    fn query_string(&self, page: u32) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some(u) = self.username {
            q.append_pair("user__username", u);
        }
        if let Some(a) = self.application {
            q.append_pair("application", &a.to_string());
        }
        if let Some(personal) = self.personal {
            q.append_pair(
                "application__isnull",
                if personal { "true" } else { "false" },
            );
        }
        if let Some(t) = self.created_from {
            q.append_pair(
                "created__gte",
                &t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
            );
        }
        if let Some(t) = self.created_to {
            q.append_pair(
                "created__lte",
                &t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
            );
        }
        if let Some(d) = self.description_contains {
            q.append_pair("description__contains", d);
        }
        q.append_pair("order_by", "id");
        q.append_pair("page_size", "200");
        q.append_pair("page", &page.to_string());
        q.finish()
    }
}

/// What is known of a token to be revoked.
#[derive(Debug, Clone)]
pub struct TokenToRevoke {
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    pub token_id: Option<u64>,
    pub kind: TokenKind,
}

/// Credentials that may be used to revoke a token besides the token itself.
#[derive(Debug, Clone, Default)]
pub struct RevocationCredentials {
    pub client: Option<ClientCredentials>,
    /// A username and password.
    pub user: Option<(String, SecretString)>,
    /// A write-scoped token of the user (a browser sign-in's access token): it may delete the
    /// user's personal tokens.
    pub bearer: Option<SecretString>,
}

/// Who a token authenticates as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwxUser {
    pub id: Option<u64>,
    pub username: String,
}

/// A client for one AWX endpoint. Cheap to clone.
#[derive(Clone)]
pub struct AwxClient {
    inner: Arc<Inner>,
}

struct Inner {
    base_url: Url,
    transport: Transport,
}

impl fmt::Debug for AwxClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwxClient")
            .field("base_url", &self.inner.base_url.as_str())
            .finish_non_exhaustive()
    }
}

impl AwxClient {
    /// Builds a client. Fails on an unusable CA bundle or base URL; makes no request.
    pub fn new(
        endpoint: Endpoint,
        limits: RequestLimits,
        observer: Option<Arc<dyn RequestObserver>>,
    ) -> Result<Self, AwxError> {
        let base_url = normalize_base_url(endpoint.base_url)?;
        let tls = tls::client_config(
            endpoint.ca_bundle_pem.as_deref(),
            endpoint.insecure_skip_tls_verify,
        )?;
        let transport = Transport::new(tls, limits, observer, endpoint.timeout)?;
        Ok(Self {
            inner: Arc::new(Inner {
                base_url,
                transport,
            }),
        })
    }

    /// The base URL requests are resolved against (always ending in `/`).
    pub fn base_url(&self) -> &Url {
        &self.inner.base_url
    }

    /// The version the server says it runs (`version` of its anonymous ping answer), if it
    /// says one: at most 64 characters of letters, digits and `.+-_`. Anything else (an error,
    /// HTML, no such field) is `None`: the version is for people, nothing depends on it.
    pub async fn version(&self, flavor: Flavor) -> Option<String> {
        let answer = self
            .send("ping", Method::GET, flavor.ping_path(), None)
            .await
            .ok()?;
        if answer.status != 200 {
            return None;
        }
        let object = wire::json_object(&answer).ok()?;
        let version = object.get("version")?.as_str()?;
        let plain = |c: char| c.is_ascii_alphanumeric() || ".+-_".contains(c);
        (!version.is_empty() && version.len() <= 64 && version.chars().all(plain))
            .then(|| version.to_string())
    }

    /// Tells the gateway from AWX 24.x (docs/awx-protocol.md#detect-flavour): the gateway answers `GET /api/gateway/v1/`
    /// with 200 JSON, AWX 24.x answers `GET /api/o/` with 200 JSON. A server or network
    /// failure during a probe is returned as such, since it says nothing about the flavour.
    pub async fn detect_flavor(&self) -> Result<Flavor, AwxError> {
        let mut seen = Vec::new();
        for flavor in [Flavor::Gateway, Flavor::Controller] {
            let answer = self
                .send("discovery", Method::GET, flavor.discovery_path(), None)
                .await?;
            let path = format!("GET /{}", flavor.discovery_path());
            match answer.status {
                200 if !wire::is_html(&answer) => match wire::json_object(&answer) {
                    Ok(_) => return Ok(flavor),
                    Err(_) => seen.push(format!("{path} answered 200 without a JSON object")),
                },
                200 => seen.push(format!("{path} answered HTML")),
                500..=599 => return Err(common_failure(&answer)),
                300..=399 => seen.push(format!(
                    "{path} redirected (HTTP {}) to {}",
                    answer.status,
                    answer.location.as_deref().unwrap_or("nowhere")
                )),
                status => seen.push(format!("{path} answered HTTP {status}")),
            }
        }
        Err(AwxError::FlavorNotDetected {
            base_url: self.inner.base_url.to_string(),
            detail: seen.join(", "),
        })
    }

    /// Gets a new token with `grant`.
    pub async fn issue(
        &self,
        flavor: Flavor,
        grant: &TokenGrant,
        scope: Scope,
    ) -> Result<IssuedToken, AwxError> {
        match grant {
            TokenGrant::Password {
                client,
                username,
                password,
            } => {
                let form = vec![
                    ("grant_type", "password"),
                    ("username", username.as_str()),
                    ("password", password.expose_secret()),
                    ("scope", scope.as_str()),
                ];
                self.token_request(flavor, client, "password", form, scope, Some(username))
                    .await
            }
            TokenGrant::ClientCredentials { client } => {
                let form = vec![
                    ("grant_type", "client_credentials"),
                    ("scope", scope.as_str()),
                ];
                self.token_request(flavor, client, "client_credentials", form, scope, None)
                    .await
            }
            TokenGrant::PersonalAccessToken {
                username,
                password,
                description,
            } => {
                let login = Login::Password { username, password };
                self.create_personal_token(flavor, login, username, description, scope)
                    .await
            }
            TokenGrant::PersonalAccessTokenAs {
                bearer,
                username,
                description,
            } => {
                let login = Login::Bearer(bearer);
                self.create_personal_token(flavor, login, username, description, scope)
                    .await
            }
        }
    }

    /// Trades a refresh token for a new token pair (docs/awx-protocol.md#refresh). AWX rotates both and deletes the
    /// old access token at once.
    pub async fn refresh(
        &self,
        flavor: Flavor,
        client: &ClientCredentials,
        refresh_token: &SecretString,
        scope: Scope,
    ) -> Result<IssuedToken, AwxError> {
        let form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose_secret()),
            ("scope", scope.as_str()),
        ];
        self.token_request(flavor, client, "refresh_token", form, scope, None)
            .await
    }

    /// Trades an authorization code from a browser sign-in for a token pair
    /// (docs/awx-protocol.md#code-exchange): the redirect URI must be the one the code was
    /// issued for, character for character, and the verifier the one whose S256 challenge
    /// went to the authorize endpoint.
    pub async fn exchange_code(
        &self,
        flavor: Flavor,
        client: &ClientCredentials,
        code: &SecretString,
        redirect_uri: &str,
        code_verifier: &SecretString,
        scope: Scope,
    ) -> Result<IssuedToken, AwxError> {
        let form = vec![
            ("grant_type", "authorization_code"),
            ("code", code.expose_secret()),
            ("redirect_uri", redirect_uri),
            ("code_verifier", code_verifier.expose_secret()),
        ];
        self.token_request(flavor, client, "authorization_code", form, scope, None)
            .await
    }

    /// Revokes a token, then checks that it no longer works: success means the token now
    /// gets 401. A token that was already dead counts as revoked.
    pub async fn revoke(
        &self,
        flavor: Flavor,
        token: &TokenToRevoke,
        creds: &RevocationCredentials,
    ) -> Result<(), AwxError> {
        match self.send_revocation(flavor, token, creds).await {
            Ok(at) => match self.whoami(flavor, &token.access_token).await {
                Err(AwxError::TokenRejected { .. }) => Ok(()),
                Ok(user) => Err(AwxError::RevocationNotEffective {
                    at,
                    user: user.username,
                }),
                Err(other) => Err(other),
            },
            // The credentials were refused or missing; if the token is dead anyway (revoked
            // earlier, expired, deleted by an admin) the goal is reached.
            Err(refused) if refused.is_refusal() => {
                match self.whoami(flavor, &token.access_token).await {
                    Err(AwxError::TokenRejected { .. }) => Ok(()),
                    _ => Err(refused),
                }
            }
            Err(other) => Err(other),
        }
    }

    /// Who `token` authenticates as. A refused token is [`AwxError::TokenRejected`].
    pub async fn whoami(&self, flavor: Flavor, token: &SecretString) -> Result<AwxUser, AwxError> {
        let answer = self
            .send(
                "me",
                Method::GET,
                flavor.me_path(),
                Some(wire::bearer_auth(token)?),
            )
            .await?;
        match answer.status {
            200..=299 => parse_me(&answer),
            401 => Err(AwxError::TokenRejected {
                at: answer.at,
                status: answer.status,
            }),
            _ => Err(common_failure(&answer)),
        }
    }

    /// The user's tokens that `query` selects, page by page (at most 50 pages of 200).
    pub async fn list_tokens(
        &self,
        flavor: Flavor,
        login: Login<'_>,
        query: &TokenQuery<'_>,
    ) -> Result<Vec<ListedToken>, AwxError> {
        const MAX_PAGES: u32 = 50;
        let mut found = Vec::new();
        for page in 1..=MAX_PAGES {
            let path = format!("{}?{}", flavor.tokens_path(), query.query_string(page));
            let answer = self
                .send("tokens", Method::GET, &path, Some(login.header()?))
                .await?;
            match answer.status {
                200..=299 => {}
                // A page past the end (tokens deleted while walking): nothing more.
                404 if page > 1 => break,
                401 => {
                    return Err(AwxError::Unauthorized {
                        at: answer.at.clone(),
                        status: answer.status,
                        detail: wire::detail_text(&answer.body),
                    });
                }
                _ => return Err(common_failure(&answer)),
            }
            let object = wire::json_object(&answer)?;
            let results = object.get("results").and_then(Value::as_array);
            for item in results.into_iter().flatten() {
                let Some(item) = item.as_object() else {
                    continue;
                };
                let Some(id) = wire::id_field(item, "id") else {
                    continue;
                };
                found.push(ListedToken {
                    id,
                    user: wire::id_field(item, "user"),
                    application: wire::id_field(item, "application"),
                    created: wire::string_field(item, "created").and_then(|t| t.parse().ok()),
                    description: wire::string_field(item, "description")
                        .unwrap_or_default()
                        .to_owned(),
                });
            }
            if object.get("next").is_none_or(Value::is_null) {
                break;
            }
        }
        Ok(found)
    }

    /// The id of the OAuth2 application `client_id` as the user sees it: AWX lists the
    /// applications of the user's organizations with their client ids, and refuses to filter
    /// on them (docs/awx-protocol.md#filters), so they are matched here. `None` when the user
    /// sees no such application (or the gateway, which lists applications to admins only).
    pub async fn application_id(
        &self,
        flavor: Flavor,
        username: &str,
        password: &SecretString,
        client_id: &str,
    ) -> Result<Option<u64>, AwxError> {
        if flavor == Flavor::Gateway {
            return Ok(None);
        }
        const MAX_PAGES: u32 = 20;
        for page in 1..=MAX_PAGES {
            let path = format!("api/v2/applications/?order_by=id&page_size=200&page={page}");
            let answer = self
                .send(
                    "applications",
                    Method::GET,
                    &path,
                    Some(wire::user_basic_auth(username, password)?),
                )
                .await?;
            match answer.status {
                200..=299 => {}
                403 | 404 => return Ok(None),
                401 => {
                    return Err(AwxError::InvalidCredentials {
                        at: answer.at.clone(),
                        status: answer.status,
                        description: Some(wire::detail_text(&answer.body)),
                    });
                }
                _ => return Err(common_failure(&answer)),
            }
            let object = wire::json_object(&answer)?;
            let results = object.get("results").and_then(Value::as_array);
            for item in results.into_iter().flatten() {
                let Some(item) = item.as_object() else {
                    continue;
                };
                if wire::string_field(item, "client_id") == Some(client_id) {
                    return Ok(wire::id_field(item, "id"));
                }
            }
            if object.get("next").is_none_or(Value::is_null) {
                break;
            }
        }
        Ok(None)
    }

    /// Sets the description of the token `id` (`PATCH .../tokens/{id}/`).
    pub async fn describe_token(
        &self,
        flavor: Flavor,
        login: Login<'_>,
        id: u64,
        description: &str,
    ) -> Result<(), AwxError> {
        let answer = self
            .send_with_body(
                "tokens_detail",
                Method::PATCH,
                &flavor.token_detail_path(id),
                Some(login.header()?),
                Body::Json(json!({ "description": description })),
            )
            .await?;
        match answer.status {
            200..=299 => Ok(()),
            _ => Err(common_failure(&answer)),
        }
    }

    /// Deletes the token `id` with `login` (404 counts as done).
    pub async fn delete_token_as(
        &self,
        flavor: Flavor,
        login: Login<'_>,
        id: u64,
    ) -> Result<(), AwxError> {
        self.delete_once(&flavor.token_detail_path(id), login.header()?)
            .await
            .map(drop)
    }

    async fn token_request<'a>(
        &self,
        flavor: Flavor,
        client: &'a ClientCredentials,
        grant_type: &'static str,
        mut form: Vec<(&'static str, &'a str)>,
        scope: Scope,
        username: Option<&String>,
    ) -> Result<IssuedToken, AwxError> {
        // Confidential applications authenticate with HTTP Basic; public ones only name
        // themselves in the body (docs/awx-protocol.md#password-grant).
        let authorization = match &client.client_secret {
            Some(secret) => Some(wire::client_basic_auth(&client.client_id, secret)?),
            None => {
                form.push(("client_id", client.client_id.as_str()));
                None
            }
        };
        let answer = self
            .send_with_body(
                "token",
                Method::POST,
                flavor.token_path(),
                authorization,
                Body::Form(form),
            )
            .await?;
        token_answer(&answer, grant_type, scope, username)
    }

    /// `POST /api/v2/tokens/` (or the gateway's) with the user's login (or a token of the
    /// user) and a JSON body (docs/awx-protocol.md#personal-tokens).
    async fn create_personal_token(
        &self,
        flavor: Flavor,
        login: Login<'_>,
        username: &str,
        description: &str,
        scope: Scope,
    ) -> Result<IssuedToken, AwxError> {
        let body = json!({
            "description": description,
            "application": null,
            "scope": scope.as_str(),
        });
        let answer = self
            .send_with_body(
                "tokens",
                Method::POST,
                flavor.tokens_path(),
                Some(login.header()?),
                Body::Json(body),
            )
            .await?;
        personal_token_answer(&answer, username, scope)
    }

    /// Makes the request that should kill the token; returns its `METHOD url` for messages.
    async fn send_revocation(
        &self,
        flavor: Flavor,
        token: &TokenToRevoke,
        creds: &RevocationCredentials,
    ) -> Result<String, AwxError> {
        match (token.kind, token.token_id) {
            // The gateway's revoke endpoint needs the hashed value; its REST API deletes by
            // id directly, which is simpler when the id is known (docs/awx-protocol.md#gateway-revoke).
            (TokenKind::Application, Some(id)) if flavor == Flavor::Gateway => {
                let at = self.delete_token(flavor, id, token, creds).await?;
                // Deleting the access token leaves its refresh token alive (docs/awx-protocol.md#delete-token).
                if let (Some(refresh), Some(client)) = (&token.refresh_token, &creds.client) {
                    self.post_revoke(flavor, client, refresh, "refresh_token")
                        .await?;
                }
                Ok(at)
            }
            (TokenKind::Application, id) => match (&creds.client, id) {
                // Revoking the refresh token also deletes its access token (docs/awx-protocol.md#revoke-token).
                (Some(client), _) => match &token.refresh_token {
                    Some(refresh) => {
                        self.post_revoke(flavor, client, refresh, "refresh_token")
                            .await
                    }
                    None => {
                        self.post_revoke(flavor, client, &token.access_token, "access_token")
                            .await
                    }
                },
                (None, Some(id)) => self.delete_token(flavor, id, token, creds).await,
                (None, None) => Err(AwxError::MissingCredentials {
                    detail: "revoking an application token needs the application's client \
                             credentials or the token's id, and neither is known"
                        .to_owned(),
                }),
            },
            (TokenKind::Personal, Some(id)) => self.delete_token(flavor, id, token, creds).await,
            // Application credentials can revoke a personal token as well (docs/awx-protocol.md#revoke-token).
            (TokenKind::Personal, None) => match &creds.client {
                Some(client) => {
                    self.post_revoke(flavor, client, &token.access_token, "access_token")
                        .await
                }
                None => Err(AwxError::MissingCredentials {
                    detail: "revoking a personal access token needs its id (or application \
                             client credentials), and neither is known"
                        .to_owned(),
                }),
            },
        }
    }

    /// `POST /api/o/revoke_token/` (or the gateway's) with client authentication (docs/awx-protocol.md#revoke-token).
    async fn post_revoke(
        &self,
        flavor: Flavor,
        client: &ClientCredentials,
        token: &SecretString,
        hint: &'static str,
    ) -> Result<String, AwxError> {
        let hashed;
        let value = match flavor {
            Flavor::Controller => token.expose_secret(),
            Flavor::Gateway => {
                hashed = wire::gateway_token_reference(token);
                hashed.expose_secret()
            }
        };
        let mut form = vec![("token", value), ("token_type_hint", hint)];
        let authorization = match &client.client_secret {
            Some(secret) => Some(wire::client_basic_auth(&client.client_id, secret)?),
            None => {
                form.push(("client_id", client.client_id.as_str()));
                None
            }
        };
        let answer = self
            .send_with_body(
                "revoke_token",
                Method::POST,
                flavor.revoke_path(),
                authorization,
                Body::Form(form),
            )
            .await?;
        match answer.status {
            200..=299 => Ok(answer.at),
            401 => Err(AwxError::InvalidClient {
                at: answer.at.clone(),
                status: answer.status,
                description: wire::oauth_error(&answer.body).and_then(|e| e.description),
            }),
            400 => Err(match wire::oauth_error(&answer.body) {
                Some(e) if e.error == "invalid_client" => AwxError::InvalidClient {
                    at: answer.at.clone(),
                    status: answer.status,
                    description: e.description,
                },
                Some(e) => AwxError::InvalidRequest {
                    at: answer.at.clone(),
                    status: answer.status,
                    description: Some(match e.description {
                        Some(d) => format!("{}: {d}", e.error),
                        None => e.error,
                    }),
                },
                None => AwxError::InvalidRequest {
                    at: answer.at.clone(),
                    status: answer.status,
                    description: Some(wire::detail_text(&answer.body)),
                },
            }),
            _ => Err(common_failure(&answer)),
        }
    }

    /// `DELETE .../tokens/{id}/` with the user's login when given; when that is refused or
    /// there is none, with the token itself (a write-scoped token may delete itself, docs/awx-protocol.md#delete-token).
    async fn delete_token(
        &self,
        flavor: Flavor,
        id: u64,
        token: &TokenToRevoke,
        creds: &RevocationCredentials,
    ) -> Result<String, AwxError> {
        let path = flavor.token_detail_path(id);
        if let Some((username, password)) = &creds.user {
            let basic = wire::user_basic_auth(username, password)?;
            match self.delete_once(&path, basic).await {
                Err(refused @ (AwxError::Unauthorized { .. } | AwxError::Forbidden { .. })) => {
                    tracing::debug!(
                        error = %refused,
                        "the user's login may not delete the token; trying the token itself"
                    );
                }
                done => return done,
            }
        }
        if let Some(bearer) = &creds.bearer {
            match self.delete_once(&path, wire::bearer_auth(bearer)?).await {
                Err(refused @ (AwxError::Unauthorized { .. } | AwxError::Forbidden { .. })) => {
                    tracing::debug!(
                        error = %refused,
                        "the sign-in may not delete the token; trying the token itself"
                    );
                }
                done => return done,
            }
        }
        self.delete_once(&path, wire::bearer_auth(&token.access_token)?)
            .await
    }

    async fn delete_once(
        &self,
        path: &str,
        authorization: HeaderValue,
    ) -> Result<String, AwxError> {
        let answer = self
            .send("tokens_detail", Method::DELETE, path, Some(authorization))
            .await?;
        match answer.status {
            // 404: already gone.
            200..=299 | 404 => Ok(answer.at),
            _ => Err(common_failure(&answer)),
        }
    }

    async fn send(
        &self,
        endpoint: &'static str,
        method: Method,
        path: &str,
        authorization: Option<HeaderValue>,
    ) -> Result<Answer, AwxError> {
        self.send_with_body(endpoint, method, path, authorization, Body::Empty)
            .await
    }

    async fn send_with_body(
        &self,
        endpoint: &'static str,
        method: Method,
        path: &str,
        authorization: Option<HeaderValue>,
        body: Body<'_>,
    ) -> Result<Answer, AwxError> {
        let url = self
            .inner
            .base_url
            .join(path)
            .map_err(|e| AwxError::InvalidEndpoint {
                detail: format!("cannot add {path} to {}: {e}", self.inner.base_url),
            })?;
        self.inner
            .transport
            .send(Call {
                endpoint,
                method,
                url,
                authorization,
                body,
            })
            .await
    }
}

/// Checks the base URL and makes it end in `/`, so that relative paths keep its prefix
/// (`https://host/awx` → `https://host/awx/api/o/token/`).
fn normalize_base_url(mut url: Url) -> Result<Url, AwxError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(AwxError::InvalidEndpoint {
            detail: format!("the scheme must be http or https, not {:?}", url.scheme()),
        });
    }
    if url.host_str().is_none() {
        return Err(AwxError::InvalidEndpoint {
            detail: "it has no host".to_owned(),
        });
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Not echoed: the user part may hold a password.
        return Err(AwxError::InvalidEndpoint {
            detail: "it must not contain a username or password; credentials are configured \
                     separately"
                .to_owned(),
        });
    }
    url.set_query(None);
    url.set_fragment(None);
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// What the token endpoint's answer means: the issued token, or why there is none.
fn token_answer(
    answer: &Answer,
    grant_type: &'static str,
    scope: Scope,
    username: Option<&String>,
) -> Result<IssuedToken, AwxError> {
    if !(200..=299).contains(&answer.status) {
        return Err(token_endpoint_failure(answer, grant_type, scope));
    }
    let object = wire::json_object(answer)?;
    let access_token = wire::string_field(&object, "access_token").ok_or_else(|| {
        AwxError::UnexpectedResponse {
            at: answer.at.clone(),
            status: Some(answer.status),
            detail: format!(
                "the token answer has no access_token (it has: {})",
                wire::key_names(&object)
            ),
            outcome: Outcome::of_unreadable(answer.status),
        }
    })?;
    Ok(IssuedToken {
        access_token: SecretString::from(access_token),
        refresh_token: wire::string_field(&object, "refresh_token").map(SecretString::from),
        expires_at: object
            .get("expires_in")
            .and_then(wire::parse_expires_in)
            .map(|secs| wire::expires_at(answer.sent_at, secs)),
        // RFC 6749 §5.1: an omitted scope is the one requested.
        scope: wire::string_field(&object, "scope")
            .unwrap_or(scope.as_str())
            .to_owned(),
        token_id: None,
        user: username.cloned(),
        kind: TokenKind::Application,
        application: None,
        answered_at: answer.date,
    })
}

/// What the answer to `POST .../tokens/` means: the created token, or why there is none.
fn personal_token_answer(
    answer: &Answer,
    username: &str,
    scope: Scope,
) -> Result<IssuedToken, AwxError> {
    if !(200..=299).contains(&answer.status) {
        return Err(personal_token_failure(answer, scope));
    }
    let object = wire::json_object(answer)?;
    let token = wire::string_field(&object, "token")
        .filter(|t| !wire::is_masked(t))
        .ok_or_else(|| AwxError::UnexpectedResponse {
            at: answer.at.clone(),
            status: Some(answer.status),
            detail: format!(
                "the created token's value is missing or masked (the answer has: {})",
                wire::key_names(&object)
            ),
            outcome: Outcome::of_unreadable(answer.status),
        })?;
    // The token exists now and its value is shown only this once: an odd `expires`
    // must not make the caller lose it.
    let expires_at = wire::string_field(&object, "expires").and_then(|text| {
        text.parse::<jiff::Timestamp>()
            .inspect_err(|error| {
                tracing::warn!(
                    at = %answer.at,
                    %error,
                    "the created token's expires field is not an RFC 3339 time; \
                     treating its expiry as unknown"
                );
            })
            .ok()
    });
    let owner = object
        .get("summary_fields")
        .and_then(|s| s.get("user"))
        .and_then(|u| u.get("username"))
        .and_then(Value::as_str)
        .unwrap_or(username);
    Ok(IssuedToken {
        access_token: SecretString::from(token),
        refresh_token: wire::string_field(&object, "refresh_token")
            .filter(|t| !wire::is_masked(t))
            .map(SecretString::from),
        expires_at,
        scope: wire::string_field(&object, "scope")
            .unwrap_or(scope.as_str())
            .to_owned(),
        token_id: wire::id_field(&object, "id"),
        user: (!owner.is_empty()).then(|| owner.to_owned()),
        // A token created with an application is that application's (it has a refresh token).
        kind: if wire::id_field(&object, "application").is_some() {
            TokenKind::Application
        } else {
            TokenKind::Personal
        },
        application: wire::id_field(&object, "application"),
        answered_at: answer.date,
    })
}

/// `GET me`: AWX answers a one-item page; accept a bare user object too.
fn parse_me(answer: &Answer) -> Result<AwxUser, AwxError> {
    let object = wire::json_object(answer)?;
    let user: Option<&Map<String, Value>> = match object.get("results") {
        Some(Value::Array(results)) => results.first().and_then(Value::as_object),
        _ => Some(&object),
    };
    let username = user.and_then(|u| wire::string_field(u, "username"));
    match (user, username) {
        (Some(user), Some(username)) => Ok(AwxUser {
            id: wire::id_field(user, "id"),
            username: username.to_owned(),
        }),
        _ => Err(AwxError::UnexpectedResponse {
            at: answer.at.clone(),
            status: Some(answer.status),
            detail: format!(
                "the answer names no user (it has: {})",
                wire::key_names(&object)
            ),
            outcome: Outcome::of_unreadable(answer.status),
        }),
    }
}

/// Errors of the token endpoint (docs/awx-protocol.md#token-errors, docs/awx-protocol.md#refresh, docs/awx-protocol.md#flavours).
fn token_endpoint_failure(answer: &Answer, grant_type: &'static str, scope: Scope) -> AwxError {
    let at = answer.at.clone();
    let status = answer.status;
    if let Some(oauth) = wire::oauth_error(&answer.body) {
        let description = oauth.description;
        return match oauth.error.as_str() {
            "invalid_client" => AwxError::InvalidClient {
                at,
                status,
                description,
            },
            "invalid_grant" if grant_type == "refresh_token" => AwxError::RefreshTokenInvalid {
                at,
                status,
                description,
            },
            "invalid_grant" if grant_type == "authorization_code" => {
                AwxError::AuthorizationCodeRejected {
                    at,
                    status,
                    description,
                }
            }
            "invalid_grant" => AwxError::InvalidCredentials {
                at,
                status,
                description: Some(format!("invalid_grant{}", opt_suffix(&description))),
            },
            "unauthorized_client" | "unsupported_grant_type" => AwxError::GrantNotSupported {
                at,
                status,
                grant_type,
                error: oauth.error,
                description,
            },
            "invalid_scope" => AwxError::InvalidScope {
                at,
                status,
                scope: scope.as_str(),
                description,
            },
            "invalid_request" => AwxError::InvalidRequest {
                at,
                status,
                description,
            },
            "access_denied" if is_external_user_refusal(description.as_deref().unwrap_or("")) => {
                AwxError::ExternalUserRefused {
                    at,
                    status,
                    detail: description.unwrap_or_default(),
                }
            }
            _ if (500..=599).contains(&status) => common_failure(answer),
            other => AwxError::UnexpectedResponse {
                at,
                status: Some(status),
                detail: format!("OAuth2 error {other}{}", opt_suffix(&description)),
                outcome: Outcome::Rejected,
            },
        };
    }
    // The two refusals AWX sends as text/html (docs/awx-protocol.md#token-errors).
    if status == 403 {
        let text = wire::detail_text(&answer.body);
        if text
            .to_ascii_lowercase()
            .contains("refresh token has expired")
        {
            return AwxError::RefreshTokenExpired { at, status };
        }
        if is_external_user_refusal(&text) {
            return AwxError::ExternalUserRefused {
                at,
                status,
                detail: text,
            };
        }
    }
    if status == 401 {
        return AwxError::InvalidClient {
            at,
            status,
            description: None,
        };
    }
    let mut error = common_failure(answer);
    if grant_type == "refresh_token"
        && let AwxError::AwxServerError { hint, .. } = &mut error
    {
        // A refresh token whose access token was deleted makes AWX fail with 500
        // (docs/awx-protocol.md#refresh).
        *hint = "; if this repeats, the refresh token's access token was probably deleted \
                 (AWX then fails with 500 on every refresh) and a new token has to be issued";
    }
    error
}

/// Errors of `POST /api/v2/tokens/` (docs/awx-protocol.md#personal-tokens).
fn personal_token_failure(answer: &Answer, scope: Scope) -> AwxError {
    let at = answer.at.clone();
    let status = answer.status;
    match status {
        401 => AwxError::InvalidCredentials {
            at,
            status,
            description: Some(wire::detail_text(&answer.body)),
        },
        403 => {
            let detail = wire::detail_text(&answer.body);
            if is_external_user_refusal(&detail) {
                AwxError::ExternalUserRefused { at, status, detail }
            } else {
                AwxError::Forbidden { at, status, detail }
            }
        }
        400 => {
            let scope_refused = matches!(
                serde_json::from_slice::<Value>(&answer.body),
                Ok(Value::Object(object)) if object.contains_key("scope")
            );
            if scope_refused {
                AwxError::InvalidScope {
                    at,
                    status,
                    scope: scope.as_str(),
                    description: Some(wire::redacted_excerpt(&answer.body)),
                }
            } else {
                AwxError::InvalidRequest {
                    at,
                    status,
                    description: Some(wire::redacted_excerpt(&answer.body)),
                }
            }
        }
        _ => common_failure(answer),
    }
}

fn is_external_user_refusal(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    lower.contains("external authentication provider")
        || lower.contains("cannot be created by users associated")
}

/// What any endpoint's redirect, missing endpoint, refusal or server error means.
fn common_failure(answer: &Answer) -> AwxError {
    let at = answer.at.clone();
    let status = answer.status;
    match status {
        300..=399 => AwxError::UnexpectedResponse {
            at,
            status: Some(status),
            detail: format!(
                "a redirect (HTTP {status}) to {}; redirects are not followed, so credentials \
                 are never sent to another address: set baseUrl to the address AWX is really \
                 served at",
                answer
                    .location
                    .as_deref()
                    .map(|l| wire::redacted_excerpt(l.as_bytes()))
                    .unwrap_or_else(|| "no Location".to_owned())
            ),
            outcome: Outcome::Rejected,
        },
        404 | 405 => AwxError::EndpointNotFound { at, status },
        401 => AwxError::Unauthorized {
            at,
            status,
            detail: wire::detail_text(&answer.body),
        },
        403 => AwxError::Forbidden {
            at,
            status,
            detail: wire::detail_text(&answer.body),
        },
        500..=599 => AwxError::AwxServerError {
            at,
            status,
            detail: Some(wire::detail_text(&answer.body)).filter(|d| d != "empty body"),
            hint: "",
        },
        _ => AwxError::UnexpectedResponse {
            at,
            status: Some(status),
            detail: format!("HTTP {status}: {}", wire::detail_text(&answer.body)),
            outcome: Outcome::of_unreadable(status),
        },
    }
}

fn opt_suffix(text: &Option<String>) -> String {
    text.as_deref()
        .map(|t| format!(": {t}"))
        .unwrap_or_default()
}
