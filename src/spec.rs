//! Checks an `AwxToken` spec the way the CRD's schema and CEL rules do (old API servers
//! ignore CEL, so the operator never relies on them) and turns it into plain values.

use std::time::Duration;

use url::Url;

use crate::{
    crd::{AwxTokenSpec, GrantType, RenewalStrategy},
    secrets::SecretLayout,
};

/// A spec that passed validation, with durations parsed and the URL normalised.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidSpec {
    /// AWX base URL, always ending in `/` so relative API paths keep any path prefix.
    pub url: Url,
    /// Host (and port) of `url`, as matched against `--allowed-awx-hosts`.
    pub host: String,
    pub rotate_every: Duration,
    pub renew_before: RenewBefore,
    pub revoke_grace_period: Duration,
    /// `None` when verification is off (0s).
    pub verify_every: Option<Duration>,
    /// Strategy in effect: personal access tokens always re-issue.
    pub strategy: RenewalStrategy,
    /// How long AWX keeps a refresh token usable (REFRESH_TOKEN_EXPIRE_SECONDS).
    pub refresh_token_lifetime: Duration,
    pub timeout: Duration,
    /// The keys of the target Secret and what each holds.
    pub secret_layout: SecretLayout,
    pub restart: RestartPolicy,
}

/// When rolloutRestartTargets are restarted (spec.rolloutRestart).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RestartPolicy {
    pub delay: Duration,
    pub min_interval: Duration,
    pub rollout_timeout: Duration,
}

/// How long before AWX's expiry a token is renewed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RenewBefore {
    Fixed(Duration),
    /// Percentage of the lifetime (issue to expiry) left when the token is renewed.
    Percentage(u8),
}

/// A spec error, naming the field so a person can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.{field}: {message}")]
pub struct SpecError {
    pub field: &'static str,
    pub message: String,
    /// The Ready condition's reason: InvalidSpec, or why the named connection is unusable.
    pub reason: &'static str,
}

fn invalid(field: &'static str, message: impl Into<String>) -> SpecError {
    SpecError {
        field,
        message: message.into(),
        reason: "InvalidSpec",
    }
}

/// A spec whose connectionRef cannot be used: `reason` says why (ConnectionNotFound,
/// ConnectionRefused, ...).
pub fn connection_refused(reason: &'static str, message: impl Into<String>) -> SpecError {
    SpecError {
        field: "connectionRef",
        message: message.into(),
        reason,
    }
}

/// Longest rotation the operator accepts: one year. Longer would defeat the point of rotation
/// and approach what timers can represent.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
const MIN_ROTATE_EVERY: Duration = Duration::from_secs(1);
/// Kubernetes allows 256 KiB of annotations per object; the operator adds its own (its
/// AwxToken's name and a hash), so the user's get all but 1 KiB.
const MAX_ANNOTATIONS_SIZE: usize = 255 * 1024;
/// Templates in all: enough for any config file, and with at most
/// MAX_TEMPLATE_PLACEHOLDERS values (the URL at most 2 KiB) the Secret stays far below the
/// 1 MiB Kubernetes stores.
const MAX_TEMPLATES_SIZE: usize = 64 * 1024;
const MAX_TEMPLATE_PLACEHOLDERS: usize = 128;
/// Prefix of the Secrets the operator keeps its token state in (`secrets::state_secret_name`).
const STATE_SECRET_PREFIX: &str = "awx-token-operator-state-";

pub fn validate(spec: &AwxTokenSpec) -> Result<ValidSpec, SpecError> {
    if spec.connection_ref.is_some() && spec.awx.is_unset() {
        // `connection::resolve` puts the connection's block in place before validation; a
        // spec that still has none here was not resolved.
        return Err(invalid(
            "connectionRef",
            "the connection it names was not read",
        ));
    }
    if spec.connection_ref.is_none() && spec.awx.is_unset() {
        return Err(invalid(
            "awx.url",
            "is empty; set spec.awx (the AWX URL and TLS settings) or spec.connectionRef",
        ));
    }
    let url = parse_url(&spec.awx.url, spec.awx.allow_insecure_http)?;
    let host = host_of(&url);

    let renewal = &spec.renewal;
    let rotate_every =
        parse_duration(&renewal.rotate_every).map_err(|m| invalid("renewal.rotateEvery", m))?;
    if !(MIN_ROTATE_EVERY..=MAX_DURATION).contains(&rotate_every) {
        return Err(invalid(
            "renewal.rotateEvery",
            "must be between 1s and 366d",
        ));
    }
    let renew_before = match (&renewal.renew_before, renewal.renew_before_percentage) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "renewal.renewBefore",
                "renewBefore and renewBeforePercentage are mutually exclusive; set one",
            ));
        }
        (Some(text), None) => {
            RenewBefore::Fixed(parse_duration(text).map_err(|m| invalid("renewal.renewBefore", m))?)
        }
        (None, Some(p)) if (1..=99).contains(&p) => RenewBefore::Percentage(p),
        (None, Some(_)) => {
            return Err(invalid(
                "renewal.renewBeforePercentage",
                "must be between 1 and 99",
            ));
        }
        (None, None) => RenewBefore::Fixed(Duration::from_secs(3600)),
    };
    let revoke_grace_period = parse_duration(&renewal.revoke_grace_period)
        .map_err(|m| invalid("renewal.revokeGracePeriod", m))?;
    if revoke_grace_period > MAX_DURATION {
        return Err(invalid("renewal.revokeGracePeriod", "must be at most 366d"));
    }
    let verify_every =
        parse_duration(&renewal.verify_every).map_err(|m| invalid("renewal.verifyEvery", m))?;
    let verify_every = match verify_every {
        d if d.is_zero() => None,
        d if d < Duration::from_secs(10) => {
            return Err(invalid(
                "renewal.verifyEvery",
                "must be 0s (off) or at least 10s, so AWX is not polled in a loop",
            ));
        }
        d => Some(d.min(MAX_DURATION)),
    };

    let refresh_token_lifetime = parse_duration(&renewal.refresh_token_lifetime)
        .map_err(|m| invalid("renewal.refreshTokenLifetime", m))?;
    if !(MIN_ROTATE_EVERY..=MAX_DURATION).contains(&refresh_token_lifetime) {
        return Err(invalid(
            "renewal.refreshTokenLifetime",
            "must be between 1s and 366d",
        ));
    }

    let strategy = match spec.grant.type_ {
        // A sign-in's consumers get personal tokens, always re-issued (the sign-in itself is
        // refreshed on its own schedule).
        GrantType::PersonalAccessToken | GrantType::AuthorizationCode => RenewalStrategy::Reissue,
        GrantType::ClientCredentials if renewal.strategy == RenewalStrategy::Refresh => {
            return Err(invalid(
                "renewal.strategy",
                "Refresh needs a refresh token, which the client-credentials grant does not issue; use Reissue",
            ));
        }
        _ => renewal.strategy,
    };

    if spec.grant.description.is_some() && spec.grant.type_ != GrantType::PersonalAccessToken {
        return Err(invalid(
            "grant.description",
            "applies only to type PersonalAccessToken",
        ));
    }
    check_name(
        "grant.credentialsSecretRef.name",
        &spec.grant.credentials_secret_ref.name,
    )?;
    let keys = &spec.grant.credentials_secret_ref;
    for (field, key) in [
        ("grant.credentialsSecretRef.usernameKey", &keys.username_key),
        ("grant.credentialsSecretRef.passwordKey", &keys.password_key),
        (
            "grant.credentialsSecretRef.clientIdKey",
            &keys.client_id_key,
        ),
        (
            "grant.credentialsSecretRef.clientSecretKey",
            &keys.client_secret_key,
        ),
    ] {
        check_secret_key(field, key)?;
    }
    if let Some(ca) = &spec.awx.ca_bundle_secret_ref {
        check_name("awx.caBundleSecretRef.name", &ca.name)?;
        check_secret_key("awx.caBundleSecretRef.key", &ca.key)?;
    }
    if let Some(name) = &spec.secret.name {
        check_name("secret.name", name)?;
        // The operator's state Secrets: writing a token Secret over one would erase the
        // tokens it must remember, and they could then never be revoked.
        if name.starts_with(STATE_SECRET_PREFIX) {
            return Err(invalid(
                "secret.name",
                format!(
                    "names starting with {STATE_SECRET_PREFIX:?} are reserved for the \
                     operator's state Secrets"
                ),
            ));
        }
    }
    let secret = &spec.secret;
    check_secret_key("secret.keys.token", &secret.keys.token)?;
    check_secret_key("secret.keys.host", &secret.keys.host)?;
    if secret.keys.token == secret.keys.host {
        return Err(invalid(
            "secret.keys",
            "token and host must be different keys",
        ));
    }
    for key in secret.extra_keys.keys() {
        check_secret_key("secret.extraKeys", key)?;
    }
    let mut template_bytes = 0;
    for (key, template) in &secret.templates {
        check_secret_key("secret.templates", key)?;
        template_bytes += template.len();
    }
    if template_bytes > MAX_TEMPLATES_SIZE {
        return Err(invalid(
            "secret.templates",
            format!(
                "templates total {template_bytes} bytes; at most {MAX_TEMPLATES_SIZE} are \
                 allowed (a Secret holds at most 1 MiB)"
            ),
        ));
    }
    let secret_layout = SecretLayout::of(secret, spec.awx.insecure_skip_tls_verify)
        .map_err(|e| invalid(e.field(), e.to_string()))?;
    let fields = secret_layout.template_fields();
    if fields > MAX_TEMPLATE_PLACEHOLDERS {
        return Err(invalid(
            "secret.templates",
            format!(
                "templates hold {fields} placeholders; at most {MAX_TEMPLATE_PLACEHOLDERS} \
                 are allowed"
            ),
        ));
    }
    for (key, value) in secret.labels.iter() {
        check_qualified_name("secret.labels", key)?;
        if value.len() > 63 {
            return Err(invalid(
                "secret.labels",
                format!(
                    "value of label {} is longer than 63 characters",
                    quoted(key)
                ),
            ));
        }
        if !is_label_value(value) {
            return Err(invalid(
                "secret.labels",
                format!(
                    "value {} of label {} may hold only letters, digits, '-', '_' and '.', and \
                     must start and end with a letter or digit",
                    quoted(value),
                    quoted(key)
                ),
            ));
        }
    }
    let mut annotations_size = 0;
    for (key, value) in secret.annotations.iter() {
        check_qualified_name("secret.annotations", key)?;
        annotations_size += key.len() + value.len();
    }
    if annotations_size > MAX_ANNOTATIONS_SIZE {
        return Err(invalid(
            "secret.annotations",
            format!(
                "keys and values total {annotations_size} bytes; Kubernetes allows 256 KiB per \
                 object, of which {MAX_ANNOTATIONS_SIZE} bytes are left for these"
            ),
        ));
    }
    for target in &spec.rollout_restart_targets {
        match (&target.name, &target.selector) {
            (Some(name), None) => check_name("rolloutRestartTargets.name", name)?,
            (None, Some(selector)) => {
                label_selector(selector)
                    .map_err(|m| invalid("rolloutRestartTargets.selector", m))?;
            }
            _ => {
                return Err(invalid(
                    "rolloutRestartTargets",
                    "each target has either name or selector",
                ));
            }
        }
    }
    let policy = &spec.rollout_restart;
    let restart_duration = |field: &'static str, text: &str| {
        parse_duration(text)
            .map_err(|m| invalid(field, m))
            .and_then(|d| {
                (d <= MAX_DURATION)
                    .then_some(d)
                    .ok_or_else(|| invalid(field, "must be at most 366d"))
            })
    };
    let restart = RestartPolicy {
        delay: restart_duration("rolloutRestart.delay", &policy.delay)?,
        min_interval: restart_duration("rolloutRestart.minInterval", &policy.min_interval)?,
        rollout_timeout: restart_duration(
            "rolloutRestart.rolloutTimeout",
            &policy.rollout_timeout,
        )?,
    };

    Ok(ValidSpec {
        url,
        host,
        rotate_every,
        renew_before,
        revoke_grace_period,
        verify_every,
        strategy,
        refresh_token_lifetime,
        timeout: Duration::from_secs(u64::from(spec.awx.timeout_seconds.clamp(1, 300))),
        restart,
        secret_layout,
    })
}

/// A label selector as the API's list calls take it (`app=web,tier in (a,b)`); an empty one
/// would select every workload of the kind, and is refused.
pub fn label_selector(
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
) -> Result<String, String> {
    let empty = selector.match_labels.as_ref().is_none_or(|m| m.is_empty())
        && selector
            .match_expressions
            .as_ref()
            .is_none_or(|e| e.is_empty());
    if empty {
        return Err(
            "an empty selector would restart every workload of the kind; name the labels".into(),
        );
    }
    for key in selector
        .match_labels
        .iter()
        .flat_map(|m| m.keys())
        .chain(selector.match_expressions.iter().flatten().map(|e| &e.key))
    {
        check_qualified_name("rolloutRestartTargets.selector", key).map_err(|e| e.message)?;
    }
    for value in selector.match_labels.iter().flat_map(|m| m.values()).chain(
        selector
            .match_expressions
            .iter()
            .flatten()
            .flat_map(|e| e.values.iter().flatten()),
    ) {
        if value.len() > 63 || !is_label_value(value) {
            return Err(format!("{} is not a valid label value", quoted(value)));
        }
    }
    kube::core::Selector::try_from(selector.clone())
        .map(|s| s.to_string())
        .map_err(|e| format!("not a usable selector: {e}"))
}

/// Host, with the port when the URL names one: what `--allowed-awx-hosts` is matched against.
pub fn host_of(url: &Url) -> String {
    match url.port() {
        Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_string(),
    }
}

pub fn parse_url(text: &str, allow_insecure_http: bool) -> Result<Url, SpecError> {
    const FIELD: &str = "awx.url";
    let mut url =
        Url::parse(text.trim()).map_err(|e| invalid(FIELD, format!("not a valid URL ({e})")))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_insecure_http => {}
        "http" => {
            return Err(invalid(
                FIELD,
                "must use https:// (set awx.allowInsecureHttp: true to allow http://)",
            ));
        }
        other => {
            return Err(invalid(
                FIELD,
                format!("scheme {} is not http(s)", quoted(other)),
            ));
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(FIELD, "has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            FIELD,
            "must not contain credentials; put them in grant.credentialsSecretRef",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(FIELD, "must not have a query or fragment"));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// Kubernetes object name: a DNS-1123 subdomain, dot-separated labels of lowercase letters,
/// digits and '-' that start and end with a letter or digit, at most 253 characters.
fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && label.starts_with(|c: char| c.is_ascii_alphanumeric())
                && label.ends_with(|c: char| c.is_ascii_alphanumeric())
        })
}

fn check_name(field: &'static str, name: &str) -> Result<(), SpecError> {
    if is_dns_subdomain(name) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{} is not a valid Kubernetes object name", quoted(name)),
        ))
    }
}

/// Secret data key: [-._a-zA-Z0-9]+, at most 253 characters, and (because a mounted Secret
/// becomes files) neither "." nor ".." nor starting with "..".
fn check_secret_key(field: &'static str, key: &str) -> Result<(), SpecError> {
    let ok = !key.is_empty()
        && key.len() <= 253
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && key != "."
        && !key.starts_with("..");
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{} is not a valid Secret key", quoted(key)),
        ))
    }
}

/// Label or annotation key: optional DNS prefix, then a name of at most 63 characters.
fn check_qualified_name(field: &'static str, key: &str) -> Result<(), SpecError> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let name_ok = !name.is_empty() && is_label_value(name);
    if name_ok && prefix.is_none_or(is_dns_subdomain) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{} is not a valid label or annotation key", quoted(key)),
        ))
    }
}

/// Label value (and the name part of a label key): empty, or at most 63 letters, digits,
/// '-', '_' and '.' that start and end with a letter or digit.
fn is_label_value(value: &str) -> bool {
    value.is_empty()
        || (value.len() <= 63
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && value.starts_with(|c: char| c.is_ascii_alphanumeric())
            && value.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// `text` quoted and escaped for a message, cut short: messages echo what the user wrote so
/// they can find it, but a spec field can be megabytes long.
pub(crate) fn quoted(text: &str) -> String {
    const MAX_CHARS: usize = 64;
    let mut out = String::from("\"");
    let mut shown = 0;
    for c in text.chars() {
        let escaped: String = match c {
            '\'' => c.to_string(),
            _ => c.escape_debug().collect(),
        };
        shown += escaped.chars().count();
        if shown > MAX_CHARS {
            out.push('…');
            break;
        }
        out.push_str(&escaped);
    }
    out.push('"');
    out
}

/// Parses durations like `90s`, `1h30m`, `7d`, `500ms`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "{} is not a duration like 30s, 5m, 24h, 7d or 1h30m",
            quoted(text)
        )
    };
    if text.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 12 {
            return Err(bad());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(number),
            "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number.saturating_mul(60)),
            "h" => Duration::from_secs(number.saturating_mul(3600)),
            "d" => Duration::from_secs(number.saturating_mul(86400)),
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total = total.saturating_add(unit);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::*;

    fn spec() -> AwxTokenSpec {
        serde_json::from_value(serde_json::json!({
            "awx": {"url": "https://awx.example.com"},
            "grant": {"type": "Password", "credentialsSecretRef": {"name": "awx-bot"}},
        }))
        .expect("minimal spec deserialises")
    }

    fn error_of(f: impl FnOnce(&mut AwxTokenSpec)) -> SpecError {
        let mut s = spec();
        f(&mut s);
        validate(&s).expect_err("spec must be rejected")
    }

    #[test]
    fn minimal_spec_gets_documented_defaults() {
        let v = validate(&spec()).unwrap();
        assert_eq!(v.url.as_str(), "https://awx.example.com/");
        assert_eq!(v.host, "awx.example.com");
        assert_eq!(v.rotate_every, Duration::from_secs(86400));
        assert_eq!(
            v.renew_before,
            RenewBefore::Fixed(Duration::from_secs(3600))
        );
        assert_eq!(v.revoke_grace_period, Duration::from_secs(300));
        assert_eq!(v.verify_every, None);
        assert_eq!(v.strategy, RenewalStrategy::Reissue);
        assert_eq!(v.timeout, Duration::from_secs(30));
    }

    #[test]
    fn url_path_prefix_kept_and_port_in_host() {
        let mut s = spec();
        s.awx.url = "https://example.com:8443/awx".into();
        let v = validate(&s).unwrap();
        assert_eq!(v.url.as_str(), "https://example.com:8443/awx/");
        assert_eq!(v.host, "example.com:8443");
    }

    #[test]
    fn rejects_bad_urls_naming_the_field() {
        for (url, insecure, needle) in [
            ("http://awx.example.com", false, "must use https://"),
            ("file:///etc/passwd", true, "scheme \"file\""),
            (
                "https://user:pw@awx.example.com",
                false,
                "must not contain credentials",
            ),
            ("https://awx.example.com/?x=1", false, "query or fragment"),
            ("https://awx.example.com/#top", false, "query or fragment"),
            ("not a url", false, "not a valid URL"),
        ] {
            let e = error_of(|s| {
                s.awx.url = url.into();
                s.awx.allow_insecure_http = insecure;
            });
            assert_eq!(e.field, "awx.url", "{url}");
            assert!(e.message.contains(needle), "{url}: {}", e.message);
        }
        let mut s = spec();
        s.awx.url = "http://127.0.0.1:8052".into();
        s.awx.allow_insecure_http = true;
        assert_eq!(validate(&s).unwrap().host, "127.0.0.1:8052");
    }

    #[test]
    fn credentials_in_url_are_not_echoed() {
        let e = error_of(|s| s.awx.url = "https://bot:hunter2@awx.example.com".into());
        assert!(!e.to_string().contains("hunter2"));
    }

    #[test]
    fn renew_before_and_percentage_are_exclusive() {
        let e = error_of(|s| {
            s.renewal.renew_before = Some("1h".into());
            s.renewal.renew_before_percentage = Some(30);
        });
        assert_eq!(e.field, "renewal.renewBefore");
        let mut s = spec();
        s.renewal.renew_before_percentage = Some(30);
        assert_eq!(
            validate(&s).unwrap().renew_before,
            RenewBefore::Percentage(30)
        );
        assert_eq!(
            error_of(|s| s.renewal.renew_before_percentage = Some(100)).field,
            "renewal.renewBeforePercentage"
        );
    }

    #[test]
    fn durations_parse_and_bad_ones_name_the_field() {
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604800)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in [
            "",
            "1",
            "h",
            "1x",
            "1.5h",
            "-1s",
            "1h 30m",
            "9999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            error_of(|s| s.renewal.rotate_every = "soon".into()).field,
            "renewal.rotateEvery"
        );
        assert_eq!(
            error_of(|s| s.renewal.rotate_every = "0s".into()).field,
            "renewal.rotateEvery"
        );
        assert_eq!(
            error_of(|s| s.renewal.rotate_every = "400d".into()).field,
            "renewal.rotateEvery"
        );
        assert_eq!(
            error_of(|s| s.renewal.verify_every = "1s".into()).field,
            "renewal.verifyEvery"
        );
    }

    #[test]
    fn personal_tokens_always_reissue_and_client_credentials_cannot_refresh() {
        let mut s = spec();
        s.grant.type_ = GrantType::PersonalAccessToken;
        s.renewal.strategy = RenewalStrategy::Refresh;
        assert_eq!(validate(&s).unwrap().strategy, RenewalStrategy::Reissue);
        let e = error_of(|s| {
            s.grant.type_ = GrantType::ClientCredentials;
            s.renewal.strategy = RenewalStrategy::Refresh;
        });
        assert_eq!(e.field, "renewal.strategy");
    }

    #[test]
    fn description_only_for_personal_tokens() {
        let e = error_of(|s| s.grant.description = Some("x".into()));
        assert_eq!(e.field, "grant.description");
    }

    #[test]
    fn rejects_bad_names_and_keys() {
        assert_eq!(
            error_of(|s| s.grant.credentials_secret_ref.name = "Bad_Name".into()).field,
            "grant.credentialsSecretRef.name"
        );
        assert_eq!(
            error_of(|s| s.grant.credentials_secret_ref.password_key = "pass word".into()).field,
            "grant.credentialsSecretRef.passwordKey"
        );
        assert_eq!(
            error_of(|s| s.secret.name = Some("x".repeat(254))).field,
            "secret.name"
        );
        assert_eq!(
            error_of(|s| s.secret.keys.host = "token".into()).field,
            "secret.keys"
        );
        assert_eq!(
            error_of(|s| {
                s.secret
                    .extra_keys
                    .insert("token".into(), SecretValue::Host);
            })
            .field,
            "secret.extraKeys"
        );
        assert_eq!(
            error_of(|s| {
                s.secret.labels.insert("ünïcode".into(), "v".into());
            })
            .field,
            "secret.labels"
        );
        assert_eq!(
            error_of(|s| {
                s.secret.labels.insert("ok".into(), "v".repeat(64));
            })
            .field,
            "secret.labels"
        );
        let mut s = spec();
        s.secret
            .labels
            .insert("example.com/team".into(), "a".into());
        s.secret
            .extra_keys
            .insert("CONTROLLER_OAUTH_TOKEN".into(), SecretValue::Token);
        assert!(validate(&s).is_ok());
    }

    #[test]
    fn long_values_are_truncated_in_messages() {
        let e = error_of(|s| s.grant.credentials_secret_ref.name = "X".repeat(10_000));
        assert!(e.message.len() < 200, "{}", e.message.len());
    }

    #[test]
    fn urls_with_credentials_in_any_form_are_refused_without_echoing_them() {
        for url in [
            "https://bot@awx.example.com",
            "https://:hunter2@awx.example.com",
            "https://bot:hunter2@awx.example.com:8443/awx",
            "https://b%40t:hun%3Ater2@awx.example.com",
            // Looks like the host, is the user name: the request would go to evil.example.
            "https://awx.example.com@evil.example",
            "https://awx.example.com:hunter2@evil.example",
        ] {
            let e = error_of(|s| s.awx.url = url.into());
            assert_eq!(e.field, "awx.url", "{url}");
            assert!(e.message.contains("credentials"), "{url}: {e}");
            assert!(!e.to_string().contains("hunter2"), "{url}: {e}");
            assert!(!e.to_string().contains("evil"), "{url}: {e}");
        }
    }

    #[test]
    fn urls_with_fragments_queries_or_other_schemes_are_refused() {
        for (url, needle) in [
            // The fragment hides where the request really goes.
            ("https://evil.example#@awx.example.com", "query or fragment"),
            ("https://awx.example.com/#", "query or fragment"),
            ("https://awx.example.com/?", "query or fragment"),
            ("https://awx.example.com/api?next=/", "query or fragment"),
            (
                "file:///var/run/secrets/kubernetes.io/serviceaccount/token",
                "scheme \"file\"",
            ),
            ("ftp://awx.example.com/", "scheme \"ftp\""),
            ("gopher://127.0.0.1:6379/_INFO", "scheme \"gopher\""),
            ("javascript:alert(1)", "scheme \"javascript\""),
            ("data:text/plain,hi", "scheme \"data\""),
            ("ws://awx.example.com/", "scheme \"ws\""),
            ("unix:/var/run/docker.sock", "scheme \"unix\""),
            ("awx.example.com", "not a valid URL"),
            ("//awx.example.com", "not a valid URL"),
            ("https://", "not a valid URL"),
            ("https://[fe80::1%25eth0]/", "not a valid URL"),
            ("https://[::1", "not a valid URL"),
        ] {
            let e = error_of(|s| {
                s.awx.url = url.into();
                s.awx.allow_insecure_http = true;
            });
            assert_eq!(e.field, "awx.url", "{url}");
            assert!(e.message.contains(needle), "{url}: {e}");
        }
        let e = error_of(|s| s.awx.url = format!("{}://awx.example.com", "x".repeat(100_000)));
        assert!(e.to_string().len() < 200, "{}", e.to_string().len());
    }

    #[test]
    fn ip_literals_and_odd_host_spellings_normalise_to_the_host_the_allow_list_sees() {
        for (url, insecure, host, normalised) in [
            (
                "https://[::1]:8443/awx",
                false,
                "[::1]:8443",
                "https://[::1]:8443/awx/",
            ),
            (
                "https://[2001:DB8::1]/",
                false,
                "[2001:db8::1]",
                "https://[2001:db8::1]/",
            ),
            (
                "http://[::ffff:127.0.0.1]:8052",
                true,
                "[::ffff:7f00:1]:8052",
                "http://[::ffff:7f00:1]:8052/",
            ),
            // Numeric IPv4 spellings become the dotted form before the allow-list sees them.
            (
                "https://2130706433/",
                false,
                "127.0.0.1",
                "https://127.0.0.1/",
            ),
            ("https://0x7f.1/", false, "127.0.0.1", "https://127.0.0.1/"),
            (
                "HTTPS://AWX.Example.COM:443",
                false,
                "awx.example.com",
                "https://awx.example.com/",
            ),
            // A backslash ends the authority in http(s) URLs, as in browsers and reqwest.
            (
                "https://awx.example.com\\@evil.example/",
                false,
                "awx.example.com",
                "https://awx.example.com/@evil.example/",
            ),
            (
                "  https://awx.example.com \n",
                false,
                "awx.example.com",
                "https://awx.example.com/",
            ),
        ] {
            let mut s = spec();
            s.awx.url = url.into();
            s.awx.allow_insecure_http = insecure;
            let v = validate(&s).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(v.host, host, "{url}");
            assert_eq!(v.url.as_str(), normalised, "{url}");
        }
    }

    #[test]
    fn names_and_keys_the_api_server_would_refuse_are_refused() {
        for name in [
            "a..b", "a.-b", "a-.b", ".a", "a.", "-a", "a-", "A", "a_b", "ä", "",
        ] {
            assert_eq!(
                error_of(|s| s.secret.name = Some(name.into())).field,
                "secret.name",
                "{name:?}"
            );
            assert_eq!(
                error_of(|s| s.grant.credentials_secret_ref.name = name.into()).field,
                "grant.credentialsSecretRef.name",
                "{name:?}"
            );
        }
        for key in [
            ".",
            "..",
            "..data",
            "...",
            "a b",
            "a/b",
            "ключ",
            "",
            &"k".repeat(254),
        ] {
            assert_eq!(
                error_of(|s| s.secret.keys.token = key.into()).field,
                "secret.keys.token",
                "{key:?}"
            );
            assert_eq!(
                error_of(|s| {
                    s.secret.extra_keys.insert(key.into(), SecretValue::Token);
                })
                .field,
                "secret.extraKeys",
                "{key:?}"
            );
        }
        let mut s = spec();
        s.secret.name = Some(format!("{}.example", "a".repeat(100)));
        s.secret.keys.token = ".hidden.token".into();
        s.secret.extra_keys.insert("a..b".into(), SecretValue::Host);
        assert!(validate(&s).is_ok());
        assert_eq!(
            error_of(|s| {
                s.rollout_restart_targets.push(RolloutRestartTarget {
                    kind: WorkloadKind::Deployment,
                    name: Some("Api".into()),
                    selector: None,
                });
            })
            .field,
            "rolloutRestartTargets.name"
        );
    }

    #[test]
    fn restart_targets_take_a_name_or_a_selector_and_the_policy_parses() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
            LabelSelector, LabelSelectorRequirement,
        };
        let selector =
            |labels: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>| LabelSelector {
                match_labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                match_expressions: Some(exprs),
            };
        let target = |name: Option<&str>, selector: Option<LabelSelector>| RolloutRestartTarget {
            kind: WorkloadKind::StatefulSet,
            name: name.map(str::to_string),
            selector,
        };
        let both = error_of(|s| {
            s.rollout_restart_targets.push(target(
                Some("web"),
                Some(selector(&[("app", "web")], vec![])),
            ))
        });
        assert_eq!(both.field, "rolloutRestartTargets");
        assert_eq!(
            error_of(|s| s.rollout_restart_targets.push(target(None, None))).field,
            "rolloutRestartTargets"
        );
        let empty = error_of(|s| {
            s.rollout_restart_targets
                .push(target(None, Some(selector(&[], vec![]))))
        });
        assert_eq!(empty.field, "rolloutRestartTargets.selector");
        assert!(
            empty.message.contains("every workload"),
            "{}",
            empty.message
        );
        let bad_value = error_of(|s| {
            s.rollout_restart_targets.push(target(
                None,
                Some(selector(&[("app", "no spaces")], vec![])),
            ))
        });
        assert_eq!(bad_value.field, "rolloutRestartTargets.selector");
        let bad_op = error_of(|s| {
            s.rollout_restart_targets.push(target(
                None,
                Some(selector(
                    &[],
                    vec![LabelSelectorRequirement {
                        key: "tier".into(),
                        operator: "Near".into(),
                        values: Some(vec!["a".into()]),
                    }],
                )),
            ))
        });
        assert_eq!(bad_op.field, "rolloutRestartTargets.selector");
        assert_eq!(
            label_selector(&selector(
                &[("app", "web")],
                vec![LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "In".into(),
                    values: Some(vec!["a".into(), "b".into()]),
                }],
            ))
            .unwrap(),
            "app=web,tier in (a,b)"
        );
        let mut s = spec();
        s.rollout_restart.delay = "3s".into();
        s.rollout_restart.min_interval = "2m".into();
        s.rollout_restart.rollout_timeout = "1h".into();
        assert_eq!(
            validate(&s).unwrap().restart,
            RestartPolicy {
                delay: Duration::from_secs(3),
                min_interval: Duration::from_secs(120),
                rollout_timeout: Duration::from_secs(3600),
            }
        );
        assert_eq!(
            error_of(|s| s.rollout_restart.rollout_timeout = "400d".into()).field,
            "rolloutRestart.rolloutTimeout"
        );
        assert_eq!(
            error_of(|s| s.rollout_restart.delay = "soon".into()).field,
            "rolloutRestart.delay"
        );
    }

    #[test]
    fn state_secret_names_are_reserved() {
        let e = error_of(|s| s.secret.name = Some(crate::secrets::state_secret_name("ci-bot")));
        assert_eq!(e.field, "secret.name");
        assert!(e.message.contains("reserved"), "{e}");
        let e = error_of(|s| {
            s.secret.name = Some(crate::secrets::state_secret_name(&"a".repeat(253)));
        });
        assert_eq!(e.field, "secret.name");
        let mut s = spec();
        s.secret.name = Some("awx-token-operator-state".into());
        assert!(validate(&s).is_ok());
    }

    #[test]
    fn extra_keys_colliding_with_either_key_are_refused_unless_they_hold_the_same() {
        for (taken, value) in [("token", SecretValue::Host), ("host", SecretValue::Token)] {
            let e = error_of(|s| {
                s.secret.extra_keys.insert(taken.into(), value);
            });
            assert_eq!(e.field, "secret.extraKeys", "{taken}");
            assert!(e.message.contains("written twice"), "{e}");
        }
        let e = error_of(|s| {
            s.secret.keys.token = "TOWER_OAUTH_TOKEN".into();
            s.secret
                .extra_keys
                .insert("TOWER_OAUTH_TOKEN".into(), SecretValue::Host);
        });
        assert_eq!(e.field, "secret.extraKeys");
        // The same content twice is one key, not a conflict.
        let mut s = spec();
        s.secret
            .extra_keys
            .insert("token".into(), SecretValue::Token);
        s.secret.extra_keys.insert("host".into(), SecretValue::Host);
        let keys: Vec<_> = validate(&s)
            .unwrap()
            .secret_layout
            .keys()
            .map(str::to_owned)
            .collect();
        assert_eq!(keys, ["host", "token"]);
    }

    #[test]
    fn presets_and_templates_are_laid_out_and_their_errors_name_the_field() {
        let mut s = spec();
        s.secret.presets = vec![SecretPreset::AwxCli];
        s.secret
            .templates
            .insert("awx.env".into(), "CONTROLLER_OAUTH_TOKEN={token}\n".into());
        let keys: Vec<_> = validate(&s)
            .unwrap()
            .secret_layout
            .keys()
            .map(str::to_owned)
            .collect();
        assert_eq!(
            keys,
            [
                "AAP_TOKEN",
                "CONTROLLER_HOST",
                "CONTROLLER_OAUTH_TOKEN",
                "CONTROLLER_VERIFY_SSL",
                "awx.env",
                "host",
                "token"
            ]
        );
        let e = error_of(|s| {
            s.secret
                .templates
                .insert("awx.env".into(), "TOKEN={tokn}".into());
        });
        assert_eq!(e.field, "secret.templates");
        assert!(
            e.to_string().starts_with(
                "spec.secret.templates: template of key \"awx.env\": unknown placeholder \"{tokn}\""
            ),
            "{e}"
        );
        let e = error_of(|s| {
            s.secret.presets = vec![SecretPreset::AwxCli];
            s.secret
                .extra_keys
                .insert("CONTROLLER_HOST".into(), SecretValue::Token);
        });
        assert_eq!(
            e.to_string(),
            "spec.secret.presets: key \"CONTROLLER_HOST\" is written twice with different \
             content: the token by secret.extraKeys and the AWX URL by preset AwxCli"
        );
        let e = error_of(|s| {
            s.secret.templates.insert("bad key!".into(), String::new());
        });
        assert_eq!(e.field, "secret.templates");
        assert!(e.message.contains("not a valid Secret key"), "{e}");
    }

    #[test]
    fn templates_beyond_what_a_secret_holds_are_refused() {
        let e = error_of(|s| {
            s.secret.templates.insert("a".into(), "x".repeat(40 * 1024));
            s.secret.templates.insert("b".into(), "x".repeat(30 * 1024));
        });
        assert_eq!(e.field, "secret.templates");
        assert!(e.message.contains("71680 bytes"), "{e}");
        let e = error_of(|s| {
            s.secret.templates.insert("a".into(), "{host}".repeat(129));
        });
        assert_eq!(e.field, "secret.templates");
        assert!(e.message.contains("129 placeholders"), "{e}");
        let mut s = spec();
        s.secret.templates.insert("a".into(), "{token}".repeat(128));
        assert!(validate(&s).is_ok());
    }

    #[test]
    fn label_and_annotation_keys_and_values_follow_kubernetes_rules() {
        for (key, value) in [
            ("ünïcode", "v"),
            ("app.kubernetes.io/ñame", "v"),
            ("Example.com/team", "v"),
            ("a..b/team", "v"),
            ("a/b/c", "v"),
            ("/team", "v"),
            ("team/", "v"),
            (&*"k".repeat(64), "v"),
            (&*format!("{}/team", "p".repeat(254)), "v"),
            ("team", "has space"),
            ("team", "ü"),
            ("team", "-lead"),
            ("team", "trail_"),
            ("team", "a/b"),
            ("team", "line\nbreak"),
        ] {
            let e = error_of(|s| {
                s.secret.labels.insert(key.into(), value.into());
            });
            assert_eq!(e.field, "secret.labels", "{key:?}: {value:?}");
            assert!(e.to_string().chars().count() < 300, "{e}");
        }
        for key in ["ünïcode", "a/b/c", "/x", "x/"] {
            let e = error_of(|s| {
                s.secret.annotations.insert(key.into(), "v".into());
            });
            assert_eq!(e.field, "secret.annotations", "{key:?}");
        }
        let mut s = spec();
        s.secret.labels.insert("team".into(), String::new());
        s.secret
            .labels
            .insert("app.kubernetes.io/part-of".into(), "a.b_c-D9".into());
        s.secret
            .labels
            .insert(format!("{}/x", "p".repeat(253)), "v".repeat(63));
        // Annotation values are free text.
        s.secret
            .annotations
            .insert("note".into(), "ünïcode\nand spaces ✓".into());
        assert!(validate(&s).is_ok());
    }

    #[test]
    fn annotations_beyond_what_kubernetes_stores_are_refused() {
        let e = error_of(|s| {
            s.secret
                .annotations
                .insert("big".into(), "x".repeat(256 * 1024));
        });
        assert_eq!(e.field, "secret.annotations");
        let e = error_of(|s| {
            for i in 0..300 {
                s.secret
                    .annotations
                    .insert(format!("a{i}"), "x".repeat(1000));
            }
        });
        assert_eq!(e.field, "secret.annotations");
        assert!(e.message.contains("bytes"), "{e}");
        let mut s = spec();
        s.secret
            .annotations
            .insert("big".into(), "x".repeat(200 * 1024));
        assert!(validate(&s).is_ok());
    }

    #[test]
    fn ten_thousand_labels_are_validated_quickly() {
        let mut s = spec();
        for i in 0..10_000 {
            s.secret
                .labels
                .insert(format!("example.com/label-{i}"), format!("value-{i}"));
            // About 230 KB in all: within what Kubernetes stores.
            s.secret
                .annotations
                .insert(format!("example.com/note-{i}"), "x".into());
            s.secret
                .extra_keys
                .insert(format!("KEY_{i}"), SecretValue::Token);
        }
        let started = std::time::Instant::now();
        assert!(validate(&s).is_ok());
        s.secret
            .labels
            .insert("zzz-last".into(), "not valid!".into());
        let e = validate(&s).unwrap_err();
        assert_eq!(e.field, "secret.labels");
        assert!(e.to_string().chars().count() < 300, "{e}");
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    }

    #[test]
    fn huge_and_hostile_inputs_give_short_messages() {
        let huge = "\u{202e}\u{0}\u{1b}[2J".repeat(100_000);
        for e in [
            error_of(|s| s.awx.url = huge.clone()),
            error_of(|s| s.secret.name = Some(huge.clone())),
            error_of(|s| s.secret.keys.host = huge.clone()),
            error_of(|s| {
                s.secret.labels.insert(huge.clone(), "v".into());
            }),
            error_of(|s| {
                s.secret.labels.insert("k".into(), huge.clone());
            }),
            error_of(|s| s.renewal.rotate_every = huge.clone()),
            error_of(|s| s.renewal.renew_before = Some(huge.clone())),
        ] {
            let text = e.to_string();
            assert!(text.chars().count() < 300, "{}", text.chars().count());
            // Control characters are escaped, never echoed raw.
            assert!(!text.chars().any(char::is_control), "{text:?}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Every `field` a SpecError may name.
        const FIELDS: [&str; 25] = [
            "awx.url",
            "awx.caBundleSecretRef.name",
            "awx.caBundleSecretRef.key",
            "grant.description",
            "grant.credentialsSecretRef.name",
            "grant.credentialsSecretRef.usernameKey",
            "grant.credentialsSecretRef.passwordKey",
            "grant.credentialsSecretRef.clientIdKey",
            "grant.credentialsSecretRef.clientSecretKey",
            "renewal.rotateEvery",
            "renewal.renewBefore",
            "renewal.renewBeforePercentage",
            "renewal.revokeGracePeriod",
            "renewal.verifyEvery",
            "renewal.strategy",
            "secret.name",
            "secret.keys",
            "secret.keys.token",
            "secret.keys.host",
            "secret.extraKeys",
            "secret.presets",
            "secret.templates",
            "secret.labels",
            "secret.annotations",
            "rolloutRestartTargets.name",
        ];

        /// Longest message a rejection may have, whatever the input.
        const MESSAGE_BOUND: usize = 300;

        const HOSTILE: [&str; 22] = [
            "",
            ".",
            "..",
            "...",
            "..data",
            "a..b",
            "a.-b",
            "-a",
            "a-",
            "A",
            "a/b/c",
            "/a",
            "a/",
            "ä",
            "\u{0}",
            "\n",
            "a b",
            "\u{202e}rtl",
            "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
            "0",
            "x.example.com/name",
            "\\\"quoted\\\"",
        ];

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                2 => any::<String>(),
                2 => "[a-z0-9.-]{0,12}",
                2 => "[-._a-zA-Z0-9]{0,12}",
                1 => "([a-z0-9.-]{1,12}/)?[-._a-zA-Z0-9]{0,12}",
                1 => prop::sample::select(&HOSTILE[..]).prop_map(str::to_owned),
                1 => ("[a-z.]{1,3}|.", 60usize..20_000).prop_map(|(s, n)| s.repeat(n)),
            ]
        }

        fn duration_text() -> impl Strategy<Value = String> {
            prop_oneof![
                text(),
                "([0-9]{1,14}(ms|s|m|h|d|x|))+",
                (
                    0u64..1_000_000,
                    prop::sample::select(&["ms", "s", "m", "h", "d"][..])
                )
                    .prop_map(|(n, unit)| format!("{n}{unit}")),
            ]
        }

        fn url_text() -> impl Strategy<Value = String> {
            let usually = |common: &'static str, odd: &'static str| prop_oneof![3 => Just(common.to_owned()), 1 => odd.prop_map(|s: String| s)];
            let parts = (
                usually(
                    "https",
                    "(http|HTTPS|file|ftp|gopher|javascript|data|ws|[a-z][a-z0-9+.-]{0,8})",
                ),
                usually("://", "(:/|:|:///|://)"),
                usually("", "([a-z%0-9]{0,6}(:[a-z%0-9]{0,6})?@)?"),
                usually(
                    "awx.example.com",
                    "(\\[[0-9a-f:.]{2,24}(%25[a-z0-9]{1,4})?\\]|[a-z0-9.-]{0,20}|[0-9]{1,10}|0x[0-9a-f]{1,8}|[a-zä]{1,8}\\.example)",
                ),
                "(:[0-9]{0,6})?",
                "(/[a-z/.%\\\\@]{0,12})?",
                usually("", "(\\?[a-z=&]{0,6})?"),
                usually("", "(#[a-z@.]{0,8})?"),
            );
            prop_oneof![
                3 => parts.prop_map(|(a, b, c, d, e, f, g, h)| format!("{a}{b}{c}{d}{e}{f}{g}{h}")),
                1 => text(),
            ]
        }

        /// Sometimes a hostile value, mostly the valid default so later checks are reached.
        fn maybe<T: std::fmt::Debug + Clone>(
            s: impl Strategy<Value = T>,
        ) -> impl Strategy<Value = Option<T>> {
            prop_oneof![7 => Just(None), 1 => s.prop_map(Some)]
        }

        // The API server's rules, written independently of the code under test.

        fn api_object_name(s: &str) -> bool {
            let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
            !s.is_empty()
                && s.len() <= 253
                && s.chars().all(|c| alnum(c) || c == '-' || c == '.')
                && s.starts_with(alnum)
                && s.ends_with(alnum)
                && !s.contains("..")
                && !s.contains(".-")
                && !s.contains("-.")
        }

        fn api_label_name(s: &str) -> bool {
            let alnum = |c: char| c.is_ascii_alphanumeric();
            (1..=63).contains(&s.len())
                && s.chars().all(|c| alnum(c) || "-_.".contains(c))
                && s.starts_with(alnum)
                && s.ends_with(alnum)
        }

        fn api_qualified_name(s: &str) -> bool {
            let parts: Vec<&str> = s.split('/').collect();
            match parts[..] {
                [name] => api_label_name(name),
                [prefix, name] => api_object_name(prefix) && api_label_name(name),
                _ => false,
            }
        }

        fn api_secret_key(s: &str) -> bool {
            (1..=253).contains(&s.len())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && s != "."
                && s != ".."
                && !s.starts_with("..")
        }

        fn check_rejection(e: &SpecError) -> Result<(), TestCaseError> {
            let text = e.to_string();
            prop_assert!(FIELDS.contains(&e.field), "unknown field {}", e.field);
            prop_assert!(text.starts_with(&format!("spec.{}: ", e.field)), "{}", text);
            prop_assert!(
                text.chars().count() <= MESSAGE_BOUND,
                "{} characters: {}",
                text.chars().count(),
                text
            );
            prop_assert!(!text.chars().any(char::is_control), "{:?}", text);
            Ok(())
        }

        fn check_url(v: &ValidSpec, allow_http: bool) -> Result<(), TestCaseError> {
            let url = &v.url;
            prop_assert!(
                url.scheme() == "https" || (allow_http && url.scheme() == "http"),
                "{}",
                url
            );
            prop_assert!(url.host_str().is_some_and(|h| !h.is_empty()), "{}", url);
            prop_assert!(
                url.username().is_empty() && url.password().is_none(),
                "{}",
                url
            );
            prop_assert!(url.query().is_none() && url.fragment().is_none(), "{}", url);
            prop_assert!(url.path().ends_with('/'), "{}", url);
            prop_assert!(!v.host.is_empty());
            prop_assert!(crate::decide::host_allowed(
                std::slice::from_ref(&v.host),
                &v.host
            ));
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn any_spec_is_accepted_soundly_or_rejected_naming_a_field_briefly(
                (url, allow_http, timeout, percentage) in
                    (maybe(url_text()), any::<bool>(), any::<u32>(), maybe(any::<u8>())),
                (rotate, before, grace, verify) in (
                    maybe(duration_text()),
                    maybe(duration_text()),
                    maybe(duration_text()),
                    maybe(duration_text()),
                ),
                (grant_type, refresh, description) in (
                    prop::sample::select(&[
                        GrantType::Password,
                        GrantType::ClientCredentials,
                        GrantType::PersonalAccessToken,
                    ][..]),
                    any::<bool>(),
                    maybe(text()),
                ),
                credentials in prop::array::uniform5(maybe(text())),
                ca in maybe((text(), text())),
                (name, token_key, host_key) in (maybe(text()), maybe(text()), maybe(text())),
                labels in maybe(prop::collection::btree_map(text(), text(), 0..6)),
                annotations in maybe(prop::collection::btree_map(text(), text(), 0..6)),
                extra in maybe(prop::collection::btree_map(
                    text(),
                    prop::sample::select(&[SecretValue::Token, SecretValue::Host][..]),
                    0..6,
                )),
                target in maybe(text()),
            ) {
                let mut s = spec();
                if let Some(url) = url {
                    s.awx.url = url;
                }
                s.awx.allow_insecure_http = allow_http;
                s.awx.timeout_seconds = timeout;
                s.renewal.renew_before_percentage = percentage;
                if let Some(d) = rotate {
                    s.renewal.rotate_every = d;
                }
                s.renewal.renew_before = before;
                if let Some(d) = grace {
                    s.renewal.revoke_grace_period = d;
                }
                if let Some(d) = verify {
                    s.renewal.verify_every = d;
                }
                s.grant.type_ = grant_type;
                if refresh {
                    s.renewal.strategy = RenewalStrategy::Refresh;
                }
                s.grant.description = description;
                let refs = &mut s.grant.credentials_secret_ref;
                for (field, value) in [
                    &mut refs.name,
                    &mut refs.username_key,
                    &mut refs.password_key,
                    &mut refs.client_id_key,
                    &mut refs.client_secret_key,
                ]
                .into_iter()
                .zip(credentials)
                {
                    if let Some(value) = value {
                        *field = value;
                    }
                }
                s.awx.ca_bundle_secret_ref =
                    ca.map(|(name, key)| SecretKeySelector { name, key });
                s.secret.name = name;
                if let Some(key) = token_key {
                    s.secret.keys.token = key;
                }
                if let Some(key) = host_key {
                    s.secret.keys.host = key;
                }
                s.secret.labels = labels.unwrap_or_default();
                s.secret.annotations = annotations.unwrap_or_default();
                s.secret.extra_keys = extra.unwrap_or_default();
                if let Some(name) = target {
                    s.rollout_restart_targets.push(RolloutRestartTarget {
                        kind: WorkloadKind::StatefulSet,
                        name: Some(name),
                        selector: None,
                    });
                }

                match validate(&s) {
                    Err(e) => check_rejection(&e)?,
                    Ok(v) => {
                        check_url(&v, s.awx.allow_insecure_http)?;
                        prop_assert!((1..=366 * 86_400).contains(&v.rotate_every.as_secs()));
                        prop_assert!(v.revoke_grace_period <= Duration::from_secs(366 * 86_400));
                        prop_assert!(v.verify_every.is_none_or(|d| d >= Duration::from_secs(10)));
                        prop_assert!((1..=300).contains(&v.timeout.as_secs()));
                        if let RenewBefore::Percentage(p) = v.renew_before {
                            prop_assert!((1..=99).contains(&p));
                        }
                        if s.grant.type_ == GrantType::PersonalAccessToken {
                            prop_assert_eq!(v.strategy, RenewalStrategy::Reissue);
                        }
                        let refs = &s.grant.credentials_secret_ref;
                        prop_assert!(api_object_name(&refs.name));
                        for key in [
                            &refs.username_key,
                            &refs.password_key,
                            &refs.client_id_key,
                            &refs.client_secret_key,
                        ] {
                            prop_assert!(api_secret_key(key), "{:?}", key);
                        }
                        if let Some(ca) = &s.awx.ca_bundle_secret_ref {
                            prop_assert!(api_object_name(&ca.name) && api_secret_key(&ca.key));
                        }
                        for t in &s.rollout_restart_targets {
                            let name = t.name.as_deref().unwrap_or_default();
                            prop_assert!(api_object_name(name), "{:?}", t.name);
                        }
                    }
                }
            }

            /// What the target Secret is made of is accepted exactly when the API server would
            /// accept the Secret (and the keys do not collide).
            #[test]
            fn secret_fields_are_accepted_exactly_when_the_api_server_would_accept_them(
                name in prop::option::of(text()),
                token_key in prop_oneof![Just("token".to_owned()), text()],
                host_key in prop_oneof![Just("host".to_owned()), text()],
                labels in prop::collection::btree_map(text(), text(), 0..6),
                annotations in prop::collection::btree_map(text(), text(), 0..6),
                extra in prop::collection::btree_map(
                    text(),
                    prop::sample::select(&[SecretValue::Token, SecretValue::Host][..]),
                    0..6,
                ),
            ) {
                let mut s = spec();
                s.secret.name = name.clone();
                s.secret.keys.token = token_key.clone();
                s.secret.keys.host = host_key.clone();
                s.secret.labels = labels.clone();
                s.secret.annotations = annotations.clone();
                s.secret.extra_keys = extra.clone();
                let annotation_bytes: usize =
                    annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
                let reserved = name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("awx-token-operator-state-"));
                let api_accepts = name.as_deref().is_none_or(api_object_name)
                    && api_secret_key(&token_key)
                    && api_secret_key(&host_key)
                    && extra.keys().all(|k| api_secret_key(k))
                    && labels.iter().all(|(k, v)| {
                        api_qualified_name(k) && (v.is_empty() || api_label_name(v))
                    })
                    && annotations.keys().all(|k| api_qualified_name(k))
                    && annotation_bytes <= 255 * 1024;
                // A key asked for twice must hold the same both times.
                let distinct = token_key != host_key
                    && extra.get(&token_key).is_none_or(|v| *v == SecretValue::Token)
                    && extra.get(&host_key).is_none_or(|v| *v == SecretValue::Host);
                let result = validate(&s);
                if let Err(e) = &result {
                    check_rejection(e)?;
                }
                prop_assert_eq!(
                    result.is_ok(),
                    api_accepts && distinct && !reserved,
                    "{:?}",
                    result.err()
                );
            }

            #[test]
            fn urls_are_accepted_only_as_https_or_allowed_http_with_a_bare_host(
                url in url_text(),
                password in "P[A-Z0-9]{8}",
                with_password in any::<bool>(),
                allow_http in any::<bool>(),
            ) {
                let url = if with_password {
                    url.replacen("://", &format!("://bot:{password}@"), 1)
                } else {
                    url
                };
                let mut s = spec();
                s.awx.url = url.clone();
                s.awx.allow_insecure_http = allow_http;
                match validate(&s) {
                    Ok(v) => check_url(&v, allow_http)?,
                    Err(e) => {
                        check_rejection(&e)?;
                        prop_assert_eq!(e.field, "awx.url");
                        prop_assert!(!e.to_string().contains(&password), "{}", e);
                    }
                }
            }

            #[test]
            fn durations_parse_without_panicking_and_add_up(
                text in duration_text(),
                parts in prop::collection::vec(
                    (0u64..1_000_000_000_000, prop::sample::select(&["ms", "s", "m", "h", "d"][..])),
                    1..6,
                ),
            ) {
                if let Err(message) = parse_duration(&text) {
                    prop_assert!(message.chars().count() <= 200, "{}", message);
                    prop_assert!(!message.chars().any(char::is_control), "{:?}", message);
                }
                let written: String = parts.iter().map(|(n, unit)| format!("{n}{unit}")).collect();
                let expected = parts.iter().fold(Duration::ZERO, |sum, (n, unit)| {
                    let secs = |factor: u64| Duration::from_secs(n.saturating_mul(factor));
                    sum.saturating_add(match *unit {
                        "ms" => Duration::from_millis(*n),
                        "s" => secs(1),
                        "m" => secs(60),
                        "h" => secs(3600),
                        _ => secs(86_400),
                    })
                });
                prop_assert_eq!(parse_duration(&written), Ok(expected));
            }
        }
    }
}
