//! The API source against a fake API server, through the real kube-rs client.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kpr::source::kube::{
    client_from, node_field_selector, KubeSource, ENDPOINTSLICE_LABEL_SELECTOR, NODE_WAIT,
    SERVICE_LABEL_SELECTOR,
};
use kpr::source::ClusterSnapshot;
use kpr_fake_apiserver::{FakeApiServer, Kind};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

/// The bound on every wait for something that should happen promptly.
const WAIT: Duration = Duration::from_secs(10);
/// The bound on waits after an outage: the watchers come back after their backoff (0.8 s
/// doubling, with jitter).
const WAIT_AFTER_OUTAGE: Duration = Duration::from_secs(25);

const NODE: &str = "node-1";

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "kpr=debug,kube_runtime=debug".into()),
        )
        .try_init();
}

fn svc(name: &str, port: u16, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 8080}]},
    })
}

fn slice(name: &str, service: &str, ip: &str, labels: Value) -> Value {
    let mut labels = labels;
    labels["kubernetes.io/service-name"] = json!(service);
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

fn node(name: &str, zone: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
    })
}

fn service_names(s: &ClusterSnapshot) -> Vec<String> {
    s.services
        .iter()
        .map(|o| o.metadata.name.clone().unwrap_or_default())
        .collect()
}

fn slice_names(s: &ClusterSnapshot) -> Vec<String> {
    s.slices
        .iter()
        .map(|o| o.metadata.name.clone().unwrap_or_default())
        .collect()
}

fn service_port(s: &ClusterSnapshot, name: &str) -> Option<i32> {
    s.services
        .iter()
        .find(|o| o.metadata.name.as_deref() == Some(name))
        .and_then(|o| o.spec.as_ref()?.ports.as_ref()?.first().map(|p| p.port))
}

fn slice_ip(s: &ClusterSnapshot, name: &str) -> Option<String> {
    s.slices
        .iter()
        .find(|o| o.metadata.name.as_deref() == Some(name))
        .and_then(|o| o.endpoints.as_ref()?.first()?.addresses.first().cloned())
}

/// A KubeSource running against `server`, and everything it published.
struct Running {
    rx: watch::Receiver<Option<Arc<ClusterSnapshot>>>,
    published: Arc<Mutex<Vec<Arc<ClusterSnapshot>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start(server: &FakeApiServer, node_name: &str) -> Running {
    init_logging();
    let client = client_from(None, Some(&server.url())).expect("client for the fake server");
    let (tx, rx) = watch::channel(None);
    let published = Arc::new(Mutex::new(Vec::new()));
    let mut collector = tx.subscribe();
    let sink = published.clone();
    tokio::spawn(async move {
        while collector.changed().await.is_ok() {
            if let Some(s) = collector.borrow_and_update().clone() {
                sink.lock().unwrap().push(s);
            }
        }
    });
    let task = tokio::spawn(KubeSource::new(client, node_name).run(tx));
    Running {
        rx,
        published,
        task,
    }
}

impl Running {
    /// Waits (bounded) for a published snapshot satisfying `pred`, and for the collector
    /// (another receiver, which may lag) to have recorded it or something newer.
    async fn wait_for(
        &mut self,
        what: &str,
        bound: Duration,
        pred: impl Fn(&ClusterSnapshot) -> bool,
    ) -> Arc<ClusterSnapshot> {
        let deadline = Instant::now() + bound;
        loop {
            let current = self.rx.borrow_and_update().clone();
            if let Some(s) = current {
                if pred(&s) {
                    let (published, rx) = (self.published.clone(), self.rx.clone());
                    wait_until("the collector to record the snapshot", || {
                        let newer = rx.borrow().as_ref().is_some_and(|c| !Arc::ptr_eq(c, &s));
                        newer || published.lock().unwrap().iter().any(|p| Arc::ptr_eq(p, &s))
                    })
                    .await;
                    return s;
                }
            }
            match tokio::time::timeout_at(deadline, self.rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!("the source stopped while waiting for {what}"),
                Err(_) => panic!(
                    "timed out after {bound:?} waiting for {what}; last snapshot: {:?}",
                    self.rx
                        .borrow()
                        .as_deref()
                        .map(|s| (service_names(s), slice_names(s)))
                ),
            }
        }
    }

    /// Asserts that nothing is published for `period`.
    async fn assert_quiet(&mut self, period: Duration, why: &str) {
        self.rx.borrow_and_update();
        if let Ok(changed) = tokio::time::timeout(period, self.rx.changed()).await {
            panic!(
                "published while {why} ({changed:?}): {:?}",
                self.rx
                    .borrow()
                    .as_deref()
                    .map(|s| (service_names(s), slice_names(s)))
            );
        }
    }

    fn published_count(&self) -> usize {
        self.published.lock().unwrap().len()
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_published_before_both_lists() {
    let server = FakeApiServer::start_local();
    server.apply(svc("a", 80, json!({})));
    server.apply(slice("a-1", "a", "10.0.0.1", json!({})));
    server.apply(node(NODE, "z1"));
    server.set_unavailable_for(Kind::EndpointSlice, true);
    let mut src = start(&server, NODE);

    // Services are listed and watched; slices are refused.
    wait_until("a Service watch", || server.open_watches(Kind::Service) > 0).await;
    wait_until("a refused EndpointSlice list", || {
        server
            .request_log()
            .iter()
            .any(|r| r.path.ends_with("/endpointslices"))
    })
    .await;
    // Longer than NODE_WAIT, so it is not the Node gate holding the publication back.
    src.assert_quiet(
        NODE_WAIT + Duration::from_millis(1500),
        "EndpointSlices are not listed",
    )
    .await;
    assert!(src.rx.borrow().is_none());
    assert_eq!(src.published_count(), 0);

    server.set_unavailable_for(Kind::EndpointSlice, false);
    let first = src
        .wait_for("the first snapshot", WAIT_AFTER_OUTAGE, |_| true)
        .await;
    assert_eq!(service_names(&first), ["a"]);
    assert_eq!(slice_names(&first), ["a-1"]);
    assert_eq!(
        first.node.as_ref().and_then(|n| n.metadata.name.as_deref()),
        Some(NODE)
    );
    let published = src.published.lock().unwrap().clone();
    assert!(!published.is_empty());
    for s in &published {
        assert_eq!(service_names(s), ["a"], "every snapshot has the Service");
        assert_eq!(slice_names(s), ["a-1"], "every snapshot has the slice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_published() {
    let server = FakeApiServer::start_local();
    server.apply(node(NODE, "z1"));
    let mut src = start(&server, NODE);
    let empty = src
        .wait_for("the initial empty snapshot", WAIT, |_| true)
        .await;
    assert!(empty.services.is_empty() && empty.slices.is_empty());

    server.apply(svc("a", 80, json!({})));
    src.wait_for("Service a", WAIT, |s| service_names(s) == ["a"])
        .await;
    server.apply(slice("a-1", "a", "10.0.0.1", json!({})));
    src.wait_for("slice a-1", WAIT, |s| slice_names(s) == ["a-1"])
        .await;

    server.apply(svc("a", 81, json!({})));
    src.wait_for("Service a on port 81", WAIT, |s| {
        service_port(s, "a") == Some(81)
    })
    .await;
    server.apply(slice("a-1", "a", "10.0.0.2", json!({})));
    src.wait_for("slice a-1 with 10.0.0.2", WAIT, |s| {
        slice_ip(s, "a-1").as_deref() == Some("10.0.0.2")
    })
    .await;

    server.apply(svc("b", 90, json!({})));
    src.wait_for("Services a and b", WAIT, |s| service_names(s) == ["a", "b"])
        .await;
    assert!(server.delete(Kind::Service, "default", "a"));
    src.wait_for("only Service b", WAIT, |s| service_names(s) == ["b"])
        .await;
    assert!(server.delete(Kind::EndpointSlice, "default", "a-1"));
    let last = src
        .wait_for("no slices", WAIT, |s| s.slices.is_empty())
        .await;
    assert_eq!(service_names(&last), ["b"]);

    // Bookmarks (every second) publish nothing.
    src.assert_quiet(Duration::from_millis(2500), "nothing changed")
        .await;
    // managedFields are not kept.
    assert!(last.services[0].metadata.managed_fields.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_keeps_the_last_state() {
    let server = FakeApiServer::start_local();
    server.apply(node(NODE, "z1"));
    server.apply(svc("a", 80, json!({})));
    server.apply(slice("a-1", "a", "10.0.0.1", json!({})));
    let mut src = start(&server, NODE);
    src.wait_for("Service a and its slice", WAIT, |s| {
        service_names(s) == ["a"] && slice_names(s) == ["a-1"]
    })
    .await;

    server.set_unavailable(true);
    server.drop_connections();
    server.clear_request_log();
    // Meanwhile the cluster changes; kpr cannot know yet.
    server.apply(svc("b", 90, json!({})));
    server.delete(Kind::EndpointSlice, "default", "a-1");
    src.assert_quiet(Duration::from_millis(2500), "the API server is down")
        .await;
    let kept = src.rx.borrow().clone().expect("a snapshot");
    assert_eq!(service_names(&kept), ["a"]);
    assert_eq!(slice_names(&kept), ["a-1"]);
    // The watchers did try (and were refused) during the outage.
    assert!(server
        .request_log()
        .iter()
        .any(|r| r.path.ends_with("/services")));

    server.set_unavailable(false);
    let after = src
        .wait_for(
            "the changes made during the outage",
            WAIT_AFTER_OUTAGE,
            |s| service_names(s) == ["a", "b"] && s.slices.is_empty(),
        )
        .await;
    assert!(after.node.is_some());
    // And changes flow again.
    server.apply(svc("c", 100, json!({})));
    src.wait_for("Service c", WAIT, |s| service_names(s) == ["a", "b", "c"])
        .await;
    for s in src.published.lock().unwrap().iter() {
        assert!(
            service_names(s).contains(&"a".to_string()),
            "no snapshot lost Service a"
        );
    }
}

/// The same, with connections refused (the watchers see errors, not 503s that kube-rs's
/// client retries by itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_server_keeps_the_last_state() {
    let server = FakeApiServer::start_local();
    server.apply(node(NODE, "z1"));
    server.apply(svc("a", 80, json!({})));
    server.apply(slice("a-1", "a", "10.0.0.1", json!({})));
    let mut src = start(&server, NODE);
    src.wait_for("Service a and its slice", WAIT, |s| {
        service_names(s) == ["a"] && slice_names(s) == ["a-1"]
    })
    .await;

    server.set_refusing(true);
    server.drop_connections();
    server.delete(Kind::Service, "default", "a");
    src.assert_quiet(
        Duration::from_millis(2500),
        "the API server refuses connections",
    )
    .await;
    assert_eq!(service_names(&src.rx.borrow().clone().unwrap()), ["a"]);

    server.set_refusing(false);
    src.wait_for(
        "the deletion made during the outage",
        WAIT_AFTER_OUTAGE,
        |s| s.services.is_empty() && slice_names(s) == ["a-1"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relist_after_410_drops_objects_deleted_meanwhile() {
    let server = FakeApiServer::start_local();
    server.apply(node(NODE, "z1"));
    server.apply(svc("a", 80, json!({})));
    server.apply(svc("b", 90, json!({})));
    server.apply(slice("a-1", "a", "10.0.0.1", json!({})));
    server.apply(slice("b-1", "b", "10.0.0.2", json!({})));
    let mut src = start(&server, NODE);
    src.wait_for("Services a, b and their slices", WAIT, |s| {
        service_names(s) == ["a", "b"] && slice_names(s) == ["a-1", "b-1"]
    })
    .await;
    wait_until("the Service watch", || {
        server.open_watches(Kind::Service) > 0
    })
    .await;
    let lists_before = server
        .request_log()
        .iter()
        .filter(|r| !r.is_watch() && r.path == "/api/v1/services")
        .count();

    // Deleted while kpr was not looking (no event will ever tell), then the history is gone.
    assert!(server.delete_silently(Kind::Service, "default", "b"));
    assert!(server.delete_silently(Kind::EndpointSlice, "default", "b-1"));
    server.compact();
    server.drop_connections();

    let s = src
        .wait_for(
            "b and b-1 to disappear after a relist",
            WAIT_AFTER_OUTAGE,
            |s| service_names(s) == ["a"],
        )
        .await;
    let s = if slice_names(&s) == ["a-1"] {
        s
    } else {
        src.wait_for("b-1 to disappear", WAIT, |s| slice_names(s) == ["a-1"])
            .await
    };
    assert_eq!(service_names(&s), ["a"]);
    let lists_after = server
        .request_log()
        .iter()
        .filter(|r| !r.is_watch() && r.path == "/api/v1/services")
        .count();
    assert!(lists_after > lists_before, "the Services were listed again");
    // The kept objects never vanished on the way.
    for s in src.published.lock().unwrap().iter() {
        assert!(service_names(s).contains(&"a".to_string()));
        assert!(slice_names(s).contains(&"a-1".to_string()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_proxies_and_headless_objects_are_filtered_by_the_server() {
    let server = FakeApiServer::start_local();
    server.apply(node(NODE, "z1"));
    server.apply(svc("plain", 80, json!({"app": "x"})));
    server.apply(svc(
        "elsewhere",
        80,
        json!({"service.kubernetes.io/service-proxy-name": "other-proxy"}),
    ));
    server.apply(svc(
        "headless",
        80,
        json!({"service.kubernetes.io/headless": ""}),
    ));
    server.apply(slice("plain-1", "plain", "10.0.0.1", json!({})));
    server.apply(slice(
        "elsewhere-1",
        "elsewhere",
        "10.0.0.2",
        json!({"service.kubernetes.io/service-proxy-name": "other-proxy"}),
    ));
    server.apply(slice(
        "headless-1",
        "headless",
        "10.0.0.3",
        json!({"service.kubernetes.io/headless": ""}),
    ));
    let mut src = start(&server, NODE);
    let s = src.wait_for("the first snapshot", WAIT, |_| true).await;
    assert_eq!(service_names(&s), ["plain"]);
    assert_eq!(slice_names(&s), ["plain-1"]);

    // A Service that gains the label later leaves the snapshot (the server sends DELETED).
    server.apply(svc(
        "plain",
        80,
        json!({"service.kubernetes.io/service-proxy-name": "other-proxy"}),
    ));
    src.wait_for("plain to be handed to another proxy", WAIT, |s| {
        s.services.is_empty()
    })
    .await;
    server.apply(svc(
        "late-headless",
        80,
        json!({"service.kubernetes.io/headless": ""}),
    ));
    src.assert_quiet(Duration::from_millis(1500), "only filtered objects changed")
        .await;
    for s in src.published.lock().unwrap().iter() {
        for name in service_names(s).iter().chain(slice_names(s).iter()) {
            assert!(
                !name.contains("elsewhere") && !name.contains("headless"),
                "{name} must never be published"
            );
        }
    }

    // Every Service and EndpointSlice request, list and watch, carried kube-proxy's selector.
    let log = server.request_log();
    let mut seen = (0, 0, 0, 0);
    for r in &log {
        if r.path == "/api/v1/services" {
            assert_eq!(
                r.param("labelSelector"),
                Some(SERVICE_LABEL_SELECTOR),
                "{r}"
            );
            if r.is_watch() {
                seen.0 += 1
            } else {
                seen.1 += 1
            }
        } else if r.path == "/apis/discovery.k8s.io/v1/endpointslices" {
            assert_eq!(
                r.param("labelSelector"),
                Some(ENDPOINTSLICE_LABEL_SELECTOR),
                "{r}"
            );
            if r.is_watch() {
                seen.2 += 1
            } else {
                seen.3 += 1
            }
        } else if r.path == "/api/v1/nodes" {
            assert_eq!(
                r.param("fieldSelector"),
                Some(node_field_selector(NODE).as_str()),
                "{r}"
            );
        }
    }
    assert!(
        seen.0 > 0 && seen.1 > 0 && seen.2 > 0 && seen.3 > 0,
        "lists and watches of both kinds: {seen:?}"
    );
    assert_eq!(
        SERVICE_LABEL_SELECTOR,
        "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_nodes_node_is_delivered() {
    let server = FakeApiServer::start_local();
    server.apply(node("node-0", "z0"));
    server.apply(node(NODE, "z1"));
    server.apply(svc("a", 80, json!({})));
    let mut src = start(&server, NODE);
    let zone = |s: &ClusterSnapshot| {
        s.node.as_ref().and_then(|n| {
            n.metadata
                .labels
                .as_ref()?
                .get("topology.kubernetes.io/zone")
                .cloned()
        })
    };
    let s = src.wait_for("the first snapshot", WAIT, |_| true).await;
    assert_eq!(
        s.node.as_ref().and_then(|n| n.metadata.name.as_deref()),
        Some(NODE)
    );
    assert_eq!(zone(&s).as_deref(), Some("z1"));
    server.apply(node(NODE, "z2"));
    src.wait_for("the node's new zone", WAIT, |s| {
        zone(s).as_deref() == Some("z2")
    })
    .await;
    // Another node's changes are not even seen.
    server.apply(node("node-0", "z9"));
    src.assert_quiet(Duration::from_millis(1500), "another Node changed")
        .await;
    // Nor are kubelet's heartbeats.
    let mut beat = node(NODE, "z2");
    beat["status"] = json!({"conditions": [{"type": "Ready", "status": "True",
                                            "lastHeartbeatTime": "2030-01-01T00:00:00Z"}]});
    server.apply(beat.clone());
    let s = src
        .wait_for("the Node's status", WAIT, |s| {
            s.node.as_ref().is_some_and(|n| n.status.is_some())
        })
        .await;
    let ready = &s
        .node
        .as_ref()
        .unwrap()
        .status
        .as_ref()
        .unwrap()
        .conditions
        .as_ref()
        .unwrap()[0];
    assert_eq!(ready.status, "True");
    assert!(ready.last_heartbeat_time.is_none());
    beat["status"]["conditions"][0]["lastHeartbeatTime"] = json!("2030-01-01T00:01:00Z");
    server.apply(beat);
    src.assert_quiet(Duration::from_millis(1500), "only a heartbeat changed")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_node_does_not_hold_the_proxy_back() {
    let server = FakeApiServer::start_local();
    server.apply(svc("a", 80, json!({})));
    let started = Instant::now();
    let mut src = start(&server, NODE);
    // Listed and absent: nothing to wait for.
    let s = src.wait_for("the first snapshot", WAIT, |_| true).await;
    assert!(
        started.elapsed() < NODE_WAIT,
        "no reason to wait for a Node that is not there"
    );
    assert!(s.node.is_none());
    assert_eq!(service_names(&s), ["a"]);
    // When the Node appears, it is delivered.
    server.apply(node(NODE, "z1"));
    src.wait_for("the Node", WAIT, |s| s.node.is_some()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlistable_node_delays_the_first_snapshot_only_briefly() {
    let server = FakeApiServer::start_local();
    server.apply(svc("a", 80, json!({})));
    server.apply(node(NODE, "z1"));
    server.set_unavailable_for(Kind::Node, true);
    let started = Instant::now();
    let mut src = start(&server, NODE);
    let s = src.wait_for("the first snapshot", WAIT, |_| true).await;
    let waited = started.elapsed();
    assert!(s.node.is_none());
    assert_eq!(service_names(&s), ["a"]);
    assert!(
        waited >= NODE_WAIT - Duration::from_millis(100),
        "published after {waited:?}, before NODE_WAIT"
    );
    server.set_unavailable_for(Kind::Node, false);
    src.wait_for("the Node once it can be listed", WAIT_AFTER_OUTAGE, |s| {
        s.node.is_some()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_node_name_means_no_node_watch() {
    let server = FakeApiServer::start_local();
    server.apply(node(NODE, "z1"));
    let started = Instant::now();
    let mut src = start(&server, "");
    let s = src.wait_for("the first snapshot", WAIT, |_| true).await;
    assert!(started.elapsed() < NODE_WAIT, "no Node to wait for");
    assert!(s.node.is_none());
    assert!(!server
        .request_log()
        .iter()
        .any(|r| r.path.starts_with("/api/v1/nodes")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_stops_when_nobody_listens() {
    let server = FakeApiServer::start_local();
    let client = client_from(None, Some(&server.url())).unwrap();
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(KubeSource::new(client, NODE).run(tx));
    drop(rx);
    tokio::time::timeout(WAIT, task)
        .await
        .expect("run returns once every receiver is gone")
        .unwrap();
}
