//! Pure helpers for the wire format: building credentials, reading answers.
//!
//! Answers are parsed into `serde_json::Value` and read field by field instead of through
//! typed deserialisation, because serde's type errors quote the offending value, and the
//! offending value could be a token.

use base64::Engine as _;
use jiff::{SignedDuration, Timestamp};
use reqwest::header::HeaderValue;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use super::error::{AwxError, Outcome};
use super::transport::Answer;

/// How much of a body goes into an error message.
const EXCERPT_CHARS: usize = 200;

/// `expires_at` for an `expires_in` counted from when the request was sent. AWX's default
/// is 1000 years and nothing stops an admin from configuring more; beyond what jiff can
/// represent the result is capped at `Timestamp::MAX`.
pub(crate) fn expires_at(sent_at: Timestamp, expires_in_secs: u64) -> Timestamp {
    i64::try_from(expires_in_secs)
        .ok()
        .and_then(|secs| sent_at.checked_add(SignedDuration::from_secs(secs)).ok())
        .unwrap_or(Timestamp::MAX)
}

/// `expires_in` as RFC 6749 says (an integer), or as some servers send it (a float or a
/// string of digits). Negative values mean "already expired".
pub(crate) fn parse_expires_in(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_i64().map(|i| i.max(0).unsigned_abs()))
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(float_secs)),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    }
}

fn float_secs(f: f64) -> u64 {
    if f <= 0.0 {
        0
    } else if f >= u64::MAX as f64 {
        u64::MAX
    } else {
        f as u64
    }
}

/// A string field that is present and not empty.
pub(crate) fn string_field<'a>(object: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    object
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// A non-negative integer field.
pub(crate) fn id_field(object: &Map<String, Value>, key: &str) -> Option<u64> {
    object.get(key).and_then(Value::as_u64)
}

/// The names of an object's keys, for error messages (names only, never values), cut
/// short like an excerpt: an object may have any number of keys.
pub(crate) fn key_names(object: &Map<String, Value>) -> String {
    let names: Vec<&str> = object.keys().map(String::as_str).collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        excerpt(names.join(", ").as_bytes())
    }
}

/// AWX and the gateway mask stored secrets with these on every read after creation.
pub(crate) fn is_masked(value: &str) -> bool {
    value == "$encrypted$" || value.chars().all(|c| c == '*')
}

/// The first characters of a body, whitespace collapsed and control characters replaced
/// (they would garble logs and terminals), for error messages.
pub(crate) fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out = String::new();
    let mut chars = 0;
    for word in text.split_whitespace() {
        if !out.is_empty() {
            if chars >= EXCERPT_CHARS {
                out.push('…');
                return out;
            }
            out.push(' ');
            chars += 1;
        }
        for c in word.chars() {
            if chars >= EXCERPT_CHARS {
                out.push('…');
                return out;
            }
            out.push(if c.is_control() { '\u{fffd}' } else { c });
            chars += 1;
        }
    }
    out
}

/// Keys whose values are tokens or credentials: never quoted in a message.
const SECRET_KEYS: [&str; 6] = [
    "access_token",
    "refresh_token",
    "token",
    "id_token",
    "password",
    "client_secret",
];

/// Like [`excerpt`], for text that may hold a token: a server can send a token answer with
/// an error status, a proxy can cut one off, a redirect can carry one. JSON has the values
/// of token and credential keys replaced; other text naming a token key is not quoted.
pub(crate) fn redacted_excerpt(body: &[u8]) -> String {
    if let Ok(mut value) = serde_json::from_slice::<Value>(body) {
        return if redact(&mut value) {
            excerpt(value.to_string().as_bytes())
        } else {
            excerpt(body)
        };
    }
    if names_a_secret(&String::from_utf8_lossy(body)) {
        "a body that seems to hold a token, not quoted".to_owned()
    } else {
        excerpt(body)
    }
}

/// Whether text that is not JSON (cut-off JSON, a form, a URL) mentions a token, or has a
/// JSON key or form field named like a credential. `type="password"` in a login page is
/// neither, so such pages are still quoted.
fn names_a_secret(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    if lower.contains("access_token") || lower.contains("refresh_token") {
        return true;
    }
    SECRET_KEYS.iter().any(|key| {
        let quoted = format!("\"{key}\"");
        let json_key = lower
            .match_indices(&quoted)
            .any(|(at, _)| lower[at + quoted.len()..].trim_start().starts_with(':'));
        let field = format!("{key}=");
        let form_field = lower
            .match_indices(&field)
            .any(|(at, _)| lower[..at].is_empty() || lower[..at].ends_with(['&', '?', '#', ';']));
        json_key || form_field
    })
}

/// Replaces the values of [`SECRET_KEYS`] at any depth; whether there was one.
fn redact(value: &mut Value) -> bool {
    match value {
        Value::Object(object) => {
            let mut found = false;
            for (key, item) in object.iter_mut() {
                if SECRET_KEYS.iter().any(|k| key.eq_ignore_ascii_case(k)) {
                    *item = Value::String("[redacted]".to_owned());
                    found = true;
                } else {
                    found |= redact(item);
                }
            }
            found
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |found, item| redact(item) | found),
        _ => false,
    }
}

/// Whether an answer is HTML (a login page, a proxy's error page) rather than JSON.
pub(crate) fn is_html(answer: &Answer) -> bool {
    let by_type = answer
        .content_type
        .as_deref()
        .is_some_and(|ct| ct.to_ascii_lowercase().contains("html"));
    let by_body = answer
        .body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'<');
    by_body || (by_type && serde_json::from_slice::<Value>(&answer.body).is_err())
}

/// The JSON object of a successful answer, or an error saying why there is none.
pub(crate) fn json_object(answer: &Answer) -> Result<Map<String, Value>, AwxError> {
    if is_html(answer) {
        return Err(AwxError::UnexpectedResponse {
            at: answer.at.clone(),
            status: Some(answer.status),
            detail: format!(
                "AWX answered HTML instead of JSON ({}); check the URL: a proxy, a login page \
                 or another web application may be answering at that address",
                redacted_excerpt(&answer.body)
            ),
            // AWX's API never answers a token request with an HTML page: whatever answered
            // (a proxy, a login page) stood in front of AWX, which did nothing.
            outcome: Outcome::Rejected,
        });
    }
    match serde_json::from_slice::<Value>(&answer.body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(other) => Err(AwxError::UnexpectedResponse {
            at: answer.at.clone(),
            status: Some(answer.status),
            detail: format!("expected a JSON object but got {}", json_kind(&other)),
            outcome: Outcome::of_unreadable(answer.status),
        }),
        // serde_json's syntax errors give a position, never the input.
        Err(e) if answer.body.is_empty() => Err(AwxError::UnexpectedResponse {
            at: answer.at.clone(),
            status: Some(answer.status),
            detail: format!("the body is empty where JSON was expected ({e})"),
            outcome: Outcome::of_unreadable(answer.status),
        }),
        Err(e) => Err(AwxError::UnexpectedResponse {
            at: answer.at.clone(),
            status: Some(answer.status),
            detail: format!("the body is not valid JSON ({e}); it may have been cut off"),
            outcome: Outcome::of_unreadable(answer.status),
        }),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An RFC 6749 §5.2 error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OAuthError {
    pub(crate) error: String,
    pub(crate) description: Option<String>,
}

pub(crate) fn oauth_error(body: &[u8]) -> Option<OAuthError> {
    let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    // Error codes are short words; anything else is cut like any text from the server.
    let error = excerpt(string_field(&object, "error")?.as_bytes());
    let description = string_field(&object, "error_description").map(|d| excerpt(d.as_bytes()));
    Some(OAuthError { error, description })
}

/// What AWX said, for messages: DRF's `{"detail": ...}` when there is one, otherwise the
/// start of the body.
pub(crate) fn detail_text(body: &[u8]) -> String {
    if let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body)
        && let Some(detail) = string_field(&object, "detail")
    {
        return excerpt(detail.as_bytes());
    }
    let text = redacted_excerpt(body);
    if text.is_empty() {
        "empty body".to_owned()
    } else {
        text
    }
}

/// `Authorization: Basic` for OAuth2 client authentication. RFC 6749 §2.3.1: the client id
/// and secret are each form-urlencoded before they are joined and base64-encoded; DOT
/// decodes them with `unquote_plus`.
pub(crate) fn client_basic_auth(
    client_id: &str,
    client_secret: &SecretString,
) -> Result<HeaderValue, AwxError> {
    let id: String = url::form_urlencoded::byte_serialize(client_id.as_bytes()).collect();
    let secret: String =
        url::form_urlencoded::byte_serialize(client_secret.expose_secret().as_bytes()).collect();
    basic_auth(&id, &secret, "client credentials")
}

/// `Authorization: Basic` with a user's login, as RFC 7617 says (no extra encoding).
pub(crate) fn user_basic_auth(
    username: &str,
    password: &SecretString,
) -> Result<HeaderValue, AwxError> {
    if username.contains(':') {
        return Err(AwxError::MalformedCredential {
            what: "username (a ':' cannot be sent in HTTP Basic authentication)",
        });
    }
    basic_auth(username, password.expose_secret(), "user's login")
}

fn basic_auth(user: &str, password: &str, what: &'static str) -> Result<HeaderValue, AwxError> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
        .map_err(|_| AwxError::MalformedCredential { what })?;
    value.set_sensitive(true);
    Ok(value)
}

/// `Authorization: Bearer`.
pub(crate) fn bearer_auth(token: &SecretString) -> Result<HeaderValue, AwxError> {
    let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
        .map_err(|_| AwxError::MalformedCredential { what: "token" })?;
    value.set_sensitive(true);
    Ok(value)
}

/// The gateway stores tokens as `$sha256$<hex>` and its revoke endpoint looks the posted
/// value up unchanged, so that is the form it has to be given (docs/awx-protocol.md#gateway-revoke).
pub(crate) fn gateway_token_reference(token: &SecretString) -> SecretString {
    let digest = Sha256::digest(token.expose_secret().as_bytes());
    SecretString::from(format!("$sha256${}", hex::encode(digest)))
}

/// Keys AWX, the gateway and DRF use, so generated answers in property tests hit the
/// interesting paths.
#[cfg(test)]
pub(crate) const KNOWN_KEYS: [&str; 16] = [
    "access_token",
    "refresh_token",
    "token",
    "token_type",
    "expires_in",
    "expires",
    "scope",
    "error",
    "error_description",
    "detail",
    "results",
    "username",
    "id",
    "next",
    "summary_fields",
    "user",
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn expires_at_adds_seconds_to_the_send_time() {
        let sent: Timestamp = "2025-01-10T12:00:00Z".parse().unwrap();
        assert_eq!(
            expires_at(sent, 3600),
            "2025-01-10T13:00:00Z".parse::<Timestamp>().unwrap()
        );
    }

    #[test]
    fn expires_at_of_a_thousand_years_lands_in_the_31st_century() {
        let sent: Timestamp = "2025-01-10T12:00:00Z".parse().unwrap();
        let at = expires_at(sent, 31_536_000_000);
        assert_eq!(at.to_zoned(jiff::tz::TimeZone::UTC).year(), 3024);
    }

    #[test]
    fn expires_at_caps_at_the_largest_timestamp_instead_of_panicking() {
        let sent = Timestamp::now();
        assert_eq!(expires_at(sent, u64::MAX), Timestamp::MAX);
        assert_eq!(expires_at(sent, i64::MAX as u64), Timestamp::MAX);
        assert_eq!(expires_at(sent, 400_000_000_000), Timestamp::MAX);
    }

    #[test]
    fn expires_in_accepts_integers_floats_and_digit_strings() {
        assert_eq!(parse_expires_in(&json!(36000)), Some(36000));
        assert_eq!(parse_expires_in(&json!(36000.7)), Some(36000));
        assert_eq!(parse_expires_in(&json!("36000")), Some(36000));
        assert_eq!(parse_expires_in(&json!(-5)), Some(0));
        assert_eq!(parse_expires_in(&json!(1e300)), Some(u64::MAX));
        assert_eq!(parse_expires_in(&json!(null)), None);
        assert_eq!(parse_expires_in(&json!("soon")), None);
    }

    #[test]
    fn excerpt_collapses_whitespace_and_stops_at_200_chars() {
        assert_eq!(
            excerpt(b"  <html>\n\t<body>  hi </body>\n"),
            "<html> <body> hi </body>"
        );
        let long = "é".repeat(500);
        let cut = excerpt(long.as_bytes());
        assert_eq!(cut.chars().count(), 201);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn oauth_error_reads_error_and_description() {
        let body =
            br#"{"error": "invalid_grant", "error_description": "Invalid credentials given."}"#;
        assert_eq!(
            oauth_error(body),
            Some(OAuthError {
                error: "invalid_grant".to_owned(),
                description: Some("Invalid credentials given.".to_owned()),
            })
        );
        assert_eq!(oauth_error(b"The refresh token has expired."), None);
        assert_eq!(oauth_error(br#"{"detail":"x"}"#), None);
    }

    #[test]
    fn detail_text_prefers_drf_detail() {
        assert_eq!(detail_text(br#"{"detail":"Nope."}"#), "Nope.");
        assert_eq!(detail_text(b"plain\n text"), "plain text");
        assert_eq!(detail_text(b""), "empty body");
    }

    #[test]
    fn client_basic_auth_form_encodes_each_part() {
        let value = client_basic_auth("id:1 x", &SecretString::from("p@ss:wörd+")).unwrap();
        let encoded = value.to_str().unwrap().strip_prefix("Basic ").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(
            String::from_utf8(decoded).unwrap(),
            "id%3A1+x:p%40ss%3Aw%C3%B6rd%2B"
        );
        assert!(value.is_sensitive());
    }

    #[test]
    fn user_basic_auth_is_plain_rfc7617() {
        let value = user_basic_auth("svc-k8s", &SecretString::from("p@ss")).unwrap();
        assert_eq!(value.to_str().unwrap(), "Basic c3ZjLWs4czpwQHNz");
        assert!(user_basic_auth("a:b", &SecretString::from("x")).is_err());
    }

    #[test]
    fn bearer_auth_refuses_header_breaking_tokens_without_echoing_them() {
        let err = bearer_auth(&SecretString::from("abc\r\nX-Evil: 1")).unwrap_err();
        assert!(!err.to_string().contains("Evil"));
        assert_eq!(err.reason(), "MalformedCredential");
    }

    #[test]
    fn gateway_token_reference_is_prefixed_lowercase_sha256_hex() {
        let reference = gateway_token_reference(&SecretString::from("abc"));
        assert_eq!(
            reference.expose_secret(),
            "$sha256$ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn masked_values_are_recognised() {
        assert!(is_masked("************"));
        assert!(is_masked("$encrypted$"));
        assert!(!is_masked("Qm7rT2vX9kLpA4sZ8nB1cD5eF3gH6j"));
    }

    #[test]
    fn redacted_excerpt_hides_token_values_in_json_and_withholds_cut_off_token_answers() {
        let body = br#"{"access_token": "Qm7rT2vX9kLpA4sZ8nB1", "nested": [{"Refresh_Token": "Zx8Yw7Vu6Ts5Rq4Po3Nm"}], "scope": "write"}"#;
        let text = redacted_excerpt(body);
        assert!(!text.contains("Qm7rT2vX9kLpA4sZ8nB1"), "{text}");
        assert!(!text.contains("Zx8Yw7Vu6Ts5Rq4Po3Nm"), "{text}");
        assert!(
            text.contains("[redacted]") && text.contains("write"),
            "{text}"
        );
        let cut = redacted_excerpt(br#"{"token_type": "Bearer", "access_token": "Qm7rT2vX9k"#);
        assert!(!cut.contains("Qm7rT2vX9k"), "{cut}");
        assert_eq!(
            redacted_excerpt(b"access_token=Qm7rT2vX9kLpA4sZ8nB1&token_type=Bearer"),
            "a body that seems to hold a token, not quoted"
        );
        // Bodies without tokens are quoted as they are, whitespace collapsed.
        assert_eq!(
            redacted_excerpt(b"<h1>Bad\n Gateway</h1>"),
            "<h1>Bad Gateway</h1>"
        );
        assert_eq!(
            redacted_excerpt(br#"{"scope": ["Must be read or write."]}"#),
            r#"{"scope": ["Must be read or write."]}"#
        );
        assert_eq!(
            detail_text(br#"{"access_token":"Qm7rT2vX9kLpA4sZ8nB1"}"#),
            r#"{"access_token":"[redacted]"}"#
        );
    }

    #[test]
    fn excerpt_replaces_control_characters() {
        assert_eq!(excerpt(b"a\x1b[31mred\x00"), "a\u{fffd}[31mred\u{fffd}");
    }

    #[test]
    fn key_names_of_a_huge_object_are_cut_short() {
        let object: Map<String, Value> = (0..100_000)
            .map(|i| (format!("key{i}"), Value::Null))
            .collect();
        assert!(key_names(&object).chars().count() <= EXCERPT_CHARS + 1);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn key() -> impl Strategy<Value = String> {
            prop_oneof![
                3 => prop::sample::select(&KNOWN_KEYS[..]).prop_map(str::to_owned),
                1 => any::<String>(),
            ]
        }

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(|f| {
                    serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
                }),
                any::<String>().prop_map(Value::String),
                key().prop_map(Value::String),
            ];
            leaf.prop_recursive(4, 48, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::btree_map(key(), inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// JSON number text of any size, including ones no machine type holds.
        fn number_text() -> impl Strategy<Value = String> {
            "-?[0-9]{1,60}(\\.[0-9]{1,12})?([eE][+-]?[0-9]{1,4})?"
        }

        fn token() -> impl Strategy<Value = String> {
            "[A-Za-z0-9_-]{24,48}"
        }

        /// Whether `text` holds 12 consecutive characters of `secret`.
        fn leaks(text: &str, secret: &str) -> bool {
            let chars: Vec<char> = secret.chars().collect();
            chars
                .windows(12)
                .any(|w| text.contains(&w.iter().collect::<String>()))
        }

        fn answer(status: u16, content_type: Option<String>, body: Vec<u8>) -> Answer {
            Answer {
                at: "POST https://awx.example.com/api/o/token/".to_owned(),
                status,
                content_type,
                location: None,
                body,
                sent_at: Timestamp::from_second(1_700_000_000).unwrap(),
                date: None,
            }
        }

        fn content_type() -> impl Strategy<Value = Option<String>> {
            prop_oneof![
                Just(None),
                Just(Some("application/json".to_owned())),
                Just(Some("text/html; charset=utf-8".to_owned())),
                Just(Some("TEXT/HTML".to_owned())),
                any::<String>().prop_map(Some),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn excerpts_of_any_bytes_are_short_and_free_of_control_characters(
                body in prop::collection::vec(any::<u8>(), 0..2048),
            ) {
                for text in [excerpt(&body), redacted_excerpt(&body), detail_text(&body)] {
                    prop_assert!(text.chars().count() <= EXCERPT_CHARS + 1);
                    prop_assert!(!text.chars().any(char::is_control), "{text:?}");
                }
            }

            #[test]
            fn readers_of_any_answer_never_panic_and_stay_short(
                status in 100u16..600,
                content_type in content_type(),
                body in prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..1024),
                    json_value().prop_map(|v| v.to_string().into_bytes()),
                    any::<String>().prop_map(String::into_bytes),
                ],
            ) {
                let answer = answer(status, content_type, body);
                let _ = is_html(&answer);
                if let Err(e) = json_object(&answer) {
                    prop_assert!(e.to_string().chars().count() < 1024);
                }
                if let Some(oauth) = oauth_error(&answer.body) {
                    prop_assert!(oauth.error.chars().count() <= EXCERPT_CHARS + 1);
                    prop_assert!(oauth
                        .description
                        .is_none_or(|d| d.chars().count() <= EXCERPT_CHARS + 1));
                }
                prop_assert!(detail_text(&answer.body).chars().count() <= EXCERPT_CHARS + 1);
            }

            #[test]
            fn token_values_under_secret_keys_are_never_quoted(
                secret in token(),
                secret_key in prop::sample::select(&SECRET_KEYS[..]),
                uppercase in any::<bool>(),
                value in json_value(),
                depth in 0usize..4,
                cut in any::<prop::sample::Index>(),
                pretty in any::<bool>(),
            ) {
                let key = if uppercase { secret_key.to_ascii_uppercase() } else { secret_key.to_owned() };
                let mut object = match value {
                    Value::Object(object) => object,
                    other => Map::from_iter([("other".to_owned(), other)]),
                };
                object.insert(key, Value::String(secret.clone()));
                let mut body = Value::Object(object);
                for _ in 0..depth {
                    body = serde_json::json!({"data": [body]});
                }
                let text = if pretty {
                    serde_json::to_string_pretty(&body).unwrap()
                } else {
                    body.to_string()
                };
                let status_of = |b: &[u8]| answer(500, Some("text/html".to_owned()), b.to_vec());
                for bytes in [text.as_bytes(), &text.as_bytes()[..cut.index(text.len() + 1)]] {
                    for shown in [
                        redacted_excerpt(bytes),
                        detail_text(bytes),
                        json_object(&status_of(bytes)).err().map(|e| e.to_string()).unwrap_or_default(),
                    ] {
                        prop_assert!(!leaks(&shown, &secret), "{shown}");
                    }
                }
            }

            #[test]
            fn expires_in_of_any_size_or_type_gives_an_expiry_at_or_after_sending(
                number in number_text(),
                value in json_value(),
                seconds in any::<u64>(),
                sent in Timestamp::MIN.as_second()..=Timestamp::MAX.as_second(),
            ) {
                let sent = Timestamp::from_second(sent).unwrap();
                prop_assert!(expires_at(sent, seconds) >= sent);
                prop_assert!(expires_at(sent, seconds) <= expires_at(sent, seconds.saturating_add(1)));
                // Numbers too large for f64 are a JSON error, not a panic.
                if let Ok(parsed) = serde_json::from_str::<Value>(&number)
                    && let Some(secs) = parse_expires_in(&parsed)
                {
                    prop_assert!(expires_at(sent, secs) >= sent);
                }
                if let Some(secs) = parse_expires_in(&value) {
                    prop_assert!(expires_at(sent, secs) >= sent);
                }
            }
        }
    }
}
