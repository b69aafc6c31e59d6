//! A host whose FORWARD policy is DROP, as Docker leaves it (issue 10, item 7): forwarded
//! NodePort traffic still reaches the backends, because kpr accepts it in FORWARD as
//! kube-proxy's KUBE-FORWARD does (the eBPF mode in its chain KPR-FORWARD, the iptables mode in
//! KUBE-FORWARD itself), while other forwarded traffic stays dropped. kube-proxy's nftables
//! mode installs no such accept (its rules are in its own table, which cannot override an
//! iptables DROP), so neither does kpr's.
//!
//! Lab: node1 192.168.100.11 with be1..be3 (10.244.1.11..13); the external client
//! 192.168.100.100 (which the lab routes to the pod CIDR through node1, for the control).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use kpr_lab::kpr::{kpr_path, Kpr, ProxyMode};

const NODEPORT: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: np, namespace: ns}\nspec:\n  type: NodePort\n  clusterIP: 10.96.4.1\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30150}]\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: np-1\n  namespace: ns\n  labels: {kubernetes.io/service-name: np}\naddressType: IPv4\nports: [{name: http, protocol: TCP, port: 8080}]\nendpoints:\n\
- {addresses: [10.244.1.11], conditions: {ready: true}}\n\
- {addresses: [10.244.1.12], conditions: {ready: true}}\n\
- {addresses: [10.244.1.13], conditions: {ready: true}}\n";

const TARGET: &str = "192.168.100.11:30150";

/// Starts kpr in `mode` with `flags` and waits until the external client reaches every
/// backend through the NodePort (showing the filter table and kpr's log if it does not).
fn start_and_reach(
    lab: &kpr_lab::Lab,
    dir: &std::path::Path,
    mode: ProxyMode,
    flags: &[&str],
) -> Kpr {
    let mut args = vec!["--hostname-override", "node1", "--devices", "eth0"];
    args.extend(mode.args());
    args.extend(flags);
    let mut kpr = Kpr::start(lab, &kpr_path(), dir, "kpr", &args).expect("kpr start");
    kpr.wait_for_frontend(&format!("{TARGET}/tcp"), "a NodePort", |f| {
        f.backends.len() == 3
    })
    .unwrap();
    let ext = lab.external_client().unwrap().clone();
    let all: BTreeSet<String> = ["be1", "be2", "be3"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let target: SocketAddr = TARGET.parse().unwrap();
    if let Err(e) = lab.wait_until_reaching(&ext, target, &all) {
        let rules = lab.exec_in_node(&["iptables-save", "-t", "filter"], None);
        panic!("{flags:?}: {e}\n{rules:?}\n{}", kpr.log());
    }
    kpr
}

fn forwarded_nodeport_traffic_is_accepted_under_a_drop_policy(mode: ProxyMode) {
    let tag = format!("fwd-{}", mode.name());
    let (lab, dir) = kpr_lab::external_client_lab(&tag, NODEPORT);
    lab.exec_in_node(&["iptables", "-P", "FORWARD", "DROP"], None)
        .unwrap();
    let _kpr = start_and_reach(&lab, &dir, mode, &[]);
    let ext = lab.external_client().unwrap().clone();
    // The control: the policy is in force for everything else forwarded (a pod reached
    // directly, not through a Service, gets no answer).
    let direct = lab
        .connect_once(
            &ext,
            "10.244.1.11:8080".parse().unwrap(),
            Duration::from_secs(1),
        )
        .unwrap();
    assert_eq!(
        direct.error.as_deref(),
        Some("ETIMEDOUT"),
        "the FORWARD DROP policy must drop non-Service traffic: {direct:?}"
    );
}

#[test]
fn ebpf_mode_accepts_forwarded_nodeport_traffic_under_a_forward_drop_policy() {
    forwarded_nodeport_traffic_is_accepted_under_a_drop_policy(ProxyMode::Ebpf);
}

#[test]
fn iptables_mode_accepts_forwarded_nodeport_traffic_under_a_forward_drop_policy() {
    forwarded_nodeport_traffic_is_accepted_under_a_drop_policy(ProxyMode::Iptables);
}

/// externalTrafficPolicy Cluster traffic to backends on this node: kpr keeps the client's
/// address by default (its replies come back through this node anyway), where kube-proxy
/// masquerades it; `--masquerade-local-endpoints` does as kube-proxy, which also makes it
/// accepted under a FORWARD DROP policy (it carries the masquerade mark KPR-FORWARD accepts).
#[test]
fn ebpf_mode_masquerades_local_endpoints_as_kube_proxy_when_asked() {
    let local = NODEPORT.replace(
        "conditions: {ready: true}}",
        "conditions: {ready: true}, nodeName: node1}",
    );
    let (lab, dir) = kpr_lab::external_client_lab("fwd-local", &local);
    let ext = lab.external_client().unwrap().clone();
    for (flags, masqueraded) in [
        (&[][..], false),
        (&["--masquerade-local-endpoints"][..], true),
    ] {
        if masqueraded {
            lab.exec_in_node(&["iptables", "-P", "FORWARD", "DROP"], None)
                .unwrap();
        }
        let kpr = start_and_reach(&lab, &dir, ProxyMode::Ebpf, flags);
        let r = lab.tcp_spread(&ext, TARGET.parse().unwrap(), 30).unwrap();
        assert_eq!(r.errors, 0, "{flags:?}: {r:?}");
        let client_kept = r.clients.keys().all(|c| c.starts_with("192.168.100.100"));
        assert_eq!(client_kept, !masqueraded, "{flags:?}: {r:?}");
        drop(kpr);
    }
}
