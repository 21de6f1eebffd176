//! Checks an `AwxToken` spec the way the CRD's schema and CEL rules do (old API servers
//! ignore CEL, so the operator never relies on them) and turns it into plain values.

use std::time::Duration;

use url::Url;

use crate::crd::{AwxTokenSpec, GrantType, RenewalStrategy};

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
    pub timeout: Duration,
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
}

fn invalid(field: &'static str, message: impl Into<String>) -> SpecError {
    SpecError {
        field,
        message: message.into(),
    }
}

/// Longest rotation the operator accepts: one year. Longer would defeat the point of rotation
/// and approach what timers can represent.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
const MIN_ROTATE_EVERY: Duration = Duration::from_secs(1);

pub fn validate(spec: &AwxTokenSpec) -> Result<ValidSpec, SpecError> {
    let url = parse_url(&spec.awx.url, spec.awx.allow_insecure_http)?;
    let host = match url.port() {
        Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_string(),
    };

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

    let strategy = match spec.grant.type_ {
        GrantType::PersonalAccessToken => RenewalStrategy::Reissue,
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
        if key == &secret.keys.token || key == &secret.keys.host {
            return Err(invalid(
                "secret.extraKeys",
                format!("key {key:?} is already used by secret.keys"),
            ));
        }
    }
    for (key, value) in secret.labels.iter() {
        check_qualified_name("secret.labels", key)?;
        if value.len() > 63 {
            return Err(invalid(
                "secret.labels",
                format!("value of label {key:?} is longer than 63 characters"),
            ));
        }
    }
    for key in secret.annotations.keys() {
        check_qualified_name("secret.annotations", key)?;
    }
    for target in &spec.rollout_restart_targets {
        check_name("rolloutRestartTargets.name", &target.name)?;
    }

    Ok(ValidSpec {
        url,
        host,
        rotate_every,
        renew_before,
        revoke_grace_period,
        verify_every,
        strategy,
        timeout: Duration::from_secs(u64::from(spec.awx.timeout_seconds.clamp(1, 300))),
    })
}

fn parse_url(text: &str, allow_insecure_http: bool) -> Result<Url, SpecError> {
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
        other => return Err(invalid(FIELD, format!("scheme {other:?} is not http(s)"))),
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

/// Kubernetes object name (DNS subdomain).
fn check_name(field: &'static str, name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{:?} is not a valid Kubernetes object name", truncate(name)),
        ))
    }
}

/// Secret data key: [-._a-zA-Z0-9]+, at most 253 characters.
fn check_secret_key(field: &'static str, key: &str) -> Result<(), SpecError> {
    let ok = !key.is_empty()
        && key.len() <= 253
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{:?} is not a valid Secret key", truncate(key)),
        ))
    }
}

/// Label or annotation key: optional DNS prefix, then a name of at most 63 characters.
fn check_qualified_name(field: &'static str, key: &str) -> Result<(), SpecError> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if name_ok && prefix.is_none_or(|p| check_name(field, p).is_ok()) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{:?} is not a valid label or annotation key", truncate(key)),
        ))
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(64).collect()
}

/// Parses durations like `90s`, `1h30m`, `7d`, `500ms`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "{:?} is not a duration like 30s, 5m, 24h, 7d or 1h30m",
            truncate(text)
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
}
