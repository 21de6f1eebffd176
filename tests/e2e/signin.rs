//! Grant type AuthorizationCode end to end: `awx-token-operator login --no-browser` signs a
//! person in at the stand-in (reqwest plays the browser: login form, consent, redirect back to
//! the loopback listener), writes the credentials Secret and the AwxToken, and the operator
//! makes it Ready. Consumers get personal tokens renewed make-before-break; the sign-in is
//! refreshed underneath without breaking them; a sign-in that can no longer be refreshed
//! reports SignInExpired with the command to sign in again.
//!
//! `signin_real_browser_*` signs in with Debian's chromium, headless, through chromedriver, and
//! forces two renewals. Both scenarios assert that the password is in no Secret of the cluster
//! and in no byte of etcd.

use std::{
    collections::HashMap,
    io::BufRead as _,
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use base64::Engine as _;
use serde_json::Value;

use crate::{
    scenarios::{READY_TIMEOUT, setup_with, wait_condition, wait_ready, wait_token},
    support::{Env, TestResult, condition, free_port, wait_for},
    webdriver::{self, Browser},
};

const NAME: &str = "sig";

fn http() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())
}

/// The cookies a browser keeps for one site.
#[derive(Default)]
struct Jar(HashMap<String, String>);

impl Jar {
    fn take(&mut self, response: &reqwest::Response) {
        for header in response.headers().get_all(reqwest::header::SET_COOKIE) {
            let Ok(text) = header.to_str() else { continue };
            let pair = text.split(';').next().unwrap_or_default();
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

fn location(response: &reqwest::Response) -> Result<String, String> {
    Ok(response
        .headers()
        .get("location")
        .ok_or("no Location header")?
        .to_str()
        .map_err(|e| e.to_string())?
        .to_owned())
}

/// What the person does in the browser: log in, approve, follow the redirect back.
async fn play_browser(authorize: url::Url, username: &str, password: &str) -> TestResult {
    let http = http()?;
    let mut jar = Jar::default();
    let err = |e: reqwest::Error| e.to_string();
    let first = http.get(authorize.clone()).send().await.map_err(err)?;
    ensure_eq!(
        first.status().as_u16(),
        302,
        "the authorize URL asks for a login"
    );
    let login = authorize
        .join(&location(&first)?)
        .map_err(|e| e.to_string())?;
    let page = http.get(login.clone()).send().await.map_err(err)?;
    jar.take(&page);
    let mut form = inputs(&page.text().await.map_err(err)?);
    for (name, value) in &mut form {
        match name.as_str() {
            "username" => *value = username.to_owned(),
            "password" => *value = password.to_owned(),
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
        .map_err(err)?;
    ensure_eq!(logged_in.status().as_u16(), 302, "the login is accepted");
    jar.take(&logged_in);
    let consent = http
        .get(authorize.clone())
        .header("cookie", jar.header())
        .send()
        .await
        .map_err(err)?;
    ensure_eq!(consent.status().as_u16(), 200, "the consent page is shown");
    jar.take(&consent);
    let mut form = inputs(&consent.text().await.map_err(err)?);
    form.push(("allow".into(), "Authorize".into()));
    let decided = http
        .post(authorize.clone())
        .header("cookie", jar.header())
        .header("referer", authorize.as_str())
        .form(&form)
        .send()
        .await
        .map_err(err)?;
    ensure_eq!(
        decided.status().as_u16(),
        302,
        "the consent sends the browser back"
    );
    let back = location(&decided)?;
    ensure!(
        back.starts_with("http://127.0.0.1:"),
        "redirected to {back}"
    );
    http.get(back).send().await.map_err(err)?;
    Ok(())
}

/// What a person does in a real browser: the login page, then Authorize on the consent page;
/// the browser then follows the redirect to `login`'s loopback listener.
async fn sign_in_with_chromium(
    browser: &Browser,
    authorize: &url::Url,
    username: &str,
    password: &str,
) -> TestResult {
    browser.open(authorize.as_str()).await?;
    browser.type_into("input[name=username]", username).await?;
    browser.type_into("input[name=password]", password).await?;
    browser.click("button#login").await?;
    browser.click("input#authorize").await?;
    wait_for(
        "the browser to come back to the loopback listener",
        Duration::from_secs(60),
        || async {
            let at = browser.current_url().await?;
            Ok(at.starts_with("http://127.0.0.1:").then_some(at))
        },
    )
    .await?;
    Ok(())
}

/// Runs `awx-token-operator login --no-browser`, plays the browser for the URL it prints, and
/// returns its output once it exited successfully.
async fn login(
    env: &Env,
    url: &str,
    ns: &str,
    client_id: &str,
    secret_file: &std::path::Path,
    person: (&str, &str),
) -> Result<String, String> {
    login_with(env, url, ns, client_id, secret_file, person, None).await
}

/// `login`, with a real browser when one is given (else reqwest plays it).
async fn login_with(
    env: &Env,
    url: &str,
    ns: &str,
    client_id: &str,
    secret_file: &std::path::Path,
    person: (&str, &str),
    browser: Option<&Browser>,
) -> Result<String, String> {
    let port = free_port();
    let mut child = Command::new(&env.operator_bin)
        .env("KUBECONFIG", &env.kubeconfig)
        .args(["login", "--url", url, "--client-id", client_id])
        .arg("--client-secret-file")
        .arg(secret_file)
        .args(["--namespace", ns, "--name", NAME, "--no-browser"])
        .args(["--allow-insecure-http", "--timeout", "2m"])
        .args(["--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting login: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut printed = Vec::new();
    let authorize = loop {
        let line = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .map_err(|_| format!("login printed no URL: {printed:?}"))?
            .ok_or_else(|| format!("login ended without a URL: {printed:?}"))?;
        printed.push(line.clone());
        let text = line.trim();
        if text.starts_with("http") && text.contains("authorize") {
            break url::Url::parse(text).map_err(|e| e.to_string())?;
        }
    };
    ensure!(
        authorize.as_str().starts_with(url),
        "the sign-in URL is at the stand-in: {authorize}"
    );
    match browser {
        Some(browser) => sign_in_with_chromium(browser, &authorize, person.0, person.1).await?,
        None => play_browser(authorize, person.0, person.1).await?,
    }
    let status = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let _ = reader.join();
    while let Ok(line) = rx.try_recv() {
        printed.push(line);
    }
    let out = printed.join("\n");
    ensure!(
        status.status.success(),
        "login failed: {out}\n{}",
        String::from_utf8_lossy(&status.stderr)
    );
    Ok(out)
}

/// Every value of every Secret in the cluster, decoded, named `namespace/name/key`.
fn cluster_secret_values(env: &Env) -> Result<Vec<(String, String)>, String> {
    let list: Value = serde_json::from_str(&env.kubectl(&["get", "secrets", "-A", "-o", "json"])?)
        .map_err(|e| e.to_string())?;
    let mut values = Vec::new();
    for item in list["items"].as_array().into_iter().flatten() {
        let at = format!(
            "{}/{}",
            item["metadata"]["namespace"].as_str().unwrap_or_default(),
            item["metadata"]["name"].as_str().unwrap_or_default()
        );
        for (key, value) in item["data"].as_object().into_iter().flatten() {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(value.as_str().unwrap_or_default())
                .map_err(|e| e.to_string())?;
            values.push((
                format!("{at}/{key}"),
                String::from_utf8_lossy(&bytes).into_owned(),
            ));
        }
    }
    Ok(values)
}

/// For each needle, whether it occurs in any file of the test cluster's etcd data directory.
/// The write-ahead log holds every write the apiserver made (every revision of every object,
/// Events included), and the cluster stores Secrets unencrypted, so a value that ever reached
/// the cluster is there.
fn in_etcd(env: &Env, needles: &[&str]) -> Result<Vec<bool>, String> {
    let mut found = vec![false; needles.len()];
    let mut dirs = vec![env.run_dir.join("etcd-data")];
    let mut files = 0;
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            files += 1;
            for (needle, seen) in needles.iter().zip(found.iter_mut()) {
                *seen |= memchr::memmem::find(&bytes, needle.as_bytes()).is_some();
            }
        }
    }
    ensure!(files > 0, "no etcd files under {}", env.run_dir.display());
    Ok(found)
}

/// The person's password is nowhere in the cluster: in no Secret of any namespace, and in no
/// byte etcd ever stored. `stored` is a value known to be in a Secret (the control: the scan
/// finds what the cluster holds).
fn ensure_password_absent(env: &Env, password: &str, stored: &str) -> TestResult {
    for (at, value) in cluster_secret_values(env)? {
        ensure!(
            !value.contains(password),
            "Secret {at} holds the person's password"
        );
    }
    let found = in_etcd(env, &[stored, password])?;
    ensure_eq!(
        found,
        vec![true, false],
        "etcd holds the consumer's token (the scan's control) and not the password"
    );
    Ok(())
}

/// What consumers see, as README's sign-in section documents: the target Secret holds a
/// personal token of the person (no application), renewed make-before-break. Two forced
/// renewals each give a new working personal token; each replaced one works through the grace
/// period, then is revoked. Returns the last token.
async fn consumers_rotate_as_documented(
    env: &Env,
    s: &crate::scenarios::Setup,
    first: &str,
) -> Result<String, String> {
    ensure_personal(s, first).await?;
    let second = rotate_and_check(env, s, "one", first).await?;
    ensure_personal(s, &second).await?;
    let third = rotate_and_check(env, s, "two", &second).await?;
    ensure_personal(s, &third).await?;
    Ok(third)
}

/// `token` is a live personal token of the person at the stand-in.
async fn ensure_personal(s: &crate::scenarios::Setup, token: &str) -> TestResult {
    let digest = crate::support::sha256_hex(token);
    let rows = s.awx.live_token_rows(&s.user).await?;
    let row = rows
        .iter()
        .find(|r| r["sha256"] == digest.as_str())
        .ok_or("the consumer's token is not listed at the stand-in")?;
    ensure_eq!(row["application"], Value::Null, "a personal token");
    Ok(())
}

/// A short grace period, so the replaced tokens' revocation is seen.
fn short_grace(env: &Env, ns: &str) -> TestResult {
    patch_renewal(env, ns, r#"{"revokeGracePeriod":"10s"}"#)
}

/// Merges `renewal` (JSON) into the AwxToken's spec.renewal, as a person would with kubectl.
fn patch_renewal(env: &Env, ns: &str, renewal: &str) -> TestResult {
    let patch = format!(r#"{{"spec":{{"renewal":{renewal}}}}}"#);
    env.kubectl(&[
        "patch", "awxt", NAME, "-n", ns, "--type", "merge", "-p", &patch,
    ])?;
    Ok(())
}

async fn rotate_and_check(
    env: &Env,
    s: &crate::scenarios::Setup,
    value: &str,
    old: &str,
) -> Result<String, String> {
    env.kubectl(&[
        "annotate",
        "--overwrite",
        "awxt",
        NAME,
        "-n",
        &s.ns,
        &format!("awx-token-operator.io/rotate={value}"),
    ])?;
    let new = wait_token(env, &s.ns, NAME, Some(old)).await?;
    ensure_eq!(
        s.awx.whoami(&new).await?,
        Some(s.user.clone()),
        "the renewed token ({value}) works"
    );
    ensure_eq!(
        s.awx.whoami(old).await?,
        Some(s.user.clone()),
        "the replaced token still works inside the grace period ({value})"
    );
    wait_for(
        "the replaced token to be revoked after the grace period",
        Duration::from_secs(60),
        || async { Ok(s.awx.whoami(old).await?.is_none().then_some(())) },
    )
    .await?;
    ensure_eq!(
        s.awx.whoami(&new).await?,
        Some(s.user.clone()),
        "the renewed token ({value}) survives the revocation of the replaced one"
    );
    Ok(new)
}

async fn refresh_deadline(env: &Env, ns: &str) -> Result<String, String> {
    Ok(
        env.awx_token(ns, NAME).await?.unwrap_or_default()["status"]["refreshTokenExpiresAt"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

pub async fn signin_browser_sign_in_gives_consumers_personal_tokens_that_outlive_session_refreshes(
    env: Arc<Env>,
) -> TestResult {
    // A stand-in of its own: the scenario changes its refresh-token lifetime.
    let awx = env.private_standin("signin", "awx")?;
    let s = setup_with(&env, "e2e-signin", awx, &[]).await?;
    env.remember_secret(&s.password);
    let port_note = "http://127.0.0.1/callback";
    // The loopback exception: a registered port-less 127.0.0.1 URI matches any port.
    let (client_id, client_secret) = s
        .awx
        .create_code_app(&format!("{}-app", s.ns), port_note)
        .await?;
    env.remember_secret(&client_secret);
    let secret_file = env.run_dir.join(format!("{}-client-secret", s.ns));
    std::fs::write(&secret_file, &client_secret).map_err(|e| e.to_string())?;
    let out = login(
        &env,
        &s.awx.url,
        &s.ns,
        &client_id,
        &secret_file,
        (&s.user, &s.password),
    )
    .await?;
    ensure!(
        !out.contains(&client_secret),
        "login printed the client secret"
    );
    let refresh = env
        .secret_value(&s.ns, &format!("{NAME}-sign-in"), "refresh_token")
        .await?
        .ok_or("login wrote no refresh token")?;
    ensure!(!out.contains(&refresh), "login printed the refresh token");
    short_grace(&env, &s.ns)?;

    let obj = wait_ready(&env, &s.ns, NAME, "True", None).await?;
    let first = env
        .secret_value(&s.ns, NAME, "token")
        .await?
        .ok_or("no token in the target Secret")?;
    ensure_eq!(
        s.awx.whoami(&first).await?,
        Some(s.user.clone()),
        "the consumer's token works"
    );
    ensure!(
        obj["status"]["refreshTokenExpiresAt"].is_string(),
        "the sign-in's refresh deadline is shown: {}",
        obj["status"]
    );
    // The Secret's refresh token was consumed by the first refresh of the sign-in.
    let rts = s.awx.refresh_token_rows(&s.user).await?;
    let consumed = rts
        .iter()
        .find(|r| r["sha256"] == crate::support::sha256_hex(&refresh).as_str())
        .ok_or("the Secret's refresh token is unknown to the stand-in")?;
    ensure_eq!(
        consumed["revoked"],
        Value::Bool(true),
        "the Secret's refresh token is consumed"
    );
    ensure_password_absent(&env, &s.password, &first)?;
    let third = consumers_rotate_as_documented(&env, &s, &first).await?;

    // The sign-in refreshed underneath: a lifetime of 15s makes it due every 10s.
    let before = refresh_deadline(&env, &s.ns).await?;
    patch_renewal(&env, &s.ns, r#"{"refreshTokenLifetime":"15s"}"#)?;
    let mut seen = before.clone();
    for round in 0..2 {
        let last = seen.clone();
        seen = wait_for(
            &format!("session refresh {round}"),
            READY_TIMEOUT,
            || async {
                let now = refresh_deadline(&env, &s.ns).await?;
                Ok((!now.is_empty() && now != last).then_some(now))
            },
        )
        .await?;
        ensure_kept_and_working(&env, &s, &third, &format!("after session refresh {round}"))
            .await?;
    }

    // The refresh token dies (as after 30 days): the next refresh is refused.
    s.awx.set_lifetimes(None, Some(1)).await?;
    let obj = wait_ready(&env, &s.ns, NAME, "False", Some("SignInExpired")).await?;
    let (_, _, message) = condition(&obj, "Ready").ok_or("no Ready condition")?;
    let command = format!(
        "awx-token-operator login --url {} --client-id {client_id} --namespace {} --name {NAME} --allow-insecure-http",
        s.awx.url.trim_end_matches('/'),
        s.ns
    );
    ensure_eq!(
        message,
        format!(
            "the sign-in can no longer be renewed (its refresh token expired, was revoked or was \
             already used, or the user was disabled); sign in again with: {command}. The Secret \
             keeps its previous token."
        ),
        "Ready's message gives the exact command"
    );
    ensure!(
        !message.contains(&client_secret) && !message.contains(&third),
        "no secret in the message"
    );
    // The consumer's last token is not revoked by the failure.
    ensure_kept_and_working(&env, &s, &third, "after the sign-in expired").await?;
    // The dead sign-in's access token, which AWX would keep for 1000 years, is revoked.
    wait_for(
        "the expired sign-in's access token to be revoked",
        READY_TIMEOUT,
        || async {
            Ok(sign_in_tokens(&s.awx, &s.user)
                .await?
                .is_empty()
                .then_some(()))
        },
    )
    .await?;

    // Signing in again, as the message says, brings the AwxToken back.
    s.awx.set_lifetimes(None, Some(2_628_000)).await?;
    patch_renewal(&env, &s.ns, r#"{"refreshTokenLifetime":null}"#)?;
    let sign_in_again = || {
        login(
            &env,
            &s.awx.url,
            &s.ns,
            &client_id,
            &secret_file,
            (&s.user, &s.password),
        )
    };
    sign_in_again().await?;
    wait_ready(&env, &s.ns, NAME, "True", None).await?;
    deleted_session_says_to_sign_in_again(&env, &s, &command).await?;

    // Signing in again replaces the broken sign-in, whose pair is revoked.
    sign_in_again().await?;
    wait_condition(&env, &s.ns, NAME, "RenewalFailed", "False", "Renewing").await?;
    let consumer = env
        .secret_value(&s.ns, NAME, "token")
        .await?
        .ok_or("no token in the target Secret")?;
    ensure_eq!(
        s.awx.whoami(&consumer).await?,
        Some(s.user.clone()),
        "the consumer's token from the new sign-in works"
    );
    wait_for(
        "one sign-in access token: the new sign-in's",
        READY_TIMEOUT,
        || async { Ok((sign_in_tokens(&s.awx, &s.user).await?.len() == 1).then_some(())) },
    )
    .await?;

    // Deleting the AwxToken revokes everything: the consumer's token and the sign-in.
    env.kubectl(&[
        "delete",
        "awxt",
        NAME,
        "-n",
        &s.ns,
        "--wait=true",
        "--timeout=60s",
    ])?;
    let live = s.awx.live_token_rows(&s.user).await?;
    ensure!(live.is_empty(), "no token of the user is alive: {live:?}");
    let refresh = s.awx.refresh_token_rows(&s.user).await?;
    ensure!(
        refresh.iter().all(|r| r["revoked"] == Value::Bool(true)),
        "every refresh token is revoked: {refresh:?}"
    );
    Ok(())
}

/// The ids of `user`'s live access tokens of an application: a sign-in's own (the consumers'
/// are personal tokens, of no application).
async fn sign_in_tokens(awx: &crate::support::Standin, user: &str) -> Result<Vec<u64>, String> {
    Ok(awx
        .live_token_rows(user)
        .await?
        .iter()
        .filter(|r| !r["application"].is_null())
        .filter_map(|r| r["id"].as_u64())
        .collect())
}

/// A person deletes the sign-in's access token in AWX, just after its refresh: AWX refuses
/// it (401), and fails (500) on every refresh of its pair (docs/awx-protocol.md#delete-token).
/// The operator refreshes once, then fails with a backoff and the command that signs in
/// again; the consumer's token is left alone.
async fn deleted_session_says_to_sign_in_again(
    env: &Env,
    s: &crate::scenarios::Setup,
    command: &str,
) -> TestResult {
    let consumer = env
        .secret_value(&s.ns, NAME, "token")
        .await?
        .ok_or("no token in the target Secret")?;
    let session = sign_in_tokens(&s.awx, &s.user).await?;
    ensure_eq!(session.len(), 1, "one sign-in access token: {session:?}");
    s.awx
        .delete_token_id_as_user(session[0], &s.user, &s.password)
        .await?;
    let before = s.awx.requests().await?.len();
    env.kubectl(&[
        "annotate",
        "--overwrite",
        "awxt",
        NAME,
        "-n",
        &s.ns,
        "awx-token-operator.io/rotate=after-delete",
    ])?;
    // Ready stays True (the Secret's token works); the renewal's failure has its condition.
    let obj = wait_condition(env, &s.ns, NAME, "RenewalFailed", "True", "AwxServerError").await?;
    let requests: Vec<(String, String, u64)> = s.awx.requests().await?[before..]
        .iter()
        .map(|r| {
            (
                r["method"].as_str().unwrap_or_default().to_owned(),
                r["path"].as_str().unwrap_or_default().to_owned(),
                r["status"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    let expected = [
        ("POST".to_owned(), "/api/v2/tokens/".to_owned(), 401),
        ("POST".to_owned(), "/api/o/token/".to_owned(), 500),
    ];
    ensure!(
        requests.starts_with(&expected),
        "the refused token, then one refresh of the sign-in: {requests:?}"
    );
    ensure!(
        requests.len() <= expected.len() * 2,
        "no more than one retry after the first backoff: {requests:?}"
    );
    let message = obj["status"]["lastFailureMessage"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(
        message.contains(&format!(
            "for a sign-in that means signing in again with: {command}"
        )),
        "the failure gives the exact command: {message}"
    );
    ensure!(!message.contains(&consumer), "no secret in the message");
    ensure_kept_and_working(env, s, &consumer, "after the failed refresh").await
}

/// The target Secret still holds the consumer's `token`, and it works at AWX.
async fn ensure_kept_and_working(
    env: &Env,
    s: &crate::scenarios::Setup,
    token: &str,
    when: &str,
) -> TestResult {
    ensure_eq!(
        env.secret_value(&s.ns, NAME, "token").await?,
        Some(token.to_owned()),
        "the Secret keeps the consumer's token {when}"
    );
    ensure_eq!(
        s.awx.whoami(token).await?,
        Some(s.user.clone()),
        "the consumer's token works {when}"
    );
    Ok(())
}

/// The sign-in as a person does it: a real headless chromium (through chromedriver) opens the
/// URL `login` prints, logs in, approves; the AwxToken becomes Ready with a working personal
/// token, two forced renewals rotate it make-before-break, and the password is nowhere in the
/// cluster (no Secret, no byte of etcd) before or after.
pub async fn signin_real_browser_signs_in_and_consumers_rotate_with_no_password_in_the_cluster(
    env: Arc<Env>,
) -> TestResult {
    let Some((chromium, driver)) = webdriver::installed() else {
        if std::env::var_os("AWXTO_REQUIRE_BROWSER").is_some() {
            return Err("chromium and chromedriver are required (AWXTO_REQUIRE_BROWSER)".into());
        }
        return crate::support::skip(
            "no chromium and chromedriver (Debian: chromium chromium-driver)",
        );
    };
    let awx = env.private_standin("signin-browser", "awx")?;
    let s = setup_with(&env, "e2e-signin-browser", awx, &[]).await?;
    env.remember_secret(&s.password);
    let (client_id, client_secret) = s
        .awx
        .create_code_app(&format!("{}-app", s.ns), "http://127.0.0.1/callback")
        .await?;
    env.remember_secret(&client_secret);
    let secret_file = env.run_dir.join(format!("{}-client-secret", s.ns));
    std::fs::write(&secret_file, &client_secret).map_err(|e| e.to_string())?;
    let profile = env.run_dir.join(format!("{}-chromium", s.ns));
    let browser = Browser::start(&chromium, &driver, &profile).await?;
    let signed_in = login_with(
        &env,
        &s.awx.url,
        &s.ns,
        &client_id,
        &secret_file,
        (&s.user, &s.password),
        Some(&browser),
    )
    .await;
    browser.quit().await;
    signed_in?;
    short_grace(&env, &s.ns)?;
    wait_ready(&env, &s.ns, NAME, "True", None).await?;
    let first = env
        .secret_value(&s.ns, NAME, "token")
        .await?
        .ok_or("no token in the target Secret")?;
    ensure_eq!(
        s.awx.whoami(&first).await?,
        Some(s.user.clone()),
        "the token signed in through chromium works"
    );
    ensure_password_absent(&env, &s.password, &first)?;
    let last = consumers_rotate_as_documented(&env, &s, &first).await?;
    ensure_eq!(
        env.secret_value(&s.ns, NAME, "token").await?,
        Some(last),
        "the target Secret holds the last renewal's token"
    );
    // Nothing the renewals wrote brought the password in.
    ensure_password_absent(&env, &s.password, &first)
}
