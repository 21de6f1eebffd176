//! The end-to-end scenarios. Each uses its own namespace, AWX users and operator process.

use std::{sync::Arc, time::Duration};

use serde_json::{Value, json};

use crate::support::{Env, Operator, Standin, TestResult, condition, sha256_hex, wait_for};

pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// An AwxToken manifest; `extra` is merged into spec.
pub fn awx_token(ns: &str, name: &str, url: &str, grant: &str, creds: &str, extra: Value) -> Value {
    let mut spec = json!({
        "awx": {"url": url, "allowInsecureHttp": true, "timeoutSeconds": 5},
        "grant": {"type": grant, "credentialsSecretRef": {"name": creds}},
    });
    merge(&mut spec, &extra);
    json!({"apiVersion": "awx-token-operator.io/v1alpha1", "kind": "AwxToken",
        "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

fn merge(base: &mut Value, extra: &Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e.clone(),
    }
}

/// Waits until the AwxToken's Ready condition has `status` (and `reason`, if given).
pub async fn wait_ready(
    env: &Env,
    ns: &str,
    name: &str,
    status: &str,
    reason: Option<&str>,
) -> Result<Value, String> {
    let what = format!("{ns}/{name} Ready={status} {reason:?}");
    let last = std::sync::Mutex::new(None);
    let r = wait_for(&what, READY_TIMEOUT, || {
        let obj = env.awx_token(ns, name);
        let last = &last;
        async move {
            let Some(obj) = obj.await? else {
                return Ok(None);
            };
            let cond = condition(&obj, "Ready");
            *last.lock().map_err(|e| e.to_string())? = cond.clone();
            Ok(cond
                .filter(|(s, r, _)| s == status && reason.is_none_or(|want| want == r))
                .map(|_| obj))
        }
    })
    .await;
    r.map_err(|e| {
        format!(
            "{e}; last Ready condition: {:?}",
            last.lock().map(|l| l.clone())
        )
    })
}

/// Waits until the Secret holds a token different from `not` and returns it.
pub async fn wait_token(
    env: &Env,
    ns: &str,
    secret: &str,
    not: Option<&str>,
) -> Result<String, String> {
    wait_for(
        &format!("a new token in {ns}/{secret}"),
        READY_TIMEOUT,
        || async {
            Ok(env
                .secret_value(ns, secret, "token")
                .await?
                .filter(|t| Some(t.as_str()) != not))
        },
    )
    .await
}

/// A namespace, an operator for it, and an AWX user with a password application.
pub struct Setup {
    pub ns: String,
    pub op: Operator,
    pub awx: Arc<Standin>,
    pub user: String,
    pub password: String,
}

pub async fn setup(env: &Env, ns: &str, mode: &str, op_args: &[&str]) -> Result<Setup, String> {
    let awx = env.standin(mode)?;
    setup_with(env, ns, awx, op_args).await
}

pub async fn setup_with(
    env: &Env,
    ns: &str,
    awx: Arc<Standin>,
    op_args: &[&str],
) -> Result<Setup, String> {
    let ns = env.namespace(ns).await?;
    let user = format!("{ns}-bot");
    let password = format!("pw-{}", sha256_hex(&ns).get(..16).unwrap_or_default());
    awx.create_user(&user, &password).await?;
    let op = env.start_operator(&ns, op_args)?;
    Ok(Setup {
        ns,
        op,
        awx,
        user,
        password,
    })
}

impl Setup {
    /// Credentials Secret `name` for the password grant with a new application.
    /// Credentials Secret `creds` for a new password application, an AwxToken `name` using
    /// them (`extra` merged into its spec), Ready: returns the AwxToken and its token.
    pub async fn issue(
        &self,
        env: &Env,
        name: &str,
        creds: &str,
        extra: Value,
    ) -> Result<(Value, String), String> {
        self.password_credentials(env, creds).await?;
        env.apply(&awx_token(
            &self.ns,
            name,
            &self.awx.url,
            "Password",
            creds,
            extra,
        ))?;
        let obj = wait_ready(env, &self.ns, name, "True", None).await?;
        let token = env
            .secret_value(&self.ns, name, "token")
            .await?
            .ok_or("no token")?;
        Ok((obj, token))
    }

    pub async fn password_credentials(&self, env: &Env, name: &str) -> TestResult {
        let (id, secret) = self
            .awx
            .create_app(&format!("{}-{name}", self.ns), "password", &self.user)
            .await?;
        env.credentials(
            &self.ns,
            name,
            &[
                ("username", &self.user),
                ("password", &self.password),
                ("client_id", &id),
                ("client_secret", &secret),
            ],
        )
    }
}

pub async fn password_grant_issues_a_working_token(env: Arc<Env>) -> TestResult {
    let s = setup(&env, "e2e-password", "awx", &[]).await?;
    s.password_credentials(&env, "awx-bot").await?;
    env.apply(&awx_token(
        &s.ns,
        "ci-bot",
        &s.awx.url,
        "Password",
        "awx-bot",
        json!({}),
    ))?;
    let obj = wait_ready(&env, &s.ns, "ci-bot", "True", Some("TokenReady")).await?;
    let secret = env.secret(&s.ns, "ci-bot").await?.ok_or("no Secret")?;
    let data = secret.data.clone().unwrap_or_default();
    let keys: Vec<_> = data.keys().cloned().collect();
    ensure_eq!(
        keys,
        vec!["host".to_string(), "token".to_string()],
        "Secret keys"
    );
    ensure_eq!(
        String::from_utf8_lossy(&data["host"].0),
        s.awx.url,
        "host key"
    );
    let token = env
        .secret_value(&s.ns, "ci-bot", "token")
        .await?
        .ok_or("no token")?;
    ensure_eq!(token.len(), 30, "AWX tokens are 30 characters");
    ensure_eq!(
        s.awx.whoami(&token).await?,
        Some(s.user.clone()),
        "token works as the user"
    );
    let status = &obj["status"];
    for field in ["issuedAt", "expiresAt", "renewalTime"] {
        ensure!(
            status[field].is_string(),
            "status.{field} missing: {status}"
        );
    }
    ensure_eq!(status["secretName"], "ci-bot", "status.secretName");
    ensure_eq!(status["flavor"], "Controller", "detected flavour");
    ensure_eq!(status["scope"], "write", "scope");
    ensure_eq!(status["user"], s.user.as_str(), "status.user");
    let text = serde_json::to_string(status).unwrap_or_default();
    ensure!(!text.contains(&token), "status leaks the token");
    let table = env.kubectl(&["get", "awxt", "-n", &s.ns])?;
    let header: Vec<_> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    ensure_eq!(
        header,
        vec!["NAME", "READY", "SECRET", "EXPIRES", "RENEWS", "AGE"],
        "printer columns"
    );
    let row: Vec<_> = table
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    ensure_eq!(
        row.get(..3),
        Some(&["ci-bot", "True", "ci-bot"][..]),
        "printer row"
    );

    // Idempotent: an unchanged healthy resource makes no AWX request and no write.
    let requests_before = s.awx.requests_for(&s.user).await?.len();
    let rv = secret.metadata.resource_version.clone();
    let status_rv = obj["metadata"]["resourceVersion"].clone();
    env.kubectl(&["annotate", "awxt", "ci-bot", "-n", &s.ns, "touch=1"])?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = env.secret(&s.ns, "ci-bot").await?.ok_or("Secret gone")?;
    ensure_eq!(
        after.metadata.resource_version,
        rv,
        "Secret rewritten without change"
    );
    ensure_eq!(
        s.awx.requests_for(&s.user).await?.len(),
        requests_before,
        "AWX requests without change"
    );
    let obj2 = env.awx_token(&s.ns, "ci-bot").await?.ok_or("gone")?;
    ensure!(
        obj2["metadata"]["resourceVersion"] != status_rv,
        "the annotation must have changed the object"
    );
    ensure_eq!(
        obj2["status"],
        obj["status"],
        "status rewritten without change"
    );
    Ok(())
}

pub async fn personal_access_token_is_issued_and_counted(env: Arc<Env>) -> TestResult {
    let s = setup(&env, "e2e-pat", "awx", &[]).await?;
    env.credentials(
        &s.ns,
        "pat-creds",
        &[("username", &s.user), ("password", &s.password)],
    )?;
    env.apply(&awx_token(
        &s.ns,
        "pat",
        &s.awx.url,
        "PersonalAccessToken",
        "pat-creds",
        json!({"grant": {"scope": "read"}}),
    ))?;
    let obj = wait_ready(&env, &s.ns, "pat", "True", None).await?;
    let token = env
        .secret_value(&s.ns, "pat", "token")
        .await?
        .ok_or("no token")?;
    ensure_eq!(
        s.awx.whoami(&token).await?,
        Some(s.user.clone()),
        "PAT works"
    );
    ensure!(
        obj["status"]["tokenId"].is_u64(),
        "tokenId reported: {}",
        obj["status"]
    );
    ensure_eq!(obj["status"]["scope"], "read", "scope");
    ensure_eq!(
        s.awx.live_tokens(&s.user).await?,
        vec![sha256_hex(&token)],
        "exactly one live token"
    );
    Ok(())
}

pub async fn client_credentials_against_generic_oauth2(env: Arc<Env>) -> TestResult {
    let s = setup(&env, "e2e-cc", "generic", &[]).await?;
    let (id, secret) = s
        .awx
        .create_app(&format!("{}-cc", s.ns), "client-credentials", &s.user)
        .await?;
    env.credentials(
        &s.ns,
        "cc-creds",
        &[("client_id", &id), ("client_secret", &secret)],
    )?;
    env.apply(&awx_token(
        &s.ns,
        "cc",
        &s.awx.url,
        "ClientCredentials",
        "cc-creds",
        json!({"awx": {"flavor": "Controller"}}),
    ))?;
    wait_ready(&env, &s.ns, "cc", "True", None).await?;
    let token = env
        .secret_value(&s.ns, "cc", "token")
        .await?
        .ok_or("no token")?;
    ensure_eq!(
        s.awx.whoami(&token).await?,
        Some(s.user.clone()),
        "client-credentials token works"
    );
    Ok(())
}

pub async fn client_credentials_refused_by_awx_with_a_clear_message(env: Arc<Env>) -> TestResult {
    let s = setup(&env, "e2e-cc-awx", "awx", &[]).await?;
    let (id, secret) = s
        .awx
        .create_app(&format!("{}-app", s.ns), "password", &s.user)
        .await?;
    env.credentials(
        &s.ns,
        "cc-creds",
        &[("client_id", &id), ("client_secret", &secret)],
    )?;
    env.apply(&awx_token(
        &s.ns,
        "cc",
        &s.awx.url,
        "ClientCredentials",
        "cc-creds",
        json!({}),
    ))?;
    let obj = wait_ready(&env, &s.ns, "cc", "False", Some("GrantNotSupported")).await?;
    let (_, _, message) = condition(&obj, "Ready").unwrap_or_default();
    ensure!(
        message.contains("support only the password and authorization-code grants")
            && message.contains("PersonalAccessToken"),
        "message must say what AWX supports: {message}"
    );
    ensure!(
        env.secret(&s.ns, "cc").await?.is_none(),
        "no Secret without a token"
    );
    Ok(())
}

pub async fn gateway_flavor_is_detected_and_used(env: Arc<Env>) -> TestResult {
    let s = setup(&env, "e2e-gateway", "gateway", &[]).await?;
    s.password_credentials(&env, "gw-creds").await?;
    env.apply(&awx_token(
        &s.ns,
        "gw",
        &s.awx.url,
        "Password",
        "gw-creds",
        json!({}),
    ))?;
    let obj = wait_ready(&env, &s.ns, "gw", "True", None).await?;
    ensure_eq!(obj["status"]["flavor"], "Gateway", "detected flavour");
    let token = env
        .secret_value(&s.ns, "gw", "token")
        .await?
        .ok_or("no token")?;
    ensure_eq!(
        s.awx.whoami(&token).await?,
        Some(s.user.clone()),
        "gateway token works"
    );
    // Personal token through the gateway, explicitly selected.
    env.credentials(
        &s.ns,
        "gw-pat-creds",
        &[("username", &s.user), ("password", &s.password)],
    )?;
    env.apply(&awx_token(
        &s.ns,
        "gw-pat",
        &s.awx.url,
        "PersonalAccessToken",
        "gw-pat-creds",
        json!({"awx": {"flavor": "Gateway"}}),
    ))?;
    wait_ready(&env, &s.ns, "gw-pat", "True", None).await?;
    let pat = env
        .secret_value(&s.ns, "gw-pat", "token")
        .await?
        .ok_or("no token")?;
    ensure_eq!(
        s.awx.whoami(&pat).await?,
        Some(s.user.clone()),
        "gateway PAT works"
    );
    Ok(())
}

pub async fn renewal_by_age_is_make_before_break(env: Arc<Env>) -> TestResult {
    let s = setup(&env, "e2e-renew", "awx", &[]).await?;
    s.password_credentials(&env, "creds").await?;
    let renewal = json!({"renewal": {"rotateEvery": "8s", "revokeGracePeriod": "5s"}});
    env.apply(&awx_token(
        &s.ns, "rot", &s.awx.url, "Password", "creds", renewal,
    ))?;
    wait_ready(&env, &s.ns, "rot", "True", None).await?;
    let first = env
        .secret_value(&s.ns, "rot", "token")
        .await?
        .ok_or("no token")?;
    let second = wait_token(&env, &s.ns, "rot", Some(&first)).await?;
    ensure_eq!(
        s.awx.whoami(&second).await?,
        Some(s.user.clone()),
        "new token works"
    );
    ensure_eq!(
        s.awx.whoami(&first).await?,
        Some(s.user.clone()),
        "old token still works inside the grace period"
    );
    wait_for(
        "the old token to be revoked",
        Duration::from_secs(30),
        || async { Ok(s.awx.whoami(&first).await?.is_none().then_some(())) },
    )
    .await?;
    // Stop rotating; afterwards exactly the token in the Secret is alive.
    env.apply(&awx_token(
        &s.ns,
        "rot",
        &s.awx.url,
        "Password",
        "creds",
        json!({"renewal": {"rotateEvery": "1h", "revokeGracePeriod": "5s"}}),
    ))?;
    wait_for(
        "one live token, the one in the Secret",
        Duration::from_secs(40),
        || async {
            let current = env
                .secret_value(&s.ns, "rot", "token")
                .await?
                .unwrap_or_default();
            let live = s.awx.live_tokens(&s.user).await?;
            let obj = env.awx_token(&s.ns, "rot").await?.unwrap_or_default();
            let pending = obj["status"]["pendingRevocations"].as_u64().unwrap_or(0);
            Ok((pending == 0 && live == vec![sha256_hex(&current)]).then_some(()))
        },
    )
    .await?;
    let metrics = s.op.metrics().await?;
    ensure!(
        metrics.contains(
            "awx_token_operator_tokens_renewed_total{grant=\"Password\",flavor=\"Controller\"}"
        ),
        "renewals counted"
    );
    Ok(())
}

pub async fn refresh_strategy_keeps_the_chain_alive(env: Arc<Env>) -> TestResult {
    // A stand-in of its own, so every refresh in its log is this scenario's.
    let awx = env.private_standin("refresh", "awx")?;
    let s = setup_with(&env, "e2e-refresh", awx, &[]).await?;
    s.password_credentials(&env, "creds").await?;
    let extra = json!({"renewal": {"rotateEvery": "6s", "strategy": "Refresh"}});
    env.apply(&awx_token(
        &s.ns, "ref", &s.awx.url, "Password", "creds", extra,
    ))?;
    let obj = wait_ready(&env, &s.ns, "ref", "True", None).await?;
    ensure!(
        obj["status"]["refreshTokenExpiresAt"].is_string(),
        "refreshTokenExpiresAt: {}",
        obj["status"]
    );
    let mut token = env
        .secret_value(&s.ns, "ref", "token")
        .await?
        .ok_or("no token")?;
    for round in 0..2 {
        let next = wait_token(&env, &s.ns, "ref", Some(&token)).await?;
        let works = s.awx.whoami(&next).await?;
        // A refresh deletes the token it replaces at once: on a loaded machine the token read
        // may already be replaced by the next refresh. It may be dead only if the Secret has
        // moved on.
        if works.is_none() {
            let now = env.secret_value(&s.ns, "ref", "token").await?;
            ensure!(
                now.as_deref() != Some(next.as_str()),
                "refreshed token works (round {round}): the Secret's token answers 401"
            );
        } else {
            ensure_eq!(
                works,
                Some(s.user.clone()),
                "refreshed token works (round {round})"
            );
        }
        ensure_eq!(
            s.awx.whoami(&token).await?,
            None,
            "the refresh grant killed the old token (round {round})"
        );
        token = next;
    }
    let requests = s.awx.requests().await?;
    let refreshes = requests
        .iter()
        .filter(|r| r["grant_type"] == "refresh_token")
        .count();
    let passwords = requests
        .iter()
        .filter(|r| r["grant_type"] == "password" && r["user"] == s.user.as_str())
        .count();
    ensure!(refreshes >= 2, "refresh grant used: {refreshes}");
    ensure_eq!(
        passwords,
        1,
        "only the first token came from the password grant"
    );
    ensure!(
        !requests.iter().any(|r| r["error"] == "invalid_grant"),
        "no refresh token was used twice"
    );
    Ok(())
}

pub async fn forced_rotation_and_suspend(env: Arc<Env>) -> TestResult {
    let s = setup(&env, "e2e-force", "awx", &[]).await?;
    let (_, first) = s.issue(&env, "f", "creds", json!({})).await?;
    env.kubectl(&[
        "annotate",
        "awxt",
        "f",
        "-n",
        &s.ns,
        "awx-token-operator.io/rotate=one",
    ])?;
    let second = wait_token(&env, &s.ns, "f", Some(&first)).await?;
    let obj = wait_for("rotatedFor=one", READY_TIMEOUT, || async {
        Ok(env
            .awx_token(&s.ns, "f")
            .await?
            .filter(|o| o["status"]["rotatedFor"] == "one"))
    })
    .await?;
    ensure_eq!(
        condition(&obj, "Ready").map(|c| c.0),
        Some("True".into()),
        "Ready after rotation"
    );

    // Suspended: no AWX traffic at all, even when rotation is asked for.
    env.apply(&awx_token(
        &s.ns,
        "f",
        &s.awx.url,
        "Password",
        "creds",
        json!({"suspend": true}),
    ))?;
    wait_ready(&env, &s.ns, "f", "True", Some("Suspended")).await?;
    // One token per rotation: the first issue and the one for "one", never a second for it.
    let grants = s
        .awx
        .requests_for(&s.user)
        .await?
        .iter()
        .filter(|r| r["grant_type"] == "password")
        .count();
    ensure_eq!(
        grants,
        2,
        "password grants for the first issue and one rotation"
    );
    let before = s.awx.requests_for(&s.user).await?.len();
    env.kubectl(&[
        "annotate",
        "--overwrite",
        "awxt",
        "f",
        "-n",
        &s.ns,
        "awx-token-operator.io/rotate=two",
    ])?;
    poke_and_wait_for_a_look(&env, &s.ns, "f", "suspended").await?;
    ensure_eq!(
        s.awx.requests_for(&s.user).await?.len(),
        before,
        "requests while suspended"
    );
    ensure_eq!(
        env.secret_value(&s.ns, "f", "token").await?,
        Some(second.clone()),
        "Secret while suspended"
    );

    env.apply(&awx_token(
        &s.ns,
        "f",
        &s.awx.url,
        "Password",
        "creds",
        json!({"suspend": false}),
    ))?;
    let third = wait_token(&env, &s.ns, "f", Some(&second)).await?;
    ensure_eq!(
        s.awx.whoami(&third).await?,
        Some(s.user.clone()),
        "token after resume"
    );

    // Suspended again, then deleted: its tokens are still revoked.
    env.apply(&awx_token(
        &s.ns,
        "f",
        &s.awx.url,
        "Password",
        "creds",
        json!({"suspend": true}),
    ))?;
    wait_ready(&env, &s.ns, "f", "True", Some("Suspended")).await?;
    env.kubectl(&["delete", "awxt", "f", "-n", &s.ns, "--wait=false"])?;
    wait_for("the AwxToken gone", READY_TIMEOUT, || async {
        Ok(env.awx_token(&s.ns, "f").await?.is_none().then_some(()))
    })
    .await?;
    ensure_eq!(
        s.awx.whoami(&third).await?,
        None,
        "a suspended AwxToken's token is revoked on delete"
    );
    ensure_eq!(
        s.awx.live_tokens(&s.user).await?,
        Vec::<String>::new(),
        "no token of the user left"
    );
    Ok(())
}

pub async fn credentials_change_reissues_for_the_new_user(env: Arc<Env>) -> TestResult {
    let s = setup(&env, "e2e-creds", "awx", &[]).await?;
    let (_, first) = s
        .issue(
            &env,
            "c",
            "creds",
            json!({"renewal": {"revokeGracePeriod": "2s"}}),
        )
        .await?;
    let other = format!("{}-other", s.ns);
    let other_pw = "another-password-42";
    s.awx.create_user(&other, other_pw).await?;
    let (id, secret) = s
        .awx
        .create_app(&format!("{}-app2", s.ns), "password", &other)
        .await?;
    env.credentials(
        &s.ns,
        "creds",
        &[
            ("username", &other),
            ("password", other_pw),
            ("client_id", &id),
            ("client_secret", &secret),
        ],
    )?;
    let second = wait_token(&env, &s.ns, "c", Some(&first)).await?;
    ensure_eq!(
        s.awx.whoami(&second).await?,
        Some(other.clone()),
        "new token acts as the new user"
    );
    wait_for(
        "the first user's token to be revoked",
        Duration::from_secs(30),
        || async { Ok(s.awx.whoami(&first).await?.is_none().then_some(())) },
    )
    .await?;
    let obj = wait_ready(&env, &s.ns, "c", "True", None).await?;
    ensure_eq!(obj["status"]["user"], other.as_str(), "status.user");
    Ok(())
}

pub async fn wrong_password_fails_without_hot_loop_and_keeps_secret(env: Arc<Env>) -> TestResult {
    let s = setup(&env, "e2e-wrongpw", "awx", &[]).await?;
    let (id, secret) = s
        .awx
        .create_app(&format!("{}-app", s.ns), "password", &s.user)
        .await?;
    env.credentials(
        &s.ns,
        "creds",
        &[
            ("username", &s.user),
            ("password", &s.password),
            ("client_id", &id),
            ("client_secret", &secret),
        ],
    )?;
    env.apply(&awx_token(
        &s.ns,
        "w",
        &s.awx.url,
        "Password",
        "creds",
        json!({}),
    ))?;
    wait_ready(&env, &s.ns, "w", "True", None).await?;
    let good = env.secret(&s.ns, "w").await?.ok_or("no Secret")?;
    let good_token = env
        .secret_value(&s.ns, "w", "token")
        .await?
        .ok_or("no token")?;
    let before = s.awx.requests_for(&s.user).await?.len();

    env.credentials(
        &s.ns,
        "creds",
        &[
            ("username", &s.user),
            ("password", "wrong-password-1"),
            ("client_id", &id),
            ("client_secret", &secret),
        ],
    )?;
    // The token in the Secret still works: Ready stays True, the failure has its own condition.
    let obj = wait_condition(
        &env,
        &s.ns,
        "w",
        "RenewalFailed",
        "True",
        "InvalidCredentials",
    )
    .await?;
    ensure_eq!(
        condition(&obj, "Ready").map(|c| (c.0, c.1)),
        Some(("True".to_string(), "TokenReady".to_string())),
        "Ready while the renewal fails"
    );
    let (_, _, message) = condition(&obj, "RenewalFailed").unwrap_or_default();
    ensure!(
        message.contains("username or password"),
        "message names the cause: {message}"
    );
    ensure!(
        !message.contains("wrong-password-1"),
        "message leaks the password"
    );
    ensure_eq!(obj["status"]["failedAttempts"], 1, "failedAttempts");
    // Wake it up again and again (the operator's own writes, edits of the object, a restart):
    // one refusal is exactly one request until the credentials change.
    let mut op = s.op;
    for round in 0..3 {
        if round == 2 {
            op.restart()?;
        }
        poke_and_wait_for_a_look(&env, &s.ns, "w", &format!("look-{round}")).await?;
    }
    let after = s.awx.requests_for(&s.user).await?.len();
    ensure_eq!(
        after - before,
        1,
        "AWX requests for the wrong password, woken 3 times and restarted once"
    );
    let obj = env.awx_token(&s.ns, "w").await?.ok_or("gone")?;
    ensure_eq!(
        obj["status"]["failedAttempts"],
        1,
        "failedAttempts after a restart"
    );
    let now = env.secret(&s.ns, "w").await?.ok_or("Secret gone")?;
    ensure_eq!(now.data, good.data, "the Secret keeps its last good token");
    ensure_eq!(
        s.awx.whoami(&good_token).await?,
        Some(s.user.clone()),
        "the last good token still works"
    );
    Ok(())
}

/// Waits until condition `type_` of the AwxToken has `status` and `reason`.
pub async fn wait_condition(
    env: &Env,
    ns: &str,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> Result<Value, String> {
    wait_for(
        &format!("{ns}/{name} {type_}={status} {reason}"),
        READY_TIMEOUT,
        || async {
            let Some(obj) = env.awx_token(ns, name).await? else {
                return Ok(None);
            };
            Ok(condition(&obj, type_)
                .filter(|(s, r, _)| s == status && r == reason)
                .map(|_| obj))
        },
    )
    .await
}

/// Changes the AwxToken's spec (a label of its Secret) and waits until its status reports the
/// new generation: proof that the operator looked at it since, whatever it decided.
pub async fn poke_and_wait_for_a_look(env: &Env, ns: &str, name: &str, value: &str) -> TestResult {
    let patch = json!({"spec": {"secret": {"labels": {"e2e.awx-token-operator.io/poke": value}}}});
    env.kubectl(&[
        "patch",
        "awxt",
        name,
        "-n",
        ns,
        "--type",
        "merge",
        "-p",
        &patch.to_string(),
    ])?;
    wait_for(
        &format!("{ns}/{name} to be looked at after poke {value}"),
        READY_TIMEOUT,
        || async {
            let Some(obj) = env.awx_token(ns, name).await? else {
                return Ok(None);
            };
            let generation = obj["metadata"]["generation"].as_i64();
            let seen = obj["status"]["observedGeneration"].as_i64();
            Ok((generation.is_some() && seen == generation).then_some(()))
        },
    )
    .await
}

pub async fn awx_down_then_back_recovers(env: Arc<Env>) -> TestResult {
    let awx = env.private_standin("down", "awx")?;
    // The token must still be the Secret's when it is checked, less than one 5 s rotation after
    // recovery: a password grant at AWX's hashing cost takes seconds on a loaded machine.
    awx.set_password_cost(1000).await?;
    let s = setup_with(&env, "e2e-down", awx, &[]).await?;
    let (_, before) = s
        .issue(
            &env,
            "d",
            "creds",
            json!({"renewal": {"rotateEvery": "5s", "revokeGracePeriod": "1s"}}),
        )
        .await?;
    s.awx.stop();
    let obj = wait_condition(&env, &s.ns, "d", "RenewalFailed", "True", "AwxUnreachable").await?;
    ensure_eq!(
        condition(&obj, "Ready").map(|c| c.0),
        Some("True".to_string()),
        "Ready while AWX is down: the Secret's token still works"
    );
    ensure_eq!(
        env.secret_value(&s.ns, "d", "token").await?,
        Some(before.clone()),
        "Secret keeps its token while AWX is down"
    );
    let (_, _, message) = condition(&obj, "RenewalFailed").unwrap_or_default();
    ensure!(
        message.contains("127.0.0.1"),
        "message names the host: {message}"
    );
    wait_for(
        "failedAttempts >= 3 (backing off)",
        READY_TIMEOUT,
        || async {
            let o = env.awx_token(&s.ns, "d").await?.unwrap_or_default();
            Ok((o["status"]["failedAttempts"].as_u64().unwrap_or(0) >= 3).then_some(()))
        },
    )
    .await?;
    s.awx.restart()?;
    wait_condition(&env, &s.ns, "d", "RenewalFailed", "False", "Renewing").await?;
    let mut after = wait_token(&env, &s.ns, "d", Some(&before)).await?;
    // A 5 s rotation with a 1 s grace period may replace and revoke it between the read and
    // the check on a loaded machine: then the Secret has moved on, and its token must work.
    let mut works = false;
    for _ in 0..3 {
        match s.awx.whoami(&after).await? {
            Some(user) if user == s.user => {
                works = true;
                break;
            }
            other => {
                let again = env
                    .secret_value(&s.ns, "d", "token")
                    .await?
                    .unwrap_or_default();
                ensure!(
                    again != after,
                    "token after recovery works: {other:?}, and the Secret still holds it"
                );
                after = again;
            }
        }
    }
    ensure!(
        works,
        "token after recovery works (three replacements in a row did not)"
    );
    let obj = wait_ready(&env, &s.ns, "d", "True", Some("TokenReady")).await?;
    ensure!(
        obj["status"]["failedAttempts"].is_null(),
        "failedAttempts reset: {}",
        obj["status"]
    );
    Ok(())
}

pub async fn delete_revokes_and_secret_follows_policy(env: Arc<Env>) -> TestResult {
    let s = setup(&env, "e2e-delete", "awx", &[]).await?;
    s.password_credentials(&env, "creds").await?;
    env.apply(&awx_token(
        &s.ns,
        "del",
        &s.awx.url,
        "Password",
        "creds",
        json!({}),
    ))?;
    env.apply(&awx_token(
        &s.ns,
        "keep",
        &s.awx.url,
        "Password",
        "creds",
        json!({"secret": {"deletionPolicy": "Retain"}, "revokeOnDelete": false}),
    ))?;
    wait_ready(&env, &s.ns, "del", "True", None).await?;
    wait_ready(&env, &s.ns, "keep", "True", None).await?;
    let del = env
        .secret_value(&s.ns, "del", "token")
        .await?
        .ok_or("no token")?;
    let keep = env
        .secret_value(&s.ns, "keep", "token")
        .await?
        .ok_or("no token")?;
    env.kubectl(&["delete", "awxt", "del", "keep", "-n", &s.ns, "--wait=false"])?;
    wait_for("both AwxTokens gone", READY_TIMEOUT, || async {
        let gone = env.awx_token(&s.ns, "del").await?.is_none()
            && env.awx_token(&s.ns, "keep").await?.is_none();
        Ok(gone.then_some(()))
    })
    .await?;
    ensure_eq!(s.awx.whoami(&del).await?, None, "token revoked on delete");
    wait_for(
        "the owned Secret to be garbage-collected",
        READY_TIMEOUT,
        || async { Ok(env.secret(&s.ns, "del").await?.is_none().then_some(())) },
    )
    .await?;
    ensure_eq!(
        env.secret_value(&s.ns, "keep", "token").await?,
        Some(keep.clone()),
        "Retain keeps the Secret"
    );
    ensure_eq!(
        s.awx.whoami(&keep).await?,
        Some(s.user.clone()),
        "revokeOnDelete=false keeps the token alive"
    );
    ensure_eq!(
        s.awx.live_tokens(&s.user).await?,
        vec![sha256_hex(&keep)],
        "only the retained token lives"
    );
    Ok(())
}

/// Personal access tokens: an interrupted request is found by its tag and deleted, so nothing
/// may leak. (OAuth2 grants have one unavoidable window; the crash torture measures it.)
pub async fn operator_restarts_converge_without_leaks(env: Arc<Env>) -> TestResult {
    let mut s = setup(&env, "e2e-restart", "awx", &[]).await?;
    let names = ["r0", "r1", "r2", "r3"];
    for name in names {
        let user = format!("{}-{name}", s.ns);
        s.awx.create_user(&user, &s.password).await?;
        let creds = format!("{name}-creds");
        env.credentials(
            &s.ns,
            &creds,
            &[("username", &user), ("password", &s.password)],
        )?;
        env.apply(&awx_token(
            &s.ns,
            name,
            &s.awx.url,
            "PersonalAccessToken",
            &creds,
            json!({"renewal": {"rotateEvery": "3s", "revokeGracePeriod": "1s"}}),
        ))?;
    }
    for name in names {
        wait_ready(&env, &s.ns, name, "True", None).await?;
    }
    for i in 0..6u64 {
        tokio::time::sleep(Duration::from_millis(700 + 300 * i)).await;
        s.op.restart()?;
    }
    for name in names {
        env.apply(&awx_token(
            &s.ns,
            name,
            &s.awx.url,
            "PersonalAccessToken",
            &format!("{name}-creds"),
            json!({"renewal": {"rotateEvery": "1h", "revokeGracePeriod": "1s"}}),
        ))?;
    }
    for name in names {
        let user = format!("{}-{name}", s.ns);
        wait_for(
            &format!("{name}: exactly the Secret's token alive"),
            Duration::from_secs(90),
            || async {
                let obj = env.awx_token(&s.ns, name).await?.unwrap_or_default();
                let ready = condition(&obj, "Ready").is_some_and(|c| c.0 == "True");
                let pending = obj["status"]["pendingRevocations"].as_u64().unwrap_or(0);
                let current = env
                    .secret_value(&s.ns, name, "token")
                    .await?
                    .unwrap_or_default();
                let live = s.awx.live_tokens(&user).await?;
                Ok((ready && pending == 0 && live == vec![sha256_hex(&current)]).then_some(()))
            },
        )
        .await?;
        let token = env
            .secret_value(&s.ns, name, "token")
            .await?
            .unwrap_or_default();
        ensure_eq!(
            s.awx.whoami(&token).await?,
            Some(user.clone()),
            "{name} works"
        );
    }
    Ok(())
}

pub async fn invalid_spec_and_conflicts_are_reported(env: Arc<Env>) -> TestResult {
    let s = setup(
        &env,
        "e2e-invalid",
        "awx",
        &["--allowed-awx-hosts", "127.0.0.1"],
    )
    .await?;
    s.password_credentials(&env, "creds").await?;
    let before = s.awx.requests_for(&s.user).await?.len();
    // http without allowInsecureHttp: the API server (no CEL on 1.20) accepts it, the operator refuses.
    let mut bad = awx_token(&s.ns, "bad", &s.awx.url, "Password", "creds", json!({}));
    bad["spec"]["awx"]["allowInsecureHttp"] = json!(false);
    env.apply(&bad)?;
    let obj = wait_ready(&env, &s.ns, "bad", "False", Some("InvalidSpec")).await?;
    ensure!(
        condition(&obj, "Ready")
            .unwrap_or_default()
            .2
            .contains("spec.awx.url"),
        "message names the field"
    );
    env.apply(&awx_token(
        &s.ns,
        "elsewhere",
        "http://localhost:1/",
        "Password",
        "creds",
        json!({}),
    ))?;
    let obj = wait_ready(&env, &s.ns, "elsewhere", "False", Some("HostNotAllowed")).await?;
    ensure!(
        condition(&obj, "Ready")
            .unwrap_or_default()
            .2
            .contains("localhost:1"),
        "message names the host"
    );
    // No reach into other namespaces: a Secret of that name elsewhere is not used.
    let elsewhere = env.namespace("e2e-invalid-other").await?;
    let (other_id, other_secret) = s
        .awx
        .create_app(&format!("{}-other", s.ns), "password", &s.user)
        .await?;
    env.credentials(
        &elsewhere,
        "missing",
        &[
            ("username", &s.user),
            ("password", &s.password),
            ("client_id", &other_id),
            ("client_secret", &other_secret),
        ],
    )?;
    env.apply(&awx_token(
        &s.ns,
        "nocreds",
        &s.awx.url,
        "Password",
        "missing",
        json!({}),
    ))?;
    let obj = wait_ready(&env, &s.ns, "nocreds", "False", Some("CredentialsNotFound")).await?;
    ensure!(
        condition(&obj, "Ready")
            .unwrap_or_default()
            .2
            .contains("\"missing\""),
        "message names the Secret"
    );
    ensure_eq!(
        s.awx.requests_for(&s.user).await?.len(),
        before,
        "no AWX request for invalid resources"
    );
    // Creating the missing Secret heals it (credentials Secrets are watched).
    let (id, secret) = s
        .awx
        .create_app(&format!("{}-late", s.ns), "password", &s.user)
        .await?;
    env.credentials(
        &s.ns,
        "missing",
        &[
            ("username", &s.user),
            ("password", &s.password),
            ("client_id", &id),
            ("client_secret", &secret),
        ],
    )?;
    wait_ready(&env, &s.ns, "nocreds", "True", None).await?;
    // A Secret someone else owns is never overwritten.
    env.credentials(&s.ns, "taken", &[("token", "someone-elses-value")])?;
    env.apply(&awx_token(
        &s.ns,
        "conflict",
        &s.awx.url,
        "Password",
        "creds",
        json!({"secret": {"name": "taken"}}),
    ))?;
    wait_ready(&env, &s.ns, "conflict", "False", Some("SecretConflict")).await?;
    ensure_eq!(
        env.secret_value(&s.ns, "taken", "token").await?,
        Some("someone-elses-value".into()),
        "foreign Secret untouched"
    );
    // No polling: the conflict waits for the Secret to change, and its deletion heals it.
    env.kubectl(&["delete", "secret", "taken", "-n", &s.ns])?;
    wait_ready(&env, &s.ns, "conflict", "True", Some("TokenReady")).await?;
    let token = env
        .secret_value(&s.ns, "taken", "token")
        .await?
        .ok_or("no token in the freed Secret")?;
    ensure_eq!(
        s.awx.whoami(&token).await?,
        Some(s.user.clone()),
        "the freed Secret holds a working token"
    );
    Ok(())
}

pub async fn metrics_and_health_endpoints(env: Arc<Env>) -> TestResult {
    let s = setup(&env, "e2e-metrics", "awx", &[]).await?;
    let (_, token) = s.issue(&env, "m", "creds", json!({})).await?;
    let text = s.op.metrics().await?;
    for needle in [
        "awx_token_operator_reconciles_total{result=\"ok\"}",
        "awx_token_operator_tokens_issued_total{grant=\"Password\",flavor=\"Controller\"} 1",
        "awx_token_operator_awx_requests_total{endpoint=\"token\",status=\"2xx\"} 1",
        "awx_token_operator_awx_request_duration_seconds_count{endpoint=\"token\"} 1",
        "awx_token_operator_token_renewal_timestamp_seconds{namespace=\"e2e-metrics\",name=\"m\"}",
        "awx_token_operator_token_expiry_timestamp_seconds{namespace=\"e2e-metrics\",name=\"m\"}",
        "awx_token_operator_leader 1",
        "awx_token_operator_build_info{version=",
    ] {
        ensure!(text.contains(needle), "metrics lack {needle}");
    }
    ensure!(!text.contains(&token), "metrics leak the token");
    let health = reqwest::get(format!("http://127.0.0.1:{}/healthz", s.op.port))
        .await
        .map_err(|e| e.to_string())?;
    ensure_eq!(health.status().as_u16(), 200, "/healthz");
    let ready = reqwest::get(format!("http://127.0.0.1:{}/readyz", s.op.port))
        .await
        .map_err(|e| e.to_string())?;
    ensure_eq!(ready.status().as_u16(), 200, "/readyz");
    Ok(())
}

/// No token, password or client secret the tests saw appears in any operator log.
pub fn operator_logs_contain_no_secret(env: &Env) -> TestResult {
    let secrets = env.secrets_seen.lock().map_err(|e| e.to_string())?.clone();
    let logs = env.operator_logs.lock().map_err(|e| e.to_string())?.clone();
    ensure!(
        !secrets.is_empty() && !logs.is_empty(),
        "nothing was captured to check"
    );
    let mut bytes = 0;
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        bytes += text.len();
        for secret in &secrets {
            ensure!(
                !text.contains(secret.as_str()),
                "{} contains a secret value",
                log.display()
            );
        }
    }
    ensure!(bytes > 0, "operator logs are empty");
    // Events and AwxToken statuses of every namespace.
    let mut published = 0;
    for kind in [
        "events.events.k8s.io",
        "events",
        "awxtokens.awx-token-operator.io",
    ] {
        let text = env.kubectl(&["get", kind, "-A", "-o", "json"])?;
        published += text.len();
        for secret in &secrets {
            ensure!(
                !text.contains(secret.as_str()),
                "{kind} contain a secret value"
            );
        }
    }
    println!(
        "    checked {} secret values against {} operator logs ({bytes} bytes) and all events and statuses ({published} bytes)",
        secrets.len(),
        logs.len()
    );
    Ok(())
}

pub async fn owned_secret_is_repaired_after_edit_and_delete(env: Arc<Env>) -> TestResult {
    let s = setup(&env, "e2e-repair", "awx", &[]).await?;
    let (_, token) = s.issue(&env, "rep", "creds", json!({})).await?;
    let requests = s.awx.requests_for(&s.user).await?.len();
    env.kubectl(&[
        "patch",
        "secret",
        "rep",
        "-n",
        &s.ns,
        "--type=merge",
        "-p",
        r#"{"stringData":{"token":"tampered"}}"#,
    ])?;
    wait_for(
        "the edited Secret to be repaired",
        READY_TIMEOUT,
        || async {
            Ok(
                (env.secret_value(&s.ns, "rep", "token").await?.as_deref() == Some(token.as_str()))
                    .then_some(()),
            )
        },
    )
    .await?;
    env.kubectl(&["delete", "secret", "rep", "-n", &s.ns])?;
    wait_for("the deleted Secret to come back", READY_TIMEOUT, || async {
        Ok(
            (env.secret_value(&s.ns, "rep", "token").await?.as_deref() == Some(token.as_str()))
                .then_some(()),
        )
    })
    .await?;
    ensure_eq!(
        s.awx.requests_for(&s.user).await?.len(),
        requests,
        "repairs need no new token"
    );
    Ok(())
}

pub async fn readiness_waits_for_caches_and_json_logs_carry_the_object(
    env: Arc<Env>,
) -> TestResult {
    let s = setup(&env, "e2e-readyz", "awx", &["--log-format", "json"]).await?;
    // An operator whose API server does not answer stays alive but not ready.
    let dead = env.run_dir.join("dead.kubeconfig");
    let kubeconfig = std::fs::read_to_string(&env.kubeconfig).map_err(|e| e.to_string())?;
    let port = crate::support::free_port();
    let rewritten: String = kubeconfig
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("server:") {
                format!("    server: https://127.0.0.1:{port}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&dead, rewritten).map_err(|e| e.to_string())?;
    let unsynced = env.start_operator_as(&s.ns, &[], &dead, &[])?;
    let url = |path: &str| format!("http://127.0.0.1:{}{path}", unsynced.port);
    wait_for(
        "/healthz of the unsynced operator",
        READY_TIMEOUT,
        || async {
            Ok(reqwest::get(url("/healthz"))
                .await
                .ok()
                .filter(|r| r.status() == 200)
                .map(drop))
        },
    )
    .await?;
    let readyz = reqwest::get(url("/readyz"))
        .await
        .map_err(|e| e.to_string())?;
    ensure_eq!(
        readyz.status().as_u16(),
        503,
        "/readyz before the caches sync"
    );
    // The healthy one becomes ready, and logs JSON lines with the object in the span.
    let ready = format!("http://127.0.0.1:{}/readyz", s.op.port);
    wait_for("/readyz 200 after sync", READY_TIMEOUT, || async {
        Ok(reqwest::get(&ready)
            .await
            .ok()
            .filter(|r| r.status() == 200)
            .map(drop))
    })
    .await?;
    s.password_credentials(&env, "creds").await?;
    env.apply(&awx_token(
        &s.ns,
        "j",
        &s.awx.url,
        "Password",
        "creds",
        json!({}),
    ))?;
    wait_ready(&env, &s.ns, "j", "True", None).await?;
    let log = std::fs::read_to_string(&s.op.log).map_err(|e| e.to_string())?;
    let mut with_object = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {line}: {e}"))?;
        if v["span"]["namespace"] == s.ns.as_str() && v["span"]["awxtoken"] == "j" {
            with_object += 1;
        }
    }
    ensure!(
        with_object > 0,
        "no log line carries the reconcile span with namespace and name"
    );
    Ok(())
}

pub async fn awx_faults_give_clear_conditions_and_recover(env: Arc<Env>) -> TestResult {
    let awx = env.private_standin("faults", "awx")?;
    let s = setup_with(&env, "e2e-faults", awx, &[]).await?;
    s.password_credentials(&env, "creds").await?;
    for (fault, reason, needle) in [
        (
            json!({"mode": "html", "paths": ["/api/o/token/"]}),
            "UnexpectedResponse",
            "HTML",
        ),
        (
            json!({"mode": "status500", "paths": ["/api/o/token/"]}),
            "AwxServerError",
            "500",
        ),
        (
            json!({"mode": "truncated", "paths": ["/api/o/token/"]}),
            "UnexpectedResponse",
            "JSON",
        ),
        (
            json!({"mode": "hang", "paths": ["/api/o/token/"]}),
            "Timeout",
            "5",
        ),
        (
            json!({"mode": "reset", "paths": ["/api/o/token/"]}),
            "AwxUnreachable",
            "127.0.0.1",
        ),
    ] {
        s.awx.set_fault(fault.clone()).await?;
        let name = format!("f-{}", fault["mode"].as_str().unwrap_or("x"));
        env.apply(&awx_token(
            &s.ns,
            &name,
            &s.awx.url,
            "Password",
            "creds",
            json!({"awx": {"flavor": "Controller"}}),
        ))?;
        let obj = wait_ready(&env, &s.ns, &name, "False", Some(reason)).await?;
        let (_, _, message) = condition(&obj, "Ready").unwrap_or_default();
        ensure!(
            message.contains(needle),
            "{fault}: message {message:?} lacks {needle:?}"
        );
        ensure!(
            env.secret(&s.ns, &name).await?.is_none(),
            "{fault}: no Secret without a token"
        );
        s.awx.clear_faults().await?;
        wait_ready(&env, &s.ns, &name, "True", Some("TokenReady")).await?;
        let token = env
            .secret_value(&s.ns, &name, "token")
            .await?
            .ok_or("no token")?;
        ensure_eq!(
            s.awx.whoami(&token).await?,
            Some(s.user.clone()),
            "{fault}: token after recovery"
        );
    }
    Ok(())
}

pub async fn external_user_is_refused_with_a_clear_message(env: Arc<Env>) -> TestResult {
    let s = setup(&env, "e2e-external", "awx", &[]).await?;
    let ldap_user = format!("{}-ldap", s.ns);
    s.awx
        .create_external_user(&ldap_user, "ldap-password-1")
        .await?;
    let (id, secret) = s
        .awx
        .create_app(&format!("{}-app", s.ns), "password", &s.user)
        .await?;
    env.credentials(
        &s.ns,
        "creds",
        &[
            ("username", &ldap_user),
            ("password", "ldap-password-1"),
            ("client_id", &id),
            ("client_secret", &secret),
        ],
    )?;
    env.apply(&awx_token(
        &s.ns,
        "x",
        &s.awx.url,
        "Password",
        "creds",
        json!({}),
    ))?;
    let obj = wait_ready(&env, &s.ns, "x", "False", Some("ExternalUserRefused")).await?;
    let (_, _, message) = condition(&obj, "Ready").unwrap_or_default();
    ensure!(
        message.contains("ALLOW_OAUTH2_FOR_EXTERNAL_USERS"),
        "message explains the setting: {message}"
    );
    Ok(())
}

pub async fn expired_refresh_token_falls_back_to_the_grant(env: Arc<Env>) -> TestResult {
    let awx = env.private_standin("refresh-expiry", "awx")?;
    let s = setup_with(&env, "e2e-refresh-expiry", awx, &[]).await?;
    s.awx.set_lifetimes(None, Some(2)).await?;
    let (_, first) = s
        .issue(
            &env,
            "r",
            "creds",
            json!({"renewal": {"rotateEvery": "5s", "strategy": "Refresh"}}),
        )
        .await?;
    let second = wait_token(&env, &s.ns, "r", Some(&first)).await?;
    ensure_eq!(
        s.awx.whoami(&second).await?,
        Some(s.user.clone()),
        "token after the fallback works"
    );
    let requests = s.awx.requests().await?;
    let expired = requests
        .iter()
        .filter(|r| r["grant_type"] == "refresh_token" && r["status"] == 403)
        .count();
    let grants = requests
        .iter()
        .filter(|r| r["grant_type"] == "password" && r["status"] == 200)
        .count();
    ensure!(expired >= 1, "the refresh token expired at AWX (403)");
    ensure!(
        grants >= 2,
        "the password grant issued the replacement: {grants}"
    );
    Ok(())
}

pub async fn url_change_revokes_the_old_token_at_the_old_awx(env: Arc<Env>) -> TestResult {
    let old_awx = env.private_standin("url-old", "awx")?;
    let new_awx = env.private_standin("url-new", "awx")?;
    let s = setup_with(&env, "e2e-url", old_awx, &[]).await?;
    s.password_credentials(&env, "creds").await?;
    let renewal = json!({"renewal": {"revokeGracePeriod": "1s"}});
    env.apply(&awx_token(
        &s.ns,
        "u",
        &s.awx.url,
        "Password",
        "creds",
        renewal.clone(),
    ))?;
    wait_ready(&env, &s.ns, "u", "True", None).await?;
    let first = env
        .secret_value(&s.ns, "u", "token")
        .await?
        .ok_or("no token")?;
    // The same account at the new AWX, then the AwxToken moves there.
    new_awx.create_user(&s.user, &s.password).await?;
    let (id, secret) = new_awx
        .create_app(&format!("{}-new", s.ns), "password", &s.user)
        .await?;
    env.credentials(
        &s.ns,
        "creds",
        &[
            ("username", &s.user),
            ("password", &s.password),
            ("client_id", &id),
            ("client_secret", &secret),
        ],
    )?;
    env.apply(&awx_token(
        &s.ns,
        "u",
        &new_awx.url,
        "Password",
        "creds",
        renewal,
    ))?;
    let second = wait_token(&env, &s.ns, "u", Some(&first)).await?;
    ensure_eq!(
        new_awx.whoami(&second).await?,
        Some(s.user.clone()),
        "token from the new AWX"
    );
    wait_for(
        "the old token to be revoked at the old AWX",
        Duration::from_secs(60),
        || async { Ok(s.awx.whoami(&first).await?.is_none().then_some(())) },
    )
    .await?;
    ensure_eq!(
        s.awx.live_tokens(&s.user).await?,
        Vec::<String>::new(),
        "nothing left at the old AWX"
    );
    Ok(())
}

pub async fn tls_trust_follows_the_ca_bundle(env: Arc<Env>) -> TestResult {
    let (awx, ca) = env.private_tls_standin("tls", "awx")?;
    ensure!(
        awx.url.starts_with("https://"),
        "the stand-in serves https: {}",
        awx.url
    );
    let s = setup_with(&env, "e2e-tls", awx, &[]).await?;
    s.password_credentials(&env, "creds").await?;
    let https = |name: &str, extra: Value| {
        let mut doc = awx_token(&s.ns, name, &s.awx.url, "Password", "creds", extra);
        doc["spec"]["awx"]["allowInsecureHttp"] = json!(false);
        doc
    };
    // Not trusted: the system roots do not know the test CA.
    env.apply(&https("untrusted", json!({})))?;
    let obj = wait_ready(&env, &s.ns, "untrusted", "False", Some("TlsError")).await?;
    let (_, _, message) = condition(&obj, "Ready").unwrap_or_default();
    ensure!(
        message.contains("caBundleSecretRef"),
        "message says what to fix: {message}"
    );
    // Trusted through the CA bundle Secret.
    env.credentials(&s.ns, "awx-ca", &[("ca.crt", &ca)])?;
    env.apply(&https(
        "trusted",
        json!({"awx": {"caBundleSecretRef": {"name": "awx-ca"}}}),
    ))?;
    wait_ready(&env, &s.ns, "trusted", "True", Some("TokenReady")).await?;
    let token = env
        .secret_value(&s.ns, "trusted", "token")
        .await?
        .ok_or("no token")?;
    ensure_eq!(
        s.awx.whoami(&token).await?,
        Some(s.user.clone()),
        "token over https works"
    );
    // A certificate from another CA is refused.
    let (_, other_ca) = env.private_tls_standin("tls-other", "awx")?;
    env.credentials(&s.ns, "other-ca", &[("ca.crt", &other_ca)])?;
    env.apply(&https(
        "wrong-ca",
        json!({"awx": {"caBundleSecretRef": {"name": "other-ca"}}}),
    ))?;
    wait_ready(&env, &s.ns, "wrong-ca", "False", Some("TlsError")).await?;
    // insecureSkipTlsVerify works, and says so loudly.
    env.apply(&https(
        "insecure",
        json!({"awx": {"insecureSkipTlsVerify": true}}),
    ))?;
    let obj = wait_ready(&env, &s.ns, "insecure", "True", Some("TokenReady")).await?;
    ensure_eq!(
        condition(&obj, "InsecureTls").map(|c| c.0),
        Some("True".to_string()),
        "InsecureTls condition"
    );
    let events = env.kubectl(&["get", "events", "-n", &s.ns, "-o", "json"])?;
    ensure!(
        events.contains("InsecureSkipTlsVerify"),
        "a Warning event about insecureSkipTlsVerify"
    );
    Ok(())
}
