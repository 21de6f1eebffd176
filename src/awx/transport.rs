//! Sending one request: the shared gates, the timeout, the body cap, the observer, and the
//! translation of transport failures into [`AwxError`].

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use reqwest::header::{self, HeaderValue};
use reqwest::{Method, Url};

use super::error::AwxError;
use super::tls::describe_tls_error;
use super::{RequestLimits, RequestObserver};

/// Answers with a larger body are not read ([`AwxError::ResponseTooLarge`]).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

const USER_AGENT: &str = concat!("awx-token-operator/", env!("CARGO_PKG_VERSION"));

pub(crate) struct Transport {
    http: reqwest::Client,
    limits: RequestLimits,
    observer: Option<Arc<dyn RequestObserver>>,
    timeout: Duration,
}

/// The body of a request.
pub(crate) enum Body<'a> {
    Empty,
    /// `application/x-www-form-urlencoded`; the only thing `/api/o/*` understands.
    Form(Vec<(&'static str, &'a str)>),
    /// JSON; the only thing `/api/v2/*` understands.
    Json(serde_json::Value),
}

/// One request to make.
pub(crate) struct Call<'a> {
    /// The fixed label given to the observer.
    pub(crate) endpoint: &'static str,
    pub(crate) method: Method,
    pub(crate) url: Url,
    pub(crate) authorization: Option<HeaderValue>,
    pub(crate) body: Body<'a>,
}

/// An HTTP answer, whatever its status, with its body read in full. Not `Debug`: the body
/// may hold a token.
pub(crate) struct Answer {
    /// `METHOD url`, for error messages.
    pub(crate) at: String,
    pub(crate) status: u16,
    pub(crate) content_type: Option<String>,
    pub(crate) location: Option<String>,
    pub(crate) body: Vec<u8>,
    /// When the request was sent; token lifetimes count from here.
    pub(crate) sent_at: Timestamp,
    /// AWX's clock when it answered (its `Date` header), to second precision.
    pub(crate) date: Option<Timestamp>,
}

impl Transport {
    pub(crate) fn new(
        tls: rustls::ClientConfig,
        limits: RequestLimits,
        observer: Option<Arc<dyn RequestObserver>>,
        timeout: Duration,
    ) -> Result<Self, AwxError> {
        let mut headers = header::HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            // A redirect would carry the credentials to wherever it points; refuse them all
            // and report the status instead.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(USER_AGENT)
            .default_headers(headers)
            .timeout(timeout)
            // Shorter than the whole request's timeout, so a request that could not connect in
            // time is told apart (never sent) from one that was sent and not answered.
            .connect_timeout(connect_timeout(timeout))
            // Servers close idle connections (gunicorn after 5 s, nginx after 75 s); reusing one
            // just as it closes fails the request. Renewals are far apart: connect anew.
            .pool_idle_timeout(Duration::from_secs(4))
            .build()
            .map_err(|e| AwxError::ClientSetup {
                detail: error_chain(&e),
            })?;
        Ok(Self {
            http,
            limits,
            observer,
            timeout,
        })
    }

    /// Sends one request after waiting on the shared rate limiter and in-flight gate, and
    /// reads the answer. Any HTTP status is an `Ok`; only the lack of a usable answer is
    /// an error.
    pub(crate) async fn send(&self, call: Call<'_>) -> Result<Answer, AwxError> {
        let at = format!("{} {}", call.method, call.url);
        let host = host_of(&call.url);

        let _admission = self.limits.admit().await;

        let mut request = self
            .http
            .request(call.method, call.url)
            .timeout(self.timeout);
        if let Some(authorization) = call.authorization {
            request = request.header(header::AUTHORIZATION, authorization);
        }
        request = match &call.body {
            Body::Empty => request,
            Body::Form(fields) => request.form(fields),
            Body::Json(value) => request.json(value),
        };

        let sent_at = Timestamp::now();
        let started = Instant::now();
        let mut status = None;
        let outcome = tokio::time::timeout(
            self.timeout,
            read_answer(request, &at, &host, sent_at, &mut status),
        )
        .await
        .unwrap_or_else(|_| {
            // The connect phase has its own, shorter timeout: when this one fires the request
            // was on its way.
            Err(AwxError::Timeout {
                at: at.clone(),
                host: host.clone(),
                timeout: self.timeout,
                sent: true,
            })
        });
        let elapsed = started.elapsed();
        if let Some(observer) = &self.observer {
            observer.observe(call.endpoint, status, elapsed);
        }
        match &outcome {
            Ok(answer) => tracing::debug!(
                endpoint = call.endpoint,
                %at,
                status = answer.status,
                elapsed_ms = elapsed.as_millis() as u64,
                "AWX answered"
            ),
            Err(error) => tracing::debug!(
                endpoint = call.endpoint,
                %at,
                %error,
                elapsed_ms = elapsed.as_millis() as u64,
                "AWX request failed"
            ),
        }
        outcome.map_err(|e| match e {
            AwxError::Timeout { at, host, sent, .. } => AwxError::Timeout {
                at,
                host,
                timeout: self.timeout,
                sent,
            },
            other => other,
        })
    }
}

async fn read_answer(
    request: reqwest::RequestBuilder,
    at: &str,
    host: &str,
    sent_at: Timestamp,
    status_seen: &mut Option<u16>,
) -> Result<Answer, AwxError> {
    let mut response = request
        .send()
        .await
        .map_err(|e| transport_error(at, host, &e))?;
    let status = response.status().as_u16();
    *status_seen = Some(status);
    let header_text = |name: header::HeaderName| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header_text(header::CONTENT_TYPE);
    let location = header_text(header::LOCATION);
    let date = header_text(header::DATE).and_then(|d| {
        jiff::fmt::rfc2822::DateTimeParser::new()
            .parse_timestamp(d.as_bytes())
            .ok()
    });

    let too_large = || AwxError::ResponseTooLarge {
        at: at.to_owned(),
        status,
        limit: MAX_BODY_BYTES,
    };
    if response
        .content_length()
        .is_some_and(|len| len > MAX_BODY_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| transport_error(at, host, &e))?
    {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Answer {
        at: at.to_owned(),
        status,
        content_type,
        location,
        body,
        sent_at,
        date,
    })
}

/// Time allowed to connect (TCP and TLS): at most 10 s, and at most 80% of the timeout.
fn connect_timeout(timeout: Duration) -> Duration {
    timeout.mul_f64(0.8).min(Duration::from_secs(10))
}

/// `host:port` of a URL, for messages.
pub(crate) fn host_of(url: &Url) -> String {
    match (url.host_str(), url.port_or_known_default()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_owned(),
        _ => url.as_str().to_owned(),
    }
}

/// Sorts a reqwest failure into timeout, TLS or unreachable. The Timeout variant's duration
/// is filled in by the caller.
fn transport_error(at: &str, host: &str, error: &reqwest::Error) -> AwxError {
    // Only a failure to connect proves the request never left; anything later (a reset, a
    // timeout while waiting, a body cut off) leaves its effect at AWX unknown.
    let sent = !error.is_connect();
    if error.is_timeout() {
        return AwxError::Timeout {
            at: at.to_owned(),
            host: host.to_owned(),
            timeout: Duration::ZERO,
            sent,
        };
    }
    // A TLS failure after the handshake (rare) is a broken connection like any other.
    if let Some(tls) = find_tls_error(error).filter(|_| !sent) {
        return AwxError::TlsError {
            at: at.to_owned(),
            host: host.to_owned(),
            detail: describe_tls_error(tls),
        };
    }
    let chain = error_chain(error);
    let detail = if error.is_connect() {
        let lower = chain.to_ascii_lowercase();
        if lower.contains("connection refused") {
            format!("connection refused by {host}: nothing listens there ({chain})")
        } else if error.is_dns() || lower.contains("dns error") {
            format!("the host name does not resolve ({chain})")
        } else {
            format!("could not connect ({chain})")
        }
    } else {
        format!("the connection failed before a complete answer came ({chain})")
    };
    AwxError::AwxUnreachable {
        at: at.to_owned(),
        host: host.to_owned(),
        detail,
        sent,
    }
}

/// The rustls error somewhere in a failure's source chain. rustls errors reach reqwest
/// wrapped in `io::Error`, whose `source()` skips the wrapped error, so look inside those.
fn find_tls_error<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut current: Option<&'a (dyn StdError + 'static)> = Some(error);
    while let Some(err) = current {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(tls) = find_tls_error(inner)
        {
            return Some(tls);
        }
        current = err.source();
    }
    None
}

/// The messages of an error and its sources, joined. reqwest errors never carry header or
/// body contents, and the URLs this client uses hold no credentials.
fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current: Option<&(dyn StdError + 'static)> = error.source();
    while let Some(err) = current {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = err.source();
    }
    if parts.is_empty() {
        parts.push(error.to_string());
    }
    parts.join(": ")
}
