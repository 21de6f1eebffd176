//! End-to-end suite: the real operator binary against a real kube-apiserver and
//! controller-manager and a real OAuth2 server behaving like AWX, all on loopback.
//!
//! A custom harness (harness = false) so the environment is started once and always stopped,
//! and scenarios run concurrently, each in its own namespace with its own operator process.
//! `cargo test --test e2e [FILTER]` runs the scenarios whose name contains FILTER.

#[macro_use]
mod support;
mod chart;
mod connections;
mod consumers;
mod image;
mod ops;
mod reconciler;
mod reliability;
mod restarts;
mod scenarios;
mod signin;
mod verify;
mod webdriver;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use support::{Env, SKIPPED, TestResult, skip};

type Scenario =
    fn(Arc<Env>) -> std::pin::Pin<Box<dyn std::future::Future<Output = TestResult> + Send>>;

macro_rules! scenario {
    ($f:path) => {
        (stringify!($f), (|env| Box::pin($f(env))) as Scenario)
    };
}

fn all() -> Vec<(&'static str, Scenario)> {
    use scenarios::*;
    vec![
        scenario!(password_grant_issues_a_working_token),
        scenario!(personal_access_token_is_issued_and_counted),
        scenario!(client_credentials_against_generic_oauth2),
        scenario!(client_credentials_refused_by_awx_with_a_clear_message),
        scenario!(gateway_flavor_is_detected_and_used),
        scenario!(renewal_by_age_is_make_before_break),
        scenario!(refresh_strategy_keeps_the_chain_alive),
        scenario!(forced_rotation_and_suspend),
        scenario!(credentials_change_reissues_for_the_new_user),
        scenario!(wrong_password_fails_without_hot_loop_and_keeps_secret),
        scenario!(awx_down_then_back_recovers),
        scenario!(delete_revokes_and_secret_follows_policy),
        scenario!(operator_restarts_converge_without_leaks),
        scenario!(invalid_spec_and_conflicts_are_reported),
        scenario!(metrics_and_health_endpoints),
        scenario!(owned_secret_is_repaired_after_edit_and_delete),
        scenario!(url_change_revokes_the_old_token_at_the_old_awx),
        scenario!(tls_trust_follows_the_ca_bundle),
        scenario!(readiness_waits_for_caches_and_json_logs_carry_the_object),
        scenario!(awx_faults_give_clear_conditions_and_recover),
        scenario!(external_user_is_refused_with_a_clear_message),
        scenario!(expired_refresh_token_falls_back_to_the_grant),
        scenario!(reconciler::storm_pending_rotation_during_an_outage_is_paced),
        scenario!(reconciler::two_operators_without_election_keep_exactly_the_held_tokens),
        scenario!(reconciler::a_recreated_awx_token_gets_its_own_token),
        scenario!(reconciler::replaced_token_is_revoked_while_renewals_fail),
        scenario!(reconciler::ten_refusals_are_ten_requests),
        scenario!(reconciler::refresh_recovers_from_a_deleted_access_token),
        scenario!(
            reconciler::serial_shards_split_the_tokens_by_label_and_a_relabel_moves_without_a_second_issue
        ),
        scenario!(signin::signin_browser_sign_in_gives_consumers_personal_tokens_that_outlive_session_refreshes),
        scenario!(signin::signin_real_browser_signs_in_and_consumers_rotate_with_no_password_in_the_cluster),
        scenario!(restarts::restarts_each_kind_once_and_the_old_token_waits_for_the_rollout),
        scenario!(restarts::restarts_two_tokens_feeding_one_workload_share_one_restart),
        scenario!(restarts::restarts_owed_survive_a_forbidden_patch_and_a_crash),
        scenario!(
            restarts::restarts_a_rollout_that_never_finishes_keeps_the_old_token_until_the_timeout
        ),
        scenario!(consumers::consumers_awx_cli_reads_the_preset_secret_and_templates_render_exactly),
        scenario!(consumers::consumers_credential_key_names_extra_keys_and_wide_columns),
        scenario!(verify::verify_every_replaces_a_token_deleted_in_awx_and_shrugs_off_a_500),
        scenario!(verify::renewal_before_expiry_percentage_and_refresh_lifetime_set_the_renewal),
        scenario!(ops::ops_leader_election_single_issuer_and_takeover),
        scenario!(ops::ops_rate_limit_holds_for_fifty_tokens_at_once),
        scenario!(ops::ops_renewals_due_together_are_started_early_not_late),
        scenario!(ops::ops_host_outside_allow_list_gets_no_request),
        scenario!(
            connections::connections_cluster_connection_serves_admitted_namespaces_without_their_seeing_its_secret
        ),
        scenario!(connections::connections_inline_awx_is_refused_when_connections_are_required),
        scenario!(chart::chart_lint_template_and_server_dry_run),
        scenario!(chart::chart_install_upgrade_uninstall_keeps_the_crd),
        scenario!(chart::chart_rbac_namespaced_install_runs_the_operator),
        scenario!(chart::chart_rbac_cluster_wide_install_runs_the_operator),
        scenario!(chart::chart_examples_and_plain_manifests_pass_server_dry_run),
        scenario!(chart::chart_dashboard_and_alerts_query_only_exported_metrics),
        scenario!(chart::chart_alerts_pass_promtool_check_and_unit_tests),
        scenario!(image::image_runs_as_the_chart_deploys_it),
        scenario!(reliability::crash_torture_kills_never_break_or_leak_tokens),
        scenario!(reliability::crash_torture_gateway_kills_never_break_or_leak_tokens),
        // Scenarios named serial_* disturb the whole cluster: they run alone, after the rest.
        scenario!(reliability::serial_apiserver_restart_is_survived),
    ]
}

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let selected: Vec<_> = all()
        .into_iter()
        .filter(|(name, _)| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str())))
        .collect();
    if std::env::args().any(|a| a == "--list") {
        for (name, _) in &selected {
            println!("{name}: test");
        }
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(run(selected));
    std::process::exit(code);
}

async fn run(selected: Vec<(&'static str, Scenario)>) -> i32 {
    let started = Instant::now();
    let env = match Env::start().await {
        Ok(env) => env,
        Err(e) => {
            eprintln!("e2e environment failed to start: {e}");
            println!("e2e: 0 passed, 1 failed");
            return 1;
        }
    };
    println!("running {} end-to-end scenarios", selected.len());
    let concurrency: usize = std::env::var("AWXTO_E2E_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let (serial, concurrent): (Vec<_>, Vec<_>) = selected
        .into_iter()
        .partition(|(name, _)| name.contains("serial_"));
    let mut results = run_batch(&env, concurrent, concurrency).await;
    results.extend(run_batch(&env, serial, 1).await);

    // Run last, over everything every operator logged during the suite; with every selected
    // scenario skipped there is nothing to check, and it is skipped too.
    let skipped = results.iter().filter(|(_, r, _)| is_skip(r)).count();
    let leak = if !results.is_empty() && skipped == results.len() {
        skip("every scenario was skipped")
    } else {
        scenarios::operator_logs_contain_no_secret(&env)
    };
    match &leak {
        Ok(()) => println!("test operator_logs_contain_no_secret ... ok"),
        Err(e) if is_skip(&leak) => println!(
            "test operator_logs_contain_no_secret ... skipped\n    {}",
            e.trim_start_matches(SKIPPED)
        ),
        Err(e) => println!("test operator_logs_contain_no_secret ... FAILED\n    {e}"),
    }
    env.stop();

    let skipped = skipped + usize::from(is_skip(&leak));
    let failed = results
        .iter()
        .filter(|(_, r, _)| r.is_err() && !is_skip(r))
        .count()
        + usize::from(leak.is_err() && !is_skip(&leak));
    let passed = results.len() + 1 - failed - skipped;
    println!("\ne2e finished in {:.1}s", started.elapsed().as_secs_f64());
    if skipped > 0 {
        println!("e2e: {passed} passed, {failed} failed, {skipped} skipped");
    } else {
        println!("e2e: {passed} passed, {failed} failed");
    }
    i32::from(failed > 0)
}

fn is_skip(result: &TestResult) -> bool {
    result.as_ref().is_err_and(|e| e.starts_with(SKIPPED))
}

async fn run_batch(
    env: &Arc<Env>,
    selected: Vec<(&'static str, Scenario)>,
    concurrency: usize,
) -> Vec<(&'static str, TestResult, Duration)> {
    stream::iter(selected)
        .map(|(name, f)| {
            let env = env.clone();
            async move {
                let t0 = Instant::now();
                // Serial scenarios load the whole machine (the sharding one issues 1,000
                // tokens: about 200 s alone on 2 cores): they get twice as long.
                let limit = if name.contains("serial_") { 600 } else { 300 };
                let outcome =
                    tokio::time::timeout(Duration::from_secs(limit), tokio::spawn(f(env))).await;
                let result = match outcome {
                    Ok(Ok(r)) => r,
                    Ok(Err(join)) => Err(format!("panicked: {join}")),
                    Err(_) => Err(format!("timed out after {limit} s")),
                };
                let took = t0.elapsed();
                match &result {
                    Ok(()) => println!("test {name} ... ok ({:.1}s)", took.as_secs_f64()),
                    Err(e) if is_skip(&result) => println!(
                        "test {name} ... skipped\n    {}",
                        e.trim_start_matches(SKIPPED)
                    ),
                    Err(e) => println!(
                        "test {name} ... FAILED ({:.1}s)\n    {e}",
                        took.as_secs_f64()
                    ),
                }
                (name, result, took)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}
