//! The sync runner: kube-proxy's bounded-frequency behaviour (pkg/util/async/bounded_frequency_runner.go).
//!
//! - Nothing is programmed before the source delivered its first complete snapshot.
//! - Syncs are rate-limited by a token bucket like kube-proxy's (burst 2, one token per
//!   `min_sync_period`): a change after a quiet period, or right after another sync, applies
//!   at once; a flurry of changes coalesces into one sync per `min_sync_period`.
//! - Every `sync_period`, and after a failed sync (with backoff), a full sync re-reads what the
//!   dataplane holds and repairs it.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use k8s_openapi::api::core::v1::Node;

use crate::changes;
use crate::model::{self, DesiredState};
use crate::source::ClusterSnapshot;

pub use crate::dataplane::{Dataplane, MapOccupancy, ModeMetrics, SyncReport};

/// What the runner reports as it goes: metrics and health are observers. Every method has a
/// no-op default so an observer implements only what it needs.
pub trait SyncObserver: Send + Sync {
    /// A change arrived from the source and waits to be programmed.
    fn update_queued(&self, _at: SystemTime) {}
    /// A sync succeeded.
    fn sync_succeeded(&self, _report: &SyncReport, _took: Duration, _full: bool, _at: SystemTime) {}
    fn sync_failed(&self) {}
    /// Objects that changed since the last programmed snapshot (kube-proxy's change counters).
    fn changes_seen(&self, _services: usize, _endpoint_slices: usize) {}
    /// Network programming latency: from a slice's trigger time to programmed.
    fn network_programmed(&self, _latency: Duration) {}
    /// This node's Node object, as of the last snapshot.
    fn node_seen(&self, _node: &Node) {}
    /// The state just programmed (runs inside the runner's Tokio runtime).
    fn desired_state(&self, _state: &DesiredState) {}
    /// Datapath state, after every sync and periodically.
    fn datapath(
        &self,
        _counters: &[(&'static str, u64)],
        _occupancy: &[MapOccupancy],
        _model_errors: usize,
    ) {
    }
    /// The proxy mode's own figures (rules per table, failed restores), after every sync and
    /// periodically.
    fn mode_metrics(&self, _m: &ModeMetrics) {}
}

#[derive(Clone)]
pub struct RunnerConfig {
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    /// Where to write a JSON status after each sync (tests and benchmarks read it).
    pub status_file: Option<PathBuf>,
    /// The admin socket, which serves the same status (`kpr status`, `kpr trace`).
    pub admin: Option<crate::admin::AdminSocket>,
    pub observers: Vec<Arc<dyn SyncObserver>>,
    /// This node's name: which endpoints are local (traffic policies).
    pub node_name: Option<String>,
    /// `--nodeport-addresses`: which of the node's addresses serve NodePorts (empty: all).
    pub nodeport_addresses: Vec<crate::config::NodePortAddress>,
    /// Whether 127.0.0.1 serves NodePorts (`--iptables-localhost-nodeports`; never in the
    /// nftables mode).
    pub localhost_nodeports: bool,
    /// This node's interface addresses ([`crate::localaddr::watch`]); a change re-syncs.
    /// None: no address is local (NodePorts are served on the Node's primary address only
    /// when `nodeport_addresses` names it).
    pub local_addresses: Option<watch::Receiver<Vec<IpAddr>>>,
}

/// The status file's content.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Status {
    pub syncs: u64,
    pub failed_syncs: u64,
    pub last_sync_unix_ms: u128,
    pub last_sync_duration_ms: f64,
    /// Whether the last successful sync was a full one (kube-proxy's full vs partial sync).
    pub last_sync_full: bool,
    /// The part of the last sync spent in the dataplane (the rest built the desired state from
    /// every object of the snapshot).
    pub last_sync_dataplane_ms: f64,
    /// Time from agent start to the end of the first successful sync.
    pub first_sync_after_start_ms: Option<f64>,
    pub last_report: SyncReport,
    pub model_errors: usize,
    pub counters: std::collections::BTreeMap<String, u64>,
    /// When `counters` were read: a reader that needs counters covering some traffic waits for
    /// a refresh later than the traffic's end.
    pub counters_unix_ms: u128,
    pub occupancy: Vec<MapOccupancy>,
    /// The proxy mode's own figures (netfilter modes: rules, failed restores).
    pub mode: ModeMetrics,
    /// Every frontend the last successful sync programmed, with its backends: what a reader
    /// waits on to know that a change it made is in the dataplane (not merely that some sync
    /// ran).
    pub frontends: FrontendsJson,
}

/// The frontends of [`Status`], serialised once per sync: at 100,000 Services they are 15 MB
/// of JSON, which the status refresh (every second, for the counters) must not build again
/// from the desired state each time.
#[derive(Clone, Debug)]
pub struct FrontendsJson(Arc<serde_json::value::RawValue>);

impl FrontendsJson {
    pub fn of(frontends: &std::collections::BTreeMap<String, FrontendStatus>) -> Self {
        match serde_json::value::to_raw_value(frontends) {
            Ok(raw) => FrontendsJson(Arc::from(raw)),
            Err(e) => {
                tracing::warn!("serializing the status's frontends: {e}");
                FrontendsJson::default()
            }
        }
    }
}

impl Default for FrontendsJson {
    fn default() -> Self {
        FrontendsJson::of(&Default::default())
    }
}

impl serde::Serialize for FrontendsJson {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// One programmed frontend in the status file.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FrontendStatus {
    /// The Service port it belongs to (`namespace/name:port`).
    pub service: String,
    /// `ClusterIP`, `NodePort`, `ExternalIP` or `LoadBalancer`.
    pub kind: &'static str,
    /// Backends for clients on this node (`ip:port`, sorted); empty: refused.
    pub backends: Vec<String>,
    /// Backends for traffic from outside the node, where they differ from `backends`
    /// (`externalTrafficPolicy: Local`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_backends: Option<Vec<String>>,
    /// The frontend's traffic policy is `Local` (`internalTrafficPolicy` on a ClusterIP,
    /// `externalTrafficPolicy` on the others).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub policy_local: bool,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_s: Option<u64>,
    /// `loadBalancerSourceRanges` (CIDRs); empty: any source.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<String>,
}

impl FrontendStatus {
    fn of(state: &model::ServicePortState) -> FrontendStatus {
        let names = |bs: &[model::Backend]| bs.iter().map(ToString::to_string).collect();
        FrontendStatus {
            service: state.name.to_string(),
            kind: match state.kind {
                model::FrontendKind::ClusterIp => "ClusterIP",
                model::FrontendKind::NodePort => "NodePort",
                model::FrontendKind::ExternalIp => "ExternalIP",
                model::FrontendKind::LoadBalancer => "LoadBalancer",
            },
            backends: names(&state.backends),
            external_backends: (state.external_backends != state.backends)
                .then(|| names(&state.external_backends)),
            policy_local: state.internal_policy_local || state.external_policy_local,
            affinity_timeout_s: state.session_affinity.map(|d| d.as_secs()),
            source_ranges: state
                .load_balancer_source_ranges
                .iter()
                .map(|net| net.to_string())
                .collect(),
        }
    }
}

fn unix_ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

const RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// kube-proxy's burstSyncs.
const BURST: f64 = 2.0;
/// How often the status file's counters are refreshed between syncs.
const STATUS_REFRESH: Duration = Duration::from_secs(1);

/// kube-proxy's BoundedFrequencyRunner limiter: `BURST` runs at once, then one per `period`.
struct TokenBucket {
    tokens: f64,
    at: Instant,
    period: Duration,
}

impl TokenBucket {
    fn new(period: Duration) -> Self {
        Self {
            tokens: BURST,
            at: Instant::now(),
            period,
        }
    }

    /// Takes a token, first waiting until one is there.
    async fn take(&mut self) {
        self.refill();
        if self.tokens < 1.0 && !self.period.is_zero() {
            tokio::time::sleep(self.period.mul_f64(1.0 - self.tokens)).await;
            self.refill();
        }
        self.tokens = (self.tokens - 1.0).max(0.0);
    }

    fn refill(&mut self) {
        let now = Instant::now();
        if self.period.is_zero() {
            self.tokens = BURST;
        } else {
            let gained = now.duration_since(self.at).as_secs_f64() / self.period.as_secs_f64();
            self.tokens = (self.tokens + gained).min(BURST);
        }
        self.at = now;
    }
}

/// Runs until the source's sender is dropped.
pub async fn run<D: Dataplane + ?Sized>(
    dataplane: &mut D,
    mut source: watch::Receiver<Option<Arc<ClusterSnapshot>>>,
    cfg: &RunnerConfig,
) {
    let started = Instant::now();
    let mut status = Status::default();

    // Wait for the first complete read.
    loop {
        if source.borrow_and_update().is_some() {
            break;
        }
        if source.changed().await.is_err() {
            return;
        }
    }
    tracing::info!("source delivered its first complete snapshot; programming the dataplane");

    let mut limiter = TokenBucket::new(cfg.min_sync_period);
    let mut status_tick = tokio::time::interval(STATUS_REFRESH);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_full = Instant::now() + cfg.sync_period;
    let mut pending = true;
    let mut full = true;
    let mut source_open = true;
    let mut local_addresses = cfg.local_addresses.clone();
    // Whether the address watch still reports changes (its thread may end; the last
    // addresses stay in use).
    let mut local_open = local_addresses.is_some();
    // The snapshot last programmed successfully, to tell what changed since.
    let mut programmed: Option<Arc<ClusterSnapshot>> = None;
    // Each Service's model as last built: a change rebuilds only the Services it touches.
    let mut model_cache = model::ModelCache::default();
    // The model errors logged so far (see below).
    let mut logged_errors: HashSet<String> = HashSet::new();
    let notify = |f: &dyn Fn(&dyn SyncObserver)| {
        for o in &cfg.observers {
            f(o.as_ref());
        }
    };
    notify(&|o| o.update_queued(SystemTime::now()));
    loop {
        if !pending {
            tokio::select! {
                changed = source.changed(), if source_open => match changed {
                    Ok(()) => {
                        pending = true;
                        notify(&|o| o.update_queued(SystemTime::now()));
                    }
                    Err(_) => source_open = false,
                },
                changed = async { local_addresses.as_mut()?.changed().await.ok() },
                    if local_open => match changed {
                    Some(()) => {
                        pending = true;
                        notify(&|o| o.update_queued(SystemTime::now()));
                    }
                    None => local_open = false,
                },
                _ = tokio::time::sleep_until(next_full.into()) => {
                    pending = true;
                    full = true;
                }
                _ = status_tick.tick() => {
                    write_status(dataplane, &mut status, cfg);
                }
            }
            if !source_open && !pending {
                return;
            }
            if !pending {
                continue;
            }
        }
        limiter.take().await;
        let snapshot = match source.borrow_and_update().clone() {
            Some(s) => s,
            None => continue,
        };
        pending = false;

        let changes = changes::between(programmed.as_deref(), &snapshot);
        if let Some(node) = &snapshot.node {
            notify(&|o| o.node_seen(node));
        }

        let t0 = Instant::now();
        let local: Vec<IpAddr> = local_addresses
            .as_mut()
            .map(|rx| rx.borrow_and_update().clone())
            .unwrap_or_default();
        let node = model::NodeContext {
            node_name: cfg.node_name.clone(),
            node_ips: crate::nodeaddr::nodeport_ips(
                snapshot.node.as_ref(),
                &local,
                &cfg.nodeport_addresses,
                cfg.localhost_nodeports,
            ),
            node_ip: crate::nodeaddr::primary_ip(snapshot.node.as_ref()),
            zone: crate::nodeaddr::zone(snapshot.node.as_ref()),
            pod_cidrs: crate::nodeaddr::pod_cidrs(snapshot.node.as_ref()),
        };
        let (desired, errors) = model_cache.build(&snapshot, &node);
        // Each skipped object (or part) once, when it first shows up, not at every sync.
        let now_errors: HashSet<String> = errors.iter().map(ToString::to_string).collect();
        for e in now_errors.difference(&logged_errors) {
            tracing::warn!("skipped: {e}");
        }
        logged_errors = now_errors;
        // Objects the source could not decode count as skipped too (logged by the source).
        status.model_errors = errors.len() + snapshot.rejected.len();
        let t_dataplane = Instant::now();
        let result = dataplane.sync(&desired, full);
        let took = t0.elapsed();
        let took_dataplane = t_dataplane.elapsed();
        match result {
            Ok(report) => {
                tracing::info!(
                    frontends = report.frontends,
                    backends = report.backends,
                    writes = report.writes,
                    deletes = report.deletes,
                    full,
                    "synced in {:.1} ms",
                    took.as_secs_f64() * 1e3
                );
                status.syncs += 1;
                status.last_report = report;
                status.last_sync_duration_ms = took.as_secs_f64() * 1e3;
                status.last_sync_full = full;
                status.last_sync_dataplane_ms = took_dataplane.as_secs_f64() * 1e3;
                status
                    .first_sync_after_start_ms
                    .get_or_insert(started.elapsed().as_secs_f64() * 1e3);
                if full {
                    next_full = Instant::now() + cfg.sync_period;
                }
                if cfg.status_file.is_some() || cfg.admin.is_some() {
                    // What is programmed: the desired state less what the dataplane refused.
                    let refused: HashSet<String> = dataplane.refused().into_iter().collect();
                    status.frontends = FrontendsJson::of(
                        &desired
                            .services
                            .iter()
                            .filter(|(_, st)| !refused.contains(&st.name.to_string()))
                            .map(|(fe, st)| (fe.to_string(), FrontendStatus::of(st)))
                            .collect(),
                    );
                }
                let now = SystemTime::now();
                notify(&|o| {
                    o.desired_state(&desired);
                    o.changes_seen(changes.services, changes.endpoint_slices);
                    o.sync_succeeded(&report, took, full, now);
                    for t in &changes.trigger_times {
                        // A trigger time in the future (clock skew) counts as zero.
                        o.network_programmed(now.duration_since(*t).unwrap_or_default());
                    }
                });
                programmed = Some(snapshot.clone());
                full = false;
            }
            Err(e) => {
                tracing::error!("sync failed, full resync in {RETRY_BACKOFF:?}: {e}");
                notify(&|o| o.sync_failed());
                status.failed_syncs += 1;
                full = true;
                next_full = Instant::now() + RETRY_BACKOFF;
            }
        }
        status.last_sync_unix_ms = unix_ms(SystemTime::now());
        write_status(dataplane, &mut status, cfg);
    }
}

/// Refreshes the datapath figures, hands them to the observers, and writes the status file if
/// one is configured.
fn write_status<D: Dataplane + ?Sized>(dataplane: &D, status: &mut Status, cfg: &RunnerConfig) {
    // Stamped before the read, so that a stamp later than some instant means the counters were
    // read after it.
    status.counters_unix_ms = unix_ms(SystemTime::now());
    let counters = dataplane.counters();
    status.occupancy = dataplane.occupancy();
    status.mode = dataplane.mode_metrics();
    for o in &cfg.observers {
        o.datapath(&counters, &status.occupancy, status.model_errors);
        o.mode_metrics(&status.mode);
    }
    if cfg.status_file.is_none() && cfg.admin.is_none() {
        return;
    }
    status.counters = counters
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let bytes = match serde_json::to_vec(status) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!("serializing the status: {e}");
            return;
        }
    };
    if let Some(path) = &cfg.status_file {
        // Write then rename, so a reader never sees half a file.
        let tmp = path.with_extension("tmp");
        let result = std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = result {
            tracing::warn!("writing status file {}: {e}", path.display());
        }
    }
    if let Some(admin) = &cfg.admin {
        admin.publish(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        calls: Arc<Mutex<Vec<(usize, bool)>>>,
        fail_next: bool,
    }

    impl Dataplane for Recorder {
        fn sync(
            &mut self,
            desired: &DesiredState,
            full: bool,
        ) -> Result<SyncReport, crate::dataplane::DataplaneError> {
            self.calls
                .lock()
                .unwrap()
                .push((desired.services.len(), full));
            if std::mem::take(&mut self.fail_next) {
                return Err(crate::nft::NftError::ZeroMark.into());
            }
            Ok(SyncReport::default())
        }
    }

    fn cfg() -> RunnerConfig {
        RunnerConfig {
            min_sync_period: Duration::from_millis(500),
            sync_period: Duration::from_secs(30),
            status_file: None,
            admin: None,
            observers: Vec::new(),
            node_name: None,
            nodeport_addresses: Vec::new(),
            localhost_nodeports: true,
            local_addresses: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_the_first_snapshot_then_coalesces_changes() {
        let (tx, rx) = watch::channel(None);
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut dp = Recorder {
            calls: calls.clone(),
            fail_next: false,
        };
        let task = tokio::spawn(async move {
            run(&mut dp, rx, &cfg()).await;
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            calls.lock().unwrap().is_empty(),
            "synced before the first snapshot"
        );

        tx.send(Some(Arc::new(ClusterSnapshot::default()))).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(calls.lock().unwrap().len(), 1);

        // The first change right after a sync still applies at once (burst of 2)...
        tx.send(Some(Arc::new(ClusterSnapshot::default()))).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(calls.lock().unwrap().len(), 2);
        // ...then the bucket is empty: five changes within the min sync period become one sync.
        for _ in 0..5 {
            tx.send(Some(Arc::new(ClusterSnapshot::default()))).unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            calls.lock().unwrap().len(),
            2,
            "synced before a token was back"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(calls.lock().unwrap().len(), 3);
        drop(tx);
        task.await.unwrap();
    }

    #[derive(Default)]
    struct Seen {
        events: Mutex<Vec<String>>,
    }

    impl SyncObserver for Seen {
        fn update_queued(&self, _at: SystemTime) {
            self.events.lock().unwrap().push("queued".into());
        }
        fn sync_succeeded(&self, _r: &SyncReport, _took: Duration, full: bool, _at: SystemTime) {
            self.events
                .lock()
                .unwrap()
                .push(format!("synced full={full}"));
        }
        fn changes_seen(&self, services: usize, slices: usize) {
            self.events
                .lock()
                .unwrap()
                .push(format!("changes {services} {slices}"));
        }
        fn network_programmed(&self, latency: Duration) {
            // The trigger time below is 2 s before "now"; allow for the test's own run time.
            let ok = latency >= Duration::from_secs(2) && latency < Duration::from_secs(60);
            self.events.lock().unwrap().push(format!("latency ok={ok}"));
        }
    }

    #[tokio::test]
    async fn observers_see_queueing_syncs_changes_and_programming_latency() {
        let (tx, rx) = watch::channel(Some(Arc::new(ClusterSnapshot::default())));
        let seen = Arc::new(Seen::default());
        let mut config = cfg();
        config.observers = vec![seen.clone()];
        let mut dp = Recorder::default();
        let task = tokio::spawn(async move { run(&mut dp, rx, &config).await });
        tokio::time::sleep(Duration::from_millis(50)).await;

        let trigger =
            k8s_openapi::jiff::Timestamp::try_from(SystemTime::now() - Duration::from_secs(2))
                .unwrap();
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice =
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "a-1", "namespace": "ns",
                             "labels": {"kubernetes.io/service-name": "a"},
                             "annotations": {(changes::TRIGGER_TIME_ANNOTATION): trigger.to_string()}},
                "addressType": "IPv4",
                "endpoints": []
            }))
            .unwrap();
        tx.send(Some(Arc::new(ClusterSnapshot {
            slices: vec![Arc::new(slice)],
            ..Default::default()
        })))
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(tx);
        task.await.unwrap();
        let events = seen.events.lock().unwrap().clone();
        assert_eq!(
            events,
            vec![
                "queued",
                "changes 0 0",
                "synced full=true",
                "queued",
                "changes 0 1",
                "synced full=false",
                "latency ok=true",
            ],
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_sync_is_retried_as_a_full_sync() {
        let (tx, rx) = watch::channel(Some(Arc::new(ClusterSnapshot::default())));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut dp = Recorder {
            calls: calls.clone(),
            fail_next: false,
        };
        let task = tokio::spawn(async move {
            run(&mut dp, rx, &cfg()).await;
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        // First sync is full; arrange the next one to fail.
        assert_eq!(calls.lock().unwrap().as_slice(), &[(0, true)]);
        drop(tx);
        task.await.unwrap();

        let (tx, rx) = watch::channel(Some(Arc::new(ClusterSnapshot::default())));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut dp = Recorder {
            calls: calls.clone(),
            fail_next: true,
        };
        let task = tokio::spawn(async move {
            run(&mut dp, rx, &cfg()).await;
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        let seen = calls.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![(0, true), (0, true)],
            "retry must be a full sync"
        );
        drop(tx);
        task.await.unwrap();
    }
}
