//! Platform-owned connections to AWX: `ClusterAwxConnection` (cluster-scoped, shared with the
//! namespaces its selector admits) and `AwxConnection` (namespaced). They split "where and how
//! to reach AWX, and with which OAuth2 application" from "what to issue" (the AwxToken), the
//! way cert-manager splits ClusterIssuer/Issuer from Certificate.
//!
//! This module holds the resource types and how an AwxToken's `spec.connectionRef` is resolved
//! before a reconcile reads the spec: the connection's `awx` block takes the place of the
//! token's, its CA bundle and application Secrets are read from the connection's namespace
//! (the operator's own for the cluster-scoped kind), and a namespace the connection does not
//! admit is refused before any request to AWX.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::core::{Selector, SelectorExt};
use kube::{CustomResource, CustomResourceExt, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    Error,
    controller::cluster::Cluster,
    crd::{AwxToken, AwxTokenSpec, FlavorSpec},
    spec::{self, SpecError},
};

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

/// What an AwxToken's reconcile needs of the connection it names.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionView {
    pub awx: crate::crd::AwxConnection,
    pub application: Option<ApplicationSecretRef>,
    pub requests_per_second: Option<u32>,
    /// For a ClusterAwxConnection: which namespaces it admits (`None` inside: none).
    pub allowed_namespaces: Option<Option<AllowedNamespaces>>,
    /// The flavour the connection's own reconcile detected, if any.
    pub detected_flavor: Option<String>,
}

impl ConnectionView {
    pub fn of_cluster(c: &ClusterAwxConnection) -> Self {
        Self {
            awx: c.spec.awx.clone(),
            application: c.spec.application.clone(),
            requests_per_second: c.spec.requests_per_second,
            allowed_namespaces: Some(c.spec.allowed_namespaces.clone()),
            detected_flavor: c.status.as_ref().and_then(|s| s.flavor.clone()),
        }
    }

    pub fn of_namespaced(c: &AwxConnection) -> Self {
        Self {
            awx: c.spec.awx.clone(),
            application: c.spec.application.clone(),
            requests_per_second: c.spec.requests_per_second,
            allowed_namespaces: None,
            detected_flavor: c.status.as_ref().and_then(|s| s.flavor.clone()),
        }
    }
}

/// The connection an AwxToken reaches AWX through.
#[derive(Clone, Debug, PartialEq)]
pub struct Via {
    pub kind: ConnectionKind,
    pub name: String,
    /// Where the connection's CA bundle and application Secrets are read.
    pub secrets_namespace: String,
    pub application: Option<ApplicationSecretRef>,
    pub requests_per_second: Option<u32>,
}

impl Via {
    /// "ClusterAwxConnection \"shared\"", for messages.
    pub fn describe(&self) -> String {
        format!("{:?} {:?}", self.kind, self.name)
    }

    /// The connection's own rate limit, if it has one: its name and rate.
    pub fn narrower(&self) -> Option<(String, std::num::NonZeroU32)> {
        let rps = std::num::NonZeroU32::new(self.requests_per_second?)?;
        let namespace =
            (self.kind == ConnectionKind::AwxConnection).then_some(self.secrets_namespace.as_str());
        Some((limit_key(self.kind, namespace, &self.name), rps))
    }

    /// The Secrets this connection makes its tokens read: (namespace, name).
    pub fn secrets(&self, awx: &crate::crd::AwxConnection) -> Vec<(String, String)> {
        let mut names: Vec<_> = awx
            .ca_bundle_secret_ref
            .iter()
            .map(|c| c.name.clone())
            .chain(self.application.iter().map(|a| a.name.clone()))
            .map(|n| (self.secrets_namespace.clone(), n))
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// The name a connection's rate gate goes by: its kind, namespace and name.
pub fn limit_key(kind: ConnectionKind, namespace: Option<&str>, name: &str) -> String {
    format!("{kind:?}/{}/{name}", namespace.unwrap_or_default())
}

/// An AwxToken as the reconcile reads it.
pub struct Resolution<'a> {
    /// The AwxToken with the connection's `awx` block in place of its own (borrowed as it is
    /// for an inline spec.awx).
    pub token: std::borrow::Cow<'a, AwxToken>,
    /// The connection, when the token names one and may use it.
    pub via: Option<Via>,
    /// Why the token may not reach AWX at all as its spec says (no request is sent).
    pub refused: Option<SpecError>,
}

/// The operator-wide rules for connections.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Where the Secrets of ClusterAwxConnections are read.
    pub operator_namespace: String,
    /// Refuse inline spec.awx: only platform-defined connections can be reached.
    pub require_connection_ref: bool,
    /// ClusterAwxConnections can be used (false when the operator watches one namespace, and
    /// so has no rights on cluster-scoped objects).
    pub cluster_connections: bool,
}

/// The error of a spec that sets both spec.awx and spec.connectionRef (the CRD's CEL rule
/// says so too, where the API server runs it).
pub fn exclusive(spec: &AwxTokenSpec) -> Option<SpecError> {
    (spec.connection_ref.is_some() && !spec.awx.is_unset()).then(|| {
        spec::connection_refused("InvalidSpec", "set either awx or connectionRef, not both")
    })
}

/// Resolves `token`'s spec.connectionRef (if any) as [`Resolution`] describes.
pub async fn resolve<'a>(
    token: &'a AwxToken,
    cluster: &impl Cluster,
    policy: &Policy,
) -> Result<Resolution<'a>, Error> {
    use std::borrow::Cow;
    let refused = |reason, message: String| Resolution {
        token: Cow::Borrowed(token),
        via: None,
        refused: Some(spec::connection_refused(reason, message)),
    };
    let Some(r) = &token.spec.connection_ref else {
        if policy.require_connection_ref {
            return Ok(refused(
                "InlineAwxRefused",
                "this operator reaches AWX only through platform-defined connections \
                 (--require-connection-ref): replace spec.awx with spec.connectionRef naming a \
                 ClusterAwxConnection or an AwxConnection; no request was sent"
                    .into(),
            ));
        }
        return Ok(Resolution {
            token: Cow::Borrowed(token),
            via: None,
            refused: None,
        });
    };
    if let Some(both) = exclusive(&token.spec) {
        return Ok(Resolution {
            token: Cow::Borrowed(token),
            via: None,
            refused: Some(both),
        });
    }
    let namespace = token.namespace().unwrap_or_default();
    if r.kind == ConnectionKind::ClusterAwxConnection && !policy.cluster_connections {
        return Ok(refused(
            "ConnectionRefused",
            format!(
                "ClusterAwxConnection {:?} cannot be used: this operator watches one namespace \
                 and reads no cluster-scoped objects; use an AwxConnection in this namespace",
                r.name
            ),
        ));
    }
    let Some(view) = cluster.connection(&namespace, r).await? else {
        let place = match r.kind {
            ConnectionKind::ClusterAwxConnection => String::new(),
            ConnectionKind::AwxConnection => format!(" in namespace {namespace:?}"),
        };
        return Ok(refused(
            "ConnectionNotFound",
            format!(
                "{:?} {:?} does not exist{place}; no request was sent",
                r.kind, r.name
            ),
        ));
    };
    let secrets_namespace = match r.kind {
        ConnectionKind::ClusterAwxConnection => {
            let labels = cluster
                .namespace_labels(&namespace)
                .await?
                .unwrap_or_default();
            let allowed = view.allowed_namespaces.clone().flatten();
            if let Err(why) = namespace_admitted(&r.name, allowed.as_ref(), &namespace, &labels) {
                return Ok(refused(
                    "ConnectionRefused",
                    format!("{why}; no request was sent"),
                ));
            }
            policy.operator_namespace.clone()
        }
        ConnectionKind::AwxConnection => namespace,
    };
    let mut effective = token.clone();
    effective.spec.awx = view.awx.clone();
    if effective.spec.awx.flavor == FlavorSpec::Auto {
        match view.detected_flavor.as_deref() {
            Some("Controller") => effective.spec.awx.flavor = FlavorSpec::Controller,
            Some("Gateway") => effective.spec.awx.flavor = FlavorSpec::Gateway,
            _ => {}
        }
    }
    Ok(Resolution {
        token: Cow::Owned(effective),
        via: Some(Via {
            kind: r.kind,
            name: r.name.clone(),
            secrets_namespace,
            application: view.application,
            requests_per_second: view.requests_per_second,
        }),
        refused: None,
    })
}

/// The YAML of a connection kind's CRD, as `crds/` holds it (without the CEL rules: for
/// Kubernetes older than 1.25).
pub fn crd_yaml(kind: ConnectionKind, without_cel: bool) -> Result<String, serde_yaml::Error> {
    let crd = match kind {
        ConnectionKind::ClusterAwxConnection => serde_json::to_value(ClusterAwxConnection::crd()),
        ConnectionKind::AwxConnection => serde_json::to_value(AwxConnection::crd()),
    };
    let mut crd = crd.map_err(<serde_yaml::Error as serde::ser::Error>::custom)?;
    if without_cel {
        crate::crd::strip_key(&mut crd, "x-kubernetes-validations");
    }
    serde_yaml::to_string(&crd)
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
