//! Switching a live node between proxy modes, one restart each, as an operator migrating from
//! kube-proxy would: kube-proxy's own iptables rules → kpr ebpf → iptables → nftables → ebpf.
//! After each restart the Service is served by the new mode and nothing of the previous one is
//! left in the node's namespace (kube-proxy's `CleanupLeftovers`).

use std::net::SocketAddr;

use kpr_lab::kpr::{kpr_path, Kpr, ProxyMode};
use kpr_lab::{require_lab, Lab, LabSpec};

const MANIFEST: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: demo}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: demo\n  labels: {kubernetes.io/service-name: echo}\naddressType: IPv4\nports: [{name: http, protocol: TCP, port: 8080}]\nendpoints:\n  - {addresses: [10.244.1.11], conditions: {ready: true}}\n  - {addresses: [10.244.1.12], conditions: {ready: true}}\n  - {addresses: [10.244.1.13], conditions: {ready: true}}\n";

/// What each mode leaves in the node's namespace, as the tools show it.
fn state(lab: &Lab) -> (bool, bool, bool) {
    let out = |args: &[&str]| lab.exec_in_node(args, None).ok();
    let iptables = out(&["iptables-save", "-t", "nat"])
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(":KUBE-SERVICES"))
        .unwrap_or(false);
    let nft = |family: &str, table: &str| {
        lab.exec_in_node(&["nft", "list", "table", family, table], None)
            .is_ok_and(|o| o.status.success())
    };
    (iptables, nft("ip", "kube-proxy"), nft("ip", "kpr"))
}

#[test]
fn a_node_switches_from_kube_proxy_through_every_mode_one_restart_each() {
    require_lab("mode_switching");
    let lab = Lab::up(LabSpec {
        prefix: Lab::unique_prefix("switch"),
        ..LabSpec::default()
    })
    .expect("lab up");
    let dir = lab.manifest_dir().unwrap();
    std::fs::write(dir.join("svc.yaml"), MANIFEST).unwrap();
    let client = lab.clients()[0].clone();
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();

    // kube-proxy was here: its rules for the same Service, as kube-proxy's iptables mode
    // writes them (kpr's writer is golden-tested against kube-proxy's expectations).
    let rendered = std::process::Command::new(kpr_path())
        .args(["render-iptables", "--manifests"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(rendered.status.success());
    let load = lab
        .exec_in_node(&["iptables-restore"], Some(&rendered.stdout))
        .unwrap();
    assert!(load.status.success(), "{load:?}");
    assert_eq!(state(&lab), (true, false, false));

    // (mode, what must be left afterwards: kube-proxy iptables, kube-proxy nft, kpr's table)
    let steps = [
        (ProxyMode::Ebpf, (false, false, true)),
        (ProxyMode::Iptables, (true, false, false)),
        (ProxyMode::Nftables, (false, true, false)),
        (ProxyMode::Ebpf, (false, false, true)),
    ];
    for (mode, left) in steps {
        let kpr = Kpr::start(&lab, &kpr_path(), &dir, "kpr", &mode.args()).expect("kpr start");
        let r = lab.tcp_spread(&client, vip, 60).unwrap();
        assert_eq!(r.errors, 0, "{mode:?}: {r:?}\n{}", kpr.log());
        assert_eq!(r.counts.len(), 3, "{mode:?}: {r:?}");
        assert_eq!(
            state(&lab),
            left,
            "{mode:?}: (kube-proxy iptables, kube-proxy nftables, kpr's table)\n{}",
            kpr.log()
        );
        // The netfilter modes' rules stay after the agent stops (as kube-proxy's do, so that
        // a restart drops no traffic) until the next mode removes them.
        let log = kpr.stop();
        assert!(!log.contains("panicked"), "{log}");
    }
}
