//! `kpr status` and `kpr trace` against a running lab (issue 11, part 4): what they show is
//! read from the live pinned maps, with the Service names from the agent's admin socket, and
//! keeps working when the agent is gone. And the agent's datapath events
//! (`--datapath-events`, issue 14), which show the same decisions as they happen.
//!
//! Lab: node1 192.168.100.11 (be1 10.244.1.11, be2 .12, be3 .13, cl1 10.244.1.21), external
//! client 192.168.100.100; over IPv6 node1 fd00:192:168:100::b, pods fd00:10:244:1::<host in
//! hex>, external client fd00:192:168:100::64.

use std::net::SocketAddr;
use std::time::Duration;

use kpr_lab::kpr::{kpr_path, Kpr};
use kpr_lab::{Lab, LabSpec};
use serde_json::Value;

const NODE1: &str = "192.168.100.11";

fn manifests() -> String {
    let eps: String = ["10.244.1.11", "10.244.1.12", "10.244.1.13"]
        .iter()
        .map(|ip| {
            format!("  - {{addresses: [{ip}], conditions: {{ready: true}}, nodeName: node1}}\n")
        })
        .collect();
    let svc = |name: &str, spec: &str, endpoints: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n{spec}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: ns\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: http, protocol: TCP, port: 8080}}]\nendpoints:{endpoints}---\n"
        )
    };
    let mut y = format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: node1}}\nstatus:\n  addresses: [{{type: InternalIP, address: {NODE1}}}, {{type: InternalIP, address: \"{NODE1_6}\"}}]\n---\n"
    );
    y += &svc(
        "web",
        "  clusterIP: 10.96.0.10\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]\n",
        &format!("\n{eps}"),
    );
    y += &svc(
        "sticky",
        "  type: NodePort\n  clusterIP: 10.96.0.20\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}]\n",
        &format!("\n{eps}"),
    );
    y += &svc(
        "empty",
        "  clusterIP: 10.96.0.30\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]\n",
        " []\n",
    );
    let lb = svc(
        "guarded",
        "  type: LoadBalancer\n  clusterIP: 10.96.0.40\n  loadBalancerSourceRanges: [10.0.0.0/8]\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30090}]\n",
        &format!("\n{eps}"),
    );
    // The status belongs to the Service document.
    y += &lb.replacen(
        "nodePort: 30090}]\n---\n",
        "nodePort: 30090}]\nstatus:\n  loadBalancer:\n    ingress: [{ip: 203.0.113.60}]\n---\n",
        1,
    );
    // IPv6: a SingleStack ClusterIP, and a NodePort with affinity.
    let eps6: String = ALL6
        .iter()
        .map(|b| {
            let ip = b.trim_start_matches('[').split(']').next().unwrap();
            format!("  - {{addresses: [\"{ip}\"], conditions: {{ready: true}}, nodeName: node1}}\n")
        })
        .collect();
    for (name, spec) in [
        ("web6", "  clusterIP: \"fd00:10:96::10\"\n  ipFamilies: [IPv6]\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]\n".to_string()),
        ("sticky6", "  type: NodePort\n  clusterIP: \"fd00:10:96::20\"\n  ipFamilies: [IPv6]\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30081}]\n".to_string()),
    ] {
        y += &svc(name, &spec, &format!("\n{eps6}")).replace("addressType: IPv4", "addressType: IPv6");
    }
    y
}

const NODE1_6: &str = "fd00:192:168:100::b";

struct Setup {
    lab: Lab,
    kpr: Option<Kpr>,
}

impl Setup {
    fn kpr_cli(&self, args: &[&str]) -> String {
        let pins = self.lab.bpffs_dir().join("kpr");
        let sock = self.lab.work_dir().join("kpr-admin.sock");
        let bin = kpr_path();
        let mut all = vec![
            bin.to_str().unwrap(),
            args[0],
            "--bpf-pin-dir",
            pins.to_str().unwrap(),
        ];
        if args[0] == "status" {
            all.extend(["--admin-socket", sock.to_str().unwrap()]);
        }
        all.extend(&args[1..]);
        let out = self.lab.exec_in_node(&all, None).unwrap();
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let text = self.kpr_cli(&a);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }
}

fn setup() -> Setup {
    setup_with(&[])
}

fn setup_with(extra_args: &[&str]) -> Setup {
    let lab = Lab::up(LabSpec {
        prefix: Lab::unique_prefix("st"),
        nodes: 1,
        backends_per_node: vec![3],
        clients_per_node: vec![1],
        external_client: true,
        ..LabSpec::default()
    })
    .expect("lab up");
    let dir = lab.manifest_dir().unwrap();
    std::fs::write(dir.join("all.yaml"), manifests()).unwrap();
    let mut args = vec![
        "--hostname-override",
        "node1",
        "--devices",
        "eth0",
        "--healthz-bind-address",
        "127.0.0.1:10256",
    ];
    args.extend(extra_args);
    let mut kpr = Kpr::start(&lab, &kpr_path(), &dir, "kpr", &args).expect("kpr start");
    kpr.wait_for_frontend("203.0.113.60:80/tcp", "the LB IP", |_| true)
        .unwrap();
    Setup {
        lab,
        kpr: Some(kpr),
    }
}

fn frontend<'a>(v: &'a Value, name: &str, scope: &str) -> &'a Value {
    v["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["frontend"] == name && f["scope"] == scope)
        .unwrap_or_else(|| panic!("no {scope} frontend {name} in {v:#}"))
}

fn backends(f: &Value) -> Vec<String> {
    let mut b: Vec<String> = f["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["address"].as_str().unwrap().to_string())
        .collect();
    b.sort();
    b
}

const ALL: [&str; 3] = ["10.244.1.11:8080", "10.244.1.12:8080", "10.244.1.13:8080"];
const ALL6: [&str; 3] = [
    "[fd00:10:244:1::b]:8080",
    "[fd00:10:244:1::c]:8080",
    "[fd00:10:244:1::d]:8080",
];

#[test]
fn status_shows_the_live_maps_with_service_names_and_without_the_agent() {
    kpr_lab::require_lab("status");
    let mut t = setup();
    let v = t.json(&["status"]);
    assert_eq!(v["agent"], "reachable", "{v:#}");
    let web = frontend(&v, "10.96.0.10:80/tcp", "internal");
    assert_eq!(web["service"], "ns/web:http");
    assert_eq!(web["kind"], "ClusterIP");
    assert_eq!(backends(web), ALL);
    let np = frontend(&v, "192.168.100.11:30080/tcp", "external");
    assert_eq!(np["kind"], "NodePort");
    assert_eq!(np["affinity_timeout_s"], 600);
    let lb = frontend(&v, "203.0.113.60:80/tcp", "external");
    assert_eq!(lb["source_ranges"], serde_json::json!(["10.0.0.0/8"]));
    assert_eq!(
        backends(frontend(&v, "10.96.0.30:80/tcp", "internal")),
        Vec::<String>::new()
    );
    assert!(v["maps"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["map"] == "KPR_SVC4_V1"));

    // Traffic shows in the counters.
    let client = t.lab.clients()[0].clone();
    let r = t
        .lab
        .tcp_spread(&client, "10.96.0.10:80".parse().unwrap(), 10)
        .unwrap();
    assert_eq!(r.errors, 0);
    let v = t.json(&["status"]);
    assert!(v["counters"]["translated"].as_u64().unwrap() >= 10, "{v:#}");

    let table = t.kpr_cli(&["status"]);
    for want in [
        "FRONTEND",
        "ns/web:http",
        "10.244.1.12:8080",
        "ClientIP 600s",
        "sourceRanges=10.0.0.0/8",
        "translated",
    ] {
        assert!(table.contains(want), "{want} missing:\n{table}");
    }

    // Without the agent: the same frontends and backends, no names.
    t.kpr.take().unwrap().kill().unwrap();
    let v = t.json(&["status"]);
    assert!(
        v["agent"].as_str().unwrap().starts_with("not reachable"),
        "{v:#}"
    );
    let web = frontend(&v, "10.96.0.10:80/tcp", "internal");
    assert_eq!(web["service"], Value::Null);
    assert_eq!(backends(web), ALL);
}

#[test]
fn trace_explains_where_a_flow_goes() {
    kpr_lab::require_lab("trace");
    let t = setup();
    let ext = t.lab.external_client().unwrap().clone();

    // A pod to the ClusterIP: the socket path, three candidates.
    let v = t.json(&["trace", "10.244.1.21", "10.96.0.10:80", "tcp"]);
    assert!(
        v["scope"].as_str().unwrap().starts_with("internal"),
        "{v:#}"
    );
    let mut c: Vec<String> = serde_json::from_value(v["candidates"].clone()).unwrap();
    c.sort();
    assert_eq!(c, ALL);

    // No endpoints: refused.
    let v = t.json(&["trace", "10.244.1.21", "10.96.0.30:80"]);
    assert!(
        v["verdict"].as_str().unwrap().contains("ECONNREFUSED"),
        "{v:#}"
    );

    // Outside the LB's source ranges: dropped, and the reason named.
    let v = t.json(&["trace", "192.168.100.100", "203.0.113.60:80"]);
    assert!(
        v["scope"].as_str().unwrap().starts_with("external"),
        "{v:#}"
    );
    assert!(
        v["verdict"].as_str().unwrap().contains("drop_source_range"),
        "{v:#}"
    );

    // Affinity from outside: no entry before the first connection; afterwards the backend
    // that connection reached.
    let v = t.json(&["trace", "192.168.100.100", "192.168.100.11:30080"]);
    assert_eq!(v["backend"], Value::Null, "{v:#}");
    let once = t
        .lab
        .connect_once(
            &ext,
            "192.168.100.11:30080".parse::<SocketAddr>().unwrap(),
            Duration::from_secs(2),
        )
        .unwrap();
    assert!(once.ok, "{once:?}");
    let reached = once.backend.unwrap();
    let v = t.json(&["trace", "192.168.100.100", "192.168.100.11:30080"]);
    let backend = v["backend"].as_str().unwrap_or_else(|| panic!("{v:#}"));
    let want = match reached.as_str() {
        "be1" => "10.244.1.11:8080",
        "be2" => "10.244.1.12:8080",
        _ => "10.244.1.13:8080",
    };
    assert_eq!(backend, want, "{v:#}");
    assert!(v["verdict"].as_str().unwrap().contains("affinity"), "{v:#}");
    let text = t.kpr_cli(&["trace", "192.168.100.100", "192.168.100.11:30080"]);
    assert!(
        text.contains("affinity: entry for 192.168.100.100"),
        "{text}"
    );

    // Not a frontend.
    let v = t.json(&["trace", "192.168.100.100", "10.244.1.11:8080"]);
    assert!(
        v["verdict"].as_str().unwrap().starts_with("not translated"),
        "{v:#}"
    );
}

#[test]
fn status_and_trace_cover_ipv6_frontends() {
    kpr_lab::require_lab("status and trace over IPv6");
    let t = setup();
    let v = t.json(&["status"]);
    let web6 = frontend(&v, "[fd00:10:96::10]:80/tcp", "internal");
    assert_eq!(web6["service"], "ns/web6:http", "{v:#}");
    assert_eq!(backends(web6), ALL6);
    let np6 = frontend(&v, &format!("[{NODE1_6}]:30081/tcp"), "external");
    assert_eq!(np6["kind"], "NodePort", "{v:#}");
    assert_eq!(np6["affinity_timeout_s"], 600);
    for map in ["KPR_SVC6_V1", "KPR_BE6_V1", "KPR_CT6_V1"] {
        assert!(
            v["maps"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["map"] == map),
            "{map} missing: {v:#}"
        );
    }

    // A pod to the IPv6 ClusterIP: the socket path, the three IPv6 backends.
    let v = t.json(&["trace", "fd00:10:244:1::15", "[fd00:10:96::10]:80"]);
    assert!(
        v["scope"].as_str().unwrap().starts_with("internal"),
        "{v:#}"
    );
    let mut c: Vec<String> = serde_json::from_value(v["candidates"].clone()).unwrap();
    c.sort();
    assert_eq!(c, ALL6, "{v:#}");

    // A v4-mapped destination goes through the IPv4 maps, as the socket programs do.
    let v = t.json(&["trace", "::ffff:10.244.1.21", "[::ffff:10.96.0.10]:80"]);
    let mut c: Vec<String> = serde_json::from_value(v["candidates"].clone()).unwrap();
    c.sort();
    assert_eq!(c, ALL, "{v:#}");

    // Affinity from outside over IPv6: the backend of the first connection.
    let ext = t.lab.external_client().unwrap().clone();
    let target: SocketAddr = format!("[{NODE1_6}]:30081").parse().unwrap();
    let once = t
        .lab
        .connect_once(&ext, target, Duration::from_secs(2))
        .unwrap();
    assert!(once.ok, "{once:?}");
    let want = match once.backend.unwrap().as_str() {
        "be1" => ALL6[0],
        "be2" => ALL6[1],
        _ => ALL6[2],
    };
    let v = t.json(&["trace", "fd00:192:168:100::64", &target.to_string()]);
    assert!(
        v["scope"].as_str().unwrap().starts_with("external"),
        "{v:#}"
    );
    assert_eq!(v["backend"], want, "{v:#}");
    assert!(v["verdict"].as_str().unwrap().contains("affinity"), "{v:#}");

    // Families that no packet mixes.
    let v = t.json(&["trace", "10.244.1.21", "[fd00:10:96::10]:80"]);
    assert_eq!(v["verdict"], "not traced", "{v:#}");
}

/// Waits until the agent's log has a `kpr::datapath` line holding every one of `parts`.
fn wait_for_event(kpr: &Kpr, parts: &[&str]) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = kpr.log();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("kpr::datapath") && parts.iter().all(|p| l.contains(p)))
        {
            eprintln!("{line}");
            return line.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no datapath event with {parts:?}; the agent's log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn datapath_events_name_translations_and_drops_with_their_reason() {
    kpr_lab::require_lab("datapath events");
    let t = setup_with(&["--datapath-events"]);
    t.lab
        .route_external_via("203.0.113.0/24", NODE1)
        .expect("route to the LB IP");
    let kpr = t.kpr.as_ref().unwrap();
    let client = t.lab.clients()[0].clone();
    let ext = t.lab.external_client().unwrap().clone();
    let connect = |pod, target: &str| {
        t.lab
            .connect_once(pod, target.parse().unwrap(), Duration::from_secs(2))
            .unwrap()
    };

    // A pod's connect to the ClusterIP: translated, the Service and backend named.
    let once = connect(&client, "10.96.0.10:80");
    assert!(once.ok, "{once:?}");
    let line = wait_for_event(
        kpr,
        &[
            "socket translated",
            "frontend=10.96.0.10:80",
            "service=ns/web:http",
        ],
    );
    assert!(
        ALL.iter().any(|b| line.contains(&format!("backend={b}"))),
        "{line}"
    );

    // No endpoints: refused, with the reason.
    let once = connect(&client, "10.96.0.30:80");
    assert_eq!(once.error.as_deref(), Some("ECONNREFUSED"), "{once:?}");
    wait_for_event(
        kpr,
        &[
            "socket refused",
            "service=ns/empty:http",
            "reason=drop_no_backend",
        ],
    );

    // From outside, outside the LB's source ranges: dropped in tc, with the reason.
    let once = connect(&ext, "203.0.113.60:80");
    assert_eq!(once.error.as_deref(), Some("ETIMEDOUT"), "{once:?}");
    wait_for_event(
        kpr,
        &[
            "flow dropped",
            "client=192.168.100.100:",
            "service=ns/guarded:http",
            "reason=drop_source_range",
        ],
    );

    // Over IPv6: a pod's connect to the ClusterIP, and a NodePort flow from outside.
    let once = connect(&client, "[fd00:10:96::10]:80");
    assert!(once.ok, "{once:?}");
    let line = wait_for_event(
        kpr,
        &[
            "socket translated",
            "frontend=[fd00:10:96::10]:80",
            "service=ns/web6:http",
        ],
    );
    assert!(
        ALL6.iter().any(|b| line.contains(&format!("backend={b}"))),
        "{line}"
    );
    let once = connect(&ext, &format!("[{NODE1_6}]:30081"));
    assert!(once.ok, "{once:?}");
    wait_for_event(
        kpr,
        &[
            "flow translated",
            "client=[fd00:192:168:100::64]:",
            &format!("frontend=[{NODE1_6}]:30081"),
            "service=ns/sticky6:http",
        ],
    );

    // A NodePort flow with affinity: the first new flow chooses, the second is an affinity hit.
    for affinity in ["affinity=0", "affinity=1"] {
        let once = connect(&ext, "192.168.100.11:30080");
        assert!(once.ok, "{once:?}");
        wait_for_event(
            kpr,
            &[
                "flow translated",
                "frontend=192.168.100.11:30080",
                "service=ns/sticky:http",
                affinity,
            ],
        );
    }
}
