//! kube-proxy's unit-test cases as data (`tests/golden/kube-proxy/<mode>/<Test>/`), loaded into
//! kpr's model: shared by the iptables and nftables golden and tracer tests.

#![allow(dead_code)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use kpr::model::{DesiredState, Family, NodeContext};
use kpr::netfilter::plan::PlanConfig;

/// One kube-proxy test (or one step of a multi-step test).
pub struct Case {
    pub name: String,
    pub dir: PathBuf,
    pub manifests: String,
    pub proxier: yaml_serde::Value,
    /// `None`: a step of a multi-step test with nothing to compare (one whose sync kube-proxy's
    /// test makes fail, TestSyncProxyRulesRepeated's step 9).
    pub expected: Option<String>,
}

/// The fake network's addresses, which `--nodeport-addresses` is matched against (kube-proxy's
/// fake interfacer; a case's `interfaceAddresses` replaces them).
const INTERFACE_ADDRESSES: &[&str] = &[
    "127.0.0.1",
    "::1",
    "192.168.0.2",
    "192.168.1.2",
    "192.168.99.11",
    "2001:db8::1",
    "2001:db8:1::2",
];

fn root(mode: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/kube-proxy")
        .join(mode)
}

/// Every case of `mode` (a directory with `manifests.yaml`), in name order, with its `expected`
/// file if it has one.
pub fn cases(mode: &str, expected: &str) -> Vec<Case> {
    let mut out = Vec::new();
    let mut dirs = vec![root(mode)];
    while let Some(dir) = dirs.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            if e.path().is_dir() {
                dirs.push(e.path());
            }
        }
        let exp = dir.join(expected);
        if !dir.join("manifests.yaml").is_file() {
            continue;
        }
        let proxier = ["proxier.yaml", "../proxier.yaml"]
            .iter()
            .map(|p| dir.join(p))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("{}: no proxier.yaml", dir.display()));
        let read = |p: &Path| {
            std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        };
        let name = dir
            .strip_prefix(root(mode))
            .unwrap()
            .to_string_lossy()
            .into_owned();
        out.push(Case {
            name,
            manifests: read(&dir.join("manifests.yaml")),
            proxier: yaml_serde::from_str(&read(&proxier)).unwrap(),
            expected: exp.is_file().then(|| read(&exp)),
            dir,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A CIDR of a case's configuration; a bare address is its host prefix.
fn parse_cidr(s: &str) -> IpNet {
    let s = s.trim();
    kpr::cidr::parse(s)
        .or_else(|_| kpr::cidr::parse_ip(s).map(IpNet::from))
        .unwrap_or_else(|e| panic!("bad CIDR: {e}"))
}

impl Case {
    /// The proxier's `serviceCIDRs` of `family` (the nftables proxier drops traffic to
    /// unallocated addresses in them).
    #[allow(dead_code)] // Used by the nftables tests only.
    pub fn service_cidrs(&self, family: kpr::model::Family) -> Vec<IpNet> {
        self.list("serviceCIDRs")
            .iter()
            .map(|c| parse_cidr(c))
            .filter(|net| kpr::model::Family::of(net.addr()) == family)
            .collect()
    }

    fn str(&self, key: &str) -> Option<&str> {
        self.proxier.get(key).and_then(|v| v.as_str())
    }

    fn bool(&self, key: &str, default: bool) -> bool {
        self.proxier
            .get(key)
            .and_then(|v| v.as_bool())
            .unwrap_or(default)
    }

    fn list(&self, key: &str) -> Vec<String> {
        self.proxier
            .get(key)
            .and_then(|v| v.as_sequence())
            .map(|s| {
                s.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn family(&self) -> Family {
        match self.str("ipFamily") {
            Some("IPv6") => Family::V6,
            _ => Family::V4,
        }
    }

    /// The model's desired state for the case's objects on the fake node, and the planner's
    /// settings from the fake proxier's; `Err` with kpr's reasons when kpr refuses an object.
    pub fn desired_state_and_config(&self) -> Result<(DesiredState, PlanConfig), String> {
        let hostname = self.str("hostname").unwrap_or("test-hostname").to_string();
        let family = self.family();
        let of_family = |ip: &IpAddr| (family == Family::V6) == ip.is_ipv6();
        let node_ips: Vec<IpAddr> = self
            .list("nodeIPs")
            .iter()
            .map(|s| s.parse().unwrap())
            .filter(of_family)
            .collect();
        let interfaces: Vec<IpAddr> = {
            let given = self.list("interfaceAddresses");
            if given.is_empty() {
                INTERFACE_ADDRESSES
                    .iter()
                    .map(|s| s.parse().unwrap())
                    .collect()
            } else {
                // `eth0 192.168.0.2/24`
                given
                    .iter()
                    .map(|s| parse_cidr(s.split_whitespace().last().unwrap()).addr())
                    .collect()
            }
        };
        let nodeport_cidrs: Vec<IpNet> = self
            .list("nodePortAddresses")
            .iter()
            .map(|s| parse_cidr(s))
            .filter(|net| of_family(&net.addr()))
            .collect();
        let nodeport_ips = (!nodeport_cidrs.is_empty()).then(|| {
            interfaces
                .iter()
                .copied()
                .filter(of_family)
                .filter(|ip| nodeport_cidrs.iter().any(|n| n.contains(ip)))
                .collect::<Vec<_>>()
        });
        let local = self
            .str("clusterCIDR")
            .map_or(kpr::netfilter::plan::LocalDetector::None, |c| {
                kpr::netfilter::plan::LocalDetector::Cidr(parse_cidr(c))
            });

        let (snapshot, errors) = kpr::source::manifest::load_text(
            &self.dir.join("manifests.yaml"),
            &self.manifests,
            None,
        );
        if !errors.is_empty() {
            let e: Vec<String> = errors.iter().map(ToString::to_string).collect();
            return Err(e.join("; "));
        }
        let ctx = NodeContext {
            node_name: Some(hostname),
            node_ips: nodeport_ips.clone().unwrap_or_default(),
            node_ip: node_ips.first().copied(),
            zone: None,
            pod_cidrs: Vec::new(),
        };
        let (state, errors) =
            kpr::model::build_for_node(&snapshot.services, &snapshot.slices, &ctx);
        if !errors.is_empty() {
            let e: Vec<String> = errors.iter().map(ToString::to_string).collect();
            return Err(e.join("; "));
        }
        let cfg = PlanConfig {
            family,
            masquerade_all: self.bool("masqueradeAll", false),
            local,
            local_from_node: false,
            node_ip: node_ips.first().copied(),
            localhost_nodeports: self.bool("localhostNodePorts", true),
            nodeport_ips,
            masquerade_mark: 0x4000,
            only_protocol: None,
        };
        Ok((state, cfg))
    }
}

/// kube-proxy cases whose objects the API server would refuse, which kpr refuses too (and says
/// why) instead of writing rules for them: (case, what kpr's error says).
pub const REFUSED_BY_KPR: &[(&str, &str)] = &[
    // The test leaves the Service port at 0 ("--dport 0" in its rules).
    ("TestEndpointSliceE2E", "port 0 is out of range"),
];

/// Lines only in `want` (-) and only in `got` (+).
pub fn diff(want: &str, got: &str) -> String {
    let w: Vec<&str> = want.lines().collect();
    let g: Vec<&str> = got.lines().collect();
    let mut out = String::new();
    for l in &w {
        if !g.contains(l) {
            out.push_str(&format!("- {l}\n"));
        }
    }
    for l in &g {
        if !w.contains(l) {
            out.push_str(&format!("+ {l}\n"));
        }
    }
    if out.is_empty() {
        out.push_str("(same lines, different order)\n");
        for (a, b) in w.iter().zip(&g) {
            if a != b {
                out.push_str(&format!("first difference:\n- {a}\n+ {b}\n"));
                break;
            }
        }
    }
    out
}

/// The desired state of a manifest text, which must be free of errors.
pub fn state_of(manifests: &str) -> DesiredState {
    let (snapshot, errors) =
        kpr::source::manifest::load_text(Path::new("manifests.yaml"), manifests, None);
    assert!(errors.is_empty(), "{errors:?}");
    let (state, errors) = kpr::model::build(&snapshot.services, &snapshot.slices);
    assert!(errors.is_empty(), "{errors:?}");
    state
}

/// `n` ClusterIP Services (10.100.0.0/16), each with `endpoints` endpoints (1 or 2), as
/// manifests: what scale tests program.
pub fn many_services(n: usize, endpoints: usize) -> String {
    use std::fmt::Write as _;
    let mut y = String::new();
    for i in 0..n {
        let (hi, lo) = (i / 250, i % 250 + 1);
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: big}}\n\
             spec:\n  clusterIP: 10.100.{hi}.{lo}\n  ports: [{{name: p, port: 80, protocol: TCP, targetPort: 8080}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s{i}-x\n  namespace: big\n  labels: {{kubernetes.io/service-name: s{i}}}\n\
             addressType: IPv4\nports: [{{name: p, port: 8080, protocol: TCP}}]\nendpoints:\n"
        );
        for subnet in [244, 245].iter().take(endpoints) {
            let _ = writeln!(y, "  - addresses: [10.{subnet}.{hi}.{lo}]");
        }
        y.push_str("---\n");
    }
    y
}
