//! Reading what a decision needs, fresh from the API server: the state Secret (with the
//! version it was read at), the target Secret, and the credentials and CA bundle Secrets.
//! Only the AwxToken itself comes from the watch cache; nothing decided here trusts its status.

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use secrecy::SecretString;
use sha2::{Digest, Sha256};

use super::cluster::Cluster;
use crate::{
    Error,
    awx::{ClientCredentials, RevocationCredentials, TokenGrant},
    connection::{Resolution, Via},
    crd::{AwxToken, GrantType},
    secrets::{self, Ownership},
    spec::{self, SpecError, ValidSpec},
    state::{STATE_KEY, Session, TokenState},
};

/// What was read for one AwxToken; the executor keeps it current as it writes.
pub struct Observed {
    pub valid: Result<ValidSpec, SpecError>,
    pub state: TokenState,
    /// The stored state Secret (for conditional writes); `None` when there is none.
    pub stored: Option<Secret>,
    /// The state Secret was written for an earlier AwxToken of the same name.
    pub predecessor_state: bool,
    pub target: Option<Secret>,
    pub target_ownership: Ownership,
    pub inputs: Result<Inputs, Refusal>,
    /// The CA bundle, when one is configured and readable (revocations use it even when the
    /// credentials cannot be read).
    pub ca_bundle: Option<Vec<u8>>,
}

/// Why the credentials (or CA bundle) cannot be used: a condition reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    fn secret_missing(name: &str, what: &str) -> Self {
        Self {
            reason: "CredentialsNotFound",
            message: format!(
                "Secret {name:?} in this namespace does not exist; create it with the {what}"
            ),
        }
    }

    /// A Secret of the connection is missing or incomplete: only its owner can fix it.
    fn connection_secret(via: &Via, what: &str) -> Self {
        Self {
            reason: "ConnectionSecretMissing",
            message: format!(
                "the {what} Secret of {} is missing or incomplete; ask the connection's owner",
                via.describe()
            ),
        }
    }

    fn key_missing(name: &str, key: &str, what: &str) -> Self {
        Self {
            reason: "CredentialsNotFound",
            message: format!(
                "Secret {name:?} has no key {key:?} (or it is empty); it must hold the {what}"
            ),
        }
    }
}

/// Credentials read from the AwxToken's Secrets.
#[derive(Clone)]
pub struct Inputs {
    pub username: Option<String>,
    pub password: Option<SecretString>,
    pub client: Option<ClientCredentials>,
    /// The refresh token of a browser sign-in (grant type AuthorizationCode), as the
    /// credentials Secret holds it: the start of a new sign-in, consumed by its first refresh.
    pub refresh_token: Option<SecretString>,
    /// Hash of everything a token is issued from; stored only in the state Secret.
    pub fingerprint: String,
}

impl Inputs {
    /// The grant to send; a personal token's description carries `tag` so a token whose
    /// creation answer was lost can be found again. A sign-in's personal token is created
    /// with the sign-in's access token (`session`).
    pub fn grant(&self, token: &AwxToken, tag: &str, session: Option<&Session>) -> TokenGrant {
        let username = self.username.clone().unwrap_or_default();
        let password = self
            .password
            .clone()
            .unwrap_or_else(|| SecretString::from(String::new()));
        let client = || {
            self.client.clone().unwrap_or(ClientCredentials {
                client_id: String::new(),
                client_secret: None,
            })
        };
        let description = || {
            format!(
                "{} [{tag}]",
                token.spec.grant.description.clone().unwrap_or_else(|| {
                    format!(
                        "awx-token-operator {}/{}",
                        token.namespace().unwrap_or_default(),
                        token.name_any()
                    )
                })
            )
        };
        match token.spec.grant.type_ {
            GrantType::Password => TokenGrant::Password {
                client: client(),
                username,
                password,
            },
            GrantType::ClientCredentials => TokenGrant::ClientCredentials { client: client() },
            GrantType::PersonalAccessToken => TokenGrant::PersonalAccessToken {
                username,
                password,
                description: description(),
            },
            GrantType::AuthorizationCode => TokenGrant::PersonalAccessTokenAs {
                bearer: session
                    .map(|s| s.access_token.to_secret())
                    .unwrap_or_else(|| SecretString::from(String::new())),
                username: session.and_then(|s| s.user.clone()).unwrap_or_default(),
                description: description(),
            },
        }
    }

    /// What may revoke a token besides its own issuing application: the user's login, or
    /// the sign-in (`session`) of grant type AuthorizationCode.
    pub fn revocation(&self, session: Option<&Session>) -> RevocationCredentials {
        RevocationCredentials {
            client: self.client.clone(),
            user: match (&self.username, &self.password) {
                (Some(u), Some(p)) => Some((u.clone(), p.clone())),
                _ => None,
            },
            bearer: session.map(|s| s.access_token.to_secret()),
        }
    }
}

/// Reads everything about `resolved.token` from the API server.
pub async fn observe(resolved: &Resolution<'_>, cluster: &impl Cluster) -> Result<Observed, Error> {
    let token = resolved.token.as_ref();
    let via = resolved.via.as_ref();
    let ns = token.namespace().unwrap_or_default();
    let valid = match &resolved.refused {
        Some(refused) => Err(refused.clone()),
        None => spec::validate(&token.spec),
    };
    let (state, stored, predecessor_state) = read_state(token, cluster).await?;
    let target = cluster.get_secret(&ns, &token.secret_name()).await?;
    let target_ownership = secrets::ownership(target.as_ref(), token);
    let ca = read_ca_bundle(token, via, cluster).await?;
    let ca_bundle = ca.as_ref().ok().cloned().flatten();
    let inputs = match ca {
        Err(refusal) => Err(refusal),
        Ok(ca) => read_credentials(token, via, valid.as_ref().ok(), ca.as_deref(), cluster).await?,
    };
    Ok(Observed {
        valid,
        state,
        stored,
        predecessor_state,
        target,
        target_ownership,
        inputs,
        ca_bundle,
    })
}

/// The state document, the Secret holding it, and whether it is a predecessor's.
pub async fn read_state(
    token: &AwxToken,
    cluster: &impl Cluster,
) -> Result<(TokenState, Option<Secret>, bool), Error> {
    let ns = token.namespace().unwrap_or_default();
    let name = secrets::state_secret_name(&token.name_any());
    let Some(secret) = cluster.get_secret(&ns, &name).await? else {
        return Ok((TokenState::default(), None, false));
    };
    match secrets::ownership(Some(&secret), token) {
        Ownership::Ours => {}
        Ownership::Predecessor => return Ok((TokenState::default(), Some(secret), true)),
        Ownership::Absent | Ownership::Foreign(_) => return Err(Error::StateConflict(name)),
    }
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(STATE_KEY))
        .map(|b| b.0.clone())
        .unwrap_or_default();
    match TokenState::decode(&bytes) {
        Ok(state) => Ok((state, Some(secret), false)),
        Err(e) => Err(Error::StateCorrupt(name, e.to_string())),
    }
}

/// The CA bundle Secret, from the AwxToken's namespace or its connection's.
async fn read_ca_bundle(
    token: &AwxToken,
    via: Option<&Via>,
    cluster: &impl Cluster,
) -> Result<Result<Option<Vec<u8>>, Refusal>, Error> {
    let Some(ca) = &token.spec.awx.ca_bundle_secret_ref else {
        return Ok(Ok(None));
    };
    let Some(via) = via else {
        let ns = token.namespace().unwrap_or_default();
        let Some(secret) = cluster.get_secret(&ns, &ca.name).await? else {
            return Ok(Err(Refusal::secret_missing(
                &ca.name,
                "AWX CA bundle (PEM)",
            )));
        };
        return Ok(pem_of(&secret, &ca.name, &ca.key));
    };
    // The connection's Secret: its name is told to nobody who cannot read the connection, and
    // the message sends the token's owner to the connection's.
    let Some(secret) = cluster.get_secret(&via.secrets_namespace, &ca.name).await? else {
        return Ok(Err(Refusal::connection_secret(via, "CA bundle")));
    };
    Ok(
        pem_of(&secret, &ca.name, &ca.key)
            .map_err(|_| Refusal::connection_secret(via, "CA bundle")),
    )
}

fn pem_of(secret: &Secret, name: &str, key: &str) -> Result<Option<Vec<u8>>, Refusal> {
    match secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .filter(|v| !v.0.is_empty())
    {
        Some(pem) => Ok(Some(pem.0.clone())),
        None => Err(Refusal::key_missing(name, key, "AWX CA bundle (PEM)")),
    }
}

/// Reads the credentials Secret. Nothing is sent anywhere with an empty credential: a missing
/// key is a refusal.
///
/// Through a connection with an application, the client id and secret come from the
/// connection's Secret, and the AwxToken's credentials Secret holds only the user's own login
/// (it is not read at all when the grant needs none).
async fn read_credentials(
    token: &AwxToken,
    via: Option<&Via>,
    valid: Option<&ValidSpec>,
    ca_bundle: Option<&[u8]>,
    cluster: &impl Cluster,
) -> Result<Result<Inputs, Refusal>, Error> {
    let grant = &token.spec.grant;
    let refs = &grant.credentials_secret_ref;
    let ns = token.namespace().unwrap_or_default();
    let application = via.and_then(|v| v.application.as_ref().map(|a| (v, a)));
    let (needs_user, needs_client) = match grant.type_ {
        GrantType::Password => (true, true),
        GrantType::ClientCredentials => (false, true),
        GrantType::PersonalAccessToken => (true, false),
        GrantType::AuthorizationCode => (false, true),
    };
    let needs_refresh_token = grant.type_ == GrantType::AuthorizationCode;
    let creds = if needs_user || needs_refresh_token || (needs_client && application.is_none()) {
        match cluster.get_secret(&ns, &refs.name).await? {
            Some(creds) => Some(creds),
            None => return Ok(Err(Refusal::secret_missing(&refs.name, "AWX credentials"))),
        }
    } else {
        None
    };
    let app_secret = match application {
        Some((via, app)) if needs_client => {
            match cluster
                .get_secret(&via.secrets_namespace, &app.name)
                .await?
            {
                Some(s) => Some(s),
                None => return Ok(Err(Refusal::connection_secret(via, "OAuth2 application"))),
            }
        }
        _ => None,
    };
    let value = |secret: Option<&Secret>, key: &str| -> Option<String> {
        let data = secret?.data.as_ref()?;
        let value = String::from_utf8(data.get(key)?.0.clone()).ok()?;
        let value = value.trim_end_matches(['\n', '\r']).to_string();
        (!value.is_empty()).then_some(value)
    };
    let read = |key: &str| value(creds.as_ref(), key);
    let require = |key: &str, what: &str| {
        read(key).ok_or_else(|| Refusal::key_missing(&refs.name, key, what))
    };
    // The fingerprint's layout is that of every release so far: changing it would make every
    // held token look issued from other inputs, and re-issue them all after an upgrade.
    let mut fingerprint = Sha256::new();
    let mut feed = |part: &str| {
        fingerprint.update(part.as_bytes());
        fingerprint.update([0]);
    };
    feed(valid.map(|v| v.url.as_str()).unwrap_or(""));
    feed(&format!(
        "{:?}/{:?}/{:?}/{:?}",
        token.spec.awx.flavor, grant.type_, grant.scope, token.spec.awx.insecure_skip_tls_verify
    ));
    feed(grant.description.as_deref().unwrap_or(""));
    let mut inputs = Inputs {
        username: None,
        password: None,
        client: None,
        refresh_token: None,
        fingerprint: String::new(),
    };
    if needs_user {
        let (u, p) = match (
            require(&refs.username_key, "AWX username"),
            require(&refs.password_key, "AWX password"),
        ) {
            (Ok(u), Ok(p)) => (u, p),
            (Err(e), _) | (_, Err(e)) => return Ok(Err(e)),
        };
        feed(&u);
        feed(&p);
        inputs.username = Some(u);
        inputs.password = Some(SecretString::from(p));
    }
    if needs_client && let Some((via, app)) = application {
        let (Some(id), secret) = (
            value(app_secret.as_ref(), &app.client_id_key),
            value(app_secret.as_ref(), &app.client_secret_key),
        ) else {
            return Ok(Err(Refusal::connection_secret(via, "OAuth2 application")));
        };
        if grant.type_ == GrantType::ClientCredentials && secret.is_none() {
            return Ok(Err(Refusal::connection_secret(via, "OAuth2 application")));
        }
        feed(&id);
        feed(secret.as_deref().unwrap_or(""));
        inputs.client = Some(ClientCredentials {
            client_id: id,
            client_secret: secret.map(SecretString::from),
        });
    } else if needs_client {
        let id = match require(&refs.client_id_key, "OAuth2 application client_id") {
            Ok(id) => id,
            Err(e) => return Ok(Err(e)),
        };
        let secret = if grant.type_ == GrantType::ClientCredentials {
            match require(&refs.client_secret_key, "OAuth2 application client_secret") {
                Ok(s) => Some(s),
                Err(e) => return Ok(Err(e)),
            }
        } else {
            read(&refs.client_secret_key)
        };
        feed(&id);
        feed(secret.as_deref().unwrap_or(""));
        inputs.client = Some(ClientCredentials {
            client_id: id,
            client_secret: secret.map(SecretString::from),
        });
    }
    if needs_refresh_token {
        let refresh = match require(&refs.refresh_token_key, "refresh token of a sign-in") {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        // Its hash, not the value: a new value is a new sign-in, which replaces the session.
        feed(&hex::encode(Sha256::digest(refresh.as_bytes())));
        inputs.refresh_token = Some(SecretString::from(refresh));
    }
    if let Some(ca) = ca_bundle {
        fingerprint.update(ca);
    }
    inputs.fingerprint = hex::encode(fingerprint.finalize());
    Ok(Ok(inputs))
}
