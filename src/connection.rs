//! Platform-owned connections to AWX: `ClusterAwxConnection` (cluster-scoped, shared with the
//! namespaces its selector admits) and `AwxConnection` (namespaced). They split "where and how
//! to reach AWX, and with which OAuth2 application" from "what to issue" (the AwxToken), the
//! way cert-manager splits ClusterIssuer/Issuer from Certificate.
//!
//! This module holds the resource types and the pure decisions over them (is a namespace
//! admitted, what fingerprint a connection has). Wiring into the reconciler is separate.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::core::{Selector, SelectorExt};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where AWX is, how to reach it and, optionally, the OAuth2 application tokens are issued
/// with; usable by AwxTokens in the namespaces `allowedNamespaces` selects.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "awx-token-operator.io",
    version = "v1alpha1",
    kind = "ClusterAwxConnection",
    doc = "A cluster-wide connection to AWX (URL, TLS, OAuth2 application) that AwxTokens in the namespaces it admits refer to with spec.connectionRef.",
    shortname = "cawxc",
    status = "AwxConnectionStatus",
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".spec.awx.url"}"#,
    printcolumn = r#"{"name":"Flavor","type":"string","jsonPath":".status.flavor"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Tokens","type":"integer","jsonPath":".status.tokens"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterAwxConnectionSpec {
    /// Where AWX is and how to talk to it. caBundleSecretRef names a Secret in the operator's
    /// namespace.
    pub awx: crate::crd::AwxConnection,
    /// The OAuth2 application tokens are issued with, from a Secret in the operator's
    /// namespace (which namespace users cannot read). Without it, each AwxToken's credentials
    /// Secret must hold the client id (and secret) itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application: Option<ApplicationSecretRef>,
    /// At most this many requests per second to AWX for all AwxTokens using this connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub requests_per_second: Option<u32>,
    /// Namespaces whose AwxTokens may use this connection, by their labels. None by default:
    /// a connection without this selector admits no namespace. An empty selector ({})
    /// admits every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_namespaces: Option<AllowedNamespaces>,
}

/// Where AWX is, how to reach it and, optionally, the OAuth2 application tokens are issued
/// with; usable by AwxTokens in the same namespace.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "awx-token-operator.io",
    version = "v1alpha1",
    kind = "AwxConnection",
    doc = "A connection to AWX (URL, TLS, OAuth2 application) that AwxTokens in the same namespace refer to with spec.connectionRef.",
    namespaced,
    shortname = "awxc",
    status = "AwxConnectionStatus",
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".spec.awx.url"}"#,
    printcolumn = r#"{"name":"Flavor","type":"string","jsonPath":".status.flavor"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Tokens","type":"integer","jsonPath":".status.tokens"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AwxConnectionSpec {
    /// Where AWX is and how to talk to it. caBundleSecretRef names a Secret in this namespace.
    pub awx: crate::crd::AwxConnection,
    /// The OAuth2 application tokens are issued with, from a Secret in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application: Option<ApplicationSecretRef>,
    /// At most this many requests per second to AWX for all AwxTokens using this connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub requests_per_second: Option<u32>,
}

/// The Secret holding an OAuth2 application's client id and secret.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationSecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key holding the application's client_id.
    #[serde(default = "default_client_id_key")]
    pub client_id_key: String,
    /// Key holding the application's client_secret (absent for public applications).
    #[serde(default = "default_client_secret_key")]
    pub client_secret_key: String,
}

/// Which namespaces may use a cluster-scoped connection.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AllowedNamespaces {
    /// Labels the namespace must have; {} admits every namespace.
    #[serde(default)]
    pub selector: LabelSelector,
}

/// What the operator last saw of a connection.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AwxConnectionStatus {
    /// Ready: AWX answered and its flavour is known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The API flavour detected (Controller or Gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flavor: Option<String>,
    /// AWX's version, where it says it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// How many AwxTokens use this connection.
    #[serde(default)]
    pub tokens: u32,
    /// The last error reaching AWX, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The two kinds an AwxToken's spec.connectionRef can name.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectionKind {
    /// A ClusterAwxConnection (cluster-scoped; the namespace must be admitted by it).
    ClusterAwxConnection,
    /// An AwxConnection in the AwxToken's namespace.
    AwxConnection,
}

/// A reference from an AwxToken to the connection it uses (instead of spec.awx).
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionRef {
    /// ClusterAwxConnection or AwxConnection.
    pub kind: ConnectionKind,
    /// Name of the connection.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Whether a namespace with these labels may use a cluster-scoped connection; Err says why not
/// in words a person can act on.
pub fn namespace_admitted(
    connection: &str,
    allowed: Option<&AllowedNamespaces>,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), String> {
    let Some(allowed) = allowed else {
        return Err(format!(
            "ClusterAwxConnection {connection:?} admits no namespace (spec.allowedNamespaces is unset); ask its owner to add namespace {namespace:?} to it"
        ));
    };
    let selector = Selector::try_from(allowed.selector.clone()).map_err(|e| {
        format!(
            "ClusterAwxConnection {connection:?} has an unusable allowedNamespaces selector: {e}"
        )
    })?;
    if selector.matches(labels) {
        Ok(())
    } else {
        Err(format!(
            "namespace {namespace:?} is not selected by ClusterAwxConnection {connection:?} spec.allowedNamespaces ({selector})"
        ))
    }
}

/// What a connection's tokens depend on, as a hash: the URL, the CA bundle, the client id and
/// a hash of the client secret (never the secret itself). A token issued under another
/// fingerprint is re-issued.
pub fn fingerprint(
    url: &str,
    ca_bundle: Option<&[u8]>,
    client_id: Option<&str>,
    client_secret: Option<&[u8]>,
) -> String {
    let mut hash = Sha256::new();
    let mut part = |tag: &[u8], value: Option<&[u8]>| {
        hash.update(tag);
        match value {
            Some(v) => {
                hash.update((v.len() as u64).to_be_bytes());
                hash.update(v);
            }
            None => hash.update(u64::MAX.to_be_bytes()),
        }
    };
    part(b"url", Some(url.as_bytes()));
    part(b"ca", ca_bundle);
    part(b"id", client_id.map(str::as_bytes));
    let secret_hash = client_secret.map(|s| Sha256::digest(s).to_vec());
    part(b"secret", secret_hash.as_deref());
    hex::encode(&hash.finalize()[..16])
}

/// The YAML of both connection CRDs, as `crds/` holds them.
pub fn crd_yaml(kind: ConnectionKind) -> Result<String, serde_yaml::Error> {
    match kind {
        ConnectionKind::ClusterAwxConnection => serde_yaml::to_string(&ClusterAwxConnection::crd()),
        ConnectionKind::AwxConnection => serde_yaml::to_string(&AwxConnection::crd()),
    }
}

fn default_client_id_key() -> String {
    "client_id".into()
}

fn default_client_secret_key() -> String {
    "client_secret".into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn no_selector_admits_no_namespace() {
        let err =
            namespace_admitted("shared", None, "apps", &labels(&[("team", "a")])).unwrap_err();
        assert_eq!(
            err,
            "ClusterAwxConnection \"shared\" admits no namespace (spec.allowedNamespaces is unset); ask its owner to add namespace \"apps\" to it"
        );
    }

    #[test]
    fn selector_admits_only_matching_namespaces() {
        let allowed: AllowedNamespaces =
            serde_json::from_value(json!({"selector": {"matchLabels": {"awx": "yes"}}})).unwrap();
        assert_eq!(
            namespace_admitted("shared", Some(&allowed), "in", &labels(&[("awx", "yes")])),
            Ok(())
        );
        assert_eq!(
            namespace_admitted("shared", Some(&allowed), "out", &labels(&[("awx", "no")])),
            Err("namespace \"out\" is not selected by ClusterAwxConnection \"shared\" spec.allowedNamespaces (awx=yes)".into())
        );
    }

    #[test]
    fn empty_selector_admits_every_namespace() {
        let allowed = AllowedNamespaces::default();
        assert_eq!(
            namespace_admitted("shared", Some(&allowed), "any", &BTreeMap::new()),
            Ok(())
        );
    }

    #[test]
    fn fingerprint_changes_with_each_input_and_hides_the_secret() {
        let base = fingerprint("https://a", Some(b"ca"), Some("id"), Some(b"s3cret"));
        assert_eq!(base.len(), 32);
        assert_eq!(
            base,
            fingerprint("https://a", Some(b"ca"), Some("id"), Some(b"s3cret"))
        );
        for other in [
            fingerprint("https://b", Some(b"ca"), Some("id"), Some(b"s3cret")),
            fingerprint("https://a", None, Some("id"), Some(b"s3cret")),
            fingerprint("https://a", Some(b"ca"), Some("id2"), Some(b"s3cret")),
            fingerprint("https://a", Some(b"ca"), Some("id"), Some(b"other")),
            fingerprint("https://a", Some(b"ca"), Some("id"), None),
        ] {
            assert_ne!(other, base);
        }
        // Moving bytes between fields must not collide.
        assert_ne!(
            fingerprint("https://a", Some(b"x"), Some("y"), None),
            fingerprint("https://a", Some(b"xy"), Some(""), None)
        );
    }

    #[test]
    fn cluster_connection_spec_round_trips_with_defaults() {
        let spec: ClusterAwxConnectionSpec = serde_json::from_value(json!({
            "awx": {"url": "https://awx.example.com"},
            "application": {"name": "awx-app"},
        }))
        .unwrap();
        let app = spec.application.unwrap();
        assert_eq!(app.client_id_key, "client_id");
        assert_eq!(app.client_secret_key, "client_secret");
        assert_eq!(spec.allowed_namespaces, None);
        assert_eq!(spec.awx.timeout_seconds, 30);
    }

    #[test]
    fn crds_are_cluster_and_namespace_scoped_with_printer_columns() {
        let cluster = ClusterAwxConnection::crd();
        assert_eq!(cluster.spec.scope, "Cluster");
        let namespaced = AwxConnection::crd();
        assert_eq!(namespaced.spec.scope, "Namespaced");
        let columns: Vec<_> = namespaced.spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["URL", "Flavor", "Ready", "Tokens"]);
    }
}
