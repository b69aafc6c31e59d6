//! Malformed and hostile objects through the API server (issue 11, part 3): each is skipped
//! with one log line naming it (or, when it is valid however odd, served), and the Services
//! around it keep working: traffic flows and a later change to a good Service is applied.
//! The fake API server stores whatever it is given, types included, so objects that a real API
//! server would refuse reach kpr too.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use kpr_fake_apiserver::FakeApiServer;
use kpr_lab::kpr::{kpr_path, Kpr};
use kpr_lab::{in_netns, Lab, LabSpec};
use serde_json::{json, Value};

const GOOD: &str = "10.96.0.10:80/tcp";

fn service(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

fn slice(ns: &str, name: &str, service: &str, body: Value) -> Value {
    let mut v = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}}});
    for (k, x) in body.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

fn cip(ip: &str, port: Value) -> Value {
    json!({"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
           "ports": [{"name": "http", "protocol": "TCP", "port": port, "targetPort": 8080}]})
}

fn eps(ips: &[&str]) -> Value {
    json!({"addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
           "endpoints": ips.iter().map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}})).collect::<Vec<_>>()})
}

/// What must happen to a hostile object.
enum Expect {
    /// Skipped (whole or in part) with a log line naming it.
    Logged,
    /// Valid, however odd: programmed (this frontend exists).
    Served(&'static str),
    /// One bad part skipped with a log line, as kube-proxy skips it; the rest programmed
    /// (this frontend exists).
    PartSkipped(&'static str),
}

impl Expect {
    fn logged(&self) -> bool {
        matches!(self, Expect::Logged | Expect::PartSkipped(_))
    }

    fn served(&self) -> Option<&'static str> {
        match self {
            Expect::Served(fe) | Expect::PartSkipped(fe) => Some(fe),
            Expect::Logged => None,
        }
    }
}

fn hostile() -> Vec<(&'static str, Value, Expect)> {
    use Expect::*;
    let h = "hostile";
    let mut v: Vec<(&'static str, Value, Expect)> = vec![
        // Wrong JSON types: decoded one by one, so only these fail.
        (
            "port-is-a-string",
            service(h, "port-is-a-string", cip("10.96.1.1", json!("eighty"))),
            Logged,
        ),
        (
            "spec-is-a-list",
            service(h, "spec-is-a-list", json!([])),
            Logged,
        ),
        (
            "cluster-ip-is-a-number",
            service(
                h,
                "cluster-ip-is-a-number",
                json!({"clusterIP": 12345, "ports": [{"port": 80}]}),
            ),
            Logged,
        ),
        (
            "endpoints-is-an-object",
            slice(
                h,
                "endpoints-is-an-object",
                "x",
                json!({"addressType": "IPv4", "endpoints": {"a": 1}}),
            ),
            Logged,
        ),
        (
            "address-is-a-number",
            slice(
                h,
                "address-is-a-number",
                "x",
                json!({"addressType": "IPv4", "endpoints": [{"addresses": [42]}]}),
            ),
            Logged,
        ),
        (
            "slice-port-is-a-string",
            slice(
                h,
                "slice-port-is-a-string",
                "x",
                json!({"addressType": "IPv4", "ports": [{"port": "x"}], "endpoints": []}),
            ),
            Logged,
        ),
        // Values no API server would accept.
        (
            "cluster-ip-not-an-ip",
            service(h, "cluster-ip-not-an-ip", cip("not-an-ip", json!(80))),
            Logged,
        ),
        (
            "cluster-ip-octet-999",
            service(h, "cluster-ip-octet-999", cip("10.96.0.999", json!(80))),
            Logged,
        ),
        (
            "unknown-protocol",
            service(
                h,
                "unknown-protocol",
                json!({"clusterIP": "10.96.1.9", "clusterIPs": ["10.96.1.9"], "ports": [{"name": "x", "protocol": "ICMP", "port": 80}]}),
            ),
            Logged,
        ),
        (
            "duplicate-ports",
            service(
                h,
                "duplicate-ports",
                json!({"clusterIP": "10.96.1.10", "clusterIPs": ["10.96.1.10"], "ports": [{"name": "a", "protocol": "TCP", "port": 80}, {"name": "b", "protocol": "TCP", "port": 80}]}),
            ),
            Logged,
        ),
        (
            "node-port-out-of-range",
            service(
                h,
                "node-port-out-of-range",
                json!({"type": "NodePort", "clusterIP": "10.96.1.11", "clusterIPs": ["10.96.1.11"], "ports": [{"name": "a", "protocol": "TCP", "port": 80, "nodePort": 99999}]}),
            ),
            Logged,
        ),
        (
            "negative-affinity-timeout",
            service(
                h,
                "negative-affinity-timeout",
                json!({"clusterIP": "10.96.1.12", "clusterIPs": ["10.96.1.12"], "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": -5}}, "ports": [{"name": "a", "protocol": "TCP", "port": 80}]}),
            ),
            Logged,
        ),
        (
            "bad-external-ip",
            service(
                h,
                "bad-external-ip",
                json!({"clusterIP": "10.96.1.13", "clusterIPs": ["10.96.1.13"], "externalIPs": ["bogus"], "ports": [{"name": "a", "protocol": "TCP", "port": 80}]}),
            ),
            PartSkipped("10.96.1.13:80/tcp"),
        ),
        (
            "bad-source-range",
            service(
                h,
                "bad-source-range",
                json!({"type": "LoadBalancer", "clusterIP": "10.96.1.14", "clusterIPs": ["10.96.1.14"], "loadBalancerSourceRanges": ["10.0.0.0/99"], "ports": [{"name": "a", "protocol": "TCP", "port": 80, "nodePort": 30014}]}),
            ),
            PartSkipped("10.96.1.14:80/tcp"),
        ),
        (
            "bad-lb-ingress",
            {
                let mut s = service(
                    h,
                    "bad-lb-ingress",
                    json!({"type": "LoadBalancer", "clusterIP": "10.96.1.15", "clusterIPs": ["10.96.1.15"], "ports": [{"name": "a", "protocol": "TCP", "port": 80, "nodePort": 30015}]}),
                );
                s["status"] = json!({"loadBalancer": {"ingress": [{"ip": "x.y"}]}});
                s
            },
            PartSkipped("10.96.1.15:80/tcp"),
        ),
        // Another Service claiming the good Service's ClusterIP and port.
        (
            "steals-the-cluster-ip",
            service("zz", "steals-the-cluster-ip", cip("10.96.0.10", json!(80))),
            Logged,
        ),
        (
            "endpoint-octet-999",
            slice(h, "endpoint-octet-999", "x", eps(&["999.1.1.1"])),
            Logged,
        ),
        (
            "slice-port-zero",
            slice(
                h,
                "slice-port-zero",
                "x",
                json!({"addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP", "port": 0}], "endpoints": []}),
            ),
            Logged,
        ),
        (
            "slice-unknown-protocol",
            slice(
                h,
                "slice-unknown-protocol",
                "x",
                json!({"addressType": "IPv4", "ports": [{"name": "http", "protocol": "BOGUS", "port": 8080}], "endpoints": []}),
            ),
            Logged,
        ),
        (
            "slice-address-family-mismatch",
            slice(h, "slice-address-family-mismatch", "x", eps(&["fd00::1"])),
            Logged,
        ),
        (
            "port-negative",
            service(h, "port-negative", cip("10.96.1.16", json!(-80))),
            Logged,
        ),
        (
            "port-too-big",
            service(h, "port-too-big", cip("10.96.1.17", json!(70000))),
            Logged,
        ),
        (
            "unknown-traffic-policy",
            service(
                h,
                "unknown-traffic-policy",
                json!({"type": "NodePort", "externalTrafficPolicy": "Sideways", "clusterIP": "10.96.1.18", "clusterIPs": ["10.96.1.18"], "ports": [{"name": "a", "protocol": "TCP", "port": 80, "nodePort": 30018}]}),
            ),
            Logged,
        ),
        (
            "unknown-affinity",
            service(
                h,
                "unknown-affinity",
                json!({"clusterIP": "10.96.1.19", "clusterIPs": ["10.96.1.19"], "sessionAffinity": "Sticky", "ports": [{"name": "a", "protocol": "TCP", "port": 80}]}),
            ),
            Logged,
        ),
        (
            "health-check-port-out-of-range",
            service(
                h,
                "health-check-port-out-of-range",
                json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 70000, "clusterIP": "10.96.1.20", "clusterIPs": ["10.96.1.20"], "ports": [{"name": "a", "protocol": "TCP", "port": 80, "nodePort": 30020}]}),
            ),
            Logged,
        ),
    ];
    // Huge but valid: 1,000 ports on one Service, 10,000 endpoints in one slice.
    let ports: Vec<Value> = (0..1000)
        .map(|i| json!({"name": format!("p{i}"), "protocol": "TCP", "port": 10000 + i, "targetPort": 8080}))
        .collect();
    v.push((
        "thousand-ports",
        service(
            h,
            "thousand-ports",
            json!({"clusterIP": "10.96.2.1", "clusterIPs": ["10.96.2.1"], "ports": ports}),
        ),
        Served("10.96.2.1:10999/tcp"),
    ));
    let many: Vec<Value> = (0..10_000u32)
        .map(|i| json!({"addresses": [format!("10.250.{}.{}", i / 250, i % 250 + 1)], "conditions": {"ready": true}}))
        .collect();
    v.push((
        "ten-thousand-endpoints-svc",
        service(h, "ten-thousand-endpoints-svc", cip("10.96.2.2", json!(80))),
        Served("10.96.2.2:80/tcp"),
    ));
    v.push((
        "ten-thousand-endpoints",
        slice(h, "ten-thousand-endpoints", "ten-thousand-endpoints-svc", json!({"addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP", "port": 8080}], "endpoints": many})),
        Served("10.96.2.2:80/tcp"),
    ));
    v
}

#[test]
fn hostile_objects_are_skipped_one_by_one_and_nothing_else_is_disturbed() {
    kpr_lab::require_lab("hostile_input");
    let lab = Lab::up(LabSpec {
        prefix: Lab::unique_prefix("hostile"),
        ..LabSpec::default()
    })
    .expect("lab up");
    let listener = in_netns(lab.node_ns(), || TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    let api = FakeApiServer::start(listener);
    api.apply(service("demo", "good", cip("10.96.0.10", json!(80))));
    api.apply(slice(
        "demo",
        "good-1",
        "good",
        eps(&["10.244.1.11", "10.244.1.12", "10.244.1.13"]),
    ));
    let url = api.url();
    let args = ["--master", url.as_str(), "--hostname-override", "node1"];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    let mut kpr = Kpr::start_with(&lab, &kpr_path(), "kpr", &args).expect("kpr start");
    kpr.wait_for_backends(
        GOOD,
        &["10.244.1.11:8080", "10.244.1.12:8080", "10.244.1.13:8080"],
    )
    .unwrap();

    let cases = hostile();
    for (_, obj, _) in &cases {
        api.apply(obj.clone());
    }
    // A change to the good Service after all of them is still applied.
    api.apply(slice(
        "demo",
        "good-1",
        "good",
        eps(&["10.244.1.11", "10.244.1.12"]),
    ));
    kpr.wait_for_backends(GOOD, &["10.244.1.11:8080", "10.244.1.12:8080"])
        .unwrap_or_else(|e| panic!("{e}\n{}", kpr.log()));
    for (_, _, expect) in &cases {
        if let Some(fe) = expect.served() {
            kpr.wait_for_frontend(fe, "a huge but valid object", |_| true)
                .unwrap_or_else(|e| panic!("{e}\n{}", kpr.log()));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let missing = loop {
        let log = kpr.log();
        let missing: Vec<&str> = cases
            .iter()
            .filter(|(name, _, e)| {
                e.logged() && !log.lines().any(|l| l.contains(&format!("/{name}")))
            })
            .map(|(name, _, _)| *name)
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = kpr.log();
    assert!(missing.is_empty(), "no log line names {missing:?}:\n{log}");
    // One line each, not one per sync.
    for (name, _, e) in &cases {
        if e.logged() {
            let n = log
                .lines()
                .filter(|l| l.contains(&format!("/{name}:")))
                .count();
            assert_eq!(n, 1, "{name} is named in {n} log lines:\n{log}");
        }
    }
    assert!(!log.contains("panicked"), "{log}");
    println!(
        "{} hostile objects, each named in the log or served:",
        cases.len()
    );
    for l in log.lines().filter(|l| l.contains("skipped")) {
        println!("  {}", l.split_once("skipped").map_or(l, |(_, r)| r));
    }

    let client = lab.clients()[0].clone();
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let r = lab.tcp_spread(&client, vip, 60).unwrap();
    assert_eq!(r.errors, 0, "{r:?}\n{log}");
    assert_eq!(r.counts.len(), 2, "{r:?}");
}
