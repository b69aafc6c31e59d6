//! Which node addresses serve NodePorts (issue 10, item 3), in every mode, with real traffic:
//! kube-proxy's `--nodeport-addresses` matched against the node's interface addresses (a new
//! address serves at once), NodePorts without a Node object, and localhost NodePorts (only for
//! the node's own processes, per `--iptables-localhost-nodeports`).
//!
//! Lab: node1 192.168.100.11 (eth0) with be1..be3 and a client pod; an external client
//! 192.168.100.100 on the same fabric.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use kpr_lab::kpr::{kpr_path, Kpr, ProxyMode};
use kpr_lab::{per_mode, Lab};

const NODE1: &str = "192.168.100.11";

/// A NodePort Service on `node_port` with be1..be3, and no Node object: a manifest source (or
/// an API server the agent cannot read Nodes from) has none.
fn nodeport(node_port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: np, namespace: ns}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.3.1\n  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: {node_port}}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: np-1\n  namespace: ns\n  labels: {{kubernetes.io/service-name: np}}\naddressType: IPv4\nports: [{{name: http, protocol: TCP, port: 8080}}]\nendpoints:\n\
         - {{addresses: [10.244.1.11], conditions: {{ready: true}}}}\n\
         - {{addresses: [10.244.1.12], conditions: {{ready: true}}}}\n\
         - {{addresses: [10.244.1.13], conditions: {{ready: true}}}}\n"
    )
}

fn all() -> BTreeSet<String> {
    ["be1", "be2", "be3"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

struct Setup {
    lab: Lab,
    kpr: Kpr,
}

impl Setup {
    fn new(tag: &str, manifest: &str, mode: ProxyMode, extra: &[&str]) -> Setup {
        let (lab, dir) = kpr_lab::external_client_lab(tag, manifest);
        let mut args = vec!["--hostname-override", "node1", "--devices", "eth0"];
        args.extend(mode.args());
        args.extend(extra);
        let kpr = Kpr::start(&lab, &kpr_path(), &dir, "kpr", &args).expect("kpr start");
        Setup { lab, kpr }
    }

    /// Waits until kpr serves a NodePort on `target` and the external client reaches every
    /// backend there.
    fn wait_served_from_outside(&mut self, target: SocketAddr) {
        let frontend = format!("{target}/tcp");
        if let Err(e) = self
            .kpr
            .wait_for_frontend(&frontend, "a NodePort", |f| f.kind == "NodePort")
        {
            panic!("{e}\n{}", self.kpr.log());
        }
        let ext = self.lab.external_client().unwrap().clone();
        if let Err(e) = self.lab.wait_until_reaching(&ext, target, &all()) {
            panic!("{e}\n{}", self.kpr.log());
        }
    }

    /// How one connection from `pod` to `target` fails (its error kind); None: it connected.
    fn failure(&self, pod: &kpr_lab::Pod, target: SocketAddr) -> Option<String> {
        self.lab
            .connect_once(pod, target, Duration::from_secs(2))
            .unwrap()
            .error
    }

    fn add_address(&self, cidr: &str) {
        self.lab
            .exec_in_node(&["ip", "addr", "add", cidr, "dev", "eth0"], None)
            .unwrap();
    }
}

per_mode! {
    /// Without a Node object NodePorts are still served on the node's address, and an address
    /// added to an interface while kpr runs serves at once (kube-proxy reads interface
    /// addresses, not the Node object; the iptables mode matches `addrtype LOCAL`, the others
    /// follow netlink).
    fn nodeports_are_served_on_the_interface_addresses_without_a_node_object(mode) {
        let mut s = Setup::new("npa-all", &nodeport(30140), mode, &[]);
        s.wait_served_from_outside(addr(NODE1, 30140));
        s.add_address("192.168.100.51/24");
        s.wait_served_from_outside(addr("192.168.100.51", 30140));
    }
}

per_mode! {
    /// `--nodeport-addresses` CIDRs select interface addresses: one inside serves (including
    /// one added later), one outside is not a NodePort address (the connection meets the
    /// node's stack, which has no listener: refused).
    fn nodeport_addresses_cidrs_select_the_interface_addresses_inside_them(mode) {
        let mut s = Setup::new(
            "npa-cidr",
            &nodeport(30141),
            mode,
            &["--nodeport-addresses", "192.168.100.0/24"],
        );
        s.wait_served_from_outside(addr(NODE1, 30141));
        // An address outside the CIDR, routed to the node by the client.
        s.add_address("198.51.100.5/32");
        s.lab.route_external_via("198.51.100.5/32", NODE1).unwrap();
        s.add_address("192.168.100.52/24");
        s.wait_served_from_outside(addr("192.168.100.52", 30141));
        let status = s.kpr.status().unwrap();
        assert!(
            !status.frontends.contains_key("198.51.100.5:30141/tcp"),
            "{:?}",
            status.frontends.keys()
        );
        let ext = s.lab.external_client().unwrap().clone();
        assert_eq!(
            s.failure(&ext, addr("198.51.100.5", 30141)).as_deref(),
            Some("ECONNREFUSED"),
            "198.51.100.5 is outside --nodeport-addresses\n{}",
            s.kpr.log()
        );
    }
}

per_mode! {
    /// Localhost NodePorts (kube-proxy's `--iptables-localhost-nodeports`, default true):
    /// 127.0.0.1:nodePort serves the node's own processes in the eBPF and iptables modes, never
    /// in the nftables mode (kube-proxy's nftables mode has none), and never a pod, whose
    /// 127.0.0.1 is its own loopback.
    fn localhost_nodeports_serve_only_the_nodes_own_processes(mode) {
        let mut s = Setup::new("npa-lo", &nodeport(30142), mode, &[]);
        s.wait_served_from_outside(addr(NODE1, 30142));
        let host = s.lab.host_network_pod(1).unwrap();
        let localhost = addr("127.0.0.1", 30142);
        if mode == ProxyMode::Nftables {
            assert_eq!(s.failure(&host, localhost).as_deref(), Some("ECONNREFUSED"));
        } else if let Err(e) = s.lab.wait_until_reaching(&host, localhost, &all()) {
            panic!("{e}\n{}", s.kpr.log());
        }
        let pod = s.lab.clients()[0].clone();
        assert_eq!(
            s.failure(&pod, localhost).as_deref(),
            Some("ECONNREFUSED"),
            "a pod's 127.0.0.1 is its own\n{}",
            s.kpr.log()
        );
    }
}

/// `--iptables-localhost-nodeports=false`: 127.0.0.1 is no NodePort address, in the eBPF mode
/// too (the node's address still is).
#[test]
fn without_localhost_nodeports_127_0_0_1_is_not_a_nodeport_address() {
    let mut s = Setup::new(
        "npa-nolo",
        &nodeport(30143),
        ProxyMode::Ebpf,
        &["--iptables-localhost-nodeports=false"],
    );
    s.wait_served_from_outside(addr(NODE1, 30143));
    let host = s.lab.host_network_pod(1).unwrap();
    if let Err(e) = s.lab.wait_until_reaching(&host, addr(NODE1, 30143), &all()) {
        panic!("{e}\n{}", s.kpr.log());
    }
    assert_eq!(
        s.failure(&host, addr("127.0.0.1", 30143)).as_deref(),
        Some("ECONNREFUSED"),
        "{}",
        s.kpr.log()
    );
}

per_mode! {
    /// A PreferDualStack NodePort Service with endpoints of both families, and
    /// `--nodeport-addresses` as a pair of CIDRs, one per family: the NodePort is served on the
    /// node's address of each family inside them, and an IPv6 address outside the IPv6 CIDR
    /// is no NodePort address.
    fn a_pair_of_nodeport_addresses_cidrs_serves_a_dual_stack_nodeport_on_both_families(mode) {
        const NODE1_6: &str = "fd00:192:168:100::b";
        let manifest = nodeport(30142)
            .replace(
                "  type: NodePort\n  clusterIP: 10.96.3.1\n",
                "  type: NodePort\n  clusterIP: 10.96.3.1\n  clusterIPs: [10.96.3.1, \"fd00:10:96::3:1\"]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: PreferDualStack\n",
            )
            + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: np-2\n  namespace: ns\n  labels: {kubernetes.io/service-name: np}\naddressType: IPv6\nports: [{name: http, protocol: TCP, port: 8080}]\nendpoints:\n\
               - {addresses: [\"fd00:10:244:1::b\"], conditions: {ready: true}}\n\
               - {addresses: [\"fd00:10:244:1::c\"], conditions: {ready: true}}\n\
               - {addresses: [\"fd00:10:244:1::d\"], conditions: {ready: true}}\n";
        let mut s = Setup::new(
            "npa-pair",
            &manifest,
            mode,
            &["--nodeport-addresses", "192.168.100.0/24,fd00:192:168:100::/64"],
        );
        let v6 = SocketAddr::new(NODE1_6.parse().unwrap(), 30142);
        s.wait_served_from_outside(addr(NODE1, 30142));
        s.wait_served_from_outside(v6);
        // An IPv6 address outside the pair, routed to the node by the client.
        s.add_address("fd00:198:51::5/128");
        s.lab
            .route_external_via("fd00:198:51::5/128", NODE1_6)
            .unwrap();
        let outside = SocketAddr::new("fd00:198:51::5".parse().unwrap(), 30142);
        let ext = s.lab.external_client().unwrap().clone();
        assert_eq!(
            s.failure(&ext, outside).as_deref(),
            Some("ECONNREFUSED"),
            "fd00:198:51::5 is outside --nodeport-addresses\n{}",
            s.kpr.log()
        );
        let status = s.kpr.status().unwrap();
        assert!(
            !status.frontends.contains_key(&format!("{outside}/tcp")),
            "{:?}",
            status.frontends.keys()
        );
    }
}
