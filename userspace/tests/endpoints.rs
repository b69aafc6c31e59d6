//! The metrics and health endpoints over real HTTP on 127.0.0.1: status codes, headers, and
//! a metrics body that parses strictly as Prometheus text 0.0.4 and as OpenMetrics.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Node, NodeSpec, Taint};
use kpr::health::{serve_health, ProxyHealth, TO_BE_DELETED_TAINT};
use kpr::metrics::{serve_metrics, Metrics};
use tokio::net::TcpListener;

/// Every network wait in these tests is bounded by this.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A plain HTTP/1.1 GET, with `Connection: close`, on a blocking thread with I/O timeouts.
async fn get(addr: SocketAddr, path: &str, accept: Option<&str>) -> HttpResponse {
    let path = path.to_string();
    let accept = accept.map(str::to_string);
    let fetch = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        if let Some(accept) = accept {
            req.push_str(&format!("Accept: {accept}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).expect("write request");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).expect("read response");
        let raw = String::from_utf8(raw).expect("UTF-8 response");
        let (head, body) = raw.split_once("\r\n\r\n").expect("end of headers");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let mut parts = status_line.splitn(3, ' ');
        assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
        let status = parts.next().unwrap().parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (k, v) = l.split_once(':').expect("header line");
                (k.trim().to_string(), v.trim().to_string())
            })
            .collect();
        let resp = HttpResponse {
            status,
            headers,
            body: body.to_string(),
        };
        if let Some(len) = resp.header("content-length") {
            assert_eq!(len.parse::<usize>().unwrap(), resp.body.len());
        }
        resp
    });
    tokio::time::timeout(IO_TIMEOUT * 2, fetch)
        .await
        .expect("request timed out")
        .expect("request thread panicked")
}

// ---------------------------------------------------------------------------------------------
// A strict parser for the two text formats: every line must be a HELP, TYPE, (OpenMetrics)
// EOF, or a sample of the family declared just before it.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavor {
    PrometheusText,
    OpenMetrics,
}

#[derive(Debug)]
struct Family {
    kind: String,
    help: Option<String>,
    /// (sample name, labels, value)
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Family {
    fn value(&self, sample: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples.iter().find_map(|(n, l, v)| {
            let want: BTreeMap<String, String> = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            (n == sample && *l == want).then_some(*v)
        })
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse::<f64>().map_err(|e| format!("value {s:?}: {e}")),
    }
}

/// Parses `name{a="b",c="d"} value` (no timestamps: kpr emits none).
fn parse_sample(line: &str) -> Result<(String, BTreeMap<String, String>, f64), String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or_else(|| format!("no value in {line:?}"))?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(mut r) = rest.strip_prefix('{') {
        if let Some(after) = r.strip_prefix('}') {
            r = after;
        } else {
            loop {
                let eq = r
                    .find('=')
                    .ok_or_else(|| format!("label without = in {line:?}"))?;
                let key = &r[..eq];
                if !is_label_name(key) {
                    return Err(format!("bad label name {key:?} in {line:?}"));
                }
                r = r[eq + 1..]
                    .strip_prefix('"')
                    .ok_or_else(|| format!("label value not quoted in {line:?}"))?;
                let mut value = String::new();
                let mut chars = r.char_indices();
                let end = loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '\\')) => value.push('\\'),
                            Some((_, '"')) => value.push('"'),
                            Some((_, 'n')) => value.push('\n'),
                            other => return Err(format!("bad escape {other:?} in {line:?}")),
                        },
                        Some((i, '"')) => break i,
                        Some((_, '\n')) | None => {
                            return Err(format!("unterminated label value in {line:?}"))
                        }
                        Some((_, c)) => value.push(c),
                    }
                };
                if labels.insert(key.to_string(), value).is_some() {
                    return Err(format!("duplicate label {key:?} in {line:?}"));
                }
                r = &r[end + 1..];
                if let Some(after) = r.strip_prefix(',') {
                    r = after;
                } else if let Some(after) = r.strip_prefix('}') {
                    r = after;
                    break;
                } else {
                    return Err(format!("expected , or }} after a label in {line:?}"));
                }
            }
        }
        rest = r;
    }
    let value = rest
        .strip_prefix(' ')
        .ok_or_else(|| format!("no space before the value in {line:?}"))?;
    if value.contains(' ') {
        return Err(format!("unexpected timestamp or trailing text in {line:?}"));
    }
    Ok((name.to_string(), labels, parse_value(value)?))
}

/// Which sample names a family of `kind` may hold, and which label is reserved.
fn sample_belongs(flavor: Flavor, family: &str, kind: &str, sample: &str) -> bool {
    match (kind, flavor) {
        ("counter", Flavor::OpenMetrics) => {
            sample == format!("{family}_total") || sample == format!("{family}_created")
        }
        ("counter", Flavor::PrometheusText) => sample == family && family.ends_with("_total"),
        ("gauge", _) | ("untyped", _) | ("unknown", _) => sample == family,
        ("histogram", _) => ["_bucket", "_sum", "_count", "_created"]
            .iter()
            .any(|s| sample == format!("{family}{s}")),
        _ => false,
    }
}

fn parse_exposition(text: &str, flavor: Flavor) -> Result<BTreeMap<String, Family>, String> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut pending_help: Option<(String, String)> = None;
    let mut seen_series = HashSet::new();
    let mut eof = false;
    if !text.ends_with('\n') {
        return Err("exposition does not end with a newline".into());
    }
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        if eof {
            return Err(format!("line {n}: content after # EOF"));
        }
        if line.is_empty() {
            return Err(format!("line {n}: empty line"));
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest
                .split_once(' ')
                .ok_or_else(|| format!("line {n}: HELP without text"))?;
            if !is_metric_name(name) {
                return Err(format!("line {n}: bad name {name:?}"));
            }
            if pending_help.is_some() {
                return Err(format!("line {n}: two HELP lines in a row"));
            }
            pending_help = Some((name.to_string(), help.to_string()));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or_else(|| format!("line {n}: TYPE without type"))?;
            if !is_metric_name(name) {
                return Err(format!("line {n}: bad name {name:?}"));
            }
            let known: &[&str] = match flavor {
                Flavor::PrometheusText => &["counter", "gauge", "histogram", "summary", "untyped"],
                Flavor::OpenMetrics => &[
                    "counter",
                    "gauge",
                    "histogram",
                    "gaugehistogram",
                    "stateset",
                    "info",
                    "summary",
                    "unknown",
                ],
            };
            if !known.contains(&kind) {
                return Err(format!("line {n}: unknown type {kind:?}"));
            }
            let help = match pending_help.take() {
                Some((help_name, help)) if help_name == name => Some(help),
                Some((help_name, _)) => {
                    return Err(format!("line {n}: HELP for {help_name} before TYPE {name}"))
                }
                None => None,
            };
            if families.contains_key(name) {
                return Err(format!("line {n}: family {name} declared twice"));
            }
            families.insert(
                name.to_string(),
                Family {
                    kind: kind.to_string(),
                    help,
                    samples: Vec::new(),
                },
            );
            current = Some(name.to_string());
            continue;
        }
        if line == "# EOF" {
            if flavor != Flavor::OpenMetrics {
                return Err(format!("line {n}: # EOF in Prometheus text"));
            }
            eof = true;
            continue;
        }
        if line.starts_with('#') {
            return Err(format!("line {n}: unexpected comment {line:?}"));
        }
        if pending_help.is_some() {
            return Err(format!("line {n}: HELP not followed by TYPE"));
        }
        let (name, labels, value) = parse_sample(line).map_err(|e| format!("line {n}: {e}"))?;
        let family_name = current
            .as_ref()
            .ok_or_else(|| format!("line {n}: sample before any TYPE"))?;
        let family = families.get_mut(family_name).unwrap();
        if !sample_belongs(flavor, family_name, &family.kind, &name) {
            return Err(format!(
                "line {n}: sample {name} does not belong to {} family {family_name}",
                family.kind
            ));
        }
        if name.ends_with("_bucket") != labels.contains_key("le") && family.kind == "histogram" {
            return Err(format!(
                "line {n}: le label on a non-bucket or missing on a bucket"
            ));
        }
        if !seen_series.insert(line[..line.rfind(' ').unwrap()].to_string()) {
            return Err(format!("line {n}: duplicate series"));
        }
        family.samples.push((name, labels, value));
    }
    if pending_help.is_some() {
        return Err("HELP at the end without TYPE".into());
    }
    if flavor == Flavor::OpenMetrics && !eof {
        return Err("OpenMetrics exposition without # EOF".into());
    }
    // Histograms: buckets ascending in le, counts cumulative, +Inf bucket equal to _count.
    for (name, family) in &families {
        if family.kind != "histogram" {
            continue;
        }
        let mut by_series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        let mut counts: BTreeMap<String, f64> = BTreeMap::new();
        for (sample, labels, value) in &family.samples {
            let mut rest = labels.clone();
            let le = rest.remove("le");
            let key = format!("{rest:?}");
            if sample.ends_with("_bucket") {
                let le =
                    parse_value(le.as_deref().unwrap()).map_err(|e| format!("{name}: le: {e}"))?;
                by_series.entry(key).or_default().push((le, *value));
            } else if sample.ends_with("_count") {
                counts.insert(key, *value);
            }
        }
        for (key, buckets) in by_series {
            for w in buckets.windows(2) {
                if w[0].0 >= w[1].0 {
                    return Err(format!("{name}{key}: le not ascending: {w:?}"));
                }
                if w[0].1 > w[1].1 {
                    return Err(format!("{name}{key}: buckets not cumulative: {w:?}"));
                }
            }
            let last = buckets.last().unwrap();
            if last.0 != f64::INFINITY {
                return Err(format!("{name}{key}: no +Inf bucket"));
            }
            if counts.get(&key) != Some(&last.1) {
                return Err(format!("{name}{key}: +Inf bucket differs from _count"));
            }
        }
    }
    Ok(families)
}

// ---------------------------------------------------------------------------------------------

const OPENMETRICS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// kube-proxy's metrics: (family name in Prometheus text 0.0.4, type, help).
const KUBE_PROXY_METRICS: &[(&str, &str, &str)] = &[
    (
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "histogram",
        "SyncProxyRules latency in seconds",
    ),
    (
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "histogram",
        "SyncProxyRules latency in seconds for full resyncs",
    ),
    (
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        "histogram",
        "SyncProxyRules latency in seconds for partial resyncs",
    ),
    (
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "gauge",
        "The last time proxy rules were successfully synced",
    ),
    (
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "gauge",
        "The last time a sync of proxy rules was queued",
    ),
    (
        "kubeproxy_network_programming_duration_seconds",
        "histogram",
        "In Cluster Network Programming Latency in seconds",
    ),
    (
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "counter",
        "Cumulative proxy rules Service changes",
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "counter",
        "Cumulative proxy rules Endpoint changes",
    ),
    (
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "gauge",
        "Pending proxy rules Service changes",
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "gauge",
        "Pending proxy rules Endpoint changes",
    ),
    (
        "kubeproxy_proxy_healthz_total",
        "counter",
        "Cumulative proxy healthz HTTP status",
    ),
    (
        "kubeproxy_proxy_livez_total",
        "counter",
        "Cumulative proxy livez HTTP status",
    ),
];

const KPR_METRICS: &[(&str, &str)] = &[
    ("kpr_bpf_map_entries", "gauge"),
    ("kpr_bpf_map_capacity", "gauge"),
    ("kpr_datapath_events_total", "counter"),
    ("kpr_sync_failures_total", "counter"),
    ("kpr_model_errors", "gauge"),
];

/// The OpenMetrics family name of a Prometheus text family.
fn openmetrics_family(name: &str, kind: &str) -> String {
    if kind == "counter" {
        name.strip_suffix("_total").unwrap().to_string()
    } else {
        name.to_string()
    }
}

fn record_some(metrics: &Metrics) {
    metrics.observe_sync(Duration::from_millis(20), true);
    metrics.observe_network_programming(Duration::from_millis(700));
    metrics.set_last_sync(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    metrics.set_last_queued(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_001));
    metrics.add_service_changes(2);
    metrics.add_endpoint_changes(7);
    metrics.set_pending(1, 3);
    metrics.set_map_occupancy("services", 12, 65_536);
    metrics.set_map_occupancy("backends", 30, 262_144);
    metrics.set_datapath_counters(&[("translated", 1_000), ("drop_no_backend", 4)]);
    metrics.inc_sync_failures();
    metrics.set_model_errors(2);
}

fn check_values(families: &BTreeMap<String, Family>, flavor: Flavor) {
    let fam = |name: &str, kind: &str| {
        let key = match flavor {
            Flavor::PrometheusText => name.to_string(),
            Flavor::OpenMetrics => openmetrics_family(name, kind),
        };
        families
            .get(&key)
            .unwrap_or_else(|| panic!("{key} missing ({flavor:?})"))
    };
    let sync = fam("kubeproxy_sync_proxy_rules_duration_seconds", "histogram");
    let full = fam(
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "histogram",
    );
    let partial = fam(
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        "histogram",
    );
    for (f, name, want) in [
        (
            sync,
            "kubeproxy_sync_proxy_rules_duration_seconds_count",
            1.0,
        ),
        (
            full,
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
            1.0,
        ),
        (
            partial,
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
            0.0,
        ),
    ] {
        assert_eq!(f.value(name, &[]), Some(want), "{name}");
    }
    let sum = sync
        .value("kubeproxy_sync_proxy_rules_duration_seconds_sum", &[])
        .unwrap();
    assert!((sum - 0.02).abs() < 1e-9, "{sum}");
    // 0.02 s lands in the 0.032 bucket, not in 0.016; 15 buckets plus +Inf.
    let buckets: Vec<_> = sync
        .samples
        .iter()
        .filter(|(n, _, _)| n.ends_with("_bucket"))
        .map(|(_, l, v)| (parse_value(&l["le"]).unwrap(), *v))
        .collect();
    assert_eq!(buckets.len(), 16);
    assert_eq!(buckets[0].0, 0.001);
    assert!((buckets[14].0 - 16.384).abs() < 1e-9);
    assert_eq!(
        buckets
            .iter()
            .find(|b| (b.0 - 0.016).abs() < 1e-9)
            .unwrap()
            .1,
        0.0
    );
    assert_eq!(
        buckets
            .iter()
            .find(|b| (b.0 - 0.032).abs() < 1e-9)
            .unwrap()
            .1,
        1.0
    );

    let np = fam(
        "kubeproxy_network_programming_duration_seconds",
        "histogram",
    );
    let np_buckets: Vec<f64> = np
        .samples
        .iter()
        .filter(|(n, _, _)| n.ends_with("_bucket"))
        .map(|(_, l, _)| parse_value(&l["le"]).unwrap())
        .collect();
    assert_eq!(np_buckets.len(), 81 + 1, "{np_buckets:?}");
    assert_eq!(&np_buckets[..4], &[0.0, 0.25, 0.5, 1.0]);
    assert_eq!(np_buckets[80], 300.0);
    let np_le = |le: &str| {
        np.value(
            "kubeproxy_network_programming_duration_seconds_bucket",
            &[("le", le)],
        )
        .unwrap()
    };
    assert_eq!(np_le("0.5"), 0.0);
    assert_eq!(np_le("1.0"), 1.0);

    let simple = |name: &str, kind: &str, labels: &[(&str, &str)]| {
        fam(name, kind).value(name, labels).unwrap_or_else(|| {
            panic!("{name}{labels:?} has no sample ({flavor:?})");
        })
    };
    assert_eq!(
        simple(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "gauge",
            &[]
        ),
        1_700_000_000.0
    );
    assert_eq!(
        simple(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "gauge",
            &[]
        ),
        1_700_000_001.0
    );
    assert_eq!(
        simple(
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "counter",
            &[]
        ),
        2.0
    );
    assert_eq!(
        simple(
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "counter",
            &[]
        ),
        7.0
    );
    assert_eq!(
        simple(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "gauge",
            &[]
        ),
        1.0
    );
    assert_eq!(
        simple(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "gauge",
            &[]
        ),
        3.0
    );
    assert_eq!(
        simple("kpr_bpf_map_entries", "gauge", &[("map", "backends")]),
        30.0
    );
    assert_eq!(
        simple("kpr_bpf_map_capacity", "gauge", &[("map", "services")]),
        65_536.0
    );
    assert_eq!(
        simple(
            "kpr_datapath_events_total",
            "counter",
            &[("reason", "translated")]
        ),
        1_000.0
    );
    assert_eq!(
        simple(
            "kpr_datapath_events_total",
            "counter",
            &[("reason", "drop_no_backend")]
        ),
        4.0
    );
    assert_eq!(simple("kpr_sync_failures_total", "counter", &[]), 1.0);
    assert_eq!(simple("kpr_model_errors", "gauge", &[]), 2.0);
}

#[tokio::test]
async fn metrics_endpoint_serves_both_formats() {
    let metrics = Metrics::new();
    record_some(&metrics);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve_metrics(listener, metrics.clone()));

    // Prometheus text 0.0.4, kube-proxy's format, when OpenMetrics is not asked for.
    let resp = get(addr, "/metrics", None).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = parse_exposition(&resp.body, Flavor::PrometheusText)
        .unwrap_or_else(|e| panic!("{e}\n{}", resp.body));
    for (name, kind, help) in KUBE_PROXY_METRICS {
        let f = text.get(*name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(f.kind, *kind, "{name}");
        assert_eq!(f.help.as_deref(), Some(*help), "{name}");
    }
    for (name, kind) in KPR_METRICS {
        let f = text.get(*name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(f.kind, *kind, "{name}");
    }
    check_values(&text, Flavor::PrometheusText);

    // The same body through a third-party parser.
    let scrape =
        prometheus_parse::Scrape::parse(resp.body.lines().map(|l| Ok(l.to_string()))).unwrap();
    let find = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .unwrap_or_else(|| panic!("prometheus-parse: no {name}"))
    };
    assert_eq!(
        find("kubeproxy_sync_proxy_rules_service_changes_total").value,
        prometheus_parse::Value::Counter(2.0)
    );
    assert_eq!(
        find("kubeproxy_sync_proxy_rules_endpoint_changes_pending").value,
        prometheus_parse::Value::Gauge(3.0)
    );
    match &find("kubeproxy_sync_full_proxy_rules_duration_seconds").value {
        prometheus_parse::Value::Histogram(buckets) => {
            assert_eq!(buckets.len(), 16);
            assert_eq!(buckets.last().unwrap().count, 1.0);
        }
        other => panic!("not a histogram: {other:?}"),
    }
    assert_eq!(
        scrape.docs["kubeproxy_network_programming_duration_seconds"],
        "In Cluster Network Programming Latency in seconds"
    );

    // OpenMetrics when the scraper prefers it, as Prometheus does by default.
    let resp = get(addr, "/metrics", Some(OPENMETRICS_ACCEPT)).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let om = parse_exposition(&resp.body, Flavor::OpenMetrics)
        .unwrap_or_else(|e| panic!("{e}\n{}", resp.body));
    for (name, kind, help) in KUBE_PROXY_METRICS {
        let family = openmetrics_family(name, kind);
        let f = om
            .get(&family)
            .unwrap_or_else(|| panic!("{family} missing"));
        assert_eq!(f.kind, *kind, "{family}");
        assert_eq!(f.help.as_deref(), Some(*help), "{family}");
    }
    for (name, kind) in KPR_METRICS {
        let family = openmetrics_family(name, kind);
        assert_eq!(om[&family].kind, *kind, "{family}");
    }
    check_values(&om, Flavor::OpenMetrics);

    // Later calls show up in the next scrape.
    metrics.observe_sync(Duration::from_millis(3), false);
    metrics.set_datapath_counters(&[("translated", 1_500)]);
    let resp = get(addr, "/metrics", None).await;
    let text = parse_exposition(&resp.body, Flavor::PrometheusText).unwrap();
    let count = |name: &str| {
        text[name]
            .value(&format!("{name}_count"), &[])
            .unwrap_or_else(|| panic!("{name}_count"))
    };
    assert_eq!(count("kubeproxy_sync_proxy_rules_duration_seconds"), 2.0);
    assert_eq!(
        count("kubeproxy_sync_partial_proxy_rules_duration_seconds"),
        1.0
    );
    assert_eq!(
        count("kubeproxy_sync_full_proxy_rules_duration_seconds"),
        1.0
    );
    assert_eq!(
        text["kpr_datapath_events_total"]
            .value("kpr_datapath_events_total", &[("reason", "translated")]),
        Some(1_500.0)
    );

    for path in ["/", "/metricsx", "/metrics/", "/healthz"] {
        let resp = get(addr, path, None).await;
        assert_eq!(resp.status, 404, "{path}");
        assert_eq!(resp.body, "404 page not found\n");
    }
    // A query string does not change the path.
    assert_eq!(get(addr, "/metrics?x=1", None).await.status, 200);

    server.abort();
}

fn json(resp: &HttpResponse) -> serde_json::Map<String, serde_json::Value> {
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.header("x-content-type-options"), Some("nosniff"));
    match serde_json::from_str(&resp.body) {
        Ok(serde_json::Value::Object(map)) => map,
        other => panic!("not a JSON object: {other:?}: {}", resp.body),
    }
}

fn keys(body: &serde_json::Map<String, serde_json::Value>) -> Vec<&str> {
    let mut keys: Vec<&str> = body.keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys
}

fn tainted_node() -> Node {
    Node {
        spec: Some(NodeSpec {
            taints: Some(vec![Taint {
                key: TO_BE_DELETED_TAINT.into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn health_endpoints_follow_kube_proxy() {
    let timeout = Duration::from_secs(60);
    let metrics = Metrics::new();
    let health = ProxyHealth::new(timeout).with_metrics(metrics.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve_health(listener, health.clone()));

    // Starting: healthy.
    let resp = get(addr, "/healthz", None).await;
    assert_eq!(resp.status, 200);
    let body = json(&resp);
    assert_eq!(keys(&body), ["currentTime", "lastUpdated", "nodeEligible"]);
    assert_eq!(body["nodeEligible"], true);
    // Healthy: lastUpdated is reported as the current time.
    assert_eq!(body["lastUpdated"], body["currentTime"]);
    assert!(body["currentTime"]
        .as_str()
        .unwrap()
        .ends_with(" +0000 UTC"));

    let resp = get(addr, "/livez", None).await;
    assert_eq!(resp.status, 200);
    let body = json(&resp);
    assert_eq!(keys(&body), ["currentTime", "lastUpdated"]);

    // An update applied, then one queued long ago and still not applied: both 503.
    let now = SystemTime::now();
    health.updated(now - timeout * 3);
    health.queued_update(now - timeout * 2);
    for path in ["/healthz", "/livez"] {
        let resp = get(addr, path, None).await;
        assert_eq!(resp.status, 503, "{path}");
        let body = json(&resp);
        assert_ne!(body["lastUpdated"], body["currentTime"], "{path}");
    }

    // Applied: healthy again.
    health.updated(SystemTime::now());
    assert_eq!(get(addr, "/healthz", None).await.status, 200);
    assert_eq!(get(addr, "/livez", None).await.status, 200);

    // The node is tainted for deletion: /healthz fails so load balancers drain it; /livez
    // (the proxy itself) stays up.
    health.sync_node(&tainted_node());
    let resp = get(addr, "/healthz", None).await;
    assert_eq!(resp.status, 503);
    assert_eq!(json(&resp)["nodeEligible"], false);
    assert_eq!(get(addr, "/livez", None).await.status, 200);

    // The taint is gone.
    health.sync_node(&Node::default());
    assert_eq!(get(addr, "/healthz", None).await.status, 200);

    for path in ["/", "/metrics", "/healthz/", "/readyz"] {
        assert_eq!(get(addr, path, None).await.status, 404, "{path}");
    }

    // Every answer was counted, as kube-proxy does.
    let text = metrics.encode_as(kpr::metrics::Format::PrometheusText);
    let families = parse_exposition(&text, Flavor::PrometheusText).unwrap();
    let healthz = &families["kubeproxy_proxy_healthz_total"];
    let livez = &families["kubeproxy_proxy_livez_total"];
    let code = |f: &Family, name: &str, code: &str| f.value(name, &[("code", code)]);
    assert_eq!(
        code(healthz, "kubeproxy_proxy_healthz_total", "200"),
        Some(3.0)
    );
    assert_eq!(
        code(healthz, "kubeproxy_proxy_healthz_total", "503"),
        Some(2.0)
    );
    assert_eq!(code(livez, "kubeproxy_proxy_livez_total", "200"), Some(3.0));
    assert_eq!(code(livez, "kubeproxy_proxy_livez_total", "503"), Some(1.0));

    server.abort();
}

#[test]
fn strict_parser_rejects_malformed_expositions() {
    let ok = "# HELP a_total x\n# TYPE a_total counter\na_total{l=\"v\"} 1\n";
    assert!(parse_exposition(ok, Flavor::PrometheusText).is_ok());
    for bad in [
        // sample without a TYPE
        "a 1\n",
        // a counter sample outside its family
        "# TYPE a_total counter\nb_total 1\n",
        // unquoted label
        "# TYPE a gauge\na{l=v} 1\n",
        // not a number
        "# TYPE a gauge\na one\n",
        // EOF in Prometheus text
        "# TYPE a gauge\na 1\n# EOF\n",
        // non-cumulative buckets
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        // no +Inf bucket
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
        // duplicate series
        "# TYPE a gauge\na 1\na 2\n",
    ] {
        assert!(
            parse_exposition(bad, Flavor::PrometheusText).is_err(),
            "accepted: {bad:?}"
        );
    }
    // OpenMetrics: counters are named without _total, and # EOF is required.
    assert!(parse_exposition("# TYPE a counter\na_total 1\n# EOF\n", Flavor::OpenMetrics).is_ok());
    assert!(parse_exposition("# TYPE a counter\na_total 1\n", Flavor::OpenMetrics).is_err());
    assert!(parse_exposition(
        "# TYPE a counter\na_total 1\n# EOF\na_total 2\n",
        Flavor::OpenMetrics
    )
    .is_err());
}
