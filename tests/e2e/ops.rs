//! Running it in production: leader election, graceful shutdown, AWX rate limits, host allow-list.

use std::{sync::Arc, time::Duration};

use serde_json::json;

use crate::{
    scenarios::{awx_token, setup_with, wait_ready, wait_token},
    support::{Env, TestResult, arrivals, wait_for},
};

const LEADER: &str = "awx_token_operator_leader";
const ISSUED: &str =
    "awx_token_operator_tokens_issued_total{grant=\"Password\",flavor=\"Controller\"}";

pub async fn ops_leader_election_single_issuer_and_takeover(env: Arc<Env>) -> TestResult {
    let awx = env.private_standin("leader", "awx")?;
    let election = [
        "--leader-elect",
        "--lease-namespace",
        "e2e-leader",
        "--lease-duration",
        "10",
    ];
    let mut s = setup_with(&env, "e2e-leader", awx, &election).await?;
    wait_for(
        "the first operator to lead",
        Duration::from_secs(30),
        || async { Ok((s.op.metric(LEADER).await.ok().flatten() == Some(1.0)).then_some(())) },
    )
    .await?;
    let mut standby = env.start_operator(&s.ns, &election)?;
    wait_for(
        "the standby to be ready",
        Duration::from_secs(30),
        || async {
            let ready = reqwest::get(format!("http://127.0.0.1:{}/readyz", standby.port)).await;
            Ok(ready.is_ok_and(|r| r.status() == 200).then_some(()))
        },
    )
    .await?;
    ensure_eq!(
        standby.metric(LEADER).await?,
        Some(0.0),
        "standby is not leader"
    );

    // Refresh chains make a double renewal visible: AWX answers invalid_grant to the loser.
    let names = ["l0", "l1", "l2"];
    for name in names {
        let creds = format!("{name}-creds");
        s.password_credentials(&env, &creds).await?;
        env.apply(&awx_token(
            &s.ns,
            name,
            &s.awx.url,
            "Password",
            &creds,
            json!({"renewal": {"rotateEvery": "4s", "strategy": "Refresh"}}),
        ))?;
    }
    for name in names {
        wait_ready(&env, &s.ns, name, "True", None).await?;
    }
    ensure_eq!(
        s.op.metric(ISSUED).await?.map(|v| v >= 3.0),
        Some(true),
        "the leader issued"
    );
    ensure_eq!(
        standby.metric(ISSUED).await?,
        None,
        "the standby issued nothing"
    );

    let before = env
        .secret_value(&s.ns, "l0", "token")
        .await?
        .ok_or("no token")?;
    s.op.kill();
    wait_for(
        "the standby to take over",
        Duration::from_secs(30),
        || async { Ok((standby.metric(LEADER).await.ok().flatten() == Some(1.0)).then_some(())) },
    )
    .await?;
    let mut token = before;
    let mut renewed = 0;
    while renewed < 2 {
        token = wait_token(&env, &s.ns, "l0", Some(&token)).await?;
        match s.awx.whoami(&token).await? {
            Some(user) if user == s.user => renewed += 1,
            other => {
                // A refresh revokes the access token it replaces at once (AWX's refresh
                // grant), before the Secret changes: on a loaded machine the token read may
                // already be replaced. It may be dead only if the Secret has moved on.
                let now = env.secret_value(&s.ns, "l0", "token").await?;
                ensure!(
                    now.as_deref() != Some(token.as_str()),
                    "renewed by the new leader: the Secret's token answers {other:?}"
                );
            }
        }
    }
    let requests = s.awx.requests().await?;
    let refreshes = requests
        .iter()
        .filter(|r| r["grant_type"] == "refresh_token")
        .count();
    let double = requests
        .iter()
        .filter(|r| r["grant_type"] == "refresh_token" && r["error"] == "invalid_grant")
        .count();
    ensure!(refreshes >= 3, "refreshes happened: {refreshes}");
    ensure_eq!(double, 0, "refresh tokens used twice (invalid_grant)");

    // SIGTERM: exits quickly and releases the Lease, so a new standby leads without waiting
    // for the lease to expire.
    let mut third = env.start_operator(&s.ns, &election)?;
    wait_for(
        "the third operator to stand by",
        Duration::from_secs(30),
        || async { Ok((third.metric(LEADER).await.ok().flatten() == Some(0.0)).then_some(())) },
    )
    .await?;
    let took = standby.terminate().await?;
    ensure!(
        took < Duration::from_secs(10),
        "exit after SIGTERM took {took:?}"
    );
    let handover = std::time::Instant::now();
    wait_for(
        "the third operator to lead",
        Duration::from_secs(30),
        || async { Ok((third.metric(LEADER).await.ok().flatten() == Some(1.0)).then_some(())) },
    )
    .await?;
    // The lease lasts 10 s: a takeover well inside it proves it was released.
    ensure!(
        handover.elapsed() < Duration::from_secs(4),
        "takeover after SIGTERM took {:?}",
        handover.elapsed()
    );
    println!(
        "    SIGTERM exit {:.2}s, takeover {:.2}s",
        took.as_secs_f64(),
        handover.elapsed().as_secs_f64()
    );
    third.kill();
    Ok(())
}

pub async fn ops_rate_limit_holds_for_fifty_tokens_at_once(env: Arc<Env>) -> TestResult {
    let awx = env.private_standin("rate", "awx")?;
    // The rate is measured where the requests arrive: 5 password grants a second at AWX's
    // default hashing cost (~0.3 s of CPU each) would load 2 cores enough for the stand-in's own
    // queueing to show in those times, so this scenario's user gets a cheap hash.
    awx.set_password_cost(1000).await?;
    let s = setup_with(
        &env,
        "e2e-rate",
        awx,
        &["--awx-max-rps", "5", "--concurrency", "50"],
    )
    .await?;
    s.password_credentials(&env, "creds").await?;
    let docs: Vec<String> = (0..50)
        .map(|i| {
            awx_token(
                &s.ns,
                &format!("t{i:02}"),
                &s.awx.url,
                "Password",
                "creds",
                json!({}),
            )
            .to_string()
        })
        .collect();
    env.kubectl_stdin(&["apply", "-f", "-"], &docs.join("\n"))?;
    wait_for("50 AwxTokens Ready", Duration::from_secs(120), || async {
        let out = env.kubectl(&["get", "awxt", "-n", &s.ns, "-o",
            "jsonpath={range .items[*]}{.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}"])?;
        Ok((out.lines().filter(|l| *l == "True").count() == 50).then_some(()))
    })
    .await?;
    let (times, max_in_a_second) = arrivals(&s.awx.requests().await?, 0);
    ensure!(times.len() >= 51, "requests seen: {}", times.len());
    let span = times.last().unwrap_or(&0.0) - times.first().unwrap_or(&0.0);
    println!(
        "    {} requests over {span:.1}s, at most {max_in_a_second} in any second",
        times.len()
    );
    ensure!(
        max_in_a_second <= 5,
        "{max_in_a_second} requests within one second"
    );
    Ok(())
}

pub async fn ops_host_outside_allow_list_gets_no_request(env: Arc<Env>) -> TestResult {
    let awx = env.private_standin("allow", "awx")?;
    let s = setup_with(
        &env,
        "e2e-allow",
        awx,
        &["--allowed-awx-hosts", "awx.example.com,*.corp.example"],
    )
    .await?;
    s.password_credentials(&env, "creds").await?;
    env.apply(&awx_token(
        &s.ns,
        "blocked",
        &s.awx.url,
        "Password",
        "creds",
        json!({}),
    ))?;
    let obj = wait_ready(&env, &s.ns, "blocked", "False", Some("HostNotAllowed")).await?;
    ensure!(
        obj["status"]["conditions"]
            .to_string()
            .contains("--allowed-awx-hosts"),
        "message names the flag"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure_eq!(
        s.awx.requests().await?.len(),
        0,
        "requests at the refused host"
    );
    ensure_eq!(
        s.awx.live_tokens(&s.user).await?,
        Vec::<String>::new(),
        "tokens at the refused host"
    );
    Ok(())
}

/// Renewals due together are started early enough that none is late under the rate limit.
/// Eight tokens issued within seconds (no limit) all come due about 120 s later; a new
/// operator with `--awx-max-rps 2` then has room for one renewal every 3 s (five requests
/// each, spaced 0.6 s; the pacer plans 3.75 s, the limiter 80% busy), 24 s for the eight:
/// started at their renewal times, the last would be about 20 s late.
pub async fn ops_renewals_due_together_are_started_early_not_late(env: Arc<Env>) -> TestResult {
    const N: usize = 8;
    let awx = env.private_standin("paced", "awx")?;
    awx.set_password_cost(1000).await?;
    let mut s = setup_with(&env, "e2e-paced", awx, &["--awx-max-rps", "0"]).await?;
    s.password_credentials(&env, "creds").await?;
    let names: Vec<String> = (0..N).map(|i| format!("p{i}")).collect();
    let docs: Vec<String> = names
        .iter()
        .map(|name| {
            let extra = json!({"renewal": {"rotateEvery": "120s", "revokeGracePeriod": "2s"}});
            awx_token(&s.ns, name, &s.awx.url, "Password", "creds", extra).to_string()
        })
        .collect();
    env.kubectl_stdin(&["apply", "-f", "-"], &docs.join("\n"))?;
    let mut promised = Vec::new();
    for name in &names {
        let obj = wait_ready(&env, &s.ns, name, "True", None).await?;
        let at = |field: &str| {
            obj["status"][field]
                .as_str()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                .ok_or_else(|| format!("{name} has no status.{field}"))
        };
        promised.push((name.clone(), at("issuedAt")?, at("renewalTime")?));
    }
    s.op.kill();
    let op = env.start_operator(&s.ns, &["--awx-max-rps", "2"])?;
    let renewed = wait_for("every token renewed", Duration::from_secs(240), || async {
        let mut issued = Vec::new();
        for (name, first, _) in &promised {
            let obj = env.awx_token(&s.ns, name).await?.ok_or("gone")?;
            match obj["status"]["issuedAt"]
                .as_str()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            {
                Some(at) if at > *first => issued.push(at),
                _ => return Ok(None),
            }
        }
        Ok(Some(issued))
    })
    .await?;
    let lateness: Vec<i64> = promised
        .iter()
        .zip(&renewed)
        .map(|((_, _, due), at)| at.as_second() - due.as_second())
        .collect();
    println!("    renewed relative to status.renewalTime (s): {lateness:?}");
    // Both times are whole seconds: 2 s allows for truncation and the grant's own round trip.
    ensure!(
        lateness.iter().all(|l| *l <= 2),
        "renewals later than promised: {lateness:?}"
    );
    // Pacing started renewals early, not all at once: the new tokens' issue times are spread
    // over at least the 21 s seven slots of 3 s or more take (less a second of rounding each
    // end).
    let (first, last) = (
        renewed.iter().min().ok_or("none")?,
        renewed.iter().max().ok_or("none")?,
    );
    let spread = last.as_second() - first.as_second();
    ensure!(spread >= 19, "renewals spread over {spread} s only");
    ensure_eq!(
        op.metric(ISSUED).await?,
        Some(N as f64),
        "tokens the paced operator issued"
    );
    Ok(())
}
