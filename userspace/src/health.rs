//! kube-proxy's proxy health server (pkg/proxy/healthcheck/proxy_health.go), on
//! `--healthz-bind-address` (default `0.0.0.0:10256`).
//!
//! - The proxy is healthy while starting (no update queued yet), and while every queued update
//!   is applied within `health_timeout` (kube-proxy: 2 × `--iptables-sync-period`; kpr: 2 ×
//!   its sync period). [`ProxyHealth::queued_update`] records only the oldest update queued
//!   since the last [`ProxyHealth::updated`].
//! - `/livez` answers the proxy's health: 200, or 503 once a queued update is late.
//! - `/healthz` is also 503 while the Node is not eligible: being deleted (deletionTimestamp
//!   set) or tainted `ToBeDeletedByClusterAutoscaler`, so that cloud load balancers drain the
//!   node before it goes. Its body adds `nodeEligible`.
//!
//! Bodies are byte-for-byte kube-proxy's (`Content-Type: application/json`,
//! `X-Content-Type-Options: nosniff`):
//!
//! ```text
//! /healthz  {"lastUpdated": "<time>","currentTime": "<time>", "nodeEligible": true}
//! /livez    {"lastUpdated": "<time>","currentTime": "<time>"}
//! ```
//!
//! Times are formatted as kube-proxy's Go `%q` of a `time.Time` prints them (not RFC 3339):
//! `2024-05-01 12:00:00.123456789 +0000 UTC`, always in UTC and without Go's process-relative
//! monotonic-clock suffix (` m=+1.23`); a proxy that never applied an update reports Go's zero
//! time, `0001-01-01 00:00:00 +0000 UTC`. As in kube-proxy, `lastUpdated` equals `currentTime`
//! whenever the answer is 200 (older kube-proxies reported the last sync-loop run, which was
//! always recent while healthy); on a 503 it is the time of the last applied update.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Node;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// kube-proxy's default `--healthz-bind-address`.
pub const DEFAULT_HEALTHZ_BIND_ADDRESS: &str = "0.0.0.0:10256";

/// The taint the Cluster Autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(Debug)]
struct State {
    last_updated: Option<SystemTime>,
    oldest_pending_queued: Option<SystemTime>,
    node_eligible: bool,
}

/// The proxy's health, shared between the sync loop (which reports queued and applied
/// updates) and the HTTP server. Cheap to clone; every method is synchronous.
#[derive(Clone, Debug)]
pub struct ProxyHealth {
    state: Arc<Mutex<State>>,
    health_timeout: Duration,
    metrics: Option<Metrics>,
}

/// One answer of the health server, computed at `current_time`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthStatus {
    /// The proxy's own health, ignoring the Node (kube-proxy's `IsHealthy`): `/livez`.
    pub healthy: bool,
    /// False while the Node is being deleted or tainted for deletion.
    pub node_eligible: bool,
    /// When an update was last applied, if ever.
    pub last_updated: Option<SystemTime>,
    pub current_time: SystemTime,
}

impl HealthStatus {
    /// What `/healthz` answers: healthy, and the Node eligible.
    pub fn healthz_ok(&self) -> bool {
        self.healthy && self.node_eligible
    }

    /// What `/livez` answers: the proxy's health alone.
    pub fn livez_ok(&self) -> bool {
        self.healthy
    }

    /// `lastUpdated` as kube-proxy reports it: the current time when the answer is 200.
    fn reported_last_updated(&self, ok: bool) -> String {
        if ok {
            go_time(Some(self.current_time))
        } else {
            go_time(self.last_updated)
        }
    }

    /// The `/healthz` status code and JSON body.
    pub fn healthz(&self) -> (u16, String) {
        let ok = self.healthz_ok();
        let body = format!(
            r#"{{"lastUpdated": {},"currentTime": {}, "nodeEligible": {}}}"#,
            quote(&self.reported_last_updated(ok)),
            quote(&go_time(Some(self.current_time))),
            self.node_eligible
        );
        (if ok { 200 } else { 503 }, body)
    }

    /// The `/livez` status code and JSON body.
    pub fn livez(&self) -> (u16, String) {
        let ok = self.livez_ok();
        let body = format!(
            r#"{{"lastUpdated": {},"currentTime": {}}}"#,
            quote(&self.reported_last_updated(ok)),
            quote(&go_time(Some(self.current_time))),
        );
        (if ok { 200 } else { 503 }, body)
    }
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

/// Formats `t` (UTC) as Go's `time.Time.String()` does, without the monotonic suffix:
/// `2006-01-02 15:04:05.999999999 -0700 MST` (trailing zeros of the fraction dropped, and the
/// dot too when it is zero). `None` is Go's zero time.
pub fn go_time(t: Option<SystemTime>) -> String {
    let Some(t) = t else {
        return "0001-01-01 00:00:00 +0000 UTC".to_string();
    };
    let (secs, nanos) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (s, n) = (d.as_secs() as i64, d.subsec_nanos());
            if n == 0 {
                (-s, 0)
            } else {
                (-s - 1, 1_000_000_000 - n)
            }
        }
    };
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let mut out = format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push_str(" +0000 UTC");
    out
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl ProxyHealth {
    /// A proxy is unhealthy once an update has been queued for `health_timeout` without
    /// being applied.
    pub fn new(health_timeout: Duration) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                last_updated: None,
                oldest_pending_queued: None,
                // Eligible while starting, until a Node event says otherwise.
                node_eligible: true,
            })),
            health_timeout,
            metrics: None,
        }
    }

    /// kube-proxy's choice: a timeout of twice the (full) sync period.
    pub fn for_sync_period(sync_period: Duration) -> Self {
        Self::new(sync_period * 2)
    }

    /// Counts the server's answers in `kubeproxy_proxy_healthz_total{code}` and
    /// `kubeproxy_proxy_livez_total{code}`. Call before cloning the handle.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn health_timeout(&self) -> Duration {
        self.health_timeout
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A change that needs a sync arrived at `now`. Only the oldest one since the last
    /// applied update counts.
    pub fn queued_update(&self, now: SystemTime) {
        let mut s = self.lock();
        if s.oldest_pending_queued.is_none() {
            s.oldest_pending_queued = Some(now);
        }
    }

    /// The dataplane now reflects every queued change (a successful sync finished at `now`).
    pub fn updated(&self, now: SystemTime) {
        let mut s = self.lock();
        s.oldest_pending_queued = None;
        s.last_updated = Some(now);
    }

    /// Node eligibility from the Node object: not eligible when it is being deleted or
    /// carries the Cluster Autoscaler's `ToBeDeletedByClusterAutoscaler` taint.
    pub fn sync_node(&self, node: &Node) {
        let deleting = node.metadata.deletion_timestamp.is_some();
        let tainted = node
            .spec
            .as_ref()
            .and_then(|spec| spec.taints.as_ref())
            .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
        self.set_node_eligible(!deleting && !tainted);
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    pub fn node_eligible(&self) -> bool {
        self.lock().node_eligible
    }

    /// The proxy's own health at `now`, ignoring the Node (kube-proxy's `IsHealthy`).
    pub fn is_healthy(&self, now: SystemTime) -> bool {
        self.status(now).healthy
    }

    /// Everything the HTTP server reports, at `now`.
    pub fn status(&self, now: SystemTime) -> HealthStatus {
        let s = self.lock();
        let healthy = match s.oldest_pending_queued {
            // Starting up, or fully synced.
            None => true,
            // An update is queued but not late yet (a queued time in the future, after a
            // clock step, counts as not late).
            Some(queued) => now
                .duration_since(queued)
                .map_or(true, |age| age < self.health_timeout),
        };
        HealthStatus {
            healthy,
            node_eligible: s.node_eligible,
            last_updated: s.last_updated,
            current_time: now,
        }
    }

    /// The answer for `path` at `now`: `Some((status code, JSON body))` for `/healthz` and
    /// `/livez`, `None` for any other path.
    pub fn respond(&self, path: &str, now: SystemTime) -> Option<(u16, String)> {
        let status = self.status(now);
        let (code, body) = match path {
            "/healthz" => status.healthz(),
            "/livez" => status.livez(),
            _ => return None,
        };
        if let Some(m) = &self.metrics {
            if path == "/healthz" {
                m.record_healthz(code);
            } else {
                m.record_livez(code);
            }
        }
        Some((code, body))
    }
}

/// Serves `/healthz` and `/livez` on `listener` until the task is dropped; any other path is
/// a 404.
pub async fn serve_health(listener: TcpListener, health: ProxyHealth) {
    crate::http_server::serve(listener, "healthz", move |req| {
        match health.respond(req.uri().path(), SystemTime::now()) {
            Some((code, body)) => crate::http_server::response(
                hyper::StatusCode::from_u16(code).expect("200 and 503 are valid"),
                "application/json",
                &[("x-content-type-options", "nosniff")],
                body,
            ),
            None => crate::http_server::not_found(),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSpec, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    const TIMEOUT: Duration = Duration::from_secs(60);

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn codes(h: &ProxyHealth, now: SystemTime) -> (u16, u16) {
        (
            h.respond("/healthz", now).unwrap().0,
            h.respond("/livez", now).unwrap().0,
        )
    }

    #[test]
    fn healthy_while_starting() {
        let h = ProxyHealth::new(TIMEOUT);
        assert_eq!(codes(&h, t(0)), (200, 200));
        // Long after start, with nothing ever queued, still healthy.
        assert_eq!(codes(&h, t(100_000)), (200, 200));
        let s = h.status(t(5));
        assert!(s.healthy && s.node_eligible);
        assert_eq!(s.last_updated, None);
    }

    #[test]
    fn unhealthy_when_a_queued_update_is_late() {
        let h = ProxyHealth::new(TIMEOUT);
        h.queued_update(t(0));
        assert_eq!(codes(&h, t(59)), (200, 200));
        assert_eq!(codes(&h, t(60)), (503, 503));
        assert!(!h.is_healthy(t(61)));
        // Later queued updates do not move the oldest one.
        h.queued_update(t(61));
        assert_eq!(codes(&h, t(62)), (503, 503));
    }

    #[test]
    fn recovers_after_update() {
        let h = ProxyHealth::new(TIMEOUT);
        h.queued_update(t(0));
        assert_eq!(codes(&h, t(120)), (503, 503));
        h.updated(t(121));
        assert_eq!(codes(&h, t(122)), (200, 200));
        assert_eq!(h.status(t(122)).last_updated, Some(t(121)));
        // A new queued update is timed from when it was queued, not from the first one.
        h.queued_update(t(200));
        assert_eq!(codes(&h, t(259)), (200, 200));
        assert_eq!(codes(&h, t(260)), (503, 503));
    }

    #[test]
    fn for_sync_period_doubles() {
        assert_eq!(
            ProxyHealth::for_sync_period(Duration::from_secs(30)).health_timeout(),
            Duration::from_secs(60)
        );
    }

    fn node(deleting: bool, taint: Option<&str>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                deletion_timestamp: deleting.then(|| Time(Default::default())),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: taint.map(|key| {
                    vec![Taint {
                        key: key.into(),
                        effect: "NoSchedule".into(),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn node_eligibility_affects_healthz_only() {
        let h = ProxyHealth::new(TIMEOUT);
        h.sync_node(&node(true, None));
        assert!(!h.node_eligible());
        assert_eq!(codes(&h, t(0)), (503, 200));

        h.sync_node(&node(false, Some(TO_BE_DELETED_TAINT)));
        assert_eq!(codes(&h, t(0)), (503, 200));
        let (_, body) = h.respond("/healthz", t(0)).unwrap();
        assert!(body.ends_with(r#", "nodeEligible": false}"#), "{body}");

        h.sync_node(&node(false, Some("node.kubernetes.io/unschedulable")));
        assert!(h.node_eligible());
        assert_eq!(codes(&h, t(0)), (200, 200));

        h.sync_node(&node(false, None));
        assert_eq!(codes(&h, t(0)), (200, 200));

        // Not eligible and late: both 503.
        h.set_node_eligible(false);
        h.queued_update(t(0));
        assert_eq!(codes(&h, t(60)), (503, 503));
    }

    #[test]
    fn bodies_are_kube_proxys() {
        let h = ProxyHealth::new(TIMEOUT);
        let now = t(0) + Duration::from_millis(250);
        assert_eq!(
            h.respond("/healthz", now).unwrap(),
            (
                200,
                r#"{"lastUpdated": "2023-11-14 22:13:20.25 +0000 UTC","currentTime": "2023-11-14 22:13:20.25 +0000 UTC", "nodeEligible": true}"#.to_string()
            )
        );
        assert_eq!(
            h.respond("/livez", now).unwrap(),
            (
                200,
                r#"{"lastUpdated": "2023-11-14 22:13:20.25 +0000 UTC","currentTime": "2023-11-14 22:13:20.25 +0000 UTC"}"#.to_string()
            )
        );
        // Unhealthy, never updated: Go's zero time.
        h.queued_update(t(0));
        assert_eq!(
            h.respond("/livez", t(60)).unwrap(),
            (
                503,
                r#"{"lastUpdated": "0001-01-01 00:00:00 +0000 UTC","currentTime": "2023-11-14 22:14:20 +0000 UTC"}"#.to_string()
            )
        );
        // Unhealthy after an update: the last applied one.
        h.updated(t(1));
        h.queued_update(t(2));
        let (code, body) = h.respond("/healthz", t(62)).unwrap();
        assert_eq!(code, 503);
        assert_eq!(
            body,
            r#"{"lastUpdated": "2023-11-14 22:13:21 +0000 UTC","currentTime": "2023-11-14 22:14:22 +0000 UTC", "nodeEligible": true}"#
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["nodeEligible"], true);
        assert_eq!(h.respond("/metrics", t(0)), None);
    }

    #[test]
    fn go_time_format() {
        assert_eq!(go_time(Some(UNIX_EPOCH)), "1970-01-01 00:00:00 +0000 UTC");
        assert_eq!(
            go_time(Some(UNIX_EPOCH + Duration::new(951_782_400, 1))),
            "2000-02-29 00:00:00.000000001 +0000 UTC"
        );
        assert_eq!(
            go_time(Some(UNIX_EPOCH + Duration::new(4_102_444_799, 120_000_000))),
            "2099-12-31 23:59:59.12 +0000 UTC"
        );
        assert_eq!(
            go_time(Some(UNIX_EPOCH - Duration::from_millis(500))),
            "1969-12-31 23:59:59.5 +0000 UTC"
        );
        assert_eq!(go_time(None), "0001-01-01 00:00:00 +0000 UTC");
    }

    #[test]
    fn answers_are_counted() {
        let m = Metrics::new();
        let h = ProxyHealth::new(TIMEOUT).with_metrics(m.clone());
        h.respond("/healthz", t(0));
        h.respond("/healthz", t(0));
        h.set_node_eligible(false);
        h.respond("/healthz", t(0));
        h.respond("/livez", t(0));
        let text = m.encode();
        assert!(
            text.contains("kubeproxy_proxy_healthz_total{code=\"200\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("kubeproxy_proxy_healthz_total{code=\"503\"} 1\n"));
        assert!(text.contains("kubeproxy_proxy_livez_total{code=\"200\"} 1\n"));
    }
}
