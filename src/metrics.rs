//! Metric names, descriptions and handles in one place (DESIGN.md §3.7).
//!
//! Each bulkhead instance owns its own Prometheus recorder instead of installing a process-wide
//! one, so a test can run several proxies in one process and read each one's numbers. Handles
//! are registered once, up front; recording a value is then an atomic operation with no lookup.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// Histogram buckets in seconds, for database latencies: sub-millisecond to a minute.
const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// [`BUCKETS`] in nanoseconds, rounded.
const BUCKET_NS: [u64; BUCKETS.len()] = {
    let mut ns = [0; BUCKETS.len()];
    let mut i = 0;
    while i < BUCKETS.len() {
        ns[i] = (BUCKETS[i] * 1e9 + 0.5) as u64;
        i += 1;
    }
    ns
};

const METADATA: Metadata<'static> = Metadata::new("bulkhead", metrics::Level::INFO, None);

/// A statement's class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Read,
    Write,
}

impl Class {
    pub fn label(self) -> &'static str {
        match self {
            Class::Read => "read",
            Class::Write => "write",
        }
    }
}

/// How a statement ended, for bulkhead_statements_total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Error,
    Timeout,
    Refused,
    Shed,
}

const OUTCOMES: [(Outcome, &str); 5] = [
    (Outcome::Ok, "ok"),
    (Outcome::Error, "error"),
    (Outcome::Timeout, "timeout"),
    (Outcome::Refused, "refused"),
    (Outcome::Shed, "shed"),
];

enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric bulkhead exports through the recorder, with its help text (DESIGN.md §3.7);
/// the statement latency histogram is rendered by [`Latency`].
const DESCRIPTIONS: [(&str, Kind, Option<Unit>, &str); 25] = [
    (
        "bulkhead_client_connections",
        Kind::Gauge,
        None,
        "Client connections open now.",
    ),
    (
        "bulkhead_server_connections",
        Kind::Gauge,
        None,
        "Server connections open now.",
    ),
    (
        "bulkhead_statements_total",
        Kind::Counter,
        None,
        "Requests by class (read, write) and outcome (ok, error, timeout, refused, shed).",
    ),
    (
        "bulkhead_cancels_sent_total",
        Kind::Counter,
        None,
        "CancelRequests bulkhead sent to servers because a deadline passed or a client left.",
    ),
    (
        "bulkhead_inflight_statements",
        Kind::Gauge,
        None,
        "Concurrency slots held now: write for writing transactions, read for the others.",
    ),
    (
        "bulkhead_concurrency_limit",
        Kind::Gauge,
        None,
        "Current concurrency limit: read is the limit for all, write for writes.",
    ),
    (
        "bulkhead_circuit_state",
        Kind::Gauge,
        None,
        "Write circuit per backend: 0 closed, 1 half-open, 2 open.",
    ),
    (
        "bulkhead_cancel_requests_total",
        Kind::Counter,
        None,
        "CancelRequests from clients: forwarded to a server, or dropped for an unknown key.",
    ),
    (
        "bulkhead_circuit_openings_total",
        Kind::Counter,
        None,
        "Times the write circuit of a backend opened.",
    ),
    (
        "bulkhead_backend_unresponsive",
        Kind::Gauge,
        None,
        "1 while the probe finds the backend not answering at all (twice in a row or more).",
    ),
    (
        "bulkhead_backend_up",
        Kind::Gauge,
        None,
        "1 if the backend answered its last probe in this role.",
    ),
    (
        "bulkhead_writable_primary",
        Kind::Gauge,
        None,
        "1 while a writable primary is known (sessions that write have somewhere to go), else 0.",
    ),
    (
        "bulkhead_ready",
        Kind::Gauge,
        None,
        "1 while /readyz answers 200, else 0 (worked out four times a second).",
    ),
    (
        "bulkhead_readiness_changes_total",
        Kind::Counter,
        None,
        "Times readiness changed (ready to not ready or back), for alerts on flapping.",
    ),
    (
        "bulkhead_patroni_following",
        Kind::Gauge,
        None,
        "1 while Patroni's /cluster answers and its leader decides the primary; 0 while bulkhead's own probes decide ([database] discovery = \"patroni\" only).",
    ),
    (
        "bulkhead_backend_replay_lag_seconds",
        Kind::Gauge,
        None,
        "A standby's replay lag at its last probe (0 when it has replayed all it received, or is not a standby).",
    ),
    (
        "bulkhead_probe_duration_seconds",
        Kind::Histogram,
        Some(Unit::Seconds),
        "How long a probe of a backend's status took.",
    ),
    (
        "bulkhead_failovers_total",
        Kind::Counter,
        None,
        "Times the writable primary moved to another host.",
    ),
    (
        "bulkhead_shed_total",
        Kind::Counter,
        None,
        "Connections and statements refused for want of capacity, by reason.",
    ),
    (
        "bulkhead_pool_server_connections",
        Kind::Gauge,
        None,
        "Pooled server connections per (user, database) pool, by state: idle, or active (lent to a client).",
    ),
    (
        "bulkhead_pool_clients_waiting",
        Kind::Gauge,
        None,
        "Clients waiting now for a server connection of the pool.",
    ),
    (
        "bulkhead_pool_wait_seconds",
        Kind::Histogram,
        Some(Unit::Seconds),
        "How long clients waited for a server connection of the pool (those that got one).",
    ),
    (
        "bulkhead_pool_size",
        Kind::Gauge,
        None,
        "The pool's size in force: its server connections, idle and lent together.",
    ),
    (
        "bulkhead_pool_server_logins_total",
        Kind::Counter,
        None,
        "Server connections the pool opened (logged in), by result: ok, failed.",
    ),
    (
        "bulkhead_pool_pinned_clients",
        Kind::Gauge,
        None,
        "Transaction mode: clients holding their server connection until they leave, because they used a feature tied to one backend.",
    ),
];

/// Per-class handles.
#[derive(Clone)]
pub struct ClassMetrics {
    statements: [Counter; 5],
    /// Statement latency, recorded without allocating (see [`Latency`]).
    pub duration: Arc<Latency>,
    pub inflight: Gauge,
    pub limit: Gauge,
}

impl ClassMetrics {
    pub fn statement(&self, outcome: Outcome) -> &Counter {
        &self.statements[OUTCOMES
            .iter()
            .position(|(o, _)| *o == outcome)
            .unwrap_or(0)]
    }
}

/// Every handle the data path records into, and the renderer for /metrics.
#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    pub client_connections: Gauge,
    pub server_connections: Gauge,
    pub cancels_sent: Counter,
    /// Client CancelRequests forwarded, and dropped for an unknown key.
    pub cancels_forwarded: Counter,
    pub cancels_unknown: Counter,
    pub read: ClassMetrics,
    pub write: ClassMetrics,
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&BUCKETS)
            .expect("bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        for (name, kind, unit, help) in DESCRIPTIONS {
            let (name, help) = (KeyName::from_const_str(name), SharedString::const_str(help));
            match kind {
                Kind::Counter => recorder.describe_counter(name, unit, help),
                Kind::Gauge => recorder.describe_gauge(name, unit, help),
                Kind::Histogram => recorder.describe_histogram(name, unit, help),
            }
        }

        let class = |c: Class| ClassMetrics {
            statements: OUTCOMES.map(|(_, outcome)| {
                counter(
                    &recorder,
                    "bulkhead_statements_total",
                    &[("class", c.label()), ("outcome", outcome)],
                )
            }),
            duration: Arc::new(Latency::default()),
            inflight: gauge(
                &recorder,
                "bulkhead_inflight_statements",
                &[("class", c.label())],
            ),
            limit: gauge(
                &recorder,
                "bulkhead_concurrency_limit",
                &[("class", c.label())],
            ),
        };
        Metrics {
            client_connections: gauge(&recorder, "bulkhead_client_connections", &[]),
            server_connections: gauge(&recorder, "bulkhead_server_connections", &[]),
            cancels_sent: counter(&recorder, "bulkhead_cancels_sent_total", &[]),
            cancels_forwarded: counter(
                &recorder,
                "bulkhead_cancel_requests_total",
                &[("result", "forwarded")],
            ),
            cancels_unknown: counter(
                &recorder,
                "bulkhead_cancel_requests_total",
                &[("result", "unknown_key")],
            ),
            read: class(Class::Read),
            write: class(Class::Write),
            handle,
            recorder: Arc::new(recorder),
        }
    }

    pub fn class(&self, c: Class) -> &ClassMetrics {
        match c {
            Class::Read => &self.read,
            Class::Write => &self.write,
        }
    }

    /// Registers a counter later (labels known only at run time, such as a backend address).
    pub fn counter(&self, name: &'static str, label_pairs: &[(&'static str, &str)]) -> Counter {
        counter(&self.recorder, name, label_pairs)
    }

    /// Registers a gauge later.
    pub fn gauge(&self, name: &'static str, label_pairs: &[(&'static str, &str)]) -> Gauge {
        gauge(&self.recorder, name, label_pairs)
    }

    /// Registers a histogram later.
    pub fn histogram(&self, name: &'static str, label_pairs: &[(&'static str, &str)]) -> Histogram {
        self.recorder
            .register_histogram(&Key::from_parts(name, labels(label_pairs)), &METADATA)
    }

    /// Drains histogram samples into their buckets. Histograms keep raw samples until this runs
    /// (a scrape runs it too), so it must run periodically even when nobody scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The Prometheus text exposition of everything recorded.
    pub fn render(&self) -> String {
        let mut out = self.handle.render();
        let (name, help) = (DURATION_NAME, DURATION_HELP);
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        self.read
            .duration
            .render(name, Class::Read.label(), &mut out);
        self.write
            .duration
            .render(name, Class::Write.label(), &mut out);
        out
    }
}

const DURATION_NAME: &str = "bulkhead_statement_duration_seconds";
const DURATION_HELP: &str = "Time from the server beginning a request to its ReadyForQuery.";

/// A latency histogram with fixed buckets in atomics. The exporter's own histograms keep raw
/// samples in blocks it allocates as they fill; on the relay path, where a sample is taken
/// per request, recording here is three atomic adds and never allocates.
#[derive(Debug, Default)]
pub struct Latency {
    /// Per bucket (not cumulative); the last counts samples above every bound.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Latency {
    pub fn record(&self, took: std::time::Duration) {
        // In whole nanoseconds: integer comparisons with constants the compiler writes into
        // the code, where floating-point bounds are loads from scattered constant data.
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let at = BUCKET_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(BUCKET_NS.len());
        self.buckets[at].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn render(&self, name: &str, class: &str, out: &mut String) {
        use std::fmt::Write;
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{class=\"{class}\",le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.buckets[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{class=\"{class}\",le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{class=\"{class}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{class=\"{class}\"}} {cumulative}");
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn labels(pairs: &[(&'static str, &str)]) -> Vec<Label> {
    pairs
        .iter()
        .map(|(k, v)| Label::new(*k, v.to_string()))
        .collect()
}

fn counter(r: &PrometheusRecorder, name: &'static str, pairs: &[(&'static str, &str)]) -> Counter {
    r.register_counter(&Key::from_parts(name, labels(pairs)), &METADATA)
}

fn gauge(r: &PrometheusRecorder, name: &'static str, pairs: &[(&'static str, &str)]) -> Gauge {
    r.register_gauge(&Key::from_parts(name, labels(pairs)), &METADATA)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `name` is a series bulkhead exports: a described metric, or a histogram's
    /// `_bucket`, `_sum` or `_count`.
    fn exported(name: &str) -> bool {
        let histograms = DESCRIPTIONS
            .iter()
            .filter(|d| matches!(d.1, Kind::Histogram))
            .map(|d| d.0)
            .chain([DURATION_NAME]);
        DESCRIPTIONS.iter().any(|d| d.0 == name)
            || name == DURATION_NAME
            || histograms.into_iter().any(|h| {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| name.strip_suffix(suffix) == Some(h))
            })
    }

    /// Every metric name in a PromQL expression: identifiers followed by a selector `{`, and
    /// every identifier that starts with `bulkhead_`.
    fn metric_names(expr: &str) -> Vec<String> {
        let mut names = Vec::new();
        let bytes = expr.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let c = bytes[i];
            if c.is_ascii_alphabetic() || c == b'_' {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                let word = &expr[start..i];
                let quoted = start > 0 && matches!(bytes[start - 1], b'"' | b'$' | b'{' | b',');
                if word.starts_with("bulkhead_") || (bytes.get(i) == Some(&b'{') && !quoted) {
                    names.push(word.to_string());
                }
            } else if c == b'"' {
                // Skip label values and strings.
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            } else {
                i += 1;
            }
        }
        names
    }

    #[test]
    fn the_dashboard_and_the_alerts_use_only_metrics_bulkhead_exports() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../config/grafana-dashboard.json"))
                .expect("the dashboard is JSON");
        let mut exprs = Vec::new();
        fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(map) => {
                    for (k, v) in map {
                        match (k.as_str(), v) {
                            ("expr" | "definition", serde_json::Value::String(e)) => {
                                out.push(e.clone())
                            }
                            _ => walk(v, out),
                        }
                    }
                }
                serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
                _ => {}
            }
        }
        walk(&dashboard, &mut exprs);
        assert!(exprs.len() > 20, "{} expressions found", exprs.len());
        let mut used = std::collections::BTreeSet::new();
        for e in &exprs {
            for name in metric_names(e) {
                assert!(
                    exported(&name),
                    "the dashboard uses {name}, not exported: {e}"
                );
                used.insert(name);
            }
        }
        // The alert rules: every expression line.
        let rules = include_str!("../config/alerts.yml");
        let mut alerts = 0;
        for line in rules.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let expr = line.trim_start().strip_prefix("expr:").unwrap_or(line);
            if line.contains("expr:") {
                alerts += 1;
            }
            if line.contains("description:") || line.contains("summary:") {
                continue;
            }
            for name in metric_names(expr) {
                assert!(
                    name == "up" || exported(&name),
                    "an alert uses {name}, not exported: {line}"
                );
            }
        }
        assert!(alerts >= 10, "{alerts} alert expressions");
        // A name that is not exported is caught.
        assert!(!exported("bulkhead_statement_latency_bucket"));
        assert_eq!(
            metric_names(r#"sum(rate(foo_total{instance=~"$instance", x="a{b"}[1m]))"#),
            ["foo_total"]
        );
        // The panels cover what an operator looks at.
        for must in [
            "bulkhead_statements_total",
            "bulkhead_statement_duration_seconds_bucket",
            "bulkhead_circuit_state",
            "bulkhead_backend_up",
            "bulkhead_inflight_statements",
            "bulkhead_concurrency_limit",
            "bulkhead_shed_total",
            "bulkhead_pool_server_connections",
        ] {
            assert!(used.contains(must), "no panel shows {must}");
        }
    }

    #[test]
    fn latency_buckets_hold_samples_up_to_their_bound_inclusive() {
        use std::time::Duration;
        let l = Latency::default();
        for took in [
            Duration::from_micros(500),
            Duration::from_millis(1),
            Duration::from_nanos(1_000_001),
            Duration::from_secs(60),
            Duration::from_secs(61),
        ] {
            l.record(took);
        }
        let counts: Vec<u64> = l
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        assert_eq!(counts[..3], [1, 1, 1]);
        assert_eq!(counts[BUCKETS.len() - 1], 1, "60 s is in the last bound");
        assert_eq!(counts[BUCKETS.len()], 1, "61 s is above every bound");
        assert_eq!(counts.iter().sum::<u64>(), 5);
        assert_eq!(
            l.sum_ns.load(Ordering::Relaxed),
            500_000 + 1_000_000 + 1_000_001 + 121_000_000_000
        );
    }

    #[test]
    fn registered_metrics_render_with_help_and_labels() {
        let m = Metrics::new();
        m.client_connections.increment(2.0);
        m.write.statement(Outcome::Timeout).increment(1);
        m.read.duration.record(std::time::Duration::from_millis(3));
        let text = m.render();
        assert!(
            text.contains("# HELP bulkhead_client_connections"),
            "{text}"
        );
        assert!(text.contains("bulkhead_client_connections 2"), "{text}");
        assert!(
            text.contains("bulkhead_statements_total{class=\"write\",outcome=\"timeout\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "bulkhead_statement_duration_seconds_bucket{class=\"read\",le=\"0.005\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn two_instances_do_not_share_numbers() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.cancels_sent.increment(5);
        assert!(a.render().contains("bulkhead_cancels_sent_total 5"));
        assert!(b.render().contains("bulkhead_cancels_sent_total 0"));
    }
}
