//! Faults while traffic flows (issue 11, part 3), bounded in time: every backend replaced in
//! a rolling update, repeatedly; the API server gone for 60 s while Services change.
//!
//! Lab: node1 with be1..be6 (10.244.1.11..16) and cl1 (10.244.1.21).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kpr_fake_apiserver::FakeApiServer;
use kpr_lab::kpr::{kpr_path, Kpr};
use kpr_lab::tool::{BenchConnect, UdpMode, UdpSpread};
use kpr_lab::{in_netns, Lab, LabSpec, Pod};
use serde_json::json;

const FRONTEND: &str = "10.96.0.10:80/tcp";
const WEB: &str = "10.96.0.10:80";
const DNS: &str = "10.96.0.10:53";

/// An endpoint's conditions in a rolling update.
#[derive(Clone, Copy)]
enum State {
    Ready,
    /// Being replaced: still serving, terminating.
    Terminating,
}

fn manifest(endpoints: &[(&str, State)]) -> String {
    let mut y = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns}\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, protocol: TCP, port: 80, targetPort: 8080}\n  - {name: dns, protocol: UDP, port: 53, targetPort: 5353}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: ns\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nports: [{name: http, protocol: TCP, port: 8080}, {name: dns, protocol: UDP, port: 5353}]\nendpoints:\n".to_string();
    for (ip, state) in endpoints {
        let conditions = match state {
            State::Ready => "{ready: true, serving: true, terminating: false}",
            State::Terminating => "{ready: false, serving: true, terminating: true}",
        };
        y += &format!("  - {{addresses: [{ip}], conditions: {conditions}}}\n");
    }
    y
}

fn at_8080(ips: &[&str]) -> Vec<String> {
    ips.iter().map(|ip| format!("{ip}:8080")).collect()
}

/// Runs a ClusterIP TCP load and an unconnected UDP load from `cl` while `during` runs.
fn under_load(lab: &Lab, cl: &Pod, during: impl FnOnce()) -> (BenchConnect, UdpSpread) {
    let stop = lab.work_dir().join("chaos-stop");
    let _ = std::fs::remove_file(&stop);
    std::thread::scope(|s| {
        let tcp = s.spawn(|| lab.bench_connect_until(cl, WEB, &stop).unwrap());
        let udp = s.spawn(|| {
            lab.udp_until(cl, DNS, UdpMode::OneSocket, 5, &stop, None)
                .unwrap()
        });
        during();
        std::fs::write(&stop, "").unwrap();
        (tcp.join().unwrap(), udp.join().unwrap())
    })
}

fn assert_no_failure(tcp: &BenchConnect, udp: &UdpSpread, log: &str) {
    println!(
        "TCP: {} connections, {} failed; UDP: {} replies, {} lost",
        tcp.connections,
        tcp.errors,
        udp.sequence.len() as u64 - udp.errors,
        udp.errors
    );
    assert!(tcp.connections > 0 && !udp.sequence.is_empty());
    assert_eq!(tcp.errors, 0, "{tcp:?}\n{log}");
    assert_eq!(udp.errors, 0, "{:?}\n{log}", udp.error_kinds);
}

#[test]
fn rolling_replacement_of_every_backend_under_load() {
    kpr_lab::require_lab("chaos_churn");
    let lab = Lab::up(LabSpec {
        prefix: Lab::unique_prefix("churn"),
        backends: 6,
        ..LabSpec::default()
    })
    .expect("lab up");
    let dir = lab.manifest_dir().unwrap();
    let a = ["10.244.1.11", "10.244.1.12", "10.244.1.13"];
    let b = ["10.244.1.14", "10.244.1.15", "10.244.1.16"];
    let write =
        |eps: &[(&str, State)]| std::fs::write(dir.join("web.yaml"), manifest(eps)).unwrap();
    write(&a.map(|ip| (ip, State::Ready)));
    let mut kpr = Kpr::start(&lab, &kpr_path(), &dir, "kpr", &[]).expect("kpr start");
    let cl = lab.clients()[0].clone();
    let mut steps = 0;
    let (tcp, udp) = under_load(&lab, &cl, || {
        let (mut old, mut new) = (a, b);
        for _ in 0..4 {
            // The new pods come up and are ready.
            let mut both: Vec<(&str, State)> = old.iter().map(|ip| (*ip, State::Ready)).collect();
            both.extend(new.iter().map(|ip| (*ip, State::Ready)));
            write(&both);
            let all: Vec<&str> = old.iter().chain(&new).copied().collect();
            kpr.wait_for_backends(FRONTEND, &refs(&at_8080(&all)))
                .unwrap();
            // The old ones terminate (still serving): traffic goes to the ready ones only.
            let mut draining: Vec<(&str, State)> =
                old.iter().map(|ip| (*ip, State::Terminating)).collect();
            draining.extend(new.iter().map(|ip| (*ip, State::Ready)));
            write(&draining);
            kpr.wait_for_backends(FRONTEND, &refs(&at_8080(&new)))
                .unwrap();
            // And go.
            write(&new.map(|ip| (ip, State::Ready)));
            kpr.wait_for_backends(FRONTEND, &refs(&at_8080(&new)))
                .unwrap();
            steps += 3;
            std::mem::swap(&mut old, &mut new);
        }
    });
    println!("{steps} endpoint changes, every backend replaced 4 times");
    assert_no_failure(&tcp, &udp, &kpr.log());
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn api_objects(ips: &[&str]) -> (serde_json::Value, serde_json::Value) {
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "ns"},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
                           {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 5353}]}
    });
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "ns", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}, {"name": "dns", "protocol": "UDP", "port": 5353}],
        "endpoints": ips.iter().map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}})).collect::<Vec<_>>()
    });
    (svc, slice)
}

/// `/healthz` of the agent (its server listens on the node's loopback).
fn healthz(lab: &Lab) -> u16 {
    in_netns(lab.node_ns(), || {
        kpr_lab::tool::http_get(
            "127.0.0.1:10256".parse::<SocketAddr>().unwrap(),
            "/healthz",
            Duration::from_secs(2),
        )
        .status
    })
    .unwrap()
}

#[test]
fn api_server_outage_of_60_s_under_load() {
    kpr_lab::require_lab("chaos_api_outage");
    let lab = Lab::up(LabSpec {
        prefix: Lab::unique_prefix("outage"),
        backends: 3,
        ..LabSpec::default()
    })
    .expect("lab up");
    let listener = in_netns(lab.node_ns(), || std::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    let api = FakeApiServer::start(listener);
    let (svc, slice) = api_objects(&["10.244.1.11", "10.244.1.12", "10.244.1.13"]);
    api.apply(svc);
    api.apply(slice);
    let url = api.url();
    let args = [
        "--master",
        url.as_str(),
        "--hostname-override",
        "node1",
        "--healthz-bind-address",
        "127.0.0.1:10256",
        // Full syncs (and so health refreshes) every 10 s, so a 60 s outage spans several.
        "--sync-period",
        "10s",
    ];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    let mut kpr = Kpr::start_with(&lab, &kpr_path(), "kpr", &args).expect("kpr start");
    kpr.wait_for_backends(
        FRONTEND,
        &refs(&at_8080(&["10.244.1.11", "10.244.1.12", "10.244.1.13"])),
    )
    .unwrap();
    let cl = lab.clients()[0].clone();
    let mut health_during = Vec::new();
    let (tcp, udp) = under_load(&lab, &cl, || {
        api.set_refusing(true);
        api.drop_connections();
        let start = Instant::now();
        // Meanwhile the cluster changes: be3 goes, and nothing reaches kpr yet.
        let (_, slice) = api_objects(&["10.244.1.11", "10.244.1.12"]);
        api.apply(slice);
        while start.elapsed() < Duration::from_secs(60) {
            health_during.push(healthz(&lab));
            std::thread::sleep(Duration::from_secs(5));
        }
        let status = kpr.status().unwrap();
        assert_eq!(
            status.frontends[FRONTEND].backends.len(),
            3,
            "kpr changed state without the API server"
        );
        api.set_refusing(false);
        // Back: kpr lists again and applies the change made meanwhile, at its next retry:
        // kube-rs's backoff (as client-go's) has grown to at most 30 s during the outage.
        let t = Instant::now();
        let want = at_8080(&["10.244.1.11", "10.244.1.12"]);
        kpr.wait_for_status(
            "the change made during the outage",
            Duration::from_secs(45),
            |s| {
                s.frontends
                    .get(FRONTEND)
                    .is_some_and(|f| f.backends == want)
            },
        )
        .unwrap();
        println!(
            "the change made during the outage was applied {:.1} s after it ended",
            t.elapsed().as_secs_f64()
        );
    });
    println!("/healthz during the outage: {health_during:?}");
    assert_no_failure(&tcp, &udp, &kpr.log());
    // kube-proxy's /healthz follows the proxier's syncs, not the API server: the agent kept
    // syncing the state it had, so it stayed healthy.
    assert!(
        health_during.iter().all(|c| *c == 200),
        "{health_during:?}\n{}",
        kpr.log()
    );
    assert_eq!(healthz(&lab), 200);
}

fn clusterip_services(range: std::ops::Range<usize>) -> String {
    let mut y = String::new();
    for i in range {
        y += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc{i:02}, namespace: ns}}\nspec:\n  clusterIP: 10.96.3.{}\n  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc{i:02}-1\n  namespace: ns\n  labels: {{kubernetes.io/service-name: svc{i:02}}}\naddressType: IPv4\nports: [{{name: http, protocol: TCP, port: 8080}}]\nendpoints:\n  - {{addresses: [10.244.1.11], conditions: {{ready: true}}}}\n  - {{addresses: [10.244.1.12], conditions: {{ready: true}}}}\n  - {{addresses: [10.244.1.13], conditions: {{ready: true}}}}\n---\n",
            i + 1
        );
    }
    y
}

#[test]
fn full_maps_refuse_what_does_not_fit_by_name_and_serve_the_rest() {
    kpr_lab::require_lab("chaos_maps_full");
    let lab = Lab::up(LabSpec {
        prefix: Lab::unique_prefix("full"),
        ..LabSpec::default()
    })
    .expect("lab up");
    let dir = lab.manifest_dir().unwrap();
    // Ten Services of 4 entries each (the frontend and 3 backends) in a map of 16.
    std::fs::write(dir.join("all.yaml"), clusterip_services(0..10)).unwrap();
    let mut kpr = Kpr::start(
        &lab,
        &kpr_path(),
        &dir,
        "kpr",
        &[
            "--bpf-services-map-max",
            "16",
            "--bpf-backends-map-max",
            "64",
        ],
    )
    .expect("kpr start");
    kpr.wait_for_frontend("10.96.3.4:80/tcp", "svc03", |_| true)
        .unwrap();
    let status = kpr.status().unwrap();
    let served: Vec<&String> = status.frontends.keys().collect();
    assert_eq!(
        served,
        [
            "10.96.3.1:80/tcp",
            "10.96.3.2:80/tcp",
            "10.96.3.3:80/tcp",
            "10.96.3.4:80/tcp"
        ],
        "the first four by name fit"
    );
    let raw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(kpr.status_path()).unwrap()).unwrap();
    assert_eq!(raw["last_report"]["refused"], 6, "{raw:#}");
    let log = kpr.log();
    for i in 4..10 {
        let n = log
            .lines()
            .filter(|l| l.contains(&format!("refused Service ns/svc{i:02}:http")))
            .count();
        assert_eq!(n, 1, "svc{i:02}:\n{log}");
    }
    let client = lab.clients()[0].clone();
    let r = lab
        .tcp_spread(&client, "10.96.3.1:80".parse().unwrap(), 30)
        .unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    assert!(!log.contains("panicked"), "{log}");

    // Room freed: the first refused one gets in.
    std::fs::write(dir.join("all.yaml"), clusterip_services(1..10)).unwrap();
    kpr.wait_for_frontend("10.96.3.5:80/tcp", "svc04 once svc00 left", |_| true)
        .unwrap();
    kpr.wait_for_no_frontend("10.96.3.1:80/tcp").unwrap();
}
