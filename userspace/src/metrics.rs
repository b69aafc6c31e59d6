//! kube-proxy's metrics, plus kpr's own, served in the Prometheus text formats.
//!
//! The kube-proxy metrics keep kube-proxy's exact names, types, help strings and histogram
//! buckets (pkg/proxy/metrics/metrics.go: subsystem `kubeproxy`), so existing dashboards and
//! alerts work unchanged. kpr adds `kpr_*` metrics for what only an eBPF dataplane has: map
//! occupancy and the kernel programs' per-reason event counters.
//!
//! # Content type
//!
//! `/metrics` negotiates the exposition format from the `Accept` header:
//! - a scraper that asks for OpenMetrics (Prometheus does, by default) gets
//!   `application/openmetrics-text; version=1.0.0; charset=utf-8`, which is what
//!   `prometheus-client` encodes natively (counter families named without `_total` in
//!   `# TYPE`, a closing `# EOF`);
//! - everything else (curl, older scrapers) gets kube-proxy's own format,
//!   `text/plain; version=0.0.4; charset=utf-8`: the same samples, with counter families named
//!   with their `_total` suffix and no `# EOF`.
//!
//! Samples, names and values are the same in both.
//!
//! kube-proxy ≥ 1.33 adds an `ip_family` label to its sync histograms; kpr syncs both families
//! in one sync and does not add it there (sums and rates over the metric are the same either
//! way). The iptables rule counts carry it, one series per family.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// kube-proxy's default `--metrics-bind-address`.
pub const DEFAULT_METRICS_BIND_ADDRESS: &str = "127.0.0.1:10249";

/// The OpenMetrics content type, as `prometheus-client` encodes it.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format kube-proxy serves (client_golang's `text/plain` exposition).
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// An exposition format for `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text.
    OpenMetrics,
    /// Prometheus text 0.0.4 (kube-proxy's format).
    PrometheusText,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Format::PrometheusText => PROMETHEUS_TEXT_CONTENT_TYPE,
        }
    }

    /// Picks the format from an `Accept` header: OpenMetrics when it is asked for with a
    /// q-value at least that of any `text/plain` (or wildcard) range, else Prometheus text.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::PrometheusText;
        };
        let mut openmetrics_q = 0.0f64;
        let mut text_q = 0.0f64;
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let mut q = 1.0f64;
            for param in parts {
                if let Some((k, v)) = param.split_once('=') {
                    if k.trim().eq_ignore_ascii_case("q") {
                        q = v.trim().parse().unwrap_or(0.0);
                    }
                }
            }
            match media.as_str() {
                "application/openmetrics-text" => openmetrics_q = openmetrics_q.max(q),
                "text/plain" | "text/*" | "*/*" => text_q = text_q.max(q),
                _ => {}
            }
        }
        if openmetrics_q > 0.0 && openmetrics_q >= text_q {
            Format::OpenMetrics
        } else {
            Format::PrometheusText
        }
    }
}

/// kube-proxy's sync-duration buckets: `ExponentialBuckets(0.001, 2, 15)`, 1 ms … 16.384 s.
pub fn sync_duration_buckets() -> Vec<f64> {
    (0..15).map(|i| 0.001 * 2f64.powi(i)).collect()
}

/// kube-proxy's network-programming buckets: `MergeBuckets(LinearBuckets(0.25, 0.25, 2),
/// LinearBuckets(1, 1, 59), LinearBuckets(60, 5, 12), LinearBuckets(120, 30, 7))`, which,
/// like kube-proxy's, starts with a `0` bucket.
pub fn network_programming_buckets() -> Vec<f64> {
    let linear =
        |start: f64, width: f64, count: u32| (0..count).map(move |i| start + width * f64::from(i));
    std::iter::once(0.0)
        .chain(linear(0.25, 0.25, 2))
        .chain(linear(1.0, 1.0, 59))
        .chain(linear(60.0, 5.0, 12))
        .chain(linear(120.0, 30.0, 7))
        .collect()
}

type Labels = Vec<(&'static str, String)>;

/// Every metric, encoded by one collector so that names and help strings are exactly
/// kube-proxy's (`Registry::register` would append a `.` to each help string).
#[derive(Debug)]
struct State {
    sync_duration: Histogram,
    sync_full_duration: Histogram,
    sync_partial_duration: Histogram,
    last_timestamp: Gauge<f64, AtomicU64>,
    last_queued_timestamp: Gauge<f64, AtomicU64>,
    network_programming: Histogram,
    endpoint_changes_pending: Gauge,
    endpoint_changes_total: Counter,
    service_changes_pending: Gauge,
    service_changes_total: Counter,
    healthz_total: Family<Labels, Counter>,
    livez_total: Family<Labels, Counter>,
    map_entries: Family<Labels, Gauge>,
    map_capacity: Family<Labels, Gauge>,
    /// Absolute totals read from the kernel, by reason.
    datapath_events: Mutex<BTreeMap<String, u64>>,
    sync_failures: Counter,
    model_errors: Gauge,
    refused: Gauge,
    /// The netfilter modes' figures, as last reported.
    mode: Mutex<crate::dataplane::ModeMetrics>,
}

fn describe<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &M,
) -> Result<(), std::fmt::Error> {
    let metric_encoder = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(metric_encoder)
}

impl Collector for State {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut e;
        describe(
            e,
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            &self.sync_duration,
        )?;
        describe(
            e,
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            &self.sync_full_duration,
        )?;
        describe(
            e,
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            &self.sync_partial_duration,
        )?;
        describe(
            e,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            &self.last_timestamp,
        )?;
        describe(
            e,
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            &self.last_queued_timestamp,
        )?;
        describe(
            e,
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            &self.network_programming,
        )?;
        describe(
            e,
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            &self.endpoint_changes_pending,
        )?;
        describe(
            e,
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            &self.endpoint_changes_total,
        )?;
        describe(
            e,
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            &self.service_changes_pending,
        )?;
        describe(
            e,
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            &self.service_changes_total,
        )?;
        describe(
            e,
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            &self.healthz_total,
        )?;
        describe(
            e,
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            &self.livez_total,
        )?;
        describe(
            e,
            "kpr_bpf_map_entries",
            "Entries in kpr's eBPF maps",
            &self.map_entries,
        )?;
        describe(
            e,
            "kpr_bpf_map_capacity",
            "Capacity (max_entries) of kpr's eBPF maps",
            &self.map_capacity,
        )?;
        {
            let events = self
                .datapath_events
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let probe = ConstCounter::new(0u64);
            let mut metric_encoder = e.encode_descriptor(
                "kpr_datapath_events",
                "Events counted by kpr's kernel programs, by reason",
                None,
                probe.metric_type(),
            )?;
            for (reason, total) in events.iter() {
                let labels = [("reason", reason.as_str())];
                ConstCounter::new(*total).encode(metric_encoder.encode_family(&labels)?)?;
            }
        }
        describe(
            e,
            "kpr_sync_failures",
            "Cumulative failed dataplane syncs",
            &self.sync_failures,
        )?;
        describe(
            e,
            "kpr_model_errors",
            "Services, EndpointSlices or parts of them (an externalIP, a source range, an endpoint, a port) the last model build skipped",
            &self.model_errors,
        )?;
        describe(
            e,
            "kpr_services_refused",
            "Service ports the last sync refused because the dataplane's maps are full",
            &self.refused,
        )?;
        let mode = self.mode.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let counter = |e: &mut DescriptorEncoder, name: &str, help: &str, v: u64| {
            describe(e, name, help, &ConstCounter::new(v))
        };
        let by_label = |e: &mut DescriptorEncoder,
                        name: &str,
                        help: &str,
                        label: &str,
                        values: &[(&'static str, &'static str, u64)]|
         -> Result<(), std::fmt::Error> {
            let probe = Gauge::<i64>::default();
            let mut metric_encoder = e.encode_descriptor(name, help, None, probe.metric_type())?;
            for (k, family, v) in values {
                let g = Gauge::<i64>::default();
                g.set(as_i64(*v));
                g.encode(metric_encoder.encode_family(&[(label, *k), ("ip_family", *family)])?)?;
            }
            Ok(())
        };
        match mode.mode {
            "iptables" => {
                counter(
                    e,
                    "kubeproxy_iptables_restore_failures",
                    "Cumulative proxy iptables restore failures",
                    mode.restore_failures,
                )?;
                counter(
                    e,
                    "kubeproxy_iptables_partial_restore_failures",
                    "Cumulative proxy iptables partial restore failures",
                    mode.partial_restore_failures,
                )?;
                by_label(
                    e,
                    "kubeproxy_sync_proxy_rules_iptables_total",
                    "Total number of iptables rules owned by kube-proxy",
                    "table",
                    &mode.iptables_rules_by_family,
                )?;
            }
            "nftables" => {
                counter(
                    e,
                    "kubeproxy_sync_proxy_rules_nftables_sync_failures",
                    "Cumulative proxy nftables sync failures",
                    mode.restore_failures,
                )?;
                by_label(
                    e,
                    "kpr_nftables_objects",
                    "Objects in kube-proxy's nftables table, by kind",
                    "kind",
                    &mode.nftables_objects_by_family,
                )?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// A cloneable handle on kpr's metrics. Every method is cheap, synchronous and thread-safe.
#[derive(Clone)]
pub struct Metrics {
    state: Arc<State>,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

fn as_i64(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

impl Metrics {
    pub fn new() -> Self {
        let state = Arc::new(State {
            sync_duration: Histogram::new(sync_duration_buckets()),
            sync_full_duration: Histogram::new(sync_duration_buckets()),
            sync_partial_duration: Histogram::new(sync_duration_buckets()),
            last_timestamp: Gauge::default(),
            last_queued_timestamp: Gauge::default(),
            network_programming: Histogram::new(network_programming_buckets()),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes_total: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes_total: Counter::default(),
            healthz_total: Family::default(),
            livez_total: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            datapath_events: Mutex::new(BTreeMap::new()),
            sync_failures: Counter::default(),
            model_errors: Gauge::default(),
            refused: Gauge::default(),
            mode: Mutex::new(Default::default()),
        });
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Arc::clone(&state)));
        Self {
            state,
            registry: Arc::new(registry),
        }
    }

    /// One sync of the dataplane took `duration`: observed in
    /// `kubeproxy_sync_proxy_rules_duration_seconds` and in the full or partial histogram.
    pub fn observe_sync(&self, duration: Duration, full: bool) {
        let secs = duration.as_secs_f64();
        self.state.sync_duration.observe(secs);
        if full {
            self.state.sync_full_duration.observe(secs);
        } else {
            self.state.sync_partial_duration.observe(secs);
        }
    }

    /// The time of the last successful sync.
    pub fn set_last_sync(&self, at: SystemTime) {
        self.state.last_timestamp.set(unix_seconds(at));
    }

    /// The last time a sync was queued (a change arrived, or a periodic sync came due).
    pub fn set_last_queued(&self, at: SystemTime) {
        self.state.last_queued_timestamp.set(unix_seconds(at));
    }

    /// Time from a Service/EndpointSlice change to the sync that programmed it.
    pub fn observe_network_programming(&self, latency: Duration) {
        self.state
            .network_programming
            .observe(latency.as_secs_f64());
    }

    pub fn add_service_changes(&self, n: usize) {
        self.state.service_changes_total.inc_by(n as u64);
    }

    pub fn add_endpoint_changes(&self, n: usize) {
        self.state.endpoint_changes_total.inc_by(n as u64);
    }

    /// Changes seen but not yet synced.
    pub fn set_pending(&self, services: usize, endpoints: usize) {
        self.state.service_changes_pending.set(as_i64(services));
        self.state.endpoint_changes_pending.set(as_i64(endpoints));
    }

    /// Occupancy of an eBPF map (`map` is e.g. `services` or `backends`).
    pub fn set_map_occupancy(&self, map: &str, entries: u64, capacity: u64) {
        let labels = vec![("map", map.to_string())];
        self.state
            .map_entries
            .get_or_create(&labels)
            .set(as_i64(entries));
        self.state
            .map_capacity
            .get_or_create(&labels)
            .set(as_i64(capacity));
    }

    /// The kernel's per-reason event totals (already summed over CPUs), as absolute values:
    /// each becomes `kpr_datapath_events_total{reason=...}`. Reasons not in `totals` keep
    /// their last value.
    pub fn set_datapath_counters(&self, totals: &[(&str, u64)]) {
        let mut events = self
            .state
            .datapath_events
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (reason, total) in totals {
            events.insert((*reason).to_string(), *total);
        }
    }

    /// The netfilter mode's figures (their `_total` counters are the mode's own totals).
    pub fn set_mode_metrics(&self, m: &crate::dataplane::ModeMetrics) {
        *self.state.mode.lock().unwrap_or_else(|p| p.into_inner()) = m.clone();
    }

    pub fn inc_sync_failures(&self) {
        self.state.sync_failures.inc();
    }

    /// Services or endpoints the last model build rejected.
    /// Service ports refused for lack of map space at the last sync (`kpr_services_refused`).
    pub fn set_refused(&self, n: usize) {
        self.state.refused.set(as_i64(n));
    }

    pub fn set_model_errors(&self, n: usize) {
        self.state.model_errors.set(as_i64(n));
    }

    /// Counts one `/healthz` answer (`kubeproxy_proxy_healthz_total{code}`).
    pub fn record_healthz(&self, code: u16) {
        let labels = vec![("code", code.to_string())];
        self.state.healthz_total.get_or_create(&labels).inc();
    }

    /// Counts one `/livez` answer (`kubeproxy_proxy_livez_total{code}`).
    pub fn record_livez(&self, code: u16) {
        let labels = vec![("code", code.to_string())];
        self.state.livez_total.get_or_create(&labels).inc();
    }

    /// The OpenMetrics text exposition (ends with `# EOF`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// The exposition in `format`.
    pub fn encode_as(&self, format: Format) -> String {
        let openmetrics = self.encode();
        match format {
            Format::OpenMetrics => openmetrics,
            Format::PrometheusText => openmetrics_to_prometheus_text(&openmetrics),
        }
    }
}

/// Rewrites prometheus-client's OpenMetrics text as Prometheus text 0.0.4: counter families
/// take their samples' `_total` name in `# HELP`/`# TYPE`, and `# UNIT`/`# EOF` go. Samples
/// are the same in both formats (kpr emits no `_created` samples or exemplars).
fn openmetrics_to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len() + 256);
    let mut pending_help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            pending_help = Some((name, help));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let family = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some((help_name, help)) = pending_help.take() {
                if help_name == name {
                    let _ = writeln!(out, "# HELP {family} {help}");
                } else {
                    let _ = writeln!(out, "# HELP {help_name} {help}");
                }
            }
            let _ = writeln!(out, "# TYPE {family} {kind}");
            continue;
        }
        if let Some((name, help)) = pending_help.take() {
            let _ = writeln!(out, "# HELP {name} {help}");
        }
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Serves `/metrics` on `listener` until the task is dropped; any other path is a 404.
pub async fn serve_metrics(listener: TcpListener, metrics: Metrics) {
    crate::http_server::serve(listener, "metrics", move |req| {
        if req.uri().path() != "/metrics" {
            return crate::http_server::not_found();
        }
        let accept = req
            .headers()
            .get(hyper::header::ACCEPT)
            .and_then(|v| v.to_str().ok());
        let format = Format::negotiate(accept);
        crate::http_server::response(
            hyper::StatusCode::OK,
            format.content_type(),
            &[],
            metrics.encode_as(format),
        )
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().unwrap())
        })
    }

    #[test]
    fn netfilter_modes_report_kube_proxys_per_mode_metrics() {
        let m = Metrics::new();
        m.set_mode_metrics(&crate::dataplane::ModeMetrics {
            mode: "iptables",
            iptables_rules: vec![("filter", 7), ("nat", 49)],
            iptables_rules_by_family: vec![
                ("filter", "IPv4", 7),
                ("nat", "IPv4", 42),
                ("nat", "IPv6", 7),
            ],
            restore_failures: 2,
            partial_restore_failures: 1,
            ..Default::default()
        });
        let text = m.encode();
        for (series, want) in [
            ("kubeproxy_iptables_restore_failures_total", 2.0),
            ("kubeproxy_iptables_partial_restore_failures_total", 1.0),
            (
                "kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\",ip_family=\"IPv4\"}",
                42.0,
            ),
            (
                "kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\",ip_family=\"IPv6\"}",
                7.0,
            ),
        ] {
            assert_eq!(sample(&text, series), Some(want), "{series}:\n{text}");
        }
        m.set_mode_metrics(&crate::dataplane::ModeMetrics {
            mode: "nftables",
            restore_failures: 3,
            ..Default::default()
        });
        let text = m.encode();
        assert_eq!(
            sample(
                &text,
                "kubeproxy_sync_proxy_rules_nftables_sync_failures_total"
            ),
            Some(3.0),
            "{text}"
        );
        assert!(
            !text.contains("kubeproxy_iptables_restore_failures"),
            "{text}"
        );
    }

    #[test]
    fn buckets_match_kube_proxy() {
        let sync = sync_duration_buckets();
        assert_eq!(sync.len(), 15);
        assert_eq!(sync[0], 0.001);
        assert!((sync[14] - 16.384).abs() < 1e-9);
        let np = network_programming_buckets();
        assert_eq!(np.len(), 1 + 2 + 59 + 12 + 7);
        assert_eq!(&np[..5], &[0.0, 0.25, 0.5, 1.0, 2.0]);
        assert_eq!(np[61], 59.0);
        assert_eq!(np[62], 60.0);
        assert_eq!(np[73], 115.0);
        assert_eq!(np[74], 120.0);
        assert_eq!(*np.last().unwrap(), 300.0);
        assert!(np.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn metrics_reflect_calls() {
        let m = Metrics::new();
        m.observe_sync(Duration::from_millis(20), true);
        m.observe_sync(Duration::from_millis(3), false);
        m.observe_network_programming(Duration::from_millis(1500));
        m.set_last_sync(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        m.set_last_queued(UNIX_EPOCH + Duration::from_secs(1_700_000_001));
        m.add_service_changes(3);
        m.add_endpoint_changes(5);
        m.add_endpoint_changes(1);
        m.set_pending(2, 4);
        m.set_map_occupancy("services", 10, 65536);
        m.set_datapath_counters(&[("translated", 42), ("drop_no_backend", 7)]);
        m.set_datapath_counters(&[("translated", 50)]);
        m.inc_sync_failures();
        m.set_model_errors(9);
        m.record_healthz(200);
        m.record_livez(503);

        let om = m.encode();
        assert!(om.ends_with("# EOF\n"), "{om}");
        for (series, want) in [
            ("kubeproxy_sync_proxy_rules_duration_seconds_count", 2.0),
            (
                "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
                1.0,
            ),
            (
                "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"0.016\"}",
                0.0,
            ),
            (
                "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"0.032\"}",
                1.0,
            ),
            (
                "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
                1.0,
            ),
            ("kubeproxy_network_programming_duration_seconds_count", 1.0),
            (
                "kubeproxy_network_programming_duration_seconds_bucket{le=\"2.0\"}",
                1.0,
            ),
            (
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                1_700_000_000.0,
            ),
            (
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                1_700_000_001.0,
            ),
            ("kubeproxy_sync_proxy_rules_service_changes_total", 3.0),
            ("kubeproxy_sync_proxy_rules_endpoint_changes_total", 6.0),
            ("kubeproxy_sync_proxy_rules_service_changes_pending", 2.0),
            ("kubeproxy_sync_proxy_rules_endpoint_changes_pending", 4.0),
            ("kpr_bpf_map_entries{map=\"services\"}", 10.0),
            ("kpr_bpf_map_capacity{map=\"services\"}", 65536.0),
            ("kpr_datapath_events_total{reason=\"translated\"}", 50.0),
            ("kpr_datapath_events_total{reason=\"drop_no_backend\"}", 7.0),
            ("kpr_sync_failures_total", 1.0),
            ("kpr_model_errors", 9.0),
            ("kubeproxy_proxy_healthz_total{code=\"200\"}", 1.0),
            ("kubeproxy_proxy_livez_total{code=\"503\"}", 1.0),
        ] {
            assert_eq!(sample(&om, series), Some(want), "{series} in\n{om}");
        }
        assert!(om.contains("# TYPE kubeproxy_sync_proxy_rules_service_changes counter\n"));
        assert!(om.contains(
            "# HELP kubeproxy_sync_proxy_rules_duration_seconds SyncProxyRules latency in seconds\n"
        ));

        let text = m.encode_as(Format::PrometheusText);
        assert!(!text.contains("# EOF"));
        assert!(text.contains("# TYPE kubeproxy_sync_proxy_rules_service_changes_total counter\n"));
        assert!(text.contains(
            "# HELP kubeproxy_sync_proxy_rules_service_changes_total Cumulative proxy rules Service changes\n"
        ));
        assert!(text.contains("# TYPE kpr_datapath_events_total counter\n"));
        assert!(text.contains("# TYPE kpr_model_errors gauge\n"));
        assert_eq!(sample(&text, "kpr_sync_failures_total"), Some(1.0));
    }

    #[test]
    fn negotiation() {
        use Format::*;
        assert_eq!(Format::negotiate(None), PrometheusText);
        assert_eq!(Format::negotiate(Some("*/*")), PrometheusText);
        assert_eq!(Format::negotiate(Some("text/plain")), PrometheusText);
        // Prometheus 2.x and 3.x defaults.
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            )),
            OpenMetrics
        );
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8,application/openmetrics-text;version=0.0.1;q=0.8,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.6,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            )),
            OpenMetrics
        );
        // A scraper configured to prefer the classic format.
        assert_eq!(
            Format::negotiate(Some(
                "text/plain;version=0.0.4,application/openmetrics-text;version=1.0.0;q=0.5"
            )),
            PrometheusText
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text; q=0")),
            PrometheusText
        );
    }
}
