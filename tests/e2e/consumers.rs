//! What consumers read: the Secret's presets and templates used by a real client nobody here
//! wrote (the awx CLI of awxkit 24.6.1), the fields of the spec that say where things are, and
//! `kubectl get -o wide`.

use std::{collections::BTreeMap, sync::Arc};

use serde_json::{Value, json};

use crate::{
    scenarios::{awx_token, setup, setup_with, wait_ready},
    support::{Env, Run, TestResult, condition},
};

/// The Secret's data as text, key by key; the token (under the default key) is remembered for
/// the leak check (the other keys hold it, the URL, or text the test writes).
async fn secret_data(env: &Env, ns: &str, name: &str) -> Result<BTreeMap<String, String>, String> {
    let secret = env
        .secret(ns, name)
        .await?
        .ok_or(format!("no Secret {ns}/{name}"))?;
    let data: BTreeMap<String, String> = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
        .collect();
    if let Some(token) = data.get("token") {
        env.remember_secret(token);
    }
    Ok(data)
}

fn expected(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `awx` with each key of the Secret as an environment variable (what `envFrom` gives a Pod),
/// and nothing else but a HOME of its own; `change` edits that environment first.
async fn awx_with_secret_env(
    env: &Arc<Env>,
    data: &BTreeMap<String, String>,
    change: &[(&str, &str)],
    args: &[&str],
) -> Result<Run, String> {
    let mut vars = data.clone();
    for (k, v) in change {
        vars.insert(k.to_string(), v.to_string());
    }
    for key in vars.keys() {
        let env_name = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        ensure!(env_name, "key {key:?} is not an environment variable name");
    }
    let vars: Vec<(String, String)> = vars.into_iter().collect();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let env = env.clone();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        env.awx_cli(&vars, &args)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// The Secret of the AwxCli preset runs `awx me` as the token's user, over https with the
/// preset's CONTROLLER_VERIFY_SSL; the AnsiblePlatform preset and two templates give exactly
/// the keys and text asked for; a misspelt placeholder and a key asked for twice are spec
/// errors that name what to fix.
pub async fn consumers_awx_cli_reads_the_preset_secret_and_templates_render_exactly(
    env: Arc<Env>,
) -> TestResult {
    let (awx, ca) = env.private_tls_standin("consumers-tls", "awx")?;
    let s = setup_with(&env, "e2e-consumers", awx, &[]).await?;
    s.password_credentials(&env, "creds").await?;
    env.credentials(&s.ns, "awx-ca", &[("ca.crt", &ca)])?;
    let https = |name: &str, extra: Value| {
        let mut doc = awx_token(&s.ns, name, &s.awx.url, "Password", "creds", extra);
        doc["spec"]["awx"]["allowInsecureHttp"] = json!(false);
        doc
    };
    let url = s.awx.url.trim_end_matches('/').to_string();

    // The awx CLI's preset, against an AWX whose certificate is not verified.
    env.apply(&https(
        "cli",
        json!({"awx": {"insecureSkipTlsVerify": true}, "secret": {"presets": ["AwxCli"]}}),
    ))?;
    wait_ready(&env, &s.ns, "cli", "True", Some("TokenReady")).await?;
    let data = secret_data(&env, &s.ns, "cli").await?;
    let token = data.get("token").cloned().ok_or("no token key")?;
    ensure_eq!(token.len(), 30, "an AWX token");
    ensure_eq!(
        data,
        expected(&[
            ("AAP_TOKEN", &token),
            ("CONTROLLER_HOST", &url),
            ("CONTROLLER_OAUTH_TOKEN", &token),
            ("CONTROLLER_VERIFY_SSL", "false"),
            ("host", &url),
            ("token", &token),
        ]),
        "Secret of the AwxCli preset"
    );
    let me = awx_with_secret_env(&env, &data, &[], &["me"]).await?;
    ensure!(
        me.ok,
        "awx me failed: {} {}",
        me.stdout.trim(),
        me.stderr.trim()
    );
    let answer: Value = serde_json::from_str(&me.stdout)
        .map_err(|e| format!("awx me printed no JSON ({e}): {}", me.stdout))?;
    ensure_eq!(answer["count"], json!(1), "awx me: one user");
    ensure_eq!(
        answer["results"][0]["username"],
        json!(s.user),
        "awx me: the token's user"
    );
    // The preset's "false" is what lets it in: verifying, awxkit refuses the test CA's certificate.
    let verifying =
        awx_with_secret_env(&env, &data, &[("CONTROLLER_VERIFY_SSL", "true")], &["me"]).await?;
    ensure!(
        !verifying.ok
            && verifying
                .stderr
                .contains("Could not establish a secure connection"),
        "awx me with CONTROLLER_VERIFY_SSL=true must fail on the certificate: {} {}",
        verifying.stdout.trim(),
        verifying.stderr.trim()
    );

    // The platform collection's preset and two templates, AWX's certificate verified.
    let env_file =
        "AAP_HOSTNAME={host}\nAAP_TOKEN={token}\n# {username} ({scope}) until {expiresAt}\n";
    let json_file = r#"{{"token": "{token}", "expires": "{expiresAt}", "user": "{username}"}}"#;
    env.apply(&https(
        "platform",
        json!({"awx": {"caBundleSecretRef": {"name": "awx-ca"}}, "secret": {
            "presets": ["AnsiblePlatform"],
            "templates": {"aap.env": env_file, "token.json": json_file}
        }}),
    ))?;
    let obj = wait_ready(&env, &s.ns, "platform", "True", Some("TokenReady")).await?;
    let data = secret_data(&env, &s.ns, "platform").await?;
    let token = data.get("token").cloned().ok_or("no token key")?;
    let expires = obj["status"]["expiresAt"]
        .as_str()
        .ok_or("status.expiresAt")?;
    ensure!(
        expires.len() == 20 && expires.ends_with('Z'),
        "AWX gives an expiry: {expires}"
    );
    let env_text = format!(
        "AAP_HOSTNAME={url}\nAAP_TOKEN={token}\n# {} (write) until {expires}\n",
        s.user
    );
    let json_text = format!(
        r#"{{"token": "{token}", "expires": "{expires}", "user": "{}"}}"#,
        s.user
    );
    ensure_eq!(
        data,
        expected(&[
            ("AAP_HOSTNAME", &url),
            ("AAP_TOKEN", &token),
            ("AAP_VALIDATE_CERTS", "true"),
            ("GATEWAY_API_TOKEN", &token),
            ("GATEWAY_HOSTNAME", &url),
            ("GATEWAY_VERIFY_SSL", "true"),
            ("aap.env", &env_text),
            ("host", &url),
            ("token", &token),
            ("token.json", &json_text),
        ]),
        "Secret of the AnsiblePlatform preset with templates"
    );
    ensure_eq!(
        serde_json::from_str::<Value>(&data["token.json"]).map_err(|e| e.to_string())?["token"],
        json!(token),
        "the JSON template is JSON"
    );

    // Spec errors: no request, no Secret, a message naming the key and what is wrong.
    env.apply(&https(
        "typo",
        json!({"secret": {"templates": {"awx.env": "CONTROLLER_OAUTH_TOKEN={tokn}"}}}),
    ))?;
    env.apply(&https(
        "clash",
        json!({"secret": {"presets": ["AwxCli"], "extraKeys": {"CONTROLLER_HOST": "token"}}}),
    ))?;
    for (name, message) in [
        (
            "typo",
            "spec.secret.templates: template of key \"awx.env\": unknown placeholder \"{tokn}\"; \
             the placeholders are {token}, {host}, {expiresAt}, {scope} and {username} ({{ and \
             }} for literal braces)",
        ),
        (
            "clash",
            "spec.secret.presets: key \"CONTROLLER_HOST\" is written twice with different \
             content: the token by secret.extraKeys and the AWX URL by preset AwxCli",
        ),
    ] {
        let obj = wait_ready(&env, &s.ns, name, "False", Some("InvalidSpec")).await?;
        ensure_eq!(
            condition(&obj, "Ready").map(|c| c.2),
            Some(message.to_string()),
            "{name}: Ready message"
        );
        ensure!(
            env.secret(&s.ns, name).await?.is_none(),
            "{name}: no Secret for an invalid spec"
        );
    }
    Ok(())
}

/// A credentials Secret with none of the default key names works through usernameKey,
/// passwordKey, clientIdKey and clientSecretKey (a confidential application: the grant needs
/// all four); extraKeys give exactly their keys; `kubectl get -o wide` shows Flavor, User and
/// Last failure, and only with -o wide.
pub async fn consumers_credential_key_names_extra_keys_and_wide_columns(
    env: Arc<Env>,
) -> TestResult {
    let s = setup(&env, "e2e-keynames", "awx", &[]).await?;
    let (client_id, client_secret) = s
        .awx
        .create_app(&format!("{}-app", s.ns), "password", &s.user)
        .await?;
    env.remember_secret(&s.password);
    env.remember_secret(&client_secret);
    env.apply(&json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "renamed-creds", "namespace": s.ns},
        "stringData": {"login": s.user, "pass-word": s.password,
            "oauth.client": client_id, "oauth.secret": client_secret}}))?;
    env.apply(&awx_token(
        &s.ns,
        "renamed",
        &s.awx.url,
        "Password",
        "renamed-creds",
        json!({
            "grant": {"credentialsSecretRef": {"usernameKey": "login", "passwordKey": "pass-word",
                "clientIdKey": "oauth.client", "clientSecretKey": "oauth.secret"}},
            "secret": {"extraKeys": {"TOWER_OAUTH_TOKEN": "token", "TOWER_HOST": "host"}}
        }),
    ))?;
    let renamed = wait_ready(&env, &s.ns, "renamed", "True", Some("TokenReady")).await?;
    let data = secret_data(&env, &s.ns, "renamed").await?;
    let token = data.get("token").cloned().ok_or("no token key")?;
    let url = s.awx.url.trim_end_matches('/').to_string();
    ensure_eq!(
        data,
        expected(&[
            ("TOWER_HOST", &url),
            ("TOWER_OAUTH_TOKEN", &token),
            ("host", &url),
            ("token", &token),
        ]),
        "Secret with extraKeys"
    );
    ensure_eq!(
        s.awx.whoami(&token).await?,
        Some(s.user.clone()),
        "the token works as the user named under usernameKey"
    );

    // A failing one, for the Last failure column.
    env.credentials(
        &s.ns,
        "wrong-creds",
        &[
            ("username", &s.user),
            ("password", "wrong-password-keynames"),
            ("client_id", &client_id),
            ("client_secret", &client_secret),
        ],
    )?;
    env.apply(&awx_token(
        &s.ns,
        "broken",
        &s.awx.url,
        "Password",
        "wrong-creds",
        json!({}),
    ))?;
    let broken = wait_ready(&env, &s.ns, "broken", "False", Some("InvalidCredentials")).await?;
    let failure = broken["status"]["lastFailureMessage"]
        .as_str()
        .ok_or("status.lastFailureMessage of broken")?
        .to_string();
    ensure!(
        failure.contains("username or password"),
        "the failure names its cause: {failure}"
    );

    let narrow = env.kubectl(&["get", "awxt", "-n", &s.ns])?;
    ensure_eq!(
        narrow
            .lines()
            .next()
            .map(|h| h.split_whitespace().collect::<Vec<_>>()),
        Some(vec!["NAME", "READY", "SECRET", "EXPIRES", "RENEWS", "AGE"]),
        "columns without -o wide"
    );
    let wide = env.kubectl(&["get", "awxt", "-n", &s.ns, "-o", "wide"])?;
    let table = columns(&wide)?;
    let status = |obj: &Value, field: &str| {
        obj["status"][field]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    ensure_eq!(
        table,
        vec![
            vec![
                "broken".to_string(),
                "False".into(),
                status(&broken, "secretName"),
                String::new(),
                status(&broken, "renewalTime"),
                "AGE".into(),
                String::new(),
                String::new(),
                failure,
            ],
            vec![
                "renamed".to_string(),
                "True".into(),
                "renamed".into(),
                status(&renamed, "expiresAt"),
                status(&renamed, "renewalTime"),
                "AGE".into(),
                "Controller".into(),
                s.user.clone(),
                String::new(),
            ],
        ],
        "kubectl get awxt -o wide:\n{wide}"
    );
    Ok(())
}

/// The rows of `kubectl get -o wide` for AwxTokens, cut at the header's column starts (values
/// may hold spaces; kubectl leaves a missing value empty), after checking the header; the age
/// (which changes) reads "AGE".
fn columns(output: &str) -> Result<Vec<Vec<String>>, String> {
    const HEADER: [&str; 9] = [
        "NAME",
        "READY",
        "SECRET",
        "EXPIRES",
        "RENEWS",
        "AGE",
        "FLAVOR",
        "USER",
        "LAST FAILURE",
    ];
    let mut lines = output.lines();
    let header = lines.next().ok_or("no output")?;
    let mut starts = Vec::new();
    let mut from = 0;
    for name in HEADER {
        let at = header[from..]
            .find(name)
            .map(|i| i + from)
            .ok_or(format!("no column {name} in {header:?}"))?;
        starts.push(at);
        from = at + name.len();
    }
    let words = HEADER.join(" ");
    ensure_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        words.split(' ').collect::<Vec<_>>(),
        "the header has exactly these columns"
    );
    let mut rows = Vec::new();
    for line in lines {
        let mut row = Vec::new();
        for (i, start) in starts.iter().enumerate() {
            let end = starts
                .get(i + 1)
                .copied()
                .unwrap_or(line.len())
                .min(line.len());
            let cell = line.get(*start..end).ok_or(format!("short row {line:?}"))?;
            row.push(if HEADER[i] == "AGE" {
                "AGE".to_string()
            } else {
                cell.trim().to_string()
            });
        }
        rows.push(row);
    }
    Ok(rows)
}
