//! `awx-token-operator login` against a real AWX stand-in (tests/awx-standin, django-oauth-toolkit
//! as AWX and the gateway run it): the browser is played by reqwest, which signs in through the
//! login form, answers the consent page and follows the redirect back to the loopback listener.
//! No cluster: the sign-in ends with the exchanged refresh token, which is then refreshed.
//!
//! Each test starts its own stand-in with tests/awx-standin/standin.sh (and stops it).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use awx_token_operator::awx::{
    AwxClient, ClientCredentials, Endpoint, Flavor, RequestLimits, Scope,
};
use awx_token_operator::login::{Browser, CallbackListener, FlavorArg, LoginError, sign_in};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{Value, json};
use url::Url;

const PASSWORD: &str = "pw-of-the-person-signing-in";

/// A stand-in in a run dir of its own, stopped on drop.
struct Standin {
    run_dir: PathBuf,
    url: String,
    mode: &'static str,
}

impl Standin {
    fn start(mode: &'static str) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let run_dir = std::env::temp_dir().join(format!(
            "awxto-login-{mode}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&run_dir).unwrap();
        let out = Command::new(script())
            .arg("start")
            .arg(&run_dir)
            .args(["--mode", mode, "--password-hash-iterations", "1000"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "standin.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .trim_end_matches('/')
            .to_owned();
        Self { run_dir, url, mode }
    }

    async fn control(&self, path: &str, body: Value) -> Value {
        let answer = http()
            .post(format!("{}/_standin/{path}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{path}: {}", answer.status());
        answer.json().await.unwrap()
    }

    fn client(&self) -> AwxClient {
        AwxClient::new(
            Endpoint {
                base_url: Url::parse(&self.url).unwrap(),
                ca_bundle_pem: None,
                insecure_skip_tls_verify: false,
                timeout: Duration::from_secs(30),
            },
            RequestLimits::default(),
            None,
        )
        .unwrap()
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(&self.run_dir)
            .status();
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/awx-standin/standin.sh")
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The cookies a browser keeps for one site.
#[derive(Default)]
struct Jar(HashMap<String, String>);

impl Jar {
    fn take(&mut self, response: &reqwest::Response) {
        for header in response.headers().get_all(reqwest::header::SET_COOKIE) {
            let text = header.to_str().unwrap();
            let pair = text.split(';').next().unwrap();
            if let Some((name, value)) = pair.split_once('=') {
                self.0
                    .insert(name.trim().to_owned(), value.trim().to_owned());
            }
        }
    }

    fn header(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn unescape(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&#x27;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

fn attribute(tag: &str, name: &str) -> Option<String> {
    let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let end = tag[start..].find('"')? + start;
    Some(unescape(&tag[start..end]))
}

/// The named `<input>` fields of a page (submit buttons left out).
fn inputs(page: &str) -> Vec<(String, String)> {
    page.split("<input")
        .skip(1)
        .filter_map(|rest| {
            let tag = &rest[..rest.find('>')?];
            if attribute(tag, "type").as_deref() == Some("submit") {
                return None;
            }
            Some((
                attribute(tag, "name")?,
                attribute(tag, "value").unwrap_or_default(),
            ))
        })
        .collect()
}

/// What the person does in the browser, start to end.
async fn play_browser(authorize: Url, username: String, allow: bool) {
    let http = http();
    let mut jar = Jar::default();
    let first = http.get(authorize.clone()).send().await.unwrap();
    assert_eq!(first.status(), 302, "the authorize URL asks for a login");
    let login = authorize
        .join(first.headers()["location"].to_str().unwrap())
        .unwrap();
    let page = http.get(login.clone()).send().await.unwrap();
    jar.take(&page);
    let mut form = inputs(&page.text().await.unwrap());
    for (name, value) in &mut form {
        match name.as_str() {
            "username" => *value = username.clone(),
            "password" => *value = PASSWORD.to_owned(),
            _ => {}
        }
    }
    let logged_in = http
        .post(login.clone())
        .header("cookie", jar.header())
        .header("referer", login.as_str())
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(logged_in.status(), 302, "the login is accepted");
    jar.take(&logged_in);
    let consent = http
        .get(authorize.clone())
        .header("cookie", jar.header())
        .send()
        .await
        .unwrap();
    assert_eq!(consent.status(), 200, "the consent page is shown");
    jar.take(&consent);
    let mut form = inputs(&consent.text().await.unwrap());
    if allow {
        form.push(("allow".into(), "Authorize".into()));
    }
    let decided = http
        .post(authorize.clone())
        .header("cookie", jar.header())
        .header("referer", authorize.as_str())
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(decided.status(), 302, "the consent sends the browser back");
    let back = decided.headers()["location"].to_str().unwrap().to_owned();
    assert!(back.starts_with("http://127.0.0.1:"), "{back}");
    let _ = http.get(back).send().await.unwrap();
}

fn browser(username: String, allow: bool) -> Browser {
    Browser::Driver(Box::new(move |url: Url| {
        tokio::spawn(play_browser(url, username, allow));
    }))
}

/// A user and a confidential authorization-code application whose redirect URI is the
/// listener's.
async fn person_and_app(standin: &Standin, redirect_uri: &str) -> (String, ClientCredentials) {
    let user = format!("person-{}", std::process::id());
    standin
        .control("users", json!({"username": user, "password": PASSWORD}))
        .await;
    let app = standin
        .control(
            "applications",
            json!({"name": format!("login-{}", std::process::id()),
                   "client_type": "confidential", "grant_type": "authorization-code",
                   "redirect_uris": [redirect_uri]}),
        )
        .await;
    let credentials = ClientCredentials {
        client_id: app["client_id"].as_str().unwrap().to_owned(),
        client_secret: Some(SecretString::from(
            app["client_secret"].as_str().unwrap().to_owned(),
        )),
    };
    (user, credentials)
}

async fn signs_in_and_the_refresh_token_works(mode: &'static str, flavor: Flavor) {
    let standin = Standin::start(mode);
    let listener = CallbackListener::bind(0).await.unwrap();
    let (user, credentials) = person_and_app(&standin, &listener.redirect_uri()).await;
    let client = standin.client();
    let mut lines = Vec::new();
    let exchanged = sign_in(
        &client,
        FlavorArg::Auto,
        &credentials,
        listener,
        browser(user.clone(), true),
        Duration::from_secs(120),
        Scope::Write,
        &mut |line| lines.push(line),
    )
    .await
    .unwrap();
    assert_eq!(exchanged.flavor, flavor, "{}", standin.mode);
    assert_eq!(exchanged.scope, "read write");
    let refresh = exchanged.refresh_token.expose_secret();
    for line in &lines {
        assert!(!line.contains(refresh), "{line}");
    }

    // What the operator will do with it: refresh with the application's credentials alone.
    let renewed = client
        .refresh(flavor, &credentials, &exchanged.refresh_token, Scope::Write)
        .await
        .unwrap();
    let me = client.whoami(flavor, &renewed.access_token).await.unwrap();
    assert_eq!(me.username, user);
    let reused = client
        .refresh(flavor, &credentials, &exchanged.refresh_token, Scope::Write)
        .await
        .unwrap_err();
    assert_eq!(reused.reason(), "RefreshTokenInvalid", "{reused}");
}

#[tokio::test]
async fn login_signs_in_at_awx_and_its_refresh_token_renews() {
    signs_in_and_the_refresh_token_works("awx", Flavor::Controller).await;
}

#[tokio::test]
async fn login_signs_in_at_the_gateway_and_its_refresh_token_renews() {
    signs_in_and_the_refresh_token_works("gateway", Flavor::Gateway).await;
}

#[tokio::test]
async fn cancel_on_the_consent_page_is_denied_and_issues_no_token() {
    let standin = Standin::start("awx");
    let listener = CallbackListener::bind(0).await.unwrap();
    let (user, credentials) = person_and_app(&standin, &listener.redirect_uri()).await;
    let error = sign_in(
        &standin.client(),
        FlavorArg::Controller,
        &credentials,
        listener,
        browser(user.clone(), false),
        Duration::from_secs(120),
        Scope::Write,
        &mut |_| {},
    )
    .await
    .err()
    .unwrap();
    assert!(matches!(error, LoginError::Denied), "{error:?}");
    let tokens: Value = http()
        .get(format!("{}/_standin/tokens?user={user}", standin.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tokens["access_tokens"], json!([]));
}

/// Signs in and opens the authorize URL, then reports the page AWX shows instead of
/// redirecting (status and body).
async fn browser_stuck_on_an_error_page(
    authorize: Url,
    username: String,
    seen: tokio::sync::oneshot::Sender<(u16, String)>,
) {
    let http = http();
    let mut jar = Jar::default();
    let first = http.get(authorize.clone()).send().await.unwrap();
    let login = authorize
        .join(first.headers()["location"].to_str().unwrap())
        .unwrap();
    let page = http.get(login.clone()).send().await.unwrap();
    jar.take(&page);
    let mut form = inputs(&page.text().await.unwrap());
    for (name, value) in &mut form {
        match name.as_str() {
            "username" => *value = username.clone(),
            "password" => *value = PASSWORD.to_owned(),
            _ => {}
        }
    }
    let logged_in = http
        .post(login.clone())
        .header("cookie", jar.header())
        .header("referer", login.as_str())
        .form(&form)
        .send()
        .await
        .unwrap();
    jar.take(&logged_in);
    let shown = http
        .get(authorize)
        .header("cookie", jar.header())
        .send()
        .await
        .unwrap();
    let status = shown.status().as_u16();
    let _ = seen.send((status, shown.text().await.unwrap()));
}

#[tokio::test]
async fn a_redirect_uri_awx_does_not_know_ends_in_a_timeout_naming_the_one_to_register() {
    let standin = Standin::start("awx");
    // The application lists another port: AWX shows an error page and never redirects.
    let (user, credentials) = person_and_app(&standin, "http://127.0.0.1:1/callback").await;
    let listener = CallbackListener::bind(0).await.unwrap();
    let redirect = listener.redirect_uri();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
    let driver = Browser::Driver(Box::new(move |url: Url| {
        tokio::spawn(browser_stuck_on_an_error_page(url, user, seen_tx));
    }));
    // The timeout is the behaviour under test: nothing else ends the wait.
    let error = sign_in(
        &standin.client(),
        FlavorArg::Controller,
        &credentials,
        listener,
        driver,
        Duration::from_secs(10),
        Scope::Write,
        &mut |_| {},
    )
    .await
    .err()
    .unwrap();
    let (status, page) = seen_rx.await.unwrap();
    assert_eq!(status, 400);
    assert!(page.contains("Mismatching redirect URI."), "{page}");
    let message = error.to_string();
    assert!(matches!(error, LoginError::Timeout { .. }), "{error:?}");
    assert!(
        message.contains(&format!(
            "the redirect URIs of the OAuth2 application {} do not match: they must include \
             exactly {redirect}",
            credentials.client_id
        )),
        "{message}"
    );
}
