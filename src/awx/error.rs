//! The one error type of the AWX client.
//!
//! Every variant says which request failed and what AWX answered, in words meant for the
//! person who has to fix it. No variant ever holds a token, password or client secret:
//! only status codes, OAuth2 error codes, AWX's own error text and short excerpts of
//! response bodies (never of request bodies or headers).

use std::time::Duration;

/// What is known about the effect of a request that failed: the question "could AWX have
/// created a token?" is answered here, never by reading messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The request never left this process or never reached AWX (refused connection, DNS,
    /// TLS handshake, a credential that cannot be sent): nothing happened at AWX.
    NeverSent,
    /// AWX answered in full and the answer says nothing was done: a refusal, or a server
    /// error (AWX runs every request in one database transaction, so a request that failed
    /// committed nothing; docs/awx-protocol.md#transactions).
    Rejected,
    /// The request was sent and its answer never arrived whole (a timeout after sending, a
    /// reset, a cut body), or AWX said success in a body that cannot be read: AWX may have
    /// done what was asked.
    Unknown,
}

impl Outcome {
    /// The outcome of a complete answer with `status` whose body could not be used: a success
    /// status means AWX did the work (a token may exist); any other status means it did not.
    pub(crate) fn of_unreadable(status: u16) -> Self {
        if (200..=299).contains(&status) {
            Self::Unknown
        } else {
            Self::Rejected
        }
    }
}

/// What went wrong talking to AWX.
///
/// `at` fields read like `POST https://awx.example.com/api/o/token/`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AwxError {
    /// The configured CA bundle is not usable PEM.
    #[error(
        "the CA bundle is not usable: {detail}; caBundleSecretRef must point at PEM \
         CERTIFICATE blocks of the CA that signed AWX's certificate"
    )]
    InvalidCaBundle { detail: String },

    /// The configured AWX address cannot be used.
    #[error("the AWX base URL is not usable: {detail}")]
    InvalidEndpoint { detail: String },

    /// The HTTP client could not be built (TLS setup and the like).
    #[error("could not set up the HTTP client for AWX: {detail}")]
    ClientSetup { detail: String },

    /// A credential contains characters that cannot be sent in an HTTP header.
    #[error("the {what} contains characters that cannot be sent in an HTTP header")]
    MalformedCredential { what: &'static str },

    /// Not enough credentials were given to do what was asked.
    #[error("{detail}")]
    MissingCredentials { detail: String },

    /// `invalid_client`: the OAuth2 application credentials are wrong.
    #[error(
        "{at} refused the OAuth2 application credentials (HTTP {status}, invalid_client{}): \
         the client_id or client_secret is wrong, or the application was deleted. These are \
         the AWX application's credentials, not the user's password; a public application \
         must be configured without a client secret",
        suffix(.description)
    )]
    InvalidClient {
        at: String,
        status: u16,
        description: Option<String>,
    },

    /// The user's username/password were refused.
    #[error(
        "{at} refused the user's login (HTTP {status}{}): the username or password is wrong, \
         or the user is inactive (or local logins are disabled with DISABLE_LOCAL_AUTH)",
        suffix(.description)
    )]
    InvalidCredentials {
        at: String,
        status: u16,
        description: Option<String>,
    },

    /// `invalid_grant` for an authorization code: it expired (AWX keeps codes 600 s), was
    /// used already, belongs to another application or redirect URI, or the PKCE verifier
    /// does not match its challenge (docs/awx-protocol.md#code-exchange).
    #[error(
        "{at} refused the authorization code (HTTP {status}, invalid_grant{}): the code was \
         used already or expired (AWX keeps a code 10 minutes), or it was issued to another \
         application, or the PKCE code verifier does not match; sign in again",
        suffix(.description)
    )]
    AuthorizationCodeRejected {
        at: String,
        status: u16,
        description: Option<String>,
    },

    /// `unauthorized_client` / `unsupported_grant_type`: the grant is not available.
    #[error("{}", grant_not_supported_message(.at, *.status, .grant_type, .error, .description))]
    GrantNotSupported {
        at: String,
        status: u16,
        grant_type: &'static str,
        error: String,
        description: Option<String>,
    },

    /// AWX refuses OAuth2 tokens for users of an external identity provider.
    #[error(
        "{at} refused to create an OAuth2 token (HTTP {status}): AWX refuses OAuth2 tokens for \
         users of an external authentication provider (LDAP, SAML, RADIUS, TACACS+, social \
         login...) unless ALLOW_OAUTH2_FOR_EXTERNAL_USERS is enabled; use a local AWX user or \
         enable that setting. AWX said: {detail}"
    )]
    ExternalUserRefused {
        at: String,
        status: u16,
        detail: String,
    },

    /// `invalid_scope`, or a scope refused by the token REST API.
    #[error(
        "{at} refused the scope {scope:?} (HTTP {status}, invalid_scope{}): only \"read\" and \
         \"write\" exist, and a refresh cannot widen the scope of the token it replaces",
        suffix(.description)
    )]
    InvalidScope {
        at: String,
        status: u16,
        scope: &'static str,
        description: Option<String>,
    },

    /// `invalid_request` or another 400 about the request's parameters.
    #[error(
        "{at} refused the request (HTTP {status}, invalid_request{}): a parameter is missing \
         or malformed; check that the username, password and client_id are set and not empty",
        suffix(.description)
    )]
    InvalidRequest {
        at: String,
        status: u16,
        description: Option<String>,
    },

    /// 403 `The refresh token has expired.`: only a fresh grant helps.
    #[error(
        "{at} refused the refresh token (HTTP {status}: The refresh token has expired.): \
         refresh tokens die REFRESH_TOKEN_EXPIRE_SECONDS (default about 30 days) after they \
         were issued; a new token has to be issued with the original grant"
    )]
    RefreshTokenExpired { at: String, status: u16 },

    /// `invalid_grant` on a refresh: only a fresh grant helps.
    #[error(
        "{at} refused the refresh token (HTTP {status}, invalid_grant{}): it is unknown, was \
         already used (AWX rotates refresh tokens on every use), was revoked, or belongs to \
         another application; a new token has to be issued with the original grant",
        suffix(.description)
    )]
    RefreshTokenInvalid {
        at: String,
        status: u16,
        description: Option<String>,
    },

    /// A 401 from an endpoint where no more specific meaning is known.
    #[error(
        "{at} answered HTTP {status} Unauthorized: the credentials sent were not accepted \
         ({detail})"
    )]
    Unauthorized {
        at: String,
        status: u16,
        detail: String,
    },

    /// A 403 from an endpoint where no more specific meaning is known.
    #[error(
        "{at} answered HTTP {status} Forbidden: the user or token lacks the permission; a \
         read-scoped token cannot create or delete tokens ({detail})"
    )]
    Forbidden {
        at: String,
        status: u16,
        detail: String,
    },

    /// The token was refused where it was used as a Bearer token.
    #[error(
        "{at} rejected the token (HTTP {status}): it is expired, revoked, replaced by a \
         refresh, or unknown to AWX"
    )]
    TokenRejected { at: String, status: u16 },

    /// 404/405: the endpoint does not exist at that address.
    #[error(
        "{at} answered HTTP {status}: there is no such endpoint; check baseUrl (including any \
         path prefix) and the AWX flavor (AWX 24.x serves /api/o/ and /api/v2/, the AAP \
         gateway /o/ and /api/gateway/v1/)"
    )]
    EndpointNotFound { at: String, status: u16 },

    /// 5xx from AWX or a proxy in front of it.
    #[error(
        "{at} answered HTTP {status}, a failure of AWX or of a proxy in front of it{}{hint}",
        suffix(.detail)
    )]
    AwxServerError {
        at: String,
        status: u16,
        detail: Option<String>,
        hint: &'static str,
    },

    /// An answer that cannot be understood (HTML, broken JSON, a redirect, missing fields...).
    #[error("{at} gave an unexpected answer{}: {detail}", status_suffix(*.status))]
    UnexpectedResponse {
        at: String,
        status: Option<u16>,
        detail: String,
        outcome: Outcome,
    },

    /// No connection could be made, or it broke before an answer came.
    #[error("cannot reach AWX at {host} ({at}): {detail}")]
    AwxUnreachable {
        at: String,
        host: String,
        detail: String,
        /// Whether the request may have reached AWX (the connection broke after it was sent).
        sent: bool,
    },

    /// No complete answer within the configured timeout.
    #[error(
        "{at} got no complete answer within {}; AWX at {host} is overloaded or unreachable",
        format_duration(*.timeout)
    )]
    Timeout {
        at: String,
        host: String,
        timeout: Duration,
        /// False when no connection could be made in time (nothing reached AWX).
        sent: bool,
    },

    /// The TLS handshake failed, usually because the certificate is not trusted.
    #[error(
        "TLS connection to {host} failed ({at}): {detail}; check caBundleSecretRef (it must hold \
         the CA that signed AWX's certificate) and that the host name in baseUrl is one the \
         certificate names"
    )]
    TlsError {
        at: String,
        host: String,
        detail: String,
    },

    /// The body exceeded the size cap.
    #[error(
        "{at} answered HTTP {status} with a body larger than {limit} bytes, which was not \
         read; check that baseUrl points at AWX"
    )]
    ResponseTooLarge {
        at: String,
        status: u16,
        limit: usize,
    },

    /// Neither the gateway nor the AWX 24.x OAuth2 API answered.
    #[error(
        "could not tell which AWX API {base_url} serves ({detail}): expected GET \
         /api/gateway/v1/ (AAP 2.5+ gateway) or GET /api/o/ (AWX 24.x) to answer 200 with \
         JSON. Check baseUrl; AWX builds after 24.6.1 have no OAuth2 tokens at all"
    )]
    FlavorNotDetected { base_url: String, detail: String },

    /// The revocation was accepted but the token still works.
    #[error(
        "{at} was accepted but the token still works (it still authenticates as {user:?}), so \
         it is not revoked"
    )]
    RevocationNotEffective { at: String, user: String },
}

impl AwxError {
    /// Whether trying again later, unchanged, may succeed.
    ///
    /// Server, network, timeout, TLS and unexpected answers are retryable; refusals of
    /// credentials or configuration are not: they need a person to change something.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::AwxServerError { .. }
            | Self::UnexpectedResponse { .. }
            | Self::AwxUnreachable { .. }
            | Self::Timeout { .. }
            | Self::TlsError { .. }
            | Self::ResponseTooLarge { .. }
            | Self::RevocationNotEffective { .. } => true,
            Self::InvalidCaBundle { .. }
            | Self::InvalidEndpoint { .. }
            | Self::ClientSetup { .. }
            | Self::MalformedCredential { .. }
            | Self::MissingCredentials { .. }
            | Self::InvalidClient { .. }
            | Self::InvalidCredentials { .. }
            | Self::AuthorizationCodeRejected { .. }
            | Self::GrantNotSupported { .. }
            | Self::ExternalUserRefused { .. }
            | Self::InvalidScope { .. }
            | Self::InvalidRequest { .. }
            | Self::RefreshTokenExpired { .. }
            | Self::RefreshTokenInvalid { .. }
            | Self::Unauthorized { .. }
            | Self::Forbidden { .. }
            | Self::TokenRejected { .. }
            | Self::EndpointNotFound { .. }
            | Self::FlavorNotDetected { .. } => false,
        }
    }

    /// A CamelCase label for Kubernetes condition reasons and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidCaBundle { .. } => "InvalidCaBundle",
            Self::InvalidEndpoint { .. } => "InvalidEndpoint",
            Self::ClientSetup { .. } => "ClientSetupFailed",
            Self::MalformedCredential { .. } => "MalformedCredential",
            Self::MissingCredentials { .. } => "MissingCredentials",
            Self::InvalidClient { .. } => "InvalidClient",
            Self::InvalidCredentials { .. } => "InvalidCredentials",
            Self::AuthorizationCodeRejected { .. } => "AuthorizationCodeRejected",
            Self::GrantNotSupported { .. } => "GrantNotSupported",
            Self::ExternalUserRefused { .. } => "ExternalUserRefused",
            Self::InvalidScope { .. } => "InvalidScope",
            Self::InvalidRequest { .. } => "InvalidRequest",
            Self::RefreshTokenExpired { .. } => "RefreshTokenExpired",
            Self::RefreshTokenInvalid { .. } => "RefreshTokenInvalid",
            Self::Unauthorized { .. } => "Unauthorized",
            Self::Forbidden { .. } => "Forbidden",
            Self::TokenRejected { .. } => "TokenRejected",
            Self::EndpointNotFound { .. } => "EndpointNotFound",
            Self::AwxServerError { .. } => "AwxServerError",
            Self::UnexpectedResponse { .. } => "UnexpectedResponse",
            Self::AwxUnreachable { .. } => "AwxUnreachable",
            Self::Timeout { .. } => "Timeout",
            Self::TlsError { .. } => "TlsError",
            Self::ResponseTooLarge { .. } => "ResponseTooLarge",
            Self::FlavorNotDetected { .. } => "FlavorNotDetected",
            Self::RevocationNotEffective { .. } => "RevocationNotEffective",
        }
    }

    /// Whether a failed refresh means the refresh chain is dead and the caller has to fall
    /// back to a fresh grant.
    pub fn requires_reissue(&self) -> bool {
        matches!(
            self,
            Self::RefreshTokenExpired { .. } | Self::RefreshTokenInvalid { .. }
        )
    }

    /// What is known about the request's effect at AWX (see [`Outcome`]).
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::InvalidCaBundle { .. }
            | Self::InvalidEndpoint { .. }
            | Self::ClientSetup { .. }
            | Self::MalformedCredential { .. }
            | Self::MissingCredentials { .. }
            // A handshake failure: no request was written.
            | Self::TlsError { .. }
            | Self::FlavorNotDetected { .. } => Outcome::NeverSent,
            Self::AwxUnreachable { sent, .. } | Self::Timeout { sent, .. } => {
                if *sent {
                    Outcome::Unknown
                } else {
                    Outcome::NeverSent
                }
            }
            Self::UnexpectedResponse { outcome, .. } => *outcome,
            Self::ResponseTooLarge { status, .. } => Outcome::of_unreadable(*status),
            Self::InvalidClient { .. }
            | Self::InvalidCredentials { .. }
            | Self::AuthorizationCodeRejected { .. }
            | Self::GrantNotSupported { .. }
            | Self::ExternalUserRefused { .. }
            | Self::InvalidScope { .. }
            | Self::InvalidRequest { .. }
            | Self::RefreshTokenExpired { .. }
            | Self::RefreshTokenInvalid { .. }
            | Self::Unauthorized { .. }
            | Self::Forbidden { .. }
            | Self::TokenRejected { .. }
            | Self::EndpointNotFound { .. }
            | Self::RevocationNotEffective { .. } => Outcome::Rejected,
            // 502 and 504 come from a proxy that lost its connection to AWX or gave up waiting
            // for it, while AWX may still have finished and committed the request.
            Self::AwxServerError {
                status: 502 | 504, ..
            } => {
                Outcome::Unknown
            }
            Self::AwxServerError { .. } => Outcome::Rejected,
        }
    }

    /// The HTTP status AWX answered with, when there was an answer.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            Self::InvalidClient { status, .. }
            | Self::InvalidCredentials { status, .. }
            | Self::AuthorizationCodeRejected { status, .. }
            | Self::GrantNotSupported { status, .. }
            | Self::ExternalUserRefused { status, .. }
            | Self::InvalidScope { status, .. }
            | Self::InvalidRequest { status, .. }
            | Self::RefreshTokenExpired { status, .. }
            | Self::RefreshTokenInvalid { status, .. }
            | Self::Unauthorized { status, .. }
            | Self::Forbidden { status, .. }
            | Self::TokenRejected { status, .. }
            | Self::EndpointNotFound { status, .. }
            | Self::AwxServerError { status, .. }
            | Self::ResponseTooLarge { status, .. } => Some(*status),
            Self::UnexpectedResponse { status, .. } => *status,
            _ => None,
        }
    }

    /// A refusal of the credentials used for a revocation: the token may already be dead,
    /// which the caller checks before reporting it.
    pub(crate) fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::Unauthorized { .. }
                | Self::Forbidden { .. }
                | Self::InvalidClient { .. }
                | Self::TokenRejected { .. }
                | Self::MissingCredentials { .. }
        )
    }
}

fn suffix(text: &Option<String>) -> String {
    match text {
        Some(text) if !text.is_empty() => format!(": {text}"),
        _ => String::new(),
    }
}

fn status_suffix(status: Option<u16>) -> String {
    status.map(|s| format!(" (HTTP {s})")).unwrap_or_default()
}

fn format_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn grant_not_supported_message(
    at: &str,
    status: u16,
    grant_type: &str,
    error: &str,
    description: &Option<String>,
) -> String {
    let said = suffix(description);
    match (grant_type, error) {
        ("client_credentials", "unauthorized_client") => format!(
            "{at} refused the client_credentials grant (HTTP {status}, unauthorized_client{said}): \
             AWX and AAP gateway applications support only the password and authorization-code \
             grants, so use grant type Password (with a \"Resource owner password-based\" \
             application) or PersonalAccessToken"
        ),
        (_, "unauthorized_client") => format!(
            "{at} refused the {grant_type} grant (HTTP {status}, unauthorized_client{said}): the \
             AWX application is not allowed to use it; set the application's authorization grant \
             type to \"Resource owner password-based\""
        ),
        _ => format!(
            "{at} did not accept the {grant_type} grant (HTTP {status}, {error}{said}): the \
             server does not support this grant type"
        ),
    }
}
