//! What the reconciler asks of AWX, as a trait: the operator runs it with the AWX client
//! ([`AwxPool`]); the simulation tests run it against an AWX in memory.

use std::{
    collections::HashMap,
    future::Future,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::Duration,
};

use secrecy::SecretString;
use sha2::{Digest, Sha256};
use url::Url;

use crate::{
    awx::{
        AwxClient, AwxError, AwxUser, ClientCredentials, Endpoint, Flavor, IssuedToken,
        ListedToken, Login, RequestLimits, RequestObserver, RevocationCredentials, Scope,
        TokenGrant, TokenQuery, TokenToRevoke,
    },
    crd::FlavorSpec,
};

/// Where an AWX is and how to reach it.
#[derive(Clone, Debug, PartialEq)]
pub struct Connection {
    pub url: Url,
    /// Host and port: requests are limited per host.
    pub host: String,
    pub insecure_skip_tls_verify: bool,
    pub timeout: Duration,
    pub ca_bundle: Option<Vec<u8>>,
    /// A rate of its own, besides the host's: a connection's name and its requestsPerSecond.
    pub narrower: Option<(String, NonZeroU32)>,
}

/// The AWX side of a reconcile. Every method is one or a few requests to AWX.
pub trait AwxApi: Send + Sync {
    /// The flavour to speak: as asked, or detected once per URL.
    fn flavor(
        &self,
        at: &Connection,
        wanted: FlavorSpec,
    ) -> impl Future<Output = Result<Flavor, AwxError>> + Send;

    fn issue(
        &self,
        at: &Connection,
        flavor: Flavor,
        grant: &TokenGrant,
        scope: Scope,
    ) -> impl Future<Output = Result<IssuedToken, AwxError>> + Send;

    fn refresh(
        &self,
        at: &Connection,
        flavor: Flavor,
        client: &ClientCredentials,
        refresh_token: &SecretString,
        scope: Scope,
    ) -> impl Future<Output = Result<IssuedToken, AwxError>> + Send;

    /// Revokes and checks that the token no longer works.
    fn revoke(
        &self,
        at: &Connection,
        flavor: Flavor,
        token: &TokenToRevoke,
        creds: &RevocationCredentials,
    ) -> impl Future<Output = Result<(), AwxError>> + Send;

    fn whoami(
        &self,
        at: &Connection,
        flavor: Flavor,
        token: &SecretString,
    ) -> impl Future<Output = Result<AwxUser, AwxError>> + Send;

    /// The id of the application `client_id` as the user sees it (remembered per AWX), or
    /// `None` when the user cannot see it or the flavour does not say.
    fn application_id(
        &self,
        at: &Connection,
        flavor: Flavor,
        username: &str,
        password: &SecretString,
        client_id: &str,
    ) -> impl Future<Output = Result<Option<u64>, AwxError>> + Send;

    fn list_tokens(
        &self,
        at: &Connection,
        flavor: Flavor,
        login: Login<'_>,
        query: &TokenQuery<'_>,
    ) -> impl Future<Output = Result<Vec<ListedToken>, AwxError>> + Send;

    fn describe_token(
        &self,
        at: &Connection,
        flavor: Flavor,
        login: Login<'_>,
        id: u64,
        description: &str,
    ) -> impl Future<Output = Result<(), AwxError>> + Send;

    fn delete_token_as(
        &self,
        at: &Connection,
        flavor: Flavor,
        login: Login<'_>,
        id: u64,
    ) -> impl Future<Output = Result<(), AwxError>> + Send;

    /// Holds off other token requests of this process for `key` (an AWX user and
    /// application) until the guard is dropped, so that a token can be told from the others
    /// created just then by its creation time.
    fn exclusive(&self, key: String) -> impl Future<Output = ExclusiveGuard> + Send;
}

/// Held while a token request for one AWX user and application is in flight.
pub struct ExclusiveGuard {
    _guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl ExclusiveGuard {
    /// A guard that holds nothing (for fakes that never run requests side by side).
    pub fn none() -> Self {
        Self { _guard: None }
    }
}

/// AWX clients and per-host request limits, shared by all AwxTokens.
pub struct AwxPool {
    clients: Mutex<HashMap<String, AwxClient>>,
    limits: Mutex<HashMap<String, RequestLimits>>,
    /// Detected flavour per URL; one detection at a time per URL, however many tokens wait.
    flavors: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<Flavor>>>>,
    /// Application ids by URL and client id, once resolved.
    applications: Mutex<HashMap<(String, String), u64>>,
    exclusive: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Rate gates of connections with their own requestsPerSecond, by name and rate.
    narrower: Mutex<HashMap<(String, NonZeroU32), Arc<crate::awx::RateGate>>>,
    max_rps: Option<NonZeroU32>,
    max_in_flight: Option<usize>,
    observer: Arc<dyn RequestObserver>,
}

impl AwxPool {
    pub fn new(
        max_rps: Option<NonZeroU32>,
        max_in_flight: Option<usize>,
        observer: Arc<dyn RequestObserver>,
    ) -> Self {
        Self {
            clients: Mutex::default(),
            limits: Mutex::default(),
            flavors: Mutex::default(),
            applications: Mutex::default(),
            exclusive: Mutex::default(),
            narrower: Mutex::default(),
            max_rps,
            max_in_flight,
            observer,
        }
    }

    /// Detects the flavour at `at` afresh (a connection's health check), and the version the
    /// server says, through the same per-host limits as every other request.
    pub async fn probe(&self, at: &Connection) -> Result<(Flavor, Option<String>), AwxError> {
        let client = self.client(at)?;
        let flavor = client.detect_flavor().await?;
        Ok((flavor, client.version(flavor).await))
    }

    fn client(&self, at: &Connection) -> Result<AwxClient, AwxError> {
        let mut key = Sha256::new();
        key.update(at.url.as_str());
        key.update([u8::from(at.insecure_skip_tls_verify)]);
        key.update(at.timeout.as_millis().to_be_bytes());
        if let Some(ca) = &at.ca_bundle {
            key.update(ca);
        }
        if let Some((name, rps)) = &at.narrower {
            key.update([1]);
            key.update(name.as_bytes());
            key.update(rps.get().to_be_bytes());
        }
        let key = hex::encode(key.finalize());
        if let Some(client) = lock(&self.clients).get(&key) {
            return Ok(client.clone());
        }
        let mut limits = lock(&self.limits)
            .entry(at.host.clone())
            .or_insert_with(|| RequestLimits::new(self.max_rps, self.max_in_flight))
            .clone();
        if let Some(narrower) = &at.narrower {
            let gate = lock(&self.narrower)
                .entry(narrower.clone())
                .or_insert_with(|| crate::awx::rate_gate(narrower.1))
                .clone();
            limits = limits.narrowed(gate);
        }
        let client = AwxClient::new(
            Endpoint {
                base_url: at.url.clone(),
                ca_bundle_pem: at.ca_bundle.clone(),
                insecure_skip_tls_verify: at.insecure_skip_tls_verify,
                timeout: at.timeout,
            },
            limits,
            Some(self.observer.clone()),
        )?;
        lock(&self.clients).insert(key, client.clone());
        Ok(client)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AwxApi for AwxPool {
    async fn flavor(&self, at: &Connection, wanted: FlavorSpec) -> Result<Flavor, AwxError> {
        match wanted {
            FlavorSpec::Controller => Ok(Flavor::Controller),
            FlavorSpec::Gateway => Ok(Flavor::Gateway),
            FlavorSpec::Auto => {
                let client = self.client(at)?;
                let cell = lock(&self.flavors)
                    .entry(at.url.to_string())
                    .or_default()
                    .clone();
                cell.get_or_try_init(|| client.detect_flavor())
                    .await
                    .copied()
            }
        }
    }

    async fn issue(
        &self,
        at: &Connection,
        flavor: Flavor,
        grant: &TokenGrant,
        scope: Scope,
    ) -> Result<IssuedToken, AwxError> {
        self.client(at)?.issue(flavor, grant, scope).await
    }

    async fn refresh(
        &self,
        at: &Connection,
        flavor: Flavor,
        client: &ClientCredentials,
        refresh_token: &SecretString,
        scope: Scope,
    ) -> Result<IssuedToken, AwxError> {
        self.client(at)?
            .refresh(flavor, client, refresh_token, scope)
            .await
    }

    async fn revoke(
        &self,
        at: &Connection,
        flavor: Flavor,
        token: &TokenToRevoke,
        creds: &RevocationCredentials,
    ) -> Result<(), AwxError> {
        self.client(at)?.revoke(flavor, token, creds).await
    }

    async fn whoami(
        &self,
        at: &Connection,
        flavor: Flavor,
        token: &SecretString,
    ) -> Result<AwxUser, AwxError> {
        self.client(at)?.whoami(flavor, token).await
    }

    async fn application_id(
        &self,
        at: &Connection,
        flavor: Flavor,
        username: &str,
        password: &SecretString,
        client_id: &str,
    ) -> Result<Option<u64>, AwxError> {
        let key = (at.url.to_string(), client_id.to_string());
        if let Some(id) = lock(&self.applications).get(&key) {
            return Ok(Some(*id));
        }
        let id = self
            .client(at)?
            .application_id(flavor, username, password, client_id)
            .await?;
        if let Some(id) = id {
            lock(&self.applications).insert(key, id);
        }
        Ok(id)
    }

    async fn list_tokens(
        &self,
        at: &Connection,
        flavor: Flavor,
        login: Login<'_>,
        query: &TokenQuery<'_>,
    ) -> Result<Vec<ListedToken>, AwxError> {
        self.client(at)?.list_tokens(flavor, login, query).await
    }

    async fn describe_token(
        &self,
        at: &Connection,
        flavor: Flavor,
        login: Login<'_>,
        id: u64,
        description: &str,
    ) -> Result<(), AwxError> {
        self.client(at)?
            .describe_token(flavor, login, id, description)
            .await
    }

    async fn delete_token_as(
        &self,
        at: &Connection,
        flavor: Flavor,
        login: Login<'_>,
        id: u64,
    ) -> Result<(), AwxError> {
        self.client(at)?.delete_token_as(flavor, login, id).await
    }

    async fn exclusive(&self, key: String) -> ExclusiveGuard {
        let mutex = lock(&self.exclusive).entry(key).or_default().clone();
        ExclusiveGuard {
            _guard: Some(mutex.lock_owned().await),
        }
    }
}
