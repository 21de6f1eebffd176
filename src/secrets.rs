//! The Secrets the operator writes: the target Secret pods mount, and the state Secret that
//! remembers tokens for renewal and revocation. Rendering and ownership are pure functions.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::{
    crd::{AwxToken, DeletionPolicy, SecretValue},
    state::{STATE_KEY, TokenState},
};

pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "awx-token-operator";
/// Label telling a token Secret (`token`) from a state Secret (`state`).
pub const ROLE_LABEL: &str = "awx-token-operator.io/role";
/// Annotation naming the AwxToken (same namespace) a Secret belongs to.
pub const OWNER_ANNOTATION: &str = "awx-token-operator.io/awx-token";
/// Annotation holding that AwxToken's UID: a re-created AwxToken of the same name is another
/// object, and must not take its predecessor's Secrets for its own.
pub const OWNER_UID_ANNOTATION: &str = "awx-token-operator.io/awx-token-uid";
/// Hash of the rendered metadata, so an unchanged Secret is not written again.
const RENDERED_ANNOTATION: &str = "awx-token-operator.io/rendered";

/// Label selector matching every Secret this operator writes.
pub fn managed_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY}")
}

/// Whether a Secret may be written for `token`.
#[derive(Debug, PartialEq, Eq)]
pub enum Ownership {
    Absent,
    Ours,
    /// Written for an earlier AwxToken of the same name (another UID), which is gone: its
    /// contents are not this object's, but the Secret may be taken over.
    Predecessor,
    /// Someone else's Secret: never touched. The text says whose.
    Foreign(String),
}

pub fn ownership(existing: Option<&Secret>, token: &AwxToken) -> Ownership {
    let Some(secret) = existing else {
        return Ownership::Absent;
    };
    let managed = secret.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY);
    match secret.annotations().get(OWNER_ANNOTATION) {
        Some(owner) if managed && *owner == token.name_any() => {
            // The UID annotation, else the owner reference (Secrets written before the
            // annotation existed); a Secret with neither predates both and is taken as ours.
            let owner_uid = secret
                .annotations()
                .get(OWNER_UID_ANNOTATION)
                .cloned()
                .or_else(|| {
                    secret
                        .owner_references()
                        .iter()
                        .find(|o| o.kind == "AwxToken")
                        .map(|o| o.uid.clone())
                });
            match (owner_uid, token.uid()) {
                (Some(owner), Some(uid)) if owner != uid => Ownership::Predecessor,
                _ => Ownership::Ours,
            }
        }
        Some(owner) if managed => Ownership::Foreign(format!("it belongs to AwxToken {owner:?}")),
        _ => Ownership::Foreign("it was not created by awx-token-operator".into()),
    }
}

/// The target Secret holding `token_value` under the keys the spec asks for.
pub fn render_target(token: &AwxToken, token_value: &str) -> Secret {
    let spec = &token.spec.secret;
    let host = token.spec.awx.url.trim().trim_end_matches('/').to_string();
    let value_of = |v: SecretValue| match v {
        SecretValue::Token => token_value.to_string(),
        SecretValue::Host => host.clone(),
    };
    let mut data = BTreeMap::new();
    data.insert(spec.keys.token.clone(), bytes(token_value));
    data.insert(spec.keys.host.clone(), bytes(&host));
    for (key, value) in &spec.extra_keys {
        data.insert(key.clone(), bytes(&value_of(*value)));
    }
    let mut labels = spec.labels.clone();
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    labels.insert(ROLE_LABEL.into(), "token".into());
    let mut annotations = spec.annotations.clone();
    annotations.insert(OWNER_ANNOTATION.into(), token.name_any());
    annotations.insert(OWNER_UID_ANNOTATION.into(), token.uid().unwrap_or_default());
    let owner = (spec.deletion_policy == DeletionPolicy::Delete)
        .then(|| token.controller_owner_ref(&()))
        .flatten();
    finish(token.secret_name(), token, labels, annotations, owner, data)
}

/// The operator's own Secret holding the token state of `token`; always owned by it.
pub fn render_state(token: &AwxToken, state: &TokenState) -> Secret {
    let labels = BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (ROLE_LABEL.to_string(), "state".to_string()),
    ]);
    let annotations = BTreeMap::from([
        (OWNER_ANNOTATION.to_string(), token.name_any()),
        (
            OWNER_UID_ANNOTATION.to_string(),
            token.uid().unwrap_or_default(),
        ),
    ]);
    let data = BTreeMap::from([(STATE_KEY.to_string(), ByteString(state.encode()))]);
    finish(
        state_secret_name(&token.name_any()),
        token,
        labels,
        annotations,
        token.controller_owner_ref(&()),
        data,
    )
}

fn finish(
    name: String,
    token: &AwxToken,
    labels: BTreeMap<String, String>,
    mut annotations: BTreeMap<String, String>,
    owner: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
    data: BTreeMap<String, ByteString>,
) -> Secret {
    let mut hasher = Sha256::new();
    for (k, v) in labels.iter().chain(annotations.iter()) {
        hasher.update(k.as_bytes());
        hasher.update([0]);
        hasher.update(v.as_bytes());
        hasher.update([0]);
    }
    for key in data.keys() {
        hasher.update(key.as_bytes());
        hasher.update([1]);
    }
    hasher.update(if owner.is_some() { b"owned" } else { b"free!" });
    annotations.insert(
        RENDERED_ANNOTATION.into(),
        hex::encode(&hasher.finalize()[..8]),
    );
    Secret {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: token.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Secret::default()
    }
}

/// True when `existing` already is what `desired` renders, so no write is needed.
pub fn up_to_date(existing: Option<&Secret>, desired: &Secret) -> bool {
    let Some(existing) = existing else {
        return false;
    };
    existing.annotations().get(RENDERED_ANNOTATION)
        == desired.annotations().get(RENDERED_ANNOTATION)
        && existing.data == desired.data
        && existing.meta().deletion_timestamp.is_none()
}

/// Name of the state Secret of the AwxToken `name`, a valid object name at any length.
pub fn state_secret_name(name: &str) -> String {
    const PREFIX: &str = "awx-token-operator-state-";
    if PREFIX.len() + name.len() <= 253 {
        format!("{PREFIX}{name}")
    } else {
        let digest = hex::encode(&Sha256::digest(name.as_bytes())[..8]);
        let keep = 253 - PREFIX.len() - digest.len() - 1;
        let head = name[..keep].trim_end_matches(['-', '.']);
        format!("{PREFIX}{head}-{digest}")
    }
}

/// The token value stored under the spec's token key, if any.
pub fn token_in(secret: &Secret, token: &AwxToken) -> Option<String> {
    let data = secret.data.as_ref()?;
    let value = data.get(&token.spec.secret.keys.token)?;
    String::from_utf8(value.0.clone()).ok()
}

fn bytes(s: &str) -> ByteString {
    ByteString(s.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn awx_token(extra: serde_json::Value) -> AwxToken {
        let mut spec = serde_json::json!({
            "awx": {"url": "https://awx.example.com/"},
            "grant": {"type": "Password", "credentialsSecretRef": {"name": "bot"}},
        });
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        let mut t = AwxToken::new("ci-bot", serde_json::from_value(spec).unwrap());
        t.metadata.namespace = Some("apps".into());
        t.metadata.uid = Some("uid-1".into());
        t
    }

    #[test]
    fn default_layout_feeds_awx_resource_operator() {
        let t = awx_token(serde_json::json!({}));
        let s = render_target(&t, "Tok3n");
        assert_eq!(s.metadata.name.as_deref(), Some("ci-bot"));
        assert_eq!(s.metadata.namespace.as_deref(), Some("apps"));
        let data = s.data.as_ref().unwrap();
        assert_eq!(data.len(), 2);
        assert_eq!(data["token"].0, b"Tok3n");
        assert_eq!(data["host"].0, b"https://awx.example.com");
        let owners = s.metadata.owner_references.as_ref().unwrap();
        assert_eq!(owners[0].uid, "uid-1");
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(s.labels()[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(s.annotations()[OWNER_ANNOTATION], "ci-bot");
        assert_eq!(token_in(&s, &t).as_deref(), Some("Tok3n"));
    }

    #[test]
    fn custom_keys_extra_keys_labels_and_retain() {
        let t = awx_token(serde_json::json!({"secret": {
            "name": "awx-env",
            "labels": {"team": "a"},
            "annotations": {"note": "x"},
            "keys": {"token": "TOWER_OAUTH_TOKEN", "host": "TOWER_HOST"},
            "extraKeys": {"CONTROLLER_OAUTH_TOKEN": "token", "CONTROLLER_HOST": "host"},
            "deletionPolicy": "Retain"
        }}));
        let s = render_target(&t, "Tok3n");
        assert_eq!(s.metadata.name.as_deref(), Some("awx-env"));
        let data = s.data.as_ref().unwrap();
        let keys: Vec<_> = data.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "CONTROLLER_HOST",
                "CONTROLLER_OAUTH_TOKEN",
                "TOWER_HOST",
                "TOWER_OAUTH_TOKEN"
            ]
        );
        assert_eq!(data["CONTROLLER_OAUTH_TOKEN"].0, b"Tok3n");
        assert_eq!(data["CONTROLLER_HOST"].0, b"https://awx.example.com");
        assert_eq!(s.labels()["team"], "a");
        assert_eq!(s.annotations()["note"], "x");
        assert!(s.metadata.owner_references.is_none());
    }

    #[test]
    fn ownership_refuses_foreign_and_other_awx_tokens_secrets() {
        let t = awx_token(serde_json::json!({}));
        assert_eq!(ownership(None, &t), Ownership::Absent);
        let ours = render_target(&t, "x");
        assert_eq!(ownership(Some(&ours), &t), Ownership::Ours);
        let foreign = Secret::default();
        assert!(
            matches!(ownership(Some(&foreign), &t), Ownership::Foreign(m) if m.contains("not created"))
        );
        let mut other = ours.clone();
        other
            .annotations_mut()
            .insert(OWNER_ANNOTATION.into(), "other".into());
        assert!(
            matches!(ownership(Some(&other), &t), Ownership::Foreign(m) if m.contains("\"other\""))
        );
    }

    #[test]
    fn up_to_date_detects_token_and_metadata_changes() {
        let t = awx_token(serde_json::json!({}));
        let a = render_target(&t, "one");
        assert!(up_to_date(Some(&a), &render_target(&t, "one")));
        assert!(!up_to_date(Some(&a), &render_target(&t, "two")));
        assert!(!up_to_date(None, &a));
        let mut relabelled = t.clone();
        relabelled
            .spec
            .secret
            .labels
            .insert("team".into(), "b".into());
        assert!(!up_to_date(Some(&a), &render_target(&relabelled, "one")));
    }

    #[test]
    fn state_secret_names_stay_valid() {
        assert_eq!(
            state_secret_name("ci-bot"),
            "awx-token-operator-state-ci-bot"
        );
        let long = "a".repeat(253);
        let name = state_secret_name(&long);
        assert_eq!(name.len(), 253);
        assert_ne!(
            state_secret_name(&"a".repeat(252)),
            state_secret_name(&long)
        );
        let t = awx_token(serde_json::json!({}));
        let s = render_state(&t, &TokenState::default());
        assert_eq!(s.metadata.owner_references.as_ref().unwrap().len(), 1);
        assert_eq!(s.labels()[ROLE_LABEL], "state");
    }
}
