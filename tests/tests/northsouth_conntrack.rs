//! North-south connection tracking with real traffic: an external client routed to a one-node
//! lab, a NodePort whose three backends are on the node (issue 15's acceptance).
//!
//! Lab: node1 192.168.100.11 (be1 10.244.1.11, be2 .12, be3 .13), external client
//! 192.168.100.100, which routes the pod CIDR through node1 (pod IPs are reachable directly,
//! as with BGP or cloud VPC CNIs).

use std::net::SocketAddr;
use std::time::Duration;

use kpr_lab::kpr::{kpr_path, Kpr, ProxyMode};
use kpr_lab::tool::{wait_for_progress, SynBurst, TcpHold, UdpSpread};
use kpr_lab::{per_mode, Lab, LabSpec, Pod};

const NODE1: &str = "192.168.100.11";
const NODEPORT: &str = "192.168.100.11:30080";
const NODEPORT_UDP: &str = "192.168.100.11:30053";
const BE1: &str = "10.244.1.11:8080";

fn manifests() -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: node1}}\nstatus:\n  addresses: [{{type: InternalIP, address: {NODE1}}}]\n---\n"
    );
    y += "apiVersion: v1\nkind: Service\nmetadata: {name: np, namespace: ns}\nspec:\n  type: NodePort\n  clusterIP: 10.96.1.1\n  ports:\n  - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}\n  - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}\n---\n";
    y += "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: np-1\n  namespace: ns\n  labels: {kubernetes.io/service-name: np}\naddressType: IPv4\nports: [{name: http, protocol: TCP, port: 8080}, {name: dns, protocol: UDP, port: 5353}]\nendpoints:\n";
    for ip in ["10.244.1.11", "10.244.1.12", "10.244.1.13"] {
        y += &format!("  - {{addresses: [{ip}], conditions: {{ready: true}}, nodeName: node1}}\n");
    }
    y
}

struct OneNode {
    lab: Lab,
    kpr: Kpr,
}

impl OneNode {
    fn up(tag: &str, mode: ProxyMode, flags: &[&str]) -> OneNode {
        let lab = Lab::up(LabSpec {
            prefix: Lab::unique_prefix(tag),
            nodes: 1,
            backends_per_node: vec![3],
            clients_per_node: vec![0],
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
            mode.args()[0],
            mode.args()[1],
        ];
        args.extend_from_slice(flags);
        let mut kpr = Kpr::start(&lab, &kpr_path(), &dir, "kpr", &args).expect("kpr start");
        let all = ["10.244.1.11:8080", "10.244.1.12:8080", "10.244.1.13:8080"];
        kpr.wait_for_backends(&format!("{NODEPORT}/tcp"), &all)
            .unwrap_or_else(|e| panic!("{e}\n{}", kpr.log()));
        OneNode { lab, kpr }
    }

    fn ext(&self) -> Pod {
        self.lab.external_client().expect("external client").clone()
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

per_mode! {
    fn direct_connections_after_nodeport_connections_from_the_same_client_ports(mode) {
        kpr_lab::require_lab("northsouth_conntrack");
        let mut t = OneNode::up("nsct", mode, &[]);
        let ext = t.ext();
        // A thousand client ports: every round reuses the ports of the rounds before it (the
        // connections close with RST, so no TIME_WAIT holds a port back).
        let mut sysctl = std::process::Command::new("sysctl");
        sysctl.args(["-qw", "net.ipv4.ip_local_port_range=40000 40999"]);
        let out = t.lab.run_in_pod(&ext, sysctl, Duration::from_secs(5)).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

        let mut direct_rates = Vec::new();
        for round in 1..=20 {
            let np = t
                .lab
                .bench_connect(&ext, addr(NODEPORT), Duration::from_millis(300), 1)
                .unwrap();
            assert_eq!(np.errors, 0, "round {round}, NodePort: {np:?}\n{}", t.kpr.log());
            assert!(np.connections > 0, "round {round}: {np:?}");
            let direct = t
                .lab
                .bench_connect(&ext, addr(BE1), Duration::from_millis(300), 1)
                .unwrap();
            assert_eq!(
                direct.errors, 0,
                "round {round}, direct to {BE1} after NodePort connections: {direct:?}"
            );
            direct_rates.push(direct.per_sec);
        }
        println!("direct connections/s by round: {direct_rates:.0?}");
        // The stall this guards against left a few dozen connections in 2 s where 12,000 went
        // before. Rates on this 2-core lab vary threefold between rounds (other tests run
        // beside this one), so each round is held to a tenth of the median round: far outside
        // the noise, and still far above the failure.
        let mut sorted = direct_rates.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        for (i, r) in direct_rates.iter().enumerate() {
            assert!(
                *r >= median / 10.0,
                "round {}: {r:.0}/s against a median of {median:.0}/s: {direct_rates:.0?}",
                i + 1
            );
        }
        if mode == ProxyMode::Ebpf {
            // The direct SYNs met the NodePort flows' entries and replaced them.
            let c = t.kpr.counters_now().unwrap();
            assert!(c["tc_ct_replaced"] > 0, "{c:?}");
        }
    }
}

#[test]
fn an_established_connection_survives_a_syn_burst_to_its_nodeport() {
    kpr_lab::require_lab("northsouth_conntrack_syn_burst");
    // Room for 512 connections (on 2 CPUs: max(256 × 2, 512)); the burst is 40 times that.
    let mut t = OneNode::up(
        "nssyn",
        ProxyMode::Ebpf,
        &["--conntrack-max-per-core=256", "--conntrack-min=512"],
    );
    let ext = t.ext();
    let work = t.lab.work_dir().to_path_buf();
    let progress = work.join("hold-progress");
    let stop = work.join("hold-stop");
    let before = t.kpr.counters_now().unwrap();
    let (hold, burst) = std::thread::scope(|s| {
        let lab = &t.lab;
        let ext_hold = ext.clone();
        let (p, st) = (progress.to_str().unwrap(), stop.to_str().unwrap());
        let hold = s.spawn(move || {
            lab.labtool_json::<TcpHold>(
                &ext_hold,
                &[
                    "tcp-hold",
                    "--target",
                    NODEPORT,
                    "--interval-ms",
                    "5",
                    "--max-ms",
                    "60000",
                    "--stop-file",
                    st,
                    "--progress-file",
                    p,
                ],
                Duration::from_secs(70),
            )
        });
        let started = wait_for_progress(&progress, 20, "held connection exchanges");
        let burst: SynBurst = lab
            .labtool_json(
                &ext,
                &["syn-burst", "--target", NODEPORT, "--count", "20000"],
                Duration::from_secs(60),
            )
            .unwrap();
        // The connection keeps exchanging after the burst, not just before it.
        let after_burst = wait_for_progress(&progress, started + 1, "exchanges after the burst");
        wait_for_progress(&progress, after_burst + 100, "exchanges after the burst");
        std::fs::write(&stop, "").unwrap();
        (hold.join().unwrap().unwrap(), burst)
    });
    println!("held connection: {hold:?}\nburst: {burst:?}");
    assert_eq!(burst.sent, 20_000, "{burst:?}");
    assert_eq!(
        hold.errors,
        0,
        "the held connection broke: {hold:?}\n{}",
        t.kpr.log()
    );
    assert_eq!(hold.backends.len(), 1, "it changed backend: {hold:?}");
    let after = t.kpr.counters_now().unwrap();
    let delta = |name: &str| after[name] - before.get(name).copied().unwrap_or(0);
    // Every SYN of the burst was a new flow through kpr, far more than its maps hold.
    assert!(delta("tc_translated") >= 20_000, "{after:?}");
    assert_eq!(delta("ct_established_full"), 0, "{after:?}");
}

#[test]
fn udp_flows_expire_after_their_lifetime_and_choose_a_backend_anew() {
    kpr_lab::require_lab("northsouth_conntrack_udp");
    let mut t = OneNode::up(
        "nsudp",
        ProxyMode::Ebpf,
        &[
            "--conntrack-udp-timeout=1s",
            "--conntrack-udp-timeout-stream=1s",
        ],
    );
    let ext = t.ext();
    let run = |t: &OneNode, count: &str, interval_ms: &str| -> UdpSpread {
        t.lab
            .labtool_json(
                &ext,
                &[
                    "udp-spread",
                    "--target",
                    NODEPORT_UDP,
                    "--count",
                    count,
                    "--one-socket",
                    "--interval-ms",
                    interval_ms,
                    "--timeout-ms",
                    "500",
                ],
                Duration::from_secs(40),
            )
            .unwrap()
    };
    // Within the lifetime, one flow (one client port) stays on its backend.
    let r = run(&t, "30", "0");
    assert_eq!(r.errors, 0, "{r:?}");
    assert_eq!(r.counts.len(), 1, "a live flow moved: {r:?}");

    // Idle for twice the lifetime between datagrams: each one starts a new flow, which picks
    // a backend at random (all 8 on one of 3 backends: 3 · 3⁻⁸ ≈ 5·10⁻⁴).
    let before = t.kpr.counters_now().unwrap()["tc_ct_expired"];
    let r = run(&t, "8", "2000");
    assert_eq!(r.errors, 0, "{r:?}");
    assert!(
        r.counts.len() >= 2,
        "expired flows kept their backend: {r:?}"
    );
    let after = t.kpr.counters_now().unwrap()["tc_ct_expired"];
    assert!(
        after - before >= 7,
        "expired entries found: {}",
        after - before
    );
}
