//! `--proxy-mode iptables` on a node whose iptables is the legacy (xtables) backend: kpr
//! detects it as kube-proxy's image does (kubelet's canary chain in the legacy tables), writes
//! its rules there and not into nftables, and serves the Service through them.

use std::net::SocketAddr;

use kpr_lab::kpr::{kpr_path, Kpr, ProxyMode};
use kpr_lab::{Lab, LabSpec};

const MANIFEST: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: demo}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: demo\n  labels: {kubernetes.io/service-name: echo}\naddressType: IPv4\nports: [{name: http, protocol: TCP, port: 8080}]\nendpoints:\n  - {addresses: [10.244.1.11], conditions: {ready: true}}\n  - {addresses: [10.244.1.12], conditions: {ready: true}}\n  - {addresses: [10.244.1.13], conditions: {ready: true}}\n";

fn save(lab: &Lab, cmd: &str) -> String {
    let out = lab.exec_in_node(&[cmd, "-t", "nat"], None).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_legacy_backend_is_detected_and_serves() {
    kpr_lab::require_lab("iptables_legacy");
    kpr_lab::preconditions::require(
        "iptables_legacy",
        &[
            "iptables-legacy",
            "iptables-legacy-save",
            "iptables-nft-save",
        ],
    );
    let lab = Lab::up(LabSpec {
        prefix: Lab::unique_prefix("legacy"),
        ..LabSpec::default()
    })
    .expect("lab up");
    // What kubelet leaves on a legacy node, and what kube-proxy's image looks for.
    lab.exec_in_node(
        &[
            "iptables-legacy",
            "-t",
            "mangle",
            "-N",
            "KUBE-KUBELET-CANARY",
        ],
        None,
    )
    .unwrap();
    let dir = lab.manifest_dir().unwrap();
    std::fs::write(dir.join("echo.yaml"), MANIFEST).unwrap();
    let mut kpr =
        Kpr::start(&lab, &kpr_path(), &dir, "kpr", &ProxyMode::Iptables.args()).expect("kpr start");
    let legacy = save(&lab, "iptables-legacy-save");
    let nft = save(&lab, "iptables-nft-save");
    assert!(
        legacy.contains("-A KUBE-SERVICES"),
        "rules not in legacy:\n{legacy}\n{}",
        kpr.log()
    );
    assert!(
        !nft.contains("KUBE-SERVICES"),
        "rules in nft as well:\n{nft}"
    );
    assert!(kpr.log().contains("Legacy"), "{}", kpr.log());

    let client = lab.clients()[0].clone();
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let r = lab.tcp_spread(&client, vip, 60).unwrap();
    assert_eq!(r.errors, 0, "{r:?}\n{}", kpr.log());
    assert_eq!(r.counts.len(), 3, "{r:?}");

    // A partial sync through iptables-legacy-restore.
    std::fs::write(
        dir.join("echo.yaml"),
        MANIFEST.replace(
            "  - {addresses: [10.244.1.13], conditions: {ready: true}}\n",
            "",
        ),
    )
    .unwrap();
    kpr.wait_for_backends(
        "10.96.0.10:80/tcp",
        &["10.244.1.11:8080", "10.244.1.12:8080"],
    )
    .unwrap();
    let r = lab.tcp_spread(&client, vip, 60).unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    assert!(!r.counts.contains_key("be3"), "{r:?}");
}
