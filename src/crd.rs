//! The `AwxToken` custom resource: what a user asks for (spec) and what the operator reports
//! (status). Doc comments on fields are user documentation: they become `kubectl explain`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Annotation whose new value forces an immediate renewal (acknowledged in `status.rotatedFor`).
pub const ROTATE_ANNOTATION: &str = "awx-token-operator.io/rotate";
/// Annotation that releases a deletion stuck because AWX cannot be reached to revoke the token.
pub const SKIP_REVOKE_ANNOTATION: &str = "awx-token-operator.io/skip-revoke";

/// An Ansible AWX (or AAP gateway) API token kept in a Kubernetes Secret, renewed before it
/// expires or grows too old, and revoked when it is replaced or this resource is deleted.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "awx-token-operator.io",
    version = "v1alpha1",
    kind = "AwxToken",
    doc = "An AWX API token kept in a Secret, renewed before it expires or grows too old, and revoked when replaced or deleted.",
    namespaced,
    shortname = "awxt",
    status = "AwxTokenStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Secret","type":"string","jsonPath":".status.secretName"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".status.expiresAt"}"#,
    printcolumn = r#"{"name":"Renews","type":"string","jsonPath":".status.renewalTime"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Flavor","type":"string","priority":1,"jsonPath":".status.flavor"}"#,
    printcolumn = r#"{"name":"User","type":"string","priority":1,"jsonPath":".status.user"}"#,
    printcolumn = r#"{"name":"Last failure","type":"string","priority":1,"jsonPath":".status.lastFailureMessage"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.awx) != has(self.connectionRef)").message("set exactly one of awx (inline) and connectionRef (a platform-defined connection)"))]
pub struct AwxTokenSpec {
    /// Where AWX is and how to talk to it, inline. Exactly one of awx and connectionRef.
    #[serde(default, skip_serializing_if = "AwxConnection::is_unset")]
    pub awx: AwxConnection,
    /// A ClusterAwxConnection or AwxConnection (same namespace) that says where AWX is, how
    /// to reach it and, optionally, which OAuth2 application issues the token. Exactly one of
    /// awx and connectionRef.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_ref: Option<crate::connection::ConnectionRef>,
    /// How the token is obtained.
    pub grant: Grant,
    /// The Secret the token is written to.
    #[serde(default)]
    pub secret: TargetSecret,
    /// When the token is renewed and how old tokens are retired.
    #[serde(default)]
    pub renewal: Renewal,
    /// Revoke the current token (and any replaced one still waiting) in AWX when this AwxToken
    /// is deleted, suspended or not.
    #[serde(default = "default_true")]
    pub revoke_on_delete: bool,
    /// Workloads in this namespace restarted (pod-template annotation) whenever the token in
    /// the Secret is replaced; never on the first issue, nor because the operator restarted.
    /// With targets, a replaced token is revoked once every restarted workload has finished
    /// its rollout (or rolloutRestart.rolloutTimeout has passed), not after revokeGracePeriod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub rollout_restart_targets: Vec<RolloutRestartTarget>,
    /// When and how often rolloutRestartTargets are restarted.
    #[serde(default)]
    pub rollout_restart: RolloutRestartPolicy,
    /// Stop all AWX traffic for this token while it exists: no issue, renewal, verification,
    /// revocation of replaced tokens or search after an interrupted request. The Secret keeps
    /// its current token. Deleting a suspended AwxToken still revokes its tokens (unless
    /// revokeOnDelete is false or the awx-token-operator.io/skip-revoke annotation is "true").
    #[serde(default)]
    pub suspend: bool,
}

/// Connection to AWX.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.url.startsWith('https://') || (has(self.allowInsecureHttp) && self.allowInsecureHttp)").message("url must use https:// unless allowInsecureHttp is true"))]
pub struct AwxConnection {
    /// Base URL of AWX or of the AAP gateway, e.g. https://awx.example.com (a path prefix is
    /// kept: https://example.com/awx/ serves /awx/api/...). No credentials, query or fragment.
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// Which API to speak. Auto detects it once per URL.
    #[serde(default)]
    pub flavor: FlavorSpec,
    /// Extra trust anchors (PEM) for AWX's certificate, from a Secret in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle_secret_ref: Option<SecretKeySelector>,
    /// Accept any TLS certificate from AWX. Dangerous: a warning event and condition say so.
    #[serde(default)]
    pub insecure_skip_tls_verify: bool,
    /// Allow a plain http:// URL (tokens and passwords then cross the network unencrypted).
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// Timeout of each request to AWX, in seconds.
    #[serde(default = "default_timeout_seconds")]
    #[schemars(range(min = 1, max = 300))]
    pub timeout_seconds: u32,
}

impl Default for AwxConnection {
    /// No connection (the AwxToken names one with connectionRef instead).
    fn default() -> Self {
        Self {
            url: String::new(),
            flavor: FlavorSpec::default(),
            ca_bundle_secret_ref: None,
            insecure_skip_tls_verify: false,
            allow_insecure_http: false,
            timeout_seconds: default_timeout_seconds(),
        }
    }
}

impl AwxConnection {
    /// Not set in the AwxToken: its connection comes from spec.connectionRef. Before a
    /// reconcile reads the spec, the connection's own block takes its place
    /// (`connection::resolve`).
    pub fn is_unset(&self) -> bool {
        *self == Self::default()
    }
}

/// The API flavour of the server at `url`.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FlavorSpec {
    /// Detect: the AAP gateway if /api/gateway/v1/ answers, else AWX if /api/o/ answers.
    #[default]
    Auto,
    /// AWX 24.x and Tower/Controller: /api/o/token/ and /api/v2/tokens/.
    Controller,
    /// AAP 2.5+ platform gateway: /o/token/ and /api/gateway/v1/tokens/.
    Gateway,
}

/// A key of a Secret in this namespace.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    /// Name of the Secret (same namespace as the AwxToken).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret holding PEM certificates.
    #[serde(default = "default_ca_key")]
    pub key: String,
}

/// How the token is obtained.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.description) || self.type == 'PersonalAccessToken'").message("description applies only to type PersonalAccessToken"))]
pub struct Grant {
    /// Password: OAuth2 password grant with an application's client_id (and secret).
    /// ClientCredentials: OAuth2 client-credentials grant (not supported by AWX or the AAP
    /// gateway, whose applications allow only password and authorization-code).
    /// PersonalAccessToken: a token created with the user's login at /api/v2/tokens/.
    /// AuthorizationCode: a person signed in through the browser (`awx-token-operator login`);
    /// the Secret holds no password.
    #[serde(rename = "type")]
    pub type_: GrantType,
    /// Secret in this namespace holding the credentials. Credentials are never inline.
    /// Through a connection with an application, it holds only the user's own login (the
    /// client id and secret are the connection's).
    pub credentials_secret_ref: CredentialsSecretRef,
    /// Token scope.
    #[serde(default)]
    pub scope: ScopeSpec,
    /// Description of a personal access token in AWX. Default: "awx-token-operator <namespace>/<name>".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub description: Option<String>,
}

/// The grant used to obtain the token.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GrantType {
    /// OAuth2 password grant (needs username, password and client_id; client_secret for
    /// confidential applications).
    Password,
    /// OAuth2 client-credentials grant (needs client_id and client_secret).
    ClientCredentials,
    /// Personal access token (needs username and password); always renewed by re-issuing.
    PersonalAccessToken,
    /// A browser sign-in (authorization-code grant), made by `awx-token-operator login`, which
    /// writes this AwxToken and its credentials Secret (client_id, client_secret for
    /// confidential applications, refresh_token; no password). The operator keeps the sign-in
    /// (an access and refresh token pair) only in its state Secret and refreshes it before the
    /// refresh token dies (at two thirds of renewal.refreshTokenLifetime); the first refresh
    /// consumes the Secret's refresh_token. Consumers get a personal access token created with
    /// the sign-in, renewed make-before-break like PersonalAccessToken, so a refresh of the
    /// sign-in never breaks them. When the sign-in cannot be renewed, Ready is False with
    /// reason SignInExpired and the command to sign in again.
    AuthorizationCode,
}

/// Token scope.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ScopeSpec {
    /// Read-only API access.
    Read,
    /// Full access with the user's permissions.
    #[default]
    Write,
}

/// The credentials Secret and which of its keys hold what.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    /// Name of the Secret (same namespace as the AwxToken).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key holding the AWX username.
    #[serde(default = "default_username_key")]
    pub username_key: String,
    /// Key holding the AWX password.
    #[serde(default = "default_password_key")]
    pub password_key: String,
    /// Key holding the OAuth2 application's client_id.
    #[serde(default = "default_client_id_key")]
    pub client_id_key: String,
    /// Key holding the OAuth2 application's client_secret (absent for public applications).
    #[serde(default = "default_client_secret_key")]
    pub client_secret_key: String,
    /// Key holding the refresh token of a browser sign-in (type AuthorizationCode). The
    /// operator's first refresh consumes it; a new value (a new sign-in) replaces the sign-in.
    #[serde(default = "default_refresh_token_key")]
    pub refresh_token_key: String,
}

/// The Secret the operator writes.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TargetSecret {
    /// Name of the Secret. Default: the AwxToken's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,
    /// Extra labels on the Secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations on the Secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Names of the keys holding the token and the AWX URL. The default (token, host) is what
    /// awx-resource-operator reads.
    #[serde(default)]
    pub keys: SecretKeys,
    /// More keys, each holding the token or the host, e.g. TOWER_OAUTH_TOKEN: token,
    /// TOWER_HOST: host. For the names common tools read, presets is shorter.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra_keys: BTreeMap<String, SecretValue>,
    /// Sets of keys that tools read, added to the keys above.
    /// AwxResourceOperator: host, token (awx-resource-operator; the default keys already are
    /// these, the preset keeps them when keys are renamed).
    /// AwxCli: CONTROLLER_HOST, CONTROLLER_OAUTH_TOKEN, CONTROLLER_VERIFY_SSL, AAP_TOKEN (the
    /// awx CLI of awxkit and the awx.awx collection, as environment variables with envFrom).
    /// AnsiblePlatform: AAP_HOSTNAME, AAP_TOKEN, AAP_VALIDATE_CERTS, GATEWAY_HOSTNAME,
    /// GATEWAY_API_TOKEN, GATEWAY_VERIFY_SSL (the ansible.platform collection, AAP 2.5+).
    /// The VERIFY_SSL and VALIDATE_CERTS keys hold "true", or "false" when
    /// awx.insecureSkipTlsVerify is true. A key written by two of keys, extraKeys, presets and
    /// templates must have the same content in both, or the spec is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub presets: Vec<SecretPreset>,
    /// Keys holding text made from a template, e.g. a whole env file or config file in one key.
    /// Placeholders: {token}; {host} (the AWX URL, without a trailing slash); {expiresAt} (RFC
    /// 3339, e.g. 2026-03-31T10:00:00Z, empty when AWX gives no expiry); {scope} (read or
    /// write); {username} (the AWX user, empty where unknown). {{ and }} stand for literal
    /// braces. Any other placeholder is refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub templates: BTreeMap<String, String>,
    /// Delete: the Secret is owned by the AwxToken and garbage-collected with it.
    /// Retain: the Secret stays when the AwxToken is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

impl Default for TargetSecret {
    fn default() -> Self {
        Self {
            name: None,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            keys: SecretKeys::default(),
            extra_keys: BTreeMap::new(),
            presets: Vec::new(),
            templates: BTreeMap::new(),
            deletion_policy: DeletionPolicy::Delete,
        }
    }
}

/// Key names in the target Secret.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeys {
    /// Key holding the token.
    #[serde(default = "default_token_key")]
    pub token: String,
    /// Key holding the AWX URL.
    #[serde(default = "default_host_key")]
    pub host: String,
}

impl Default for SecretKeys {
    fn default() -> Self {
        Self {
            token: default_token_key(),
            host: default_host_key(),
        }
    }
}

/// What an extra key holds.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SecretValue {
    /// The token.
    Token,
    /// The AWX URL.
    Host,
}

/// A set of keys that a tool reads (each is described at spec.secret.presets).
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SecretPreset {
    /// awx-resource-operator (an AnsibleJob's tower_auth_secret): host and token. The default
    /// keys already are these; the preset says so, and keeps them when keys are renamed.
    AwxResourceOperator,
    /// The awx CLI (awxkit) and the awx.awx collection, from environment variables:
    /// CONTROLLER_HOST, CONTROLLER_OAUTH_TOKEN, CONTROLLER_VERIFY_SSL, and AAP_TOKEN (which
    /// newer awx.awx releases read).
    AwxCli,
    /// The ansible.platform collection for AAP 2.5 and later, from environment variables:
    /// AAP_HOSTNAME, AAP_TOKEN, AAP_VALIDATE_CERTS, and the older names GATEWAY_HOSTNAME,
    /// GATEWAY_API_TOKEN, GATEWAY_VERIFY_SSL.
    AnsiblePlatform,
}

/// What happens to the Secret when the AwxToken is deleted.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeletionPolicy {
    /// Owned by the AwxToken; deleted with it.
    #[default]
    Delete,
    /// Kept.
    Retain,
}

/// Renewal policy. Durations are written like 90s, 30m, 24h, 7d or 1h30m.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.renewBefore) && has(self.renewBeforePercentage))").message("renewBefore and renewBeforePercentage are mutually exclusive"))]
pub struct Renewal {
    /// Maximum age of a token, whatever AWX's expiry says (AWX's default lifetime is 1000 years).
    #[serde(default = "default_rotate_every")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub rotate_every: String,
    /// Renew this long before AWX's expiry. Default 1h. Exclusive with renewBeforePercentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub renew_before: Option<String>,
    /// Renew when this percentage of the lifetime (issue to expiry) is left. Exclusive with renewBefore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 99))]
    pub renew_before_percentage: Option<u8>,
    /// Reissue: new token, Secret updated, old token revoked after revokeGracePeriod
    /// (make-before-break). Refresh: refresh_token grant; AWX deletes the old token at once.
    /// Personal access tokens are always re-issued.
    #[serde(default)]
    pub strategy: RenewalStrategy,
    /// How long a replaced token stays valid after the Secret changed.
    #[serde(default = "default_revoke_grace_period")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub revoke_grace_period: String,
    /// When above 0s, check the token in the Secret with AWX this often and re-issue it if AWX
    /// rejects it.
    #[serde(default = "default_verify_every")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub verify_every: String,
    /// How long AWX keeps a refresh token usable after issuing it: AWX's
    /// REFRESH_TOKEN_EXPIRE_SECONDS, 2628000 s (730h) by default. AWX never reports it, so set
    /// it when your AWX is configured otherwise. With strategy Refresh the token is renewed
    /// before this runs out; a refresh AWX refuses as expired falls back to the grant.
    #[serde(default = "default_refresh_token_lifetime")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub refresh_token_lifetime: String,
}

impl Default for Renewal {
    fn default() -> Self {
        Self {
            rotate_every: default_rotate_every(),
            renew_before: None,
            renew_before_percentage: None,
            strategy: RenewalStrategy::default(),
            revoke_grace_period: default_revoke_grace_period(),
            verify_every: default_verify_every(),
            refresh_token_lifetime: default_refresh_token_lifetime(),
        }
    }
}

/// How a token is renewed.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RenewalStrategy {
    /// Issue a new token, then revoke the old one after the grace period.
    #[default]
    Reissue,
    /// Use the refresh_token grant (the old access token dies at once).
    Refresh,
}

/// Workloads restarted when the token changes: one by name, or every one of the kind whose
/// labels match a selector.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.name) != has(self.selector)").message("a restart target has either name or selector"))]
pub struct RolloutRestartTarget {
    /// Deployment, StatefulSet or DaemonSet.
    pub kind: WorkloadKind,
    /// Name of the workload in the AwxToken's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,
    /// Every workload of the kind in the AwxToken's namespace whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// When rolloutRestartTargets are restarted. Durations as in renewal.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutRestartPolicy {
    /// How long after the token changed the workloads are restarted. Workloads fed by several
    /// AwxTokens whose tokens change within it are restarted once, after the last change.
    #[serde(default = "default_restart_delay")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub delay: String,
    /// The shortest time between two restarts of one workload by the operator (whichever
    /// AwxToken asked for them); a restart owed sooner waits.
    #[serde(default = "default_restart_min_interval")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub min_interval: String,
    /// How long a replaced token is kept for a rollout that does not finish (replicas
    /// updated and available). After revokeGracePeriod a Warning says the rollout is late;
    /// after this the token is revoked anyway.
    #[serde(default = "default_rollout_timeout")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub rollout_timeout: String,
}

impl Default for RolloutRestartPolicy {
    fn default() -> Self {
        Self {
            delay: default_restart_delay(),
            min_interval: default_restart_min_interval(),
            rollout_timeout: default_rollout_timeout(),
        }
    }
}

/// Kinds of workload that can be restarted.
#[derive(
    JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub enum WorkloadKind {
    /// apps/v1 Deployment.
    Deployment,
    /// apps/v1 StatefulSet.
    StatefulSet,
    /// apps/v1 DaemonSet.
    DaemonSet,
}

/// What the operator observed and did. Never holds a token value.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AwxTokenStatus {
    /// Ready: the Secret holds a token AWX accepts and that is not past its expiry (it stays
    /// True while a renewal fails, as long as that holds). RenewalFailed: renewing the token
    /// fails or cannot be tried (the reason says why); the token in the Secret still works.
    /// InsecureTls: AWX's certificate is not verified.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The Secret holding the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// The API flavour used (detected when flavor is Auto).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flavor: Option<String>,
    /// AWX's id of the current token, where AWX reports one (personal tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<u64>,
    /// Scope of the current token as AWX granted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The AWX user the token acts as, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// When the current token was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<Time>,
    /// When AWX says the current token expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// When the operator will renew the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal_time: Option<Time>,
    /// When the refresh token dies: its issue plus spec.renewal.refreshTokenLifetime (AWX counts
    /// REFRESH_TOKEN_EXPIRE_SECONDS from the issue). Only with strategy Refresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token_expires_at: Option<Time>,
    /// When AWX last confirmed the token in the Secret (spec.renewal.verifyEvery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<Time>,
    /// Replaced tokens waiting for their grace period to end before revocation.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pending_revocations: u32,
    /// The value of the awx-token-operator.io/rotate annotation last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_for: Option<String>,
    /// Consecutive failed attempts; reset by a success.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failed_attempts: u32,
    /// When the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<Time>,
    /// Why the last attempt failed. Never contains a secret value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_message: Option<String>,
}

/// Duration syntax accepted by renewal fields: one or more number+unit pairs (ms, s, m, h, d).
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h|d))+$";

fn is_zero(n: &u32) -> bool {
    *n == 0
}
fn default_true() -> bool {
    true
}
fn default_timeout_seconds() -> u32 {
    30
}
fn default_ca_key() -> String {
    "ca.crt".into()
}
fn default_username_key() -> String {
    "username".into()
}
fn default_password_key() -> String {
    "password".into()
}
fn default_client_id_key() -> String {
    "client_id".into()
}
fn default_client_secret_key() -> String {
    "client_secret".into()
}
fn default_refresh_token_key() -> String {
    "refresh_token".into()
}
fn default_token_key() -> String {
    "token".into()
}
fn default_host_key() -> String {
    "host".into()
}
fn default_rotate_every() -> String {
    "24h".into()
}
fn default_revoke_grace_period() -> String {
    "5m".into()
}
fn default_verify_every() -> String {
    "0s".into()
}
fn default_refresh_token_lifetime() -> String {
    "730h".into()
}
fn default_restart_delay() -> String {
    "10s".into()
}
fn default_restart_min_interval() -> String {
    "1m".into()
}
fn default_rollout_timeout() -> String {
    "30m".into()
}

impl AwxToken {
    /// Name of the Secret the token is written to.
    pub fn secret_name(&self) -> String {
        self.spec
            .secret
            .name
            .clone()
            .unwrap_or_else(|| kube::ResourceExt::name_any(self))
    }
}

/// The CRD as YAML, exactly as committed under crds/. `without_cel` drops the
/// x-kubernetes-validations rules for API servers older than 1.25, which reject them; the
/// operator checks the same rules itself.
pub fn crd_yaml(without_cel: bool) -> Result<String, serde_yaml::Error> {
    let mut crd = serde_json::to_value(AwxToken::crd())
        .map_err(<serde_yaml::Error as serde::ser::Error>::custom)?;
    if without_cel {
        strip_key(&mut crd, "x-kubernetes-validations");
    }
    serde_yaml::to_string(&crd)
}

pub(crate) fn strip_key(value: &mut serde_json::Value, key: &str) {
    match value {
        serde_json::Value::Object(map) => {
            map.remove(key);
            map.values_mut().for_each(|v| strip_key(v, key));
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| strip_key(v, key)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    /// The schema of the CRD file users install (crds/), not of the Rust types directly.
    fn committed_schema() -> Value {
        let text = include_str!("../crds/awxtokens.awx-token-operator.io.yaml");
        let crd: Value = serde_yaml::from_str(text).expect("the committed CRD is YAML");
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    }

    fn object(spec: Value) -> Value {
        json!({"apiVersion": "awx-token-operator.io/v1alpha1", "kind": "AwxToken",
            "metadata": {"name": "t", "namespace": "apps"}, "spec": spec})
    }

    fn spec(extra: Value) -> Value {
        let mut spec = json!({
            "awx": {"url": "https://awx.example.com"},
            "grant": {"type": "Password", "credentialsSecretRef": {"name": "bot"}},
        });
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                match (s.get_mut(k), v) {
                    (Some(Value::Object(inner)), Value::Object(more)) => inner.extend(more.clone()),
                    _ => {
                        s.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        spec
    }

    fn cel(spec: Value) -> Result<(), String> {
        kube::core::cel::Validator::new()
            .validate(&committed_schema(), &object(spec), None)
            .map_err(|e| format!("{e:?}"))
    }

    #[test]
    fn cel_rules_accept_valid_specs() {
        assert_eq!(cel(spec(json!({}))), Ok(()));
        assert_eq!(
            cel(spec(
                json!({"awx": {"url": "http://awx.local", "allowInsecureHttp": true}})
            )),
            Ok(())
        );
        assert_eq!(
            cel(spec(
                json!({"grant": {"type": "PersonalAccessToken", "description": "ci"}})
            )),
            Ok(())
        );
        assert_eq!(
            cel(spec(json!({"renewal": {"renewBeforePercentage": 30}}))),
            Ok(())
        );
    }

    #[test]
    fn cel_rules_take_exactly_one_of_awx_and_connection_ref() {
        let via = json!({"kind": "ClusterAwxConnection", "name": "shared"});
        let mut only_ref = spec(json!({}));
        only_ref["connectionRef"] = via.clone();
        only_ref.as_object_mut().unwrap().remove("awx");
        assert_eq!(cel(only_ref.clone()), Ok(()));
        let typed: AwxTokenSpec = serde_json::from_value(only_ref.clone()).unwrap();
        assert!(typed.awx.is_unset());
        assert_eq!(
            crate::connection::exclusive(&typed),
            None,
            "connectionRef alone is fine"
        );

        let mut both = spec(json!({}));
        both["connectionRef"] = via;
        let neither = {
            let mut s = only_ref;
            s.as_object_mut().unwrap().remove("connectionRef");
            s
        };
        for wrong in [both.clone(), neither.clone()] {
            let result = cel(wrong.clone());
            assert!(
                result
                    .as_ref()
                    .is_err_and(|e| e.contains("set exactly one of awx")),
                "{wrong}: {result:?}"
            );
        }
        // The operator refuses both on its own (old API servers ignore CEL) ...
        let typed: AwxTokenSpec = serde_json::from_value(both).unwrap();
        assert_eq!(
            crate::connection::exclusive(&typed).map(|e| e.to_string()),
            Some("spec.connectionRef: set either awx or connectionRef, not both".into())
        );
        // ... and neither.
        let typed: AwxTokenSpec = serde_json::from_value(neither).unwrap();
        assert_eq!(
            crate::spec::validate(&typed).map(|_| ()).map_err(|e| e.to_string()),
            Err("spec.awx.url: is empty; set spec.awx (the AWX URL and TLS settings) or spec.connectionRef".into())
        );
    }

    #[test]
    fn cel_rules_reject_what_the_operator_rejects() {
        for (extra, message) in [
            (
                json!({"awx": {"url": "http://awx.local"}}),
                "url must use https://",
            ),
            (
                json!({"renewal": {"renewBefore": "1h", "renewBeforePercentage": 30}}),
                "mutually exclusive",
            ),
            (
                json!({"grant": {"description": "x"}}),
                "description applies only",
            ),
        ] {
            let result = cel(spec(extra.clone()));
            assert!(
                result.as_ref().is_err_and(|e| e.contains(message)),
                "{extra}: {result:?}"
            );
            // The operator refuses the same spec on its own (old API servers ignore CEL).
            let typed: AwxTokenSpec = serde_json::from_value(spec(extra.clone())).unwrap();
            assert!(crate::spec::validate(&typed).is_err(), "{extra}");
        }
    }

    #[test]
    fn without_cel_strips_every_rule() {
        let with = crd_yaml(false).unwrap();
        let without = crd_yaml(true).unwrap();
        assert_eq!(with.matches("x-kubernetes-validations").count(), 5);
        assert_eq!(without.matches("x-kubernetes-validations").count(), 0);
    }
}
