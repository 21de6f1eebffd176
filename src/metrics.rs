//! Prometheus metrics. Labels are bounded: no token ids, no URLs, no values.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{
        MetricType, TypedMetric,
        counter::Counter,
        family::{Family, MetricConstructor},
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Metric, Registry},
};

use crate::awx::RequestObserver;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub grant: &'static str,
    pub flavor: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RevocationLabels {
    pub flavor: &'static str,
    /// revoked (verified dead) or failed (retried after a backoff).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RestartLabels {
    /// Deployment, StatefulSet or DaemonSet.
    pub kind: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AwxRequestLabels {
    pub endpoint: &'static str,
    /// 2xx, 3xx, 4xx, 5xx, or "error" when no HTTP answer came.
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

#[derive(Clone)]
pub struct LatencyHistogram;

impl MetricConstructor<Histogram> for LatencyHistogram {
    fn new_metric(&self) -> Histogram {
        Histogram::new(exponential_buckets(0.005, 2.0, 14))
    }
}

/// The per-AwxToken gauges, one entry per AwxToken for all three, encoded at scrape time. A
/// `Family` per gauge held each AwxToken's namespace and name as two more strings per family,
/// and a shared cell per value: 2.5 MiB of a restarted operator's heap at 10,000 AwxTokens.
#[derive(Debug, Default)]
struct ObjectGauges {
    /// "namespace/name" (neither can hold a slash) → its times.
    by_object: Mutex<HashMap<Box<str>, ObjectTimes>>,
}

/// One AwxToken's gauges (unix seconds); an AwxToken with none is not kept.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct ObjectTimes {
    expiry: Option<f64>,
    renewal: Option<f64>,
    failing_since: Option<f64>,
}

/// A per-AwxToken gauge: name, help, and which of an AwxToken's times it shows.
type ObjectGauge = (&'static str, &'static str, fn(&ObjectTimes) -> Option<f64>);

/// The per-AwxToken gauges.
const OBJECT_GAUGES: [ObjectGauge; 3] = [
    (
        "token_expiry_timestamp_seconds",
        "When AWX says the current token of an AwxToken expires (unix seconds)",
        |t| t.expiry,
    ),
    (
        "token_renewal_timestamp_seconds",
        "When the operator will renew the token of an AwxToken (unix seconds)",
        |t| t.renewal,
    ),
    (
        "renewal_failing_since_timestamp_seconds",
        "Since when every attempt to obtain a token for an AwxToken has failed (unix seconds; \
         kept across restarts); absent once one succeeds",
        |t| t.failing_since,
    ),
];

impl ObjectGauges {
    fn update(&self, namespace: &str, name: &str, change: impl FnOnce(&mut ObjectTimes)) {
        let key = format!("{namespace}/{name}");
        let mut map = self.by_object.lock().unwrap_or_else(|e| e.into_inner());
        let mut times = map.get(key.as_str()).copied().unwrap_or_default();
        change(&mut times);
        if times == ObjectTimes::default() {
            map.remove(key.as_str());
        } else {
            map.insert(key.into_boxed_str(), times);
        }
    }
}

impl Collector for ObjectGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let map = self.by_object.lock().unwrap_or_else(|e| e.into_inner());
        let mut objects: Vec<(&str, &str, &ObjectTimes)> = map
            .iter()
            .map(|(key, times)| {
                let (namespace, name) = key.split_once('/').unwrap_or(("", key));
                (namespace, name, times)
            })
            .collect();
        objects.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        for (gauge, help, value_of) in OBJECT_GAUGES {
            let mut family = encoder.encode_descriptor(gauge, help, None, MetricType::Gauge)?;
            for (namespace, name, times) in &objects {
                if let Some(value) = value_of(times) {
                    let labels = [("namespace", *namespace), ("name", *name)];
                    ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

const PREFIX: &str = "awx_token_operator";

/// The registry, and the names of the series each family registered in it exports.
struct Described {
    registry: Registry,
    series: BTreeSet<String>,
}

impl Described {
    fn register<M: Metric + TypedMetric>(&mut self, name: &str, help: &str, metric: M) {
        let suffixes: &[&str] = match M::TYPE {
            MetricType::Counter => &["_total"],
            MetricType::Histogram => &["_bucket", "_sum", "_count"],
            MetricType::Info => &["_info"],
            MetricType::Gauge | MetricType::Unknown => &[""],
        };
        self.series
            .extend(suffixes.iter().map(|s| format!("{PREFIX}_{name}{s}")));
        self.registry.register(name, help, metric);
    }
}

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    series: BTreeSet<String>,
    pub reconciles: Family<ResultLabels, Counter>,
    pub reconcile_errors: Family<ReasonLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub tokens_issued: Family<TokenLabels, Counter>,
    pub tokens_renewed: Family<TokenLabels, Counter>,
    pub revocations: Family<RevocationLabels, Counter>,
    pub interrupted_issues: Family<OutcomeLabels, Counter>,
    pub renewal_failures: Family<ReasonLabels, Counter>,
    pub verifications: Family<OutcomeLabels, Counter>,
    pub restarts: Family<RestartLabels, Counter>,
    pub rollouts: Family<OutcomeLabels, Counter>,
    pub awx_requests: Family<AwxRequestLabels, Counter>,
    pub awx_request_duration: Family<EndpointLabels, Histogram, LatencyHistogram>,
    pub objects_in_backoff: Gauge,
    objects: Arc<ObjectGauges>,
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Described {
            registry: Registry::with_prefix(PREFIX),
            series: BTreeSet::new(),
        };
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles of AwxTokens by result (ok, error)",
            reconciles.clone(),
        );
        for result in ["ok", "error"] {
            drop(reconciles.get_or_create(&ResultLabels { result }));
        }
        let reconcile_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed reconciles by condition reason",
            reconcile_errors.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            reconcile_duration.clone(),
        );
        let tokens_issued = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens_issued",
            "Tokens obtained from AWX (first issue, re-issue or refresh)",
            tokens_issued.clone(),
        );
        let tokens_renewed = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens_renewed",
            "Tokens replaced before they expired or grew too old",
            tokens_renewed.clone(),
        );
        let revocations = Family::<RevocationLabels, Counter>::default();
        registry.register(
            "revocations",
            "Attempts to revoke a replaced or deleted AwxToken's token in AWX by outcome: revoked \
             (verified dead), failed (tried again after a backoff)",
            revocations.clone(),
        );
        let interrupted_issues = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "interrupted_issues",
            "Token requests interrupted by a restart: cleaned (the tagged personal token was found \
             and deleted, or none was created) or unrecoverable (an OAuth2 token may be left in AWX)",
            interrupted_issues.clone(),
        );
        let renewal_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "renewal_failures",
            "Failed attempts to obtain a token (first issue, renewal, refresh) by reason",
            renewal_failures.clone(),
        );
        let verifications = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "verifications",
            "Checks of the token in the Secret with AWX (verifyEvery) by outcome: valid, \
             rejected (AWX no longer accepts it), error (no answer)",
            verifications.clone(),
        );
        let restarts = Family::<RestartLabels, Counter>::default();
        registry.register(
            "restarts",
            "Workload restarts for a token change (rolloutRestartTargets) by kind and outcome: \
             restarted, shared (another AwxToken's restart already gave the pods the new token), \
             failed",
            restarts.clone(),
        );
        let rollouts = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "rollouts",
            "Rollouts waited for before replaced tokens are revoked, by outcome: finished, \
             timed_out (rolloutRestart.rolloutTimeout passed; the tokens were revoked anyway)",
            rollouts.clone(),
        );
        let awx_requests = Family::<AwxRequestLabels, Counter>::default();
        registry.register(
            "awx_requests",
            "HTTP requests sent to AWX by endpoint and status class",
            awx_requests.clone(),
        );
        let awx_request_duration =
            Family::<EndpointLabels, Histogram, LatencyHistogram>::new_with_constructor(
                LatencyHistogram,
            );
        registry.register(
            "awx_request_duration_seconds",
            "Latency of HTTP requests to AWX by endpoint",
            awx_request_duration.clone(),
        );
        let objects_in_backoff = Gauge::default();
        registry.register(
            "objects_in_backoff",
            "AwxTokens waiting to retry after a failure",
            objects_in_backoff.clone(),
        );
        let objects = Arc::new(ObjectGauges::default());
        registry.series.extend(
            OBJECT_GAUGES
                .iter()
                .map(|(name, ..)| format!("{PREFIX}_{name}")),
        );
        registry
            .registry
            .register_collector(Box::new(objects.clone()));
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this process holds the leader lease (or runs without election)",
            leader.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "Build information", build_info);
        Self {
            registry: registry.registry,
            series: registry.series,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            tokens_issued,
            tokens_renewed,
            revocations,
            interrupted_issues,
            renewal_failures,
            verifications,
            restarts,
            rollouts,
            awx_requests,
            awx_request_duration,
            objects_in_backoff,
            objects,
            leader,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// The names of the series the operator exports, whether or not they have samples yet
    /// (the registry leaves a family without samples out of the exposition altogether): what a
    /// dashboard or an alert may query.
    pub fn series_names(&self) -> &BTreeSet<String> {
        &self.series
    }

    /// Records since when obtaining a token for one AwxToken has failed (`None`: it has not).
    pub fn set_failing_since(&self, namespace: &str, name: &str, since: Option<f64>) {
        self.objects
            .update(namespace, name, |t| t.failing_since = since);
    }

    /// Records the schedule of one AwxToken (or forgets it with `None`).
    pub fn set_schedule(&self, namespace: &str, name: &str, times: Option<(Option<f64>, f64)>) {
        self.objects.update(namespace, name, |t| {
            (t.expiry, t.renewal) = match times {
                Some((expiry, renewal)) => (expiry, Some(renewal)),
                None => (None, None),
            }
        });
    }
}

impl RequestObserver for Metrics {
    fn observe(&self, endpoint: &'static str, status: Option<u16>, elapsed: Duration) {
        let status = match status {
            Some(200..=299) => "2xx",
            Some(300..=399) => "3xx",
            Some(400..=499) => "4xx",
            Some(500..=599) => "5xx",
            Some(_) => "other",
            None => "error",
        };
        self.awx_requests
            .get_or_create(&AwxRequestLabels { endpoint, status })
            .inc();
        self.awx_request_duration
            .get_or_create(&EndpointLabels { endpoint })
            .observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_prefix() {
        let m = Metrics::new();
        m.observe("token", Some(201), Duration::from_millis(20));
        m.observe("me", None, Duration::from_millis(1));
        m.set_schedule("apps", "ci-bot", Some((Some(2.0e9), 1.9e9)));
        let text = m.render();
        for needle in [
            "awx_token_operator_reconciles_total",
            "awx_token_operator_awx_requests_total{endpoint=\"token\",status=\"2xx\"} 1",
            "awx_token_operator_awx_requests_total{endpoint=\"me\",status=\"error\"} 1",
            "awx_token_operator_awx_request_duration_seconds_bucket",
            "awx_token_operator_token_expiry_timestamp_seconds{namespace=\"apps\",name=\"ci-bot\"} 2000000000",
            "awx_token_operator_token_renewal_timestamp_seconds{namespace=\"apps\",name=\"ci-bot\"} 1900000000",
            "awx_token_operator_build_info{version=",
            "awx_token_operator_leader",
            "awx_token_operator_objects_in_backoff",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        m.set_schedule("apps", "ci-bot", None);
        assert!(!m.render().contains("name=\"ci-bot\""));
    }

    #[test]
    fn per_object_gauges_are_kept_while_one_has_a_value() {
        let m = Metrics::new();
        m.set_schedule("apps", "a", Some((None, 1.9e9)));
        m.set_failing_since("apps", "a", Some(1.7e9));
        m.set_schedule("ops", "b", Some((Some(2.0e9), 1.8e9)));
        let text = m.render();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("timestamp_seconds{"))
            .collect();
        assert_eq!(
            lines,
            [
                "awx_token_operator_token_expiry_timestamp_seconds{namespace=\"ops\",name=\"b\"} 2000000000.0",
                "awx_token_operator_token_renewal_timestamp_seconds{namespace=\"apps\",name=\"a\"} 1900000000.0",
                "awx_token_operator_token_renewal_timestamp_seconds{namespace=\"ops\",name=\"b\"} 1800000000.0",
                "awx_token_operator_renewal_failing_since_timestamp_seconds{namespace=\"apps\",name=\"a\"} 1700000000.0",
            ]
        );
        // The schedule forgotten, the failure is still shown; both forgotten, nothing is kept.
        m.set_schedule("apps", "a", None);
        assert!(m.render().contains(
            "awx_token_operator_renewal_failing_since_timestamp_seconds{namespace=\"apps\",name=\"a\"}"
        ));
        m.set_failing_since("apps", "a", None);
        m.set_schedule("ops", "b", None);
        assert!(m.objects.by_object.lock().unwrap().is_empty());
        assert!(!m.render().contains("timestamp_seconds{"));
    }

    #[test]
    fn failing_since_is_reported_per_object_until_cleared() {
        let m = Metrics::new();
        m.set_failing_since("apps", "ci-bot", Some(1.7e9));
        m.set_failing_since("apps", "other", Some(1.8e9));
        let text = m.render();
        assert!(
            text.contains("awx_token_operator_renewal_failing_since_timestamp_seconds{namespace=\"apps\",name=\"ci-bot\"} 1700000000.0"),
            "{text}"
        );
        m.set_failing_since("apps", "ci-bot", None);
        let lines: Vec<_> = m
            .render()
            .lines()
            .filter(|l| l.starts_with("awx_token_operator_renewal_failing_since"))
            .map(str::to_string)
            .collect();
        assert_eq!(
            lines,
            [
                "awx_token_operator_renewal_failing_since_timestamp_seconds{namespace=\"apps\",name=\"other\"} 1800000000.0"
            ]
        );
    }

    const EXPORTED: [&str; 23] = [
        "awx_token_operator_awx_request_duration_seconds_bucket",
        "awx_token_operator_awx_request_duration_seconds_count",
        "awx_token_operator_awx_request_duration_seconds_sum",
        "awx_token_operator_awx_requests_total",
        "awx_token_operator_build_info",
        "awx_token_operator_interrupted_issues_total",
        "awx_token_operator_leader",
        "awx_token_operator_objects_in_backoff",
        "awx_token_operator_reconcile_duration_seconds_bucket",
        "awx_token_operator_reconcile_duration_seconds_count",
        "awx_token_operator_reconcile_duration_seconds_sum",
        "awx_token_operator_reconcile_errors_total",
        "awx_token_operator_reconciles_total",
        "awx_token_operator_renewal_failing_since_timestamp_seconds",
        "awx_token_operator_renewal_failures_total",
        "awx_token_operator_restarts_total",
        "awx_token_operator_revocations_total",
        "awx_token_operator_rollouts_total",
        "awx_token_operator_token_expiry_timestamp_seconds",
        "awx_token_operator_token_renewal_timestamp_seconds",
        "awx_token_operator_tokens_issued_total",
        "awx_token_operator_tokens_renewed_total",
        "awx_token_operator_verifications_total",
    ];

    /// The names of the sample lines of an exposition.
    fn sampled(text: &str) -> BTreeSet<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_string)
            .collect()
    }

    /// A family without samples is left out of the exposition, yet it is a name a dashboard
    /// may query: the names come from the registration, for every family.
    #[test]
    fn series_names_are_every_family_with_or_without_samples() {
        let m = Metrics::new();
        let want: BTreeSet<String> = EXPORTED.into_iter().map(str::to_string).collect();
        assert_eq!(m.series_names(), &want);
        let text = m.render();
        assert!(!text.contains("awx_token_operator_revocations"), "{text}");
        assert!(sampled(&text).is_subset(&want));
    }

    /// Once every family has a sample, the exposition has exactly the names
    /// `series_names` says: the suffixes follow the encoder.
    #[test]
    fn series_names_match_the_exposition_once_every_family_has_a_sample() {
        let m = Metrics::new();
        let token = TokenLabels {
            grant: "Password",
            flavor: "Controller",
        };
        m.reconcile_errors
            .get_or_create(&ReasonLabels { reason: "Conflict" })
            .inc();
        m.tokens_issued.get_or_create(&token).inc();
        m.tokens_renewed.get_or_create(&token).inc();
        m.revocations
            .get_or_create(&RevocationLabels {
                flavor: "Controller",
                outcome: "revoked",
            })
            .inc();
        m.interrupted_issues
            .get_or_create(&OutcomeLabels { outcome: "cleaned" })
            .inc();
        m.renewal_failures
            .get_or_create(&ReasonLabels {
                reason: "AwxServerError",
            })
            .inc();
        m.verifications
            .get_or_create(&OutcomeLabels { outcome: "valid" })
            .inc();
        m.restarts
            .get_or_create(&RestartLabels {
                kind: "Deployment",
                outcome: "restarted",
            })
            .inc();
        m.rollouts
            .get_or_create(&OutcomeLabels {
                outcome: "finished",
            })
            .inc();
        m.observe("token", Some(201), Duration::from_millis(20));
        m.set_schedule("apps", "ci-bot", Some((Some(2.0e9), 1.9e9)));
        m.set_failing_since("apps", "ci-bot", Some(1.7e9));
        assert_eq!(&sampled(&m.render()), m.series_names());
    }
}
