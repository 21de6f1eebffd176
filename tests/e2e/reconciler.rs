//! The reconciler's promises under trouble: a pending rotation during an outage is paced, two
//! operator processes never lose a token, a re-created AwxToken never takes its predecessor's
//! state, replaced tokens go even while renewals fail, one refusal is one request, and a
//! refresh chain whose access token was deleted recovers.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use serde_json::json;

use crate::{
    scenarios::{
        READY_TIMEOUT, Setup, awx_token, poke_and_wait_for_a_look, setup_with, wait_condition,
        wait_ready, wait_token,
    },
    support::{Env, Operator, TestResult, condition, sha256_hex, wait_for},
};

/// How long an outage is watched.
const OUTAGE: Duration = Duration::from_secs(60);

/// Token requests the operator sent (any answer, or none) according to its own metrics.
async fn token_requests_sent(op: &Operator) -> Result<f64, String> {
    let text = op.metrics().await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("awx_token_operator_awx_requests_total{endpoint=\"token\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum())
}

fn events(env: &Env, ns: &str, reason: &str) -> Result<usize, String> {
    let out = env.kubectl(&[
        "get",
        "events.events.k8s.io",
        "-n",
        ns,
        "-o",
        "jsonpath={range .items[*]}{.reason}{\"\\n\"}{end}",
    ])?;
    Ok(out.lines().filter(|l| *l == reason).count())
}

/// One outage: a Ready AwxToken, AWX goes down (or answers 500), a rotation is asked for, and
/// for 60 s the operator is prodded every way there is. Returns (attempts, requests).
async fn outage(env: &Env, s: &Setup, name: &str, down: bool) -> Result<(u64, u64), String> {
    let (_, token) = s
        .issue(env, name, &format!("{name}-creds"), json!({}))
        .await?;
    if down {
        s.awx.stop();
    } else {
        s.awx
            .set_fault(json!({"mode": "status500", "paths": ["/api/o/token/"]}))
            .await?;
    }
    let sent_before = token_requests_sent(&s.op).await?;
    let logged_before = s.awx.requests().await.map(|r| r.len()).unwrap_or(0);
    let started = Instant::now();
    let rotate = |value: &str| {
        env.kubectl(&[
            "annotate",
            "--overwrite",
            "awxt",
            name,
            "-n",
            &s.ns,
            &format!("awx-token-operator.io/rotate={value}"),
        ])
    };
    rotate("1")?;
    // Every way a retry used to be triggered: a new rotate value (allowed once more), spec
    // edits, credential writes, annotations; and the operator's own writes all along.
    let prods: [(u64, &str); 5] = [
        (10, "rotate"),
        (20, "spec"),
        (30, "credentials"),
        (40, "poke"),
        (50, "spec"),
    ];
    for (at, what) in prods {
        tokio::time::sleep_until((started + Duration::from_secs(at)).into()).await;
        match what {
            "rotate" => rotate("2").map(drop)?,
            "spec" => env.apply(&awx_token(
                &s.ns,
                name,
                &s.awx.url,
                "Password",
                &format!("{name}-creds"),
                json!({"secret": {"labels": {"prodded": format!("at-{at}")}}}),
            ))?,
            "credentials" => {
                // The credentials Secret changes (a label), its values do not: an event, no
                // new inputs.
                env.kubectl(&[
                    "label",
                    "--overwrite",
                    "secret",
                    &format!("{name}-creds"),
                    "-n",
                    &s.ns,
                    &format!("prodded=at-{at}"),
                ])?;
            }
            _ => poke_and_wait_for_a_look(env, &s.ns, name, &format!("at-{at}")).await?,
        }
    }
    tokio::time::sleep_until((started + OUTAGE).into()).await;
    let obj = env.awx_token(&s.ns, name).await?.ok_or("gone")?;
    let attempts = obj["status"]["failedAttempts"].as_u64().unwrap_or(0);
    let requests = if down {
        (token_requests_sent(&s.op).await? - sent_before) as u64
    } else {
        s.awx
            .requests()
            .await?
            .iter()
            .skip(logged_before)
            .filter(|r| r["path"] == "/api/o/token/")
            .count() as u64
    };
    // Ready stays True: the Secret's token works all along.
    ensure_eq!(
        condition(&obj, "Ready").map(|c| c.0),
        Some("True".to_string()),
        "Ready during the outage"
    );
    ensure_eq!(
        env.secret_value(&s.ns, name, "token").await?,
        Some(token),
        "the Secret keeps its token"
    );
    Ok((attempts, requests))
}

/// A pending rotation while AWX is down, and while it answers 500: at most 6 attempts and 6
/// requests in 60 s, and no warning about lost tokens for complete 500 answers.
pub async fn storm_pending_rotation_during_an_outage_is_paced(env: Arc<Env>) -> TestResult {
    // The operator's real backoff (5 s doubling), not the suite's short one.
    let real = ["--backoff-base", "5s", "--backoff-max", "5m"];
    let down = env.private_standin("storm-down", "awx")?;
    let failing = env.private_standin("storm-500", "awx")?;
    let s_down = setup_with(&env, "e2e-storm-down", down, &real).await?;
    let s_500 = setup_with(&env, "e2e-storm-500", failing, &real).await?;
    let (a, b) = tokio::join!(
        outage(&env, &s_down, "down", true),
        outage(&env, &s_500, "failing", false)
    );
    let ((down_attempts, down_requests), (failing_attempts, failing_requests)) = (a?, b?);
    println!(
        "    AWX down: {down_attempts} attempts, {down_requests} token requests in 60 s; \
         AWX answering 500: {failing_attempts} attempts, {failing_requests} token requests"
    );
    ensure!(
        (1..=6).contains(&down_attempts) && down_requests <= 6,
        "AWX down: {down_attempts} attempts, {down_requests} requests"
    );
    ensure!(
        (1..=6).contains(&failing_attempts) && failing_requests <= 6,
        "AWX answering 500: {failing_attempts} attempts, {failing_requests} requests"
    );
    ensure_eq!(
        failing_attempts,
        failing_requests,
        "one request per attempt"
    );
    // A complete 500 created nothing (AWX runs each request in one transaction): no warning.
    ensure_eq!(
        events(&env, &s_500.ns, "InterruptedIssue")?,
        0,
        "InterruptedIssue events after complete 500 answers"
    );
    Ok(())
}

/// Two operator processes without leader election, the same AwxTokens, rotations forced over
/// and over: whatever they did to each other, the tokens alive in AWX are exactly those in the
/// Secrets once the replaced ones have been revoked.
pub async fn two_operators_without_election_keep_exactly_the_held_tokens(
    env: Arc<Env>,
) -> TestResult {
    let awx = env.private_standin("two", "awx")?;
    let s = setup_with(&env, "e2e-two", awx, &[]).await?;
    let other = env.start_operator(&s.ns, &[])?;
    let names: Vec<String> = (0..4).map(|i| format!("t{i}")).collect();
    for name in &names {
        s.password_credentials(&env, &format!("{name}-creds"))
            .await?;
        env.apply(&awx_token(
            &s.ns,
            name,
            &s.awx.url,
            "Password",
            &format!("{name}-creds"),
            json!({"renewal": {"revokeGracePeriod": "1s"}}),
        ))?;
    }
    for name in &names {
        wait_ready(&env, &s.ns, name, "True", None).await?;
    }
    let rounds: usize = std::env::var("AWXTO_TWO_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    for round in 0..rounds {
        let value = format!("r{round}");
        for name in &names {
            env.kubectl(&[
                "annotate",
                "--overwrite",
                "awxt",
                name,
                "-n",
                &s.ns,
                &format!("awx-token-operator.io/rotate={value}"),
            ])?;
        }
        for name in &names {
            wait_for(
                &format!("{name} rotated for {value}"),
                READY_TIMEOUT,
                || async {
                    let o = env.awx_token(&s.ns, name).await?.unwrap_or_default();
                    Ok((o["status"]["rotatedFor"] == value.as_str()).then_some(()))
                },
            )
            .await?;
        }
    }
    // Settled: no replaced token waiting, every Secret holding a working token.
    let mut held = BTreeSet::new();
    for name in &names {
        wait_for(
            &format!("{name} with no pending revocation"),
            READY_TIMEOUT,
            || async {
                let o = env.awx_token(&s.ns, name).await?.unwrap_or_default();
                let settled = o["status"]["pendingRevocations"].is_null()
                    && condition(&o, "Ready").is_some_and(|c| c.0 == "True");
                Ok(settled.then_some(()))
            },
        )
        .await?;
        let token = env
            .secret_value(&s.ns, name, "token")
            .await?
            .ok_or("no token")?;
        ensure_eq!(
            s.awx.whoami(&token).await?,
            Some(s.user.clone()),
            "{name}: the Secret's token works"
        );
        held.insert(sha256_hex(&token));
    }
    let alive: BTreeSet<String> = s.awx.live_tokens(&s.user).await?.into_iter().collect();
    let issued = s
        .awx
        .requests_for(&s.user)
        .await?
        .iter()
        .filter(|r| r["grant_type"] == "password" && r["status"] == 200)
        .count();
    println!(
        "    2 processes, {} AwxTokens, {rounds} forced rotations each: {issued} tokens issued, \
         {} alive, {} in Secrets",
        names.len(),
        alive.len(),
        held.len()
    );
    ensure_eq!(alive, held, "tokens alive in AWX vs tokens in the Secrets");
    drop(other);
    Ok(())
}

/// An AwxToken deleted and created again under the same name, before the garbage collector
/// removed the old Secrets (here: never, they are orphaned): the new object gets a token of
/// its own, and never reports Ready with its predecessor's.
pub async fn a_recreated_awx_token_gets_its_own_token(env: Arc<Env>) -> TestResult {
    let awx = env.private_standin("reborn", "awx")?;
    let s = setup_with(&env, "e2e-reborn", awx, &[]).await?;
    let (_, first) = s.issue(&env, "r", "creds", json!({})).await?;
    // Told not to revoke, so the predecessor's token stays alive and usable: the worst case.
    env.kubectl(&[
        "annotate",
        "awxt",
        "r",
        "-n",
        &s.ns,
        "awx-token-operator.io/skip-revoke=true",
    ])?;
    env.kubectl(&["delete", "awxt", "r", "-n", &s.ns, "--cascade=orphan"])?;
    wait_for("the old AwxToken gone", READY_TIMEOUT, || async {
        Ok(env.awx_token(&s.ns, "r").await?.is_none().then_some(()))
    })
    .await?;
    ensure!(
        env.secret(&s.ns, "awx-token-operator-state-r")
            .await?
            .is_some(),
        "the predecessor's state Secret is still there"
    );
    env.apply(&awx_token(
        &s.ns,
        "r",
        &s.awx.url,
        "Password",
        "creds",
        json!({}),
    ))?;
    let second = wait_token(&env, &s.ns, "r", Some(&first)).await?;
    let obj = wait_ready(&env, &s.ns, "r", "True", Some("TokenReady")).await?;
    ensure!(second != first, "a new token");
    ensure_eq!(
        s.awx.whoami(&second).await?,
        Some(s.user.clone()),
        "the new token works"
    );
    let secret = env.secret(&s.ns, "r").await?.ok_or("no Secret")?;
    let uid = obj["metadata"]["uid"].as_str().unwrap_or_default();
    let owners: Vec<String> = secret
        .metadata
        .owner_references
        .unwrap_or_default()
        .into_iter()
        .map(|o| o.uid)
        .collect();
    ensure_eq!(
        owners,
        vec![uid.to_string()],
        "the Secret is owned by the new UID"
    );
    // The predecessor's token was never revoked (skip-revoke) nor taken over.
    ensure_eq!(
        s.awx.whoami(&first).await?,
        Some(s.user.clone()),
        "the predecessor's token is untouched"
    );
    Ok(())
}

/// A token replaced shortly before the renewals start failing (a wrong password) is revoked
/// when its grace period ends all the same, and not before: the period counts from the
/// moment the Secret holds its successor, as a watch on the Secret sees it.
pub async fn replaced_token_is_revoked_while_renewals_fail(env: Arc<Env>) -> TestResult {
    let awx = env.private_standin("retire", "awx")?;
    let s = setup_with(&env, "e2e-retire", awx, &[]).await?;
    let (_, first) = s
        .issue(
            &env,
            "x",
            "creds",
            json!({"renewal": {"revokeGracePeriod": "8s"}}),
        )
        .await?;
    env.kubectl(&[
        "annotate",
        "awxt",
        "x",
        "-n",
        &s.ns,
        "awx-token-operator.io/rotate=now",
    ])?;
    let second = wait_token(&env, &s.ns, "x", Some(&first)).await?;
    env.remember_secret(&second);
    ensure_eq!(
        s.awx.whoami(&first).await?,
        Some(s.user.clone()),
        "the replaced token works during its grace period"
    );
    // Within the grace period the credentials break: every renewal fails from now on.
    env.remember_secret("not-the-password");
    env.kubectl(&[
        "patch",
        "secret",
        "creds",
        "-n",
        &s.ns,
        "--type",
        "merge",
        "-p",
        r#"{"stringData": {"password": "not-the-password"}}"#,
    ])?;
    wait_condition(
        &env,
        &s.ns,
        "x",
        "RenewalFailed",
        "True",
        "InvalidCredentials",
    )
    .await?;
    wait_for("the replaced token revoked", READY_TIMEOUT, || async {
        Ok(s.awx.whoami(&first).await?.is_none().then_some(()))
    })
    .await?;
    // Timed by the servers' clocks, not by when this test got to look (under load that was
    // seconds late): when the API server stored the Secret with the new token (its
    // managedFields time, cut to the second), and when the revocation reached AWX.
    let stored: Api<Secret> = Api::namespaced(env.client.clone(), &s.ns);
    let secret = stored.get("x").await.map_err(|e| e.to_string())?;
    let written = secret
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.manager.as_deref() == Some("awx-token-operator"))
        .filter_map(|m| m.time.as_ref())
        .map(|t| t.0.as_millisecond() as f64 / 1000.0)
        .fold(f64::MIN, f64::max);
    let revoked = s
        .awx
        .requests()
        .await?
        .iter()
        .filter(|r| {
            r["path"]
                .as_str()
                .is_some_and(|p| p.ends_with("/revoke_token/"))
        })
        .filter_map(|r| r["time"].as_f64())
        .fold(f64::MAX, f64::min);
    let after = revoked - written;
    println!("    revoked {after:.2} s after the Secret was written (to the second)");
    // A twentieth of the period (0.4 s) early is allowed; the write time is cut to the
    // second, so it is at most that much earlier than the write.
    ensure!(
        (7.6..30.0).contains(&after),
        "revoked {after:.2} s after the Secret was written: the grace period is 8 s"
    );
    ensure_eq!(
        s.awx.whoami(&second).await?,
        Some(s.user.clone()),
        "the Secret's token still works"
    );
    Ok(())
}

/// Ten AwxTokens created with a wrong password: exactly ten token requests, however often the
/// operator is woken or restarted afterwards.
pub async fn ten_refusals_are_ten_requests(env: Arc<Env>) -> TestResult {
    let awx = env.private_standin("refusals", "awx")?;
    let mut s = setup_with(&env, "e2e-refusals", awx, &[]).await?;
    let (id, secret) = s
        .awx
        .create_app(&format!("{}-app", s.ns), "password", &s.user)
        .await?;
    env.credentials(
        &s.ns,
        "creds",
        &[
            ("username", &s.user),
            ("password", "wrong-password-2"),
            ("client_id", &id),
            ("client_secret", &secret),
        ],
    )?;
    let names: Vec<String> = (0..10).map(|i| format!("w{i}")).collect();
    let docs: Vec<String> = names
        .iter()
        .map(|n| awx_token(&s.ns, n, &s.awx.url, "Password", "creds", json!({})).to_string())
        .collect();
    env.kubectl_stdin(&["apply", "-f", "-"], &docs.join("\n"))?;
    for name in &names {
        let obj = wait_ready(&env, &s.ns, name, "False", Some("InvalidCredentials")).await?;
        ensure_eq!(obj["status"]["failedAttempts"], 1, "{name}: failedAttempts");
    }
    for (round, name) in names.iter().enumerate() {
        poke_and_wait_for_a_look(&env, &s.ns, name, &format!("p{round}")).await?;
    }
    s.op.restart()?;
    for (round, name) in names.iter().enumerate() {
        poke_and_wait_for_a_look(&env, &s.ns, name, &format!("q{round}")).await?;
    }
    let grants = s
        .awx
        .requests_for(&s.user)
        .await?
        .iter()
        .filter(|r| r["grant_type"] == "password")
        .count();
    ensure_eq!(
        grants,
        10,
        "password grants for ten refusals, woken and restarted"
    );
    for name in &names {
        let obj = env.awx_token(&s.ns, name).await?.ok_or("gone")?;
        ensure_eq!(obj["status"]["failedAttempts"], 1, "{name}: failedAttempts");
    }
    Ok(())
}

/// Strategy Refresh, and the access token deleted in AWX behind the operator's back: AWX then
/// fails every refresh of its refresh token with a 500. Verification finds the token rejected
/// (Ready=False, never True for it), and the grant replaces it.
pub async fn refresh_recovers_from_a_deleted_access_token(env: Arc<Env>) -> TestResult {
    let awx = env.private_standin("orphan-refresh", "awx")?;
    let s = setup_with(&env, "e2e-orphan-refresh", awx, &[]).await?;
    let (_, first) = s
        .issue(
            &env,
            "v",
            "creds",
            json!({"renewal": {"strategy": "Refresh", "verifyEvery": "10s"}}),
        )
        .await?;
    let (_, other) = s
        .issue(
            &env,
            "f",
            "creds-f",
            json!({"renewal": {"strategy": "Refresh"}}),
        )
        .await?;
    // An admin deletes both access tokens; their refresh tokens stay (AWX behaviour).
    for token in [&first, &other] {
        s.awx
            .delete_token_as_user(token, &s.user, &s.password)
            .await?;
        ensure_eq!(s.awx.whoami(token).await?, None, "the token is deleted");
    }
    // Verified: found rejected, replaced by the grant.
    let replaced = wait_token(&env, &s.ns, "v", Some(&first)).await?;
    ensure_eq!(
        s.awx.whoami(&replaced).await?,
        Some(s.user.clone()),
        "the replacement works"
    );
    wait_ready(&env, &s.ns, "v", "True", Some("TokenReady")).await?;
    // Not verified: a forced rotation refreshes, AWX answers 500, the grant takes over.
    env.kubectl(&[
        "annotate",
        "awxt",
        "f",
        "-n",
        &s.ns,
        "awx-token-operator.io/rotate=1",
    ])?;
    let fixed = wait_token(&env, &s.ns, "f", Some(&other)).await?;
    ensure_eq!(
        s.awx.whoami(&fixed).await?,
        Some(s.user.clone()),
        "the grant's token works"
    );
    let requests = s.awx.requests_for(&s.user).await?;
    let failed_refreshes = requests
        .iter()
        .filter(|r| r["grant_type"] == "refresh_token" && r["status"] == 500)
        .count();
    ensure!(
        failed_refreshes <= 1,
        "{failed_refreshes} refreshes answered 500: the dead chain was retried"
    );
    ensure_eq!(
        events(&env, &s.ns, "InterruptedIssue")?,
        0,
        "no false InterruptedIssue"
    );
    Ok(())
}

/// Two operator processes, each a shard (`--shard-selector`) of 1,000 AwxTokens split by the
/// `sharding.fluxcd.io/key` label: each token is issued exactly once, by its own shard; a
/// relabelled token moves to the other shard without a second issue, and from then on only
/// the new shard acts on it. Serial: 1,000 grants at once starve the other scenarios' stand-ins
/// on two cores.
pub async fn serial_shards_split_the_tokens_by_label_and_a_relabel_moves_without_a_second_issue(
    env: Arc<Env>,
) -> TestResult {
    const TOKENS: usize = 1000;
    const KEY: &str = "sharding.fluxcd.io/key";
    let awx = env.private_standin("shards", "awx")?;
    let s = setup_with(
        &env,
        "e2e-shards",
        awx,
        &["--shard-selector", &format!("{KEY}=shard-1")],
    )
    .await?;
    let mut two = env.start_operator(&s.ns, &["--shard-selector", &format!("{KEY}=shard-2")])?;
    // Four applications: grants of one user and application run one at a time per process.
    for c in 0..4 {
        s.password_credentials(&env, &format!("creds-{c}")).await?;
    }
    let shard_of = |i: usize| {
        if i.is_multiple_of(2) {
            "shard-1"
        } else {
            "shard-2"
        }
    };
    let doc = |i: usize, shard: &str| {
        let mut t = awx_token(
            &s.ns,
            &format!("t{i:04}"),
            &s.awx.url,
            "Password",
            &format!("creds-{}", (i / 2) % 4),
            json!({}),
        );
        t["metadata"]["labels"] = json!({KEY: shard});
        t.to_string()
    };
    for chunk in (0..TOKENS).collect::<Vec<_>>().chunks(250) {
        let docs: Vec<String> = chunk.iter().map(|i| doc(*i, shard_of(*i))).collect();
        env.kubectl_stdin(&["apply", "-f", "-"], &docs.join("\n"))?;
    }
    wait_for(
        "all AwxTokens Ready",
        Duration::from_secs(600),
        || async {
            let out = env.kubectl(&[
                "get",
                "awxt",
                "-n",
                &s.ns,
                "-o",
                "jsonpath={range .items[*]}{.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
            ])?;
            Ok((out.lines().filter(|l| *l == "True").count() == TOKENS).then_some(()))
        },
    )
    .await?;
    let (one_sent, two_sent) = (
        token_requests_sent(&s.op).await?,
        token_requests_sent(&two).await?,
    );
    ensure_eq!(
        (one_sent, two_sent),
        ((TOKENS / 2) as f64, (TOKENS / 2) as f64),
        "each shard issued its half, each token once"
    );
    ensure_eq!(
        s.awx.live_tokens(&s.user).await?.len(),
        TOKENS,
        "AWX holds one token per AwxToken"
    );

    // t0000 moves from shard 1 to shard 2: its token stays.
    let before = env
        .secret_value(&s.ns, "t0000", "token")
        .await?
        .ok_or("no token")?;
    env.kubectl(&[
        "label",
        "awxt",
        "t0000",
        "-n",
        &s.ns,
        &format!("{KEY}=shard-2"),
        "--overwrite",
    ])?;
    // Shard 2 shows that it looked: a rotation asked of the moved token is done by it alone.
    env.kubectl(&[
        "annotate",
        "awxt",
        "t0000",
        "-n",
        &s.ns,
        "awx-token-operator.io/rotate=after-the-move",
    ])?;
    let after = wait_token(&env, &s.ns, "t0000", Some(&before)).await?;
    ensure_eq!(
        s.awx.whoami(&after).await?,
        Some(s.user.clone()),
        "the moved token's new token works"
    );
    ensure_eq!(
        (
            token_requests_sent(&s.op).await?,
            token_requests_sent(&two).await?
        ),
        (one_sent, two_sent + 1.0),
        "one new token, by the new shard; none when it moved"
    );

    // Shard 2 crashes and starts over its 501 AwxTokens: its watchers list them in pages
    // (`paged_lists`, 100 a page), and it issues nothing, once it has reconciled every one.
    two.restart()?;
    wait_for(
        "the restarted shard to reconcile each of its 501 AwxTokens",
        Duration::from_secs(120),
        || async {
            let ok = two
                .metric("awx_token_operator_reconciles_total{result=\"ok\"}")
                .await
                .ok()
                .flatten()
                .unwrap_or(0.0);
            Ok((ok >= (TOKENS / 2 + 1) as f64).then_some(()))
        },
    )
    .await?;
    ensure_eq!(
        token_requests_sent(&two).await?,
        0.0,
        "a restart over 501 AwxTokens issues no token"
    );
    Ok(())
}
