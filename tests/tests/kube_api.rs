//! kpr following a Kubernetes API server, end to end in the lab: the project's fake API server
//! (real HTTP, the list/watch protocol) listens inside the node's network namespace, the real
//! kpr binary watches it through kube-rs, and real traffic crosses the ClusterIP. Also checks
//! kpr's health and metrics endpoints there, and reports the network programming latency of an
//! EndpointSlice change.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use kpr_fake_apiserver::{FakeApiServer, Kind};
use kpr_lab::kpr::{kpr_path, Kpr};
use kpr_lab::{in_netns, Lab, LabSpec};
use serde_json::json;

const NODE: &str = "node1";
const FRONTEND: &str = "10.96.0.10:80/tcp";
const TRIGGER: &str = "endpoints.kubernetes.io/last-change-trigger-time";

fn service() -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "echo", "namespace": "demo"},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]}
    })
}

fn slice(ips: &[&str], trigger: Option<&str>) -> serde_json::Value {
    let mut metadata = json!({
        "name": "echo-1", "namespace": "demo",
        "labels": {"kubernetes.io/service-name": "echo"}
    });
    if let Some(t) = trigger {
        metadata["annotations"] = json!({ TRIGGER: t });
    }
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": metadata,
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": ips.iter().map(|ip| json!({
            "addresses": [ip], "conditions": {"ready": true}, "nodeName": NODE
        })).collect::<Vec<_>>()
    })
}

fn node() -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE},
        "status": {"addresses": [{"type": "InternalIP", "address": "169.254.1.1"}]}
    })
}

/// A one-node lab and the fake API server listening inside its node namespace (where kpr runs).
fn lab_with_api(tag: &str) -> (Lab, FakeApiServer) {
    let lab = Lab::up(LabSpec {
        prefix: Lab::unique_prefix(tag),
        ..LabSpec::default()
    })
    .expect("lab up");
    let listener = in_netns(lab.node_ns(), || TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    (lab, FakeApiServer::start(listener))
}

/// kpr on node1, watching `api`, with its health and metrics servers on the node's loopback.
fn start_kpr(lab: &Lab, api: &FakeApiServer) -> Kpr {
    let url = api.url();
    let args = [
        "--master",
        url.as_str(),
        "--hostname-override",
        NODE,
        "--healthz-bind-address",
        "127.0.0.1:10256",
        "--metrics-bind-address",
        "127.0.0.1:10249",
    ];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    Kpr::start_with(lab, &kpr_path(), "kpr", &args).expect("kpr start")
}

/// RFC 3339 UTC with nanoseconds, as the EndpointSlice controller writes trigger times.
fn now_rfc3339() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%S.%NZ"])
        .output()
        .expect("date");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// GET `path` from `addr` inside the namespace `ns` (where kpr's servers listen).
fn http_get(ns: &str, addr: &str, path: &str) -> (u16, String) {
    let addr: SocketAddr = addr.parse().unwrap();
    let path = path.to_string();
    in_netns(ns, move || -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: kpr\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((code, body))
    })
    .expect("enter node namespace")
    .expect("HTTP request")
}

/// A sample's value from Prometheus text, e.g. `kubeproxy_network_programming_duration_seconds_count`.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.split_once(' ')?;
            (n == name).then(|| v.trim().parse().ok()).flatten()
        })
}

#[test]
fn kpr_follows_the_api_server_serves_traffic_health_and_metrics() {
    kpr_lab::require_lab("kube_api");
    let (lab, api) = lab_with_api("api");
    api.apply(service());
    api.apply(slice(&["10.244.1.11", "10.244.1.12", "10.244.1.13"], None));
    api.apply(node());

    let mut kpr = start_kpr(&lab, &api);
    let client = lab.clients()[0].clone();
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();

    let r = lab.tcp_spread(&client, vip, 150).unwrap();
    assert_eq!(r.errors, 0, "{r:?}\n{}", kpr.log());
    assert_eq!(r.counts.len(), 3, "{r:?}");

    let (code, body) = http_get(lab.node_ns(), "127.0.0.1:10256", "/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"nodeEligible\": true"), "{body}");
    let (code, _) = http_get(lab.node_ns(), "127.0.0.1:10256", "/livez");
    assert_eq!(code, 200);

    // An EndpointSlice change through the API, stamped like the EndpointSlice controller does.
    let written = Instant::now();
    api.apply(slice(&["10.244.1.11", "10.244.1.12"], Some(&now_rfc3339())));
    kpr.wait_for_backends(FRONTEND, &["10.244.1.11:8080", "10.244.1.12:8080"])
        .unwrap();
    let applied = written.elapsed();
    let r = lab.tcp_spread(&client, vip, 100).unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    assert!(
        !r.counts.contains_key("be3"),
        "removed endpoint still used: {r:?}"
    );

    let (code, metrics) = http_get(lab.node_ns(), "127.0.0.1:10249", "/metrics");
    assert_eq!(code, 200);
    // The histogram is recorded by the sync that programmed the change, before the status
    // that showed it was written.
    let count = sample(
        &metrics,
        "kubeproxy_network_programming_duration_seconds_count",
    )
    .expect("network programming histogram");
    let sum = sample(
        &metrics,
        "kubeproxy_network_programming_duration_seconds_sum",
    )
    .unwrap();
    assert!(
        count >= 1.0,
        "no network programming latency recorded:\n{metrics}"
    );
    let latency = sum / count;
    eprintln!(
        "network programming latency (EndpointSlice change → programmed): {:.1} ms \
         (kpr saw and applied the change {:.1} ms after the API write)",
        latency * 1e3,
        applied.as_secs_f64() * 1e3
    );
    // A sanity bound (the change was stamped just before the write), not a latency claim.
    assert!(latency < 60.0, "latency {latency} s");
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
    ] {
        assert!(
            sample(&metrics, name).unwrap_or(0.0) > 0.0,
            "{name}:\n{metrics}"
        );
    }

    // A Service deleted through the API stops being translated: the connection goes to the
    // ClusterIP itself, which the lab's node routes to its uplink, where it vanishes (a
    // timeout), and kpr's hook saw nothing.
    api.delete(Kind::Service, "demo", "echo");
    kpr.wait_for_no_frontend(FRONTEND).unwrap();
    let before = kpr.counters_now().unwrap();
    let once = lab
        .connect_once(&client, vip, Duration::from_secs(2))
        .unwrap();
    assert_eq!(once.error.as_deref(), Some("ETIMEDOUT"), "{once:?}");
    let after = kpr.counters_now().unwrap();
    assert_eq!(after["translated"], before["translated"]);
    assert_eq!(after["drop_no_backend"], before["drop_no_backend"]);
}

#[test]
fn kpr_keeps_serving_while_the_api_server_is_down() {
    kpr_lab::require_lab("kube_api_down");
    let (lab, api) = lab_with_api("apidown");
    api.apply(service());
    api.apply(slice(&["10.244.1.11", "10.244.1.12", "10.244.1.13"], None));
    let kpr = start_kpr(&lab, &api);
    let client = lab.clients()[0].clone();
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();

    api.set_refusing(true);
    api.drop_connections();
    // Wait until kpr has noticed: both watches report the failure and keep the last state.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !["Services", "EndpointSlices"]
        .iter()
        .all(|w| kpr.log().contains(&format!("{w} watch failing")))
    {
        assert!(
            Instant::now() < deadline,
            "kpr did not notice the outage:\n{}",
            kpr.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = lab.tcp_spread(&client, vip, 60).unwrap();
    assert_eq!(
        r.errors,
        0,
        "stopped serving while the API server is down: {r:?}\n{}",
        kpr.log()
    );
    assert_eq!(r.counts.len(), 3, "{r:?}");
}

#[test]
fn pods_reach_nodeports_on_the_nodes_address_and_external_ips() {
    kpr_lab::require_lab("kube_api_nodeport");
    let (lab, api) = lab_with_api("apinp");
    let mut svc = service();
    svc["spec"]["type"] = json!("NodePort");
    svc["spec"]["ports"][0]["nodePort"] = json!(30080);
    // An address of the documentation range: it exists only as a frontend in kpr's maps.
    svc["spec"]["externalIPs"] = json!(["203.0.113.10"]);
    api.apply(svc);
    api.apply(slice(&["10.244.1.11", "10.244.1.12", "10.244.1.13"], None));
    // The node's address pods reach it by (the lab's gateway address, owned by the node).
    api.apply(node());
    let url = api.url();
    let args = ["--master", url.as_str(), "--hostname-override", NODE];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    let kpr = Kpr::start_with(&lab, &kpr_path(), "kpr", &args).expect("kpr start");
    let client = lab.clients()[0].clone();

    for target in ["169.254.1.1:30080", "203.0.113.10:80", "10.96.0.10:80"] {
        let r = lab
            .tcp_spread(&client, target.parse().unwrap(), 90)
            .unwrap();
        assert_eq!(r.errors, 0, "{target}: {r:?}\n{}", kpr.log());
        assert_eq!(r.counts.len(), 3, "{target}: {r:?}");
        assert_eq!(r.peers.keys().collect::<Vec<_>>(), vec![target], "{r:?}");
    }
}
