//! The Secrets the operator writes: the target Secret pods mount, and the state Secret that
//! remembers tokens for renewal and revocation. Rendering and ownership are pure functions.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::{
    crd::{AwxToken, DeletionPolicy, SecretPreset, SecretValue, TargetSecret},
    spec::quoted,
    state::{HeldToken, STATE_KEY, TokenState},
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

/// A value about the current token that a key of the target Secret can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenField {
    Token,
    /// The AWX URL of the spec, without a trailing slash.
    Host,
    /// RFC 3339 to the second, as status.expiresAt; empty when AWX gave no expiry.
    ExpiresAt,
    Scope,
    /// Empty where the user is not known.
    Username,
}

impl TokenField {
    /// The placeholder names of templates, in the order the documentation lists them.
    const PLACEHOLDERS: [(&'static str, TokenField); 5] = [
        ("token", TokenField::Token),
        ("host", TokenField::Host),
        ("expiresAt", TokenField::ExpiresAt),
        ("scope", TokenField::Scope),
        ("username", TokenField::Username),
    ];
}

/// One piece of a key's value.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(TokenField),
}

/// What one key of the target Secret holds: text and token values, in order. Two contents
/// are equal exactly when they render the same for every token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyContent(Vec<Part>);

impl KeyContent {
    fn field(field: TokenField) -> Self {
        Self(vec![Part::Field(field)])
    }

    fn text(text: &str) -> Self {
        Self(vec![Part::Text(text.to_string())])
    }

    /// Adds text, merged into the text before it, so that equal renderings compare equal.
    fn push_text(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        match self.0.last_mut() {
            Some(Part::Text(last)) => last.push_str(text),
            _ => self.0.push(Part::Text(text.to_string())),
        }
    }

    /// For messages: what the key holds, without any value.
    fn describe(&self) -> String {
        match &self.0[..] {
            [Part::Field(TokenField::Token)] => "the token".into(),
            [Part::Field(TokenField::Host)] => "the AWX URL".into(),
            [Part::Text(text)] if text.len() <= 8 => format!("the text {}", quoted(text)),
            _ => "a template".into(),
        }
    }

    fn render(&self, facts: &TokenFacts, host: &str) -> String {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Field(TokenField::Token) => out.push_str(facts.token),
                Part::Field(TokenField::Host) => out.push_str(host),
                Part::Field(TokenField::ExpiresAt) => {
                    if let Some(at) = facts.expires_at {
                        out.push_str(&rfc3339_seconds(at));
                    }
                }
                Part::Field(TokenField::Scope) => out.push_str(facts.scope),
                Part::Field(TokenField::Username) => out.push_str(facts.username.unwrap_or("")),
            }
        }
        out
    }
}

/// Where a key of the target Secret is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySource {
    TokenKey,
    HostKey,
    ExtraKeys,
    Preset(SecretPreset),
    Templates,
}

impl KeySource {
    /// The spec field, for the error naming it.
    pub fn field(self) -> &'static str {
        match self {
            Self::TokenKey => "secret.keys.token",
            Self::HostKey => "secret.keys.host",
            Self::ExtraKeys => "secret.extraKeys",
            Self::Preset(_) => "secret.presets",
            Self::Templates => "secret.templates",
        }
    }
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Preset(preset) => write!(f, "preset {preset:?}"),
            other => f.write_str(other.field()),
        }
    }
}

/// Why the keys a spec asks for cannot make one Secret. Messages quote keys and placeholders
/// (shortened), never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "key {} is written twice with different content: {first_content} by {first} and \
         {second_content} by {second}", quoted(.key)
    )]
    Conflict {
        key: String,
        first: KeySource,
        first_content: String,
        second: KeySource,
        second_content: String,
    },
    #[error(
        "template of key {}: unknown placeholder {}; the placeholders are {{token}}, {{host}}, \
         {{expiresAt}}, {{scope}} and {{username}} ({{{{ and }}}} for literal braces)",
        quoted(.key), braced(.placeholder)
    )]
    UnknownPlaceholder { key: String, placeholder: String },
    #[error(
        "template of key {}: the {{ at character {at} has no closing }} (write {{{{ for a \
         literal brace)", quoted(.key)
    )]
    Unclosed { key: String, at: usize },
    #[error(
        "template of key {}: the }} at character {at} has no opening {{ (write }}}} for a \
         literal brace)", quoted(.key)
    )]
    UnmatchedClose { key: String, at: usize },
}

/// `{name}`, quoted for a message.
fn braced(name: &str) -> String {
    quoted(&format!("{{{name}}}"))
}

impl LayoutError {
    /// The spec field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Conflict { second, .. } => second.field(),
            _ => KeySource::Templates.field(),
        }
    }
}

/// The keys of the target Secret and what each holds, as the spec asks: checked once, when
/// the spec is validated, and rendered for every token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretLayout {
    keys: BTreeMap<String, (KeyContent, KeySource)>,
}

impl SecretLayout {
    /// Lays out keys, extraKeys, presets and templates, in that order. A key asked for twice
    /// must have the same content both times; `insecure_skip_tls_verify` is what the presets'
    /// "verify" keys say.
    pub fn of(spec: &TargetSecret, insecure_skip_tls_verify: bool) -> Result<Self, LayoutError> {
        let mut layout = Self::default();
        layout.add(
            &spec.keys.token,
            KeyContent::field(TokenField::Token),
            KeySource::TokenKey,
        )?;
        layout.add(
            &spec.keys.host,
            KeyContent::field(TokenField::Host),
            KeySource::HostKey,
        )?;
        for (key, value) in &spec.extra_keys {
            let field = match value {
                SecretValue::Token => TokenField::Token,
                SecretValue::Host => TokenField::Host,
            };
            layout.add(key, KeyContent::field(field), KeySource::ExtraKeys)?;
        }
        let verify = if insecure_skip_tls_verify {
            "false"
        } else {
            "true"
        };
        for preset in &spec.presets {
            for (key, content) in preset_keys(*preset) {
                let content = match content {
                    PresetValue::Field(field) => KeyContent::field(*field),
                    PresetValue::Verify => KeyContent::text(verify),
                };
                layout.add(key, content, KeySource::Preset(*preset))?;
            }
        }
        for (key, template) in &spec.templates {
            layout.add(key, parse_template(key, template)?, KeySource::Templates)?;
        }
        Ok(layout)
    }

    fn add(
        &mut self,
        key: &str,
        content: KeyContent,
        source: KeySource,
    ) -> Result<(), LayoutError> {
        match self.keys.get(key) {
            Some((held, _)) if *held == content => Ok(()),
            Some((held, first)) => Err(LayoutError::Conflict {
                key: key.to_string(),
                first: *first,
                first_content: held.describe(),
                second: source,
                second_content: content.describe(),
            }),
            None => {
                self.keys.insert(key.to_string(), (content, source));
                Ok(())
            }
        }
    }

    /// The keys, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// How many placeholders the templates hold in all.
    pub fn template_fields(&self) -> usize {
        self.keys
            .values()
            .filter(|(_, source)| *source == KeySource::Templates)
            .map(|(content, _)| {
                content
                    .0
                    .iter()
                    .filter(|p| matches!(p, Part::Field(_)))
                    .count()
            })
            .sum()
    }
}

/// What a preset key holds.
#[derive(Clone, Copy)]
enum PresetValue {
    Field(TokenField),
    /// "true", or "false" when TLS verification is off.
    Verify,
}

/// The keys of a preset, as the tool's own source reads them (README.md names the files).
fn preset_keys(preset: SecretPreset) -> &'static [(&'static str, PresetValue)] {
    use PresetValue::{Field, Verify};
    use TokenField::{Host, Token};
    match preset {
        SecretPreset::AwxResourceOperator => &[("host", Field(Host)), ("token", Field(Token))],
        // awxkit 24.6.1, awxkit/cli/format.py (CONTROLLER_* first, then TOWER_*); the awx.awx
        // collection reads the same names, and AAP_TOKEN after them in newer releases.
        SecretPreset::AwxCli => &[
            ("CONTROLLER_HOST", Field(Host)),
            ("CONTROLLER_OAUTH_TOKEN", Field(Token)),
            ("CONTROLLER_VERIFY_SSL", Verify),
            ("AAP_TOKEN", Field(Token)),
        ],
        // ansible.platform, plugins/module_utils/aap_module.py: GATEWAY_* first, then AAP_*.
        SecretPreset::AnsiblePlatform => &[
            ("AAP_HOSTNAME", Field(Host)),
            ("AAP_TOKEN", Field(Token)),
            ("AAP_VALIDATE_CERTS", Verify),
            ("GATEWAY_HOSTNAME", Field(Host)),
            ("GATEWAY_API_TOKEN", Field(Token)),
            ("GATEWAY_VERIFY_SSL", Verify),
        ],
    }
}

/// Parses a template: `{name}` is a placeholder, `{{` and `}}` are literal braces.
fn parse_template(key: &str, template: &str) -> Result<KeyContent, LayoutError> {
    let mut content = KeyContent(Vec::new());
    let mut rest = template;
    // Characters consumed so far, for messages (a person counts characters, not bytes).
    let mut at = 0;
    while let Some(i) = rest.find(['{', '}']) {
        content.push_text(&rest[..i]);
        at += rest[..i].chars().count();
        let after = &rest[i + 1..];
        if rest[i..].starts_with("{{") || rest[i..].starts_with("}}") {
            content.push_text(&rest[i..=i]);
            rest = &after[1..];
            at += 2;
        } else if rest[i..].starts_with('}') {
            return Err(LayoutError::UnmatchedClose {
                key: key.to_string(),
                at: at + 1,
            });
        } else {
            let Some(end) = after.find('}') else {
                return Err(LayoutError::Unclosed {
                    key: key.to_string(),
                    at: at + 1,
                });
            };
            let name = &after[..end];
            let Some((_, field)) = TokenField::PLACEHOLDERS.iter().find(|(n, _)| *n == name) else {
                return Err(LayoutError::UnknownPlaceholder {
                    key: key.to_string(),
                    placeholder: name.to_string(),
                });
            };
            content.0.push(Part::Field(*field));
            at += name.chars().count() + 2;
            rest = &after[end + 1..];
        }
    }
    content.push_text(rest);
    Ok(content)
}

/// As Kubernetes writes times (status.expiresAt): RFC 3339, whole seconds, UTC.
fn rfc3339_seconds(at: jiff::Timestamp) -> String {
    jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", at).unwrap_or_default()
}

/// What the keys of the target Secret can say about the current token.
#[derive(Clone, Copy, Debug)]
pub struct TokenFacts<'a> {
    pub token: &'a str,
    pub expires_at: Option<jiff::Timestamp>,
    pub scope: &'a str,
    pub username: Option<&'a str>,
}

impl<'a> From<&'a HeldToken> for TokenFacts<'a> {
    fn from(held: &'a HeldToken) -> Self {
        Self {
            token: held.token.access_token.expose(),
            expires_at: held.expires_at,
            scope: &held.scope,
            username: held.user.as_deref(),
        }
    }
}

/// The target Secret: the keys of `layout` (made from the spec of `token`) filled in for the
/// current token.
pub fn render_target(token: &AwxToken, layout: &SecretLayout, facts: &TokenFacts) -> Secret {
    let spec = &token.spec.secret;
    let host = token.spec.awx.url.trim().trim_end_matches('/');
    let data = layout
        .keys
        .iter()
        .map(|(key, (content, _))| (key.clone(), bytes(&content.render(facts, host))))
        .collect();
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

    /// The target Secret for a token with the facts of `FACTS` but the value `token_value`.
    fn render(t: &AwxToken, token_value: &str) -> Secret {
        let layout = SecretLayout::of(&t.spec.secret, t.spec.awx.insecure_skip_tls_verify)
            .expect("the spec lays out");
        render_target(
            t,
            &layout,
            &TokenFacts {
                token: token_value,
                ..FACTS
            },
        )
    }

    const FACTS: TokenFacts<'static> = TokenFacts {
        token: "Tok3n",
        expires_at: None,
        scope: "write",
        username: Some("svc-k8s"),
    };

    /// The Secret's data as text, key by key.
    fn data_of(s: &Secret) -> Vec<(String, String)> {
        s.data
            .as_ref()
            .expect("data")
            .iter()
            .map(|(k, v)| (k.clone(), String::from_utf8(v.0.clone()).expect("UTF-8")))
            .collect()
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn layout_error(secret: serde_json::Value) -> LayoutError {
        let t = awx_token(serde_json::json!({ "secret": secret }));
        SecretLayout::of(&t.spec.secret, false).expect_err("the layout is refused")
    }

    #[test]
    fn default_layout_feeds_awx_resource_operator() {
        let t = awx_token(serde_json::json!({}));
        let s = render(&t, "Tok3n");
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
        let s = render(&t, "Tok3n");
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
        let ours = render(&t, "x");
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
        let a = render(&t, "one");
        assert!(up_to_date(Some(&a), &render(&t, "one")));
        assert!(!up_to_date(Some(&a), &render(&t, "two")));
        assert!(!up_to_date(None, &a));
        let mut relabelled = t.clone();
        relabelled
            .spec
            .secret
            .labels
            .insert("team".into(), "b".into());
        assert!(!up_to_date(Some(&a), &render(&relabelled, "one")));
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

    #[test]
    fn awx_cli_preset_writes_what_awxkit_reads() {
        let t = awx_token(serde_json::json!({"secret": {"presets": ["AwxCli"]}}));
        assert_eq!(
            data_of(&render(&t, "Tok3n")),
            pairs(&[
                ("AAP_TOKEN", "Tok3n"),
                ("CONTROLLER_HOST", "https://awx.example.com"),
                ("CONTROLLER_OAUTH_TOKEN", "Tok3n"),
                ("CONTROLLER_VERIFY_SSL", "true"),
                ("host", "https://awx.example.com"),
                ("token", "Tok3n"),
            ])
        );
    }

    #[test]
    fn verify_keys_say_false_when_tls_verification_is_off() {
        let mut t = awx_token(serde_json::json!({
            "secret": {"presets": ["AwxCli", "AnsiblePlatform"]}
        }));
        t.spec.awx.insecure_skip_tls_verify = true;
        assert_eq!(
            data_of(&render(&t, "Tok3n")),
            pairs(&[
                ("AAP_HOSTNAME", "https://awx.example.com"),
                ("AAP_TOKEN", "Tok3n"),
                ("AAP_VALIDATE_CERTS", "false"),
                ("CONTROLLER_HOST", "https://awx.example.com"),
                ("CONTROLLER_OAUTH_TOKEN", "Tok3n"),
                ("CONTROLLER_VERIFY_SSL", "false"),
                ("GATEWAY_API_TOKEN", "Tok3n"),
                ("GATEWAY_HOSTNAME", "https://awx.example.com"),
                ("GATEWAY_VERIFY_SSL", "false"),
                ("host", "https://awx.example.com"),
                ("token", "Tok3n"),
            ])
        );
    }

    #[test]
    fn platform_preset_and_resource_operator_preset_with_renamed_keys() {
        let t = awx_token(serde_json::json!({"secret": {
            "keys": {"token": "TOWER_OAUTH_TOKEN", "host": "TOWER_HOST"},
            "presets": ["AnsiblePlatform", "AwxResourceOperator"]
        }}));
        assert_eq!(
            data_of(&render(&t, "Tok3n")),
            pairs(&[
                ("AAP_HOSTNAME", "https://awx.example.com"),
                ("AAP_TOKEN", "Tok3n"),
                ("AAP_VALIDATE_CERTS", "true"),
                ("GATEWAY_API_TOKEN", "Tok3n"),
                ("GATEWAY_HOSTNAME", "https://awx.example.com"),
                ("GATEWAY_VERIFY_SSL", "true"),
                ("TOWER_HOST", "https://awx.example.com"),
                ("TOWER_OAUTH_TOKEN", "Tok3n"),
                ("host", "https://awx.example.com"),
                ("token", "Tok3n"),
            ])
        );
        // The token the operator finds again is the one under keys.token.
        assert_eq!(token_in(&render(&t, "Tok3n"), &t).as_deref(), Some("Tok3n"));
    }

    #[test]
    fn templates_fill_every_placeholder_and_keep_doubled_braces() {
        let t = awx_token(serde_json::json!({"secret": {"templates": {
            "awx.env": "CONTROLLER_HOST={host}\nCONTROLLER_OAUTH_TOKEN={token}\n",
            "token.json": "{{\"token\": \"{token}\", \"expires\": \"{expiresAt}\", \
                           \"scope\": \"{scope}\", \"user\": \"{username}\"}}",
            "plain": "no placeholders, a }} and a {{",
            "empty": ""
        }}}));
        let facts = TokenFacts {
            expires_at: Some("3026-03-31T10:00:00.987654321Z".parse().unwrap()),
            ..FACTS
        };
        let layout = SecretLayout::of(&t.spec.secret, false).unwrap();
        assert_eq!(
            data_of(&render_target(&t, &layout, &facts)),
            pairs(&[
                (
                    "awx.env",
                    "CONTROLLER_HOST=https://awx.example.com\nCONTROLLER_OAUTH_TOKEN=Tok3n\n"
                ),
                ("empty", ""),
                ("host", "https://awx.example.com"),
                ("plain", "no placeholders, a } and a {"),
                ("token", "Tok3n"),
                (
                    "token.json",
                    "{\"token\": \"Tok3n\", \"expires\": \"3026-03-31T10:00:00Z\", \
                     \"scope\": \"write\", \"user\": \"svc-k8s\"}"
                ),
            ])
        );
        assert_eq!(layout.template_fields(), 6);
    }

    #[test]
    fn unknown_expiry_and_user_render_empty() {
        let t = awx_token(serde_json::json!({"secret": {"templates": {
            "about": "[{username}] until [{expiresAt}] ({scope})"
        }}}));
        let layout = SecretLayout::of(&t.spec.secret, false).unwrap();
        let facts = TokenFacts {
            username: None,
            scope: "read",
            ..FACTS
        };
        let data = data_of(&render_target(&t, &layout, &facts));
        assert_eq!(
            data[0],
            ("about".to_string(), "[] until [] (read)".to_string())
        );
    }

    #[test]
    fn template_errors_name_the_key_and_the_placeholder() {
        for (template, message) in [
            (
                "CONTROLLER_OAUTH_TOKEN={tokn}",
                "template of key \"awx.env\": unknown placeholder \"{tokn}\"; the placeholders \
                 are {token}, {host}, {expiresAt}, {scope} and {username} ({{ and }} for \
                 literal braces)",
            ),
            (
                "{Token}",
                "template of key \"awx.env\": unknown placeholder \"{Token}\"; the placeholders \
                 are {token}, {host}, {expiresAt}, {scope} and {username} ({{ and }} for \
                 literal braces)",
            ),
            (
                "{}",
                "template of key \"awx.env\": unknown placeholder \"{}\"; the placeholders \
                 are {token}, {host}, {expiresAt}, {scope} and {username} ({{ and }} for \
                 literal braces)",
            ),
            (
                "é={token} {host",
                "template of key \"awx.env\": the { at character 11 has no closing } (write {{ \
                 for a literal brace)",
            ),
            (
                "{{x}",
                "template of key \"awx.env\": the } at character 4 has no opening { (write }} \
                 for a literal brace)",
            ),
        ] {
            let e = layout_error(serde_json::json!({"templates": {"awx.env": template}}));
            assert_eq!(e.field(), "secret.templates", "{template}");
            assert_eq!(e.to_string(), message, "{template}");
        }
    }

    #[test]
    fn a_key_from_two_sources_with_different_content_is_refused() {
        for (secret, field, message) in [
            (
                serde_json::json!({"extraKeys": {"CONTROLLER_HOST": "token"}, "presets": ["AwxCli"]}),
                "secret.presets",
                "key \"CONTROLLER_HOST\" is written twice with different content: the token by \
                 secret.extraKeys and the AWX URL by preset AwxCli",
            ),
            (
                serde_json::json!({"extraKeys": {"token": "host"}}),
                "secret.extraKeys",
                "key \"token\" is written twice with different content: the token by \
                 secret.keys.token and the AWX URL by secret.extraKeys",
            ),
            (
                serde_json::json!({"keys": {"token": "AAP_HOSTNAME"}, "presets": ["AnsiblePlatform"]}),
                "secret.presets",
                "key \"AAP_HOSTNAME\" is written twice with different content: the token by \
                 secret.keys.token and the AWX URL by preset AnsiblePlatform",
            ),
            (
                serde_json::json!({"presets": ["AwxCli"], "templates": {"CONTROLLER_VERIFY_SSL": "false"}}),
                "secret.templates",
                "key \"CONTROLLER_VERIFY_SSL\" is written twice with different content: the text \
                 \"true\" by preset AwxCli and the text \"false\" by secret.templates",
            ),
            (
                serde_json::json!({"templates": {"host": "{host}/"}}),
                "secret.templates",
                "key \"host\" is written twice with different content: the AWX URL by \
                 secret.keys.host and a template by secret.templates",
            ),
        ] {
            let e = layout_error(secret.clone());
            assert_eq!(e.field(), field, "{secret}");
            assert_eq!(e.to_string(), message, "{secret}");
        }
    }

    #[test]
    fn a_key_from_two_sources_with_the_same_content_is_written_once() {
        let t = awx_token(serde_json::json!({"secret": {
            "extraKeys": {"CONTROLLER_OAUTH_TOKEN": "token", "AAP_HOSTNAME": "host"},
            "presets": ["AwxCli", "AnsiblePlatform", "AwxResourceOperator", "AwxCli"],
            "templates": {"AAP_TOKEN": "{token}", "GATEWAY_VERIFY_SSL": "true", "token": "{token}"}
        }}));
        let layout = SecretLayout::of(&t.spec.secret, false).unwrap();
        assert_eq!(
            layout.keys().collect::<Vec<_>>(),
            [
                "AAP_HOSTNAME",
                "AAP_TOKEN",
                "AAP_VALIDATE_CERTS",
                "CONTROLLER_HOST",
                "CONTROLLER_OAUTH_TOKEN",
                "CONTROLLER_VERIFY_SSL",
                "GATEWAY_API_TOKEN",
                "GATEWAY_HOSTNAME",
                "GATEWAY_VERIFY_SSL",
                "host",
                "token"
            ]
        );
    }

    #[test]
    fn layout_errors_never_hold_a_token_and_stay_short() {
        let long = "k".repeat(250);
        let e = layout_error(
            serde_json::json!({"templates": {long.clone(): format!("{{{}}}", "p".repeat(5000))}}),
        );
        assert!(e.to_string().chars().count() < 300, "{e}");
        // Rendering is where token values enter, and it cannot fail.
        let t = awx_token(serde_json::json!({"secret": {"templates": {"x": "{token}"}}}));
        assert_eq!(
            data_of(&render(&t, "S3cr3t")),
            pairs(&[
                ("host", "https://awx.example.com"),
                ("token", "S3cr3t"),
                ("x", "S3cr3t")
            ])
        );
    }
}
