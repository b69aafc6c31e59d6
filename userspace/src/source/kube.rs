//! The Kubernetes API source: kube-rs watchers with reflector stores for Services,
//! EndpointSlices and this node's Node, published as [`ClusterSnapshot`]s.
//!
//! Like kube-proxy's informers:
//! - Services and EndpointSlices are listed and watched with kube-proxy's label selector
//!   ([`SERVICE_LABEL_SELECTOR`], [`ENDPOINTSLICE_LABEL_SELECTOR`]): objects that belong to
//!   another service proxy or to a headless Service are filtered out by the API server.
//! - The Node is watched with a field selector on its name ([`node_field_selector`]).
//! - Nothing is published before both Services and EndpointSlices have completed their first
//!   list; the Node holds the first publication back for at most [`NODE_WAIT`].
//! - Watches reconnect with kube-rs's default backoff. While the API server is unreachable
//!   nothing is published, so the last snapshot stays programmed. After a 410 Gone the watcher
//!   lists again and the store is replaced wholesale, so objects deleted in the meantime
//!   disappear from the next snapshot.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::watch;
use tokio::time::Instant;

use super::lenient::Lenient;
use super::ClusterSnapshot;

/// One kind of access the agent needs to the API server. The deployment's RBAC must grant
/// exactly these (a test compares deploy/ with this list).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiAccess {
    /// API group ("" for the core group).
    pub group: &'static str,
    /// Resource (plural, lower case).
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// Everything the agent reads from the API server.
pub const API_ACCESS: &[ApiAccess] = &[
    ApiAccess {
        group: "",
        resource: "services",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "",
        resource: "nodes",
        verbs: &["list", "watch"],
    },
];

/// A Service (or its slices) with this label is handled by another service proxy.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Set on the endpoints of headless Services, which have nothing to proxy.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";

/// The label selector kube-proxy puts on its Service informer (`noProxyName` and
/// `noHeadlessEndpoints`), byte for byte as client-go renders it (requirements sorted by key).
pub const SERVICE_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name";
/// kube-proxy uses one informer factory, hence the same selector, for EndpointSlices.
pub const ENDPOINTSLICE_LABEL_SELECTOR: &str = SERVICE_LABEL_SELECTOR;

/// How long the first publication waits for this node's Node object once Services and
/// EndpointSlices are listed. A missing Node must not stop the proxy.
pub const NODE_WAIT: Duration = Duration::from_secs(2);

/// A failing watch is logged at warn level once per failure streak, and again at most this
/// often while it keeps failing.
const WARN_REPEAT: Duration = Duration::from_secs(300);

/// At most this many already-arrived watch events are folded into one publication.
const MAX_BATCH: usize = 4096;

/// The field selector that watches only this node's Node object.
pub fn node_field_selector(node_name: &str) -> String {
    format!("metadata.name={node_name}")
}

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("invalid API server URL {url:?}: {reason}")]
    InvalidMaster { url: String, reason: String },
    #[error("cannot load kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no --kubeconfig or --master given, not running in a cluster ({in_cluster}), \
         and no default kubeconfig: {source}"
    )]
    NoConfig {
        in_cluster: kube::config::InClusterError,
        #[source]
        source: kube::config::InferConfigError,
    },
    #[error("loading the client configuration did not complete (unexpected in kube-rs)")]
    ConfigPending,
    #[error("the Kubernetes client must be created inside a Tokio runtime")]
    NoRuntime,
    #[error("cannot create the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// Polls a future that is known to complete without waiting (kube-rs's config loaders are
/// `async` for API reasons only). `Pending` becomes an error rather than a hang.
fn ready_now<F: Future>(fut: F) -> Result<F::Output, KubeSourceError> {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => Ok(out),
        Poll::Pending => Err(KubeSourceError::ConfigPending),
    }
}

/// `--master` as client-go reads it: a URL, or `host:port` with the scheme implied
/// (`https` when the kubeconfig supplies TLS settings, `http` for a bare `--master`).
fn parse_master(master: &str, default_https: bool) -> Result<http::Uri, KubeSourceError> {
    let invalid = |reason: String| KubeSourceError::InvalidMaster {
        url: master.to_string(),
        reason,
    };
    let with_scheme = if master.contains("://") {
        master.to_string()
    } else if default_https {
        format!("https://{master}")
    } else {
        format!("http://{master}")
    };
    let uri: http::Uri = with_scheme.parse().map_err(|e| invalid(format!("{e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(invalid("the scheme must be http or https".into())),
    }
    if uri.authority().is_none() {
        return Err(invalid("no host".into()));
    }
    Ok(uri)
}

/// Builds a client with kube-proxy's `--kubeconfig` / `--master` semantics:
/// - `--kubeconfig` given: its current context; `--master` (if given) overrides its server;
/// - only `--master`: that URL with no credentials (plain HTTP for an `http://` URL);
/// - neither: the in-cluster service account, else the default kubeconfig (`$KUBECONFIG`,
///   `~/.kube/config`).
///
/// Must be called inside a Tokio runtime (the client spawns its request buffer there).
pub fn client_from(
    kubeconfig: Option<&Path>,
    master: Option<&str>,
) -> Result<Client, KubeSourceError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(KubeSourceError::NoRuntime);
    }
    let config = match (kubeconfig, master) {
        (Some(path), master) => {
            let kubeconfig_error = |source| KubeSourceError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
            let mut config = ready_now(kube::Config::from_custom_kubeconfig(
                file,
                &kube::config::KubeConfigOptions::default(),
            ))?
            .map_err(kubeconfig_error)?;
            if let Some(master) = master {
                config.cluster_url = parse_master(master, true)?;
            }
            config
        }
        (None, Some(master)) => kube::Config::new(parse_master(master, false)?),
        (None, None) => match kube::Config::incluster() {
            Ok(config) => config,
            Err(in_cluster) => ready_now(kube::Config::infer())?
                .map_err(|source| KubeSourceError::NoConfig { in_cluster, source })?,
        },
    };
    tracing::info!(server = %config.cluster_url, "Kubernetes API server");
    Client::try_from(config).map_err(KubeSourceError::Client)
}

/// Which watch an event came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Watched {
    Services,
    EndpointSlices,
    Node,
}

impl Watched {
    fn name(self) -> &'static str {
        match self {
            Watched::Services => "Services",
            Watched::EndpointSlices => "EndpointSlices",
            Watched::Node => "Node",
        }
    }
}

/// What a watcher event did to its reflector store (which already holds the objects).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// A (re)list started; the store keeps its content until the list is complete.
    ListStart,
    /// An object of a list in progress.
    Listed,
    /// A list completed and replaced the store.
    ListDone,
    /// An object was added, changed or deleted.
    Changed,
}

impl<K> From<&watcher::Event<K>> for Step {
    fn from(event: &watcher::Event<K>) -> Self {
        match event {
            watcher::Event::Init => Step::ListStart,
            watcher::Event::InitApply(_) => Step::Listed,
            watcher::Event::InitDone => Step::ListDone,
            watcher::Event::Apply(_) | watcher::Event::Delete(_) => Step::Changed,
        }
    }
}

type Update = (Watched, Result<Step, watcher::Error>);

/// Whether an error only means "your resourceVersion is too old, list again": routine.
fn is_expired(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::WatchError(status) => status.code == 410,
        watcher::Error::InitialListFailed(kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

/// Objects as stored: without managedFields (large, and of no use to a proxy).
fn trim_meta<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

/// The Node as stored: also without what changes constantly and means nothing to a proxy
/// (heartbeat times, the image list, and so its resourceVersion), so kubelet's status reports
/// do not cause syncs. (The watcher resumes from the RVs it saw before this; the store keys
/// objects by name.)
fn trim_node(node: &mut Node) {
    trim_meta(node);
    node.metadata.resource_version = None;
    if let Some(status) = node.status.as_mut() {
        status.images = None;
        for condition in status.conditions.iter_mut().flatten() {
            condition.last_heartbeat_time = None;
        }
    }
}

/// Per-watch bookkeeping for the log: one warning per failure streak.
///
/// A watch that comes back produces no event until something changes, so a streak also ends
/// silently after [`STREAK_GAP`] without errors.
#[derive(Default)]
struct Health {
    failing: bool,
    last_error: Option<Instant>,
    last_warn: Option<Instant>,
}

/// Errors further apart than this belong to different failure streaks (the backoff between
/// two attempts is at most about 30 s, with jitter).
const STREAK_GAP: Duration = Duration::from_secs(120);

impl Health {
    fn failed(&mut self, what: Watched, error: &watcher::Error) {
        if is_expired(error) {
            tracing::info!("{} watch expired (410 Gone); listing again", what.name());
            return;
        }
        let now = Instant::now();
        let since = |t: Option<Instant>, d: Duration| t.is_none_or(|t| now.duration_since(t) >= d);
        let new_streak = !self.failing || since(self.last_error, STREAK_GAP);
        if new_streak || since(self.last_warn, WARN_REPEAT) {
            let still = if new_streak { "" } else { "still " };
            tracing::warn!(
                "{} watch {still}failing: {}; keeping the last state and retrying with backoff",
                what.name(),
                error_chain(error)
            );
            self.last_warn = Some(now);
        } else {
            tracing::debug!("{} watch failed again: {}", what.name(), error_chain(error));
        }
        self.failing = true;
        self.last_error = Some(now);
    }

    fn succeeded(&mut self, what: Watched) {
        if self.failing {
            tracing::info!("{} watch recovered", what.name());
            self.failing = false;
        }
    }
}

/// An error and its causes, `: `-joined (kube-rs's errors keep the useful part in sources).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// The objects of `store` that decoded, sorted by namespace and name; the others go to
/// `rejected` as (a key naming the object's version, `Kind namespace/name: reason`).
fn decoded<K>(store: &Store<Lenient<K>>, rejected: &mut Vec<(String, String)>) -> Vec<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone,
{
    let mut objects = Vec::new();
    for o in store.state() {
        match &o.decoded {
            Ok(k) => objects.push(k.clone()),
            Err(reason) => {
                let kind = K::kind(&());
                let rv = o.meta().resource_version.clone().unwrap_or_default();
                rejected.push((
                    format!("{kind} {} {rv}", o.name()),
                    format!("{kind} {}: {reason}", o.name()),
                ));
            }
        }
    }
    objects.sort_by(|a: &Arc<K>, b: &Arc<K>| {
        (a.meta().namespace.as_deref(), a.meta().name.as_deref())
            .cmp(&(b.meta().namespace.as_deref(), b.meta().name.as_deref()))
    });
    rejected.sort();
    objects
}

fn trim_lenient<K: Resource + Clone>(obj: &mut Lenient<K>)
where
    Lenient<K>: Resource,
{
    trim_meta(obj);
    if let Ok(k) = obj.decoded.as_mut() {
        // Just decoded, so not shared yet: make_mut does not copy.
        trim_meta(Arc::make_mut(k));
    }
}

/// Follows the API server and publishes snapshots of what kpr proxies.
pub struct KubeSource {
    client: Client,
    node_name: String,
}

impl KubeSource {
    /// `node_name` is this node's name (`--hostname-override`, or the host name); empty means
    /// "do not watch a Node" (snapshots then carry none).
    pub fn new(client: Client, node_name: impl Into<String>) -> Self {
        Self {
            client,
            node_name: node_name.into(),
        }
    }

    /// Watches until every receiver is gone, publishing `Some(snapshot)` whenever what the
    /// stores hold changed. Publishes nothing before Services and EndpointSlices are both
    /// listed; while the API server is unreachable the last snapshot stays.
    pub async fn run(self, tx: watch::Sender<Option<Arc<ClusterSnapshot>>>) {
        let (services, services_writer) = reflector::store::<Lenient<Service>>();
        let (slices, slices_writer) = reflector::store::<Lenient<EndpointSlice>>();
        let (nodes, nodes_writer) = reflector::store::<Node>();

        let mut streams: Vec<BoxStream<'static, Update>> = vec![
            watcher(
                Api::<Lenient<Service>>::all(self.client.clone()),
                watcher::Config::default().labels(SERVICE_LABEL_SELECTOR),
            )
            .modify(trim_lenient)
            .default_backoff()
            .reflect(services_writer)
            .map(|r| (Watched::Services, r.map(|e| Step::from(&e))))
            .boxed(),
            watcher(
                Api::<Lenient<EndpointSlice>>::all(self.client.clone()),
                watcher::Config::default().labels(ENDPOINTSLICE_LABEL_SELECTOR),
            )
            .modify(trim_lenient)
            .default_backoff()
            .reflect(slices_writer)
            .map(|r| (Watched::EndpointSlices, r.map(|e| Step::from(&e))))
            .boxed(),
        ];
        let watch_node = !self.node_name.is_empty();
        if watch_node {
            streams.push(
                watcher(
                    Api::<Node>::all(self.client.clone()),
                    watcher::Config::default().fields(&node_field_selector(&self.node_name)),
                )
                .modify(trim_node)
                .default_backoff()
                .reflect(nodes_writer)
                .map(|r| (Watched::Node, r.map(|e| Step::from(&e))))
                .boxed(),
            );
        } else {
            drop(nodes_writer);
        }
        let mut events = futures::stream::select_all(streams);

        let mut services_listed = false;
        let mut slices_listed = false;
        // The Node gate opens when it is listed or when NODE_WAIT has passed since the rest
        // was listed.
        let mut node_gate_open = !watch_node;
        let mut node_deadline: Option<Instant> = None;
        let mut health = [Health::default(), Health::default(), Health::default()];
        // Objects that did not decode and were logged, by kind, name and resourceVersion: each
        // is logged once, not at every publication.
        let mut logged_rejects = std::collections::HashSet::new();
        let mut dirty = false;

        loop {
            let first = tokio::select! {
                _ = tx.closed() => return,
                _ = sleep_until_opt(node_deadline), if !node_gate_open && node_deadline.is_some() => {
                    tracing::warn!(
                        "Node {:?} not listed within {NODE_WAIT:?}; going on without it",
                        self.node_name
                    );
                    node_gate_open = true;
                    dirty = true;
                    None
                }
                update = events.next() => match update {
                    Some(update) => Some(update),
                    None => {
                        // Watchers retry forever; this cannot happen, but must not spin.
                        tracing::error!("Kubernetes watches ended; no more updates");
                        tx.closed().await;
                        return;
                    }
                },
            };
            // Fold in whatever else has already arrived, then publish once.
            let mut batch = 0;
            let mut next = first;
            while let Some((what, result)) = next {
                let h = &mut health[what as usize];
                match result {
                    Ok(step) => {
                        if step != Step::ListStart {
                            h.succeeded(what);
                        }
                        match (step, what) {
                            (Step::ListDone, Watched::Services) => services_listed = true,
                            (Step::ListDone, Watched::EndpointSlices) => slices_listed = true,
                            (Step::ListDone, Watched::Node) => node_gate_open = true,
                            _ => {}
                        }
                        if matches!(step, Step::ListDone | Step::Changed) {
                            dirty = true;
                        }
                    }
                    Err(error) => h.failed(what, &error),
                }
                batch += 1;
                if batch >= MAX_BATCH {
                    break;
                }
                next = events.next().now_or_never().flatten();
            }
            if !(services_listed && slices_listed) {
                continue;
            }
            if !node_gate_open {
                if node_deadline.is_none() {
                    node_deadline = Some(Instant::now() + NODE_WAIT);
                }
                continue;
            }
            if !dirty {
                continue;
            }
            dirty = false;
            let mut rejected = Vec::new();
            let snapshot = ClusterSnapshot {
                services: decoded(&services, &mut rejected),
                slices: decoded(&slices, &mut rejected),
                node: nodes
                    .state()
                    .iter()
                    .find(|n| n.name_any() == self.node_name)
                    .map(|n| Node::clone(n)),
                rejected: rejected.iter().map(|(_, text)| text.clone()).collect(),
            };
            for (key, text) in &rejected {
                if !logged_rejects.contains(key) {
                    tracing::warn!("skipped {text}; every other object is used");
                }
            }
            logged_rejects = rejected.into_iter().map(|(key, _)| key).collect();
            if !publish(&tx, snapshot) {
                return;
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Sends the snapshot unless it equals the one published last. False once nobody listens.
fn publish(tx: &watch::Sender<Option<Arc<ClusterSnapshot>>>, snapshot: ClusterSnapshot) -> bool {
    let unchanged = tx
        .borrow()
        .as_deref()
        .is_some_and(|old| old.same_as(&snapshot));
    if unchanged {
        return !tx.is_closed();
    }
    tracing::info!(
        services = snapshot.services.len(),
        slices = snapshot.slices.len(),
        node = snapshot.node.is_some(),
        "cluster state from the API server"
    );
    tx.send(Some(Arc::new(snapshot))).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_are_kube_proxys() {
        // client-go renders the requirements sorted by key.
        let mut keys = [LABEL_SERVICE_PROXY_NAME, LABEL_HEADLESS];
        keys.sort();
        let expected: Vec<String> = keys.iter().map(|k| format!("!{k}")).collect();
        assert_eq!(SERVICE_LABEL_SELECTOR, expected.join(","));
        assert_eq!(ENDPOINTSLICE_LABEL_SELECTOR, SERVICE_LABEL_SELECTOR);
        assert_eq!(node_field_selector("n1"), "metadata.name=n1");
    }

    #[test]
    fn api_access_matches_the_watches() {
        let resources: Vec<(&str, &str)> =
            API_ACCESS.iter().map(|a| (a.group, a.resource)).collect();
        assert_eq!(
            resources,
            [
                (
                    <Service as k8s_openapi::Resource>::GROUP,
                    <Service as k8s_openapi::Resource>::URL_PATH_SEGMENT
                ),
                (
                    <EndpointSlice as k8s_openapi::Resource>::GROUP,
                    <EndpointSlice as k8s_openapi::Resource>::URL_PATH_SEGMENT
                ),
                (
                    <Node as k8s_openapi::Resource>::GROUP,
                    <Node as k8s_openapi::Resource>::URL_PATH_SEGMENT
                ),
            ]
        );
        assert!(API_ACCESS.iter().all(|a| a.verbs == ["list", "watch"]));
    }

    #[test]
    fn master_urls() {
        assert_eq!(
            parse_master("http://127.0.0.1:8080", false)
                .unwrap()
                .to_string(),
            "http://127.0.0.1:8080/"
        );
        assert_eq!(
            parse_master("10.0.0.1:6443", true).unwrap().scheme_str(),
            Some("https")
        );
        assert_eq!(
            parse_master("127.0.0.1:8080", false).unwrap().scheme_str(),
            Some("http")
        );
        assert!(parse_master("ftp://x", false).is_err());
        assert!(parse_master("http://", false).is_err());
        assert!(parse_master("not a url", false).is_err());
    }

    #[test]
    fn client_needs_a_runtime() {
        assert!(matches!(
            client_from(None, Some("http://127.0.0.1:1")),
            Err(KubeSourceError::NoRuntime)
        ));
    }

    #[tokio::test]
    async fn client_from_master_only_and_bad_kubeconfig() {
        assert!(client_from(None, Some("http://127.0.0.1:1")).is_ok());
        let result = client_from(Some(Path::new("/nonexistent/kubeconfig")), None);
        assert!(matches!(result, Err(KubeSourceError::Kubeconfig { .. })));
    }

    #[tokio::test]
    async fn kubeconfig_with_master_override() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters: [{name: k, cluster: {server: 'https://10.1.2.3:6443'}}]\n\
             contexts: [{name: c, context: {cluster: k, user: u}}]\n\
             users: [{name: u, user: {token: secret}}]\n",
        )
        .unwrap();
        let client = client_from(Some(&path), None).unwrap();
        assert_eq!(client.default_namespace(), "default");
        assert!(client_from(Some(&path), Some("http://127.0.0.1:1")).is_ok());
        assert!(matches!(
            client_from(Some(&path), Some("ftp://x")),
            Err(KubeSourceError::InvalidMaster { .. })
        ));
    }

    #[test]
    fn node_trimming_drops_noise() {
        let mut node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n", "managedFields": [{"manager": "kubelet"}],
                         "resourceVersion": "42",
                         "labels": {"topology.kubernetes.io/zone": "z"}},
            "status": {"images": [{"names": ["x"]}],
                       "conditions": [{"type": "Ready", "status": "True",
                                       "lastHeartbeatTime": "2024-01-01T00:00:00Z"}]},
        }))
        .unwrap();
        trim_node(&mut node);
        assert!(node.metadata.managed_fields.is_none());
        assert!(node.metadata.resource_version.is_none());
        assert!(node.metadata.labels.is_some());
        let status = node.status.unwrap();
        assert!(status.images.is_none());
        let conditions = status.conditions.unwrap();
        assert_eq!(conditions[0].status, "True");
        assert!(conditions[0].last_heartbeat_time.is_none());
    }
}
