//! Building and using a lab.

use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};
use crate::netns::{in_netns, netns_exec, netns_exists};
use crate::process::{
    check, describe, run_bounded, run_bounded_placed, spawn_placed, Placement, ProcessGuard,
};
use crate::state::{
    create_dir_all_retry, proc_start_time, teardown, validate_prefix, work_dir_for, LabState,
};
use crate::tool::{BenchConnect, ConnectOnce, TcpSpread, UdpSpread};

/// The address every pod's default route points to; each node owns it on `lo`.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The IPv6 gateway of every pod: a link-local address each node puts on every pod's veth
/// (NDP answers only for addresses of the asking interface, so it cannot live on `lo`).
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// The external client's address on the fabric (192.168.100.0/24; node `n` is at .(10+n)).
pub const EXTERNAL_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 100);
/// The external client's IPv6 address on the fabric (fd00:192:168:100::/64; node `n` is at
/// ::(10+n) in hex).
pub const EXTERNAL_CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x100, 0, 0, 0, 100);
/// The most nodes a lab can have (fabric addresses .11 to .60).
pub const MAX_NODES: usize = 50;
/// The SCTP port every backend serves, on kernels with SCTP (the VM stage's).
pub const SCTP_PORT: u16 = 9090;
/// The bridge in the fabric namespace.
const BRIDGE: &str = "br0";
/// The external client's name (pod name, namespace suffix, bridge port, cgroup directory).
const EXTERNAL_NAME: &str = "ext";
/// How long `up` waits for the echo servers to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound for `exec_in_node` (an iptables-restore of 100k services takes a while).
const EXEC_TIMEOUT: Duration = Duration::from_secs(600);

/// Node `index`'s address on the fabric: 192.168.100.(10+index).
pub fn node_fabric_ip(index: usize) -> Ipv4Addr {
    assert!((1..=MAX_NODES).contains(&index), "node index {index}");
    Ipv4Addr::new(192, 168, 100, 10 + index as u8)
}

/// Node `index`'s IPv6 address on the fabric: fd00:192:168:100::(10+index).
pub fn node_fabric_ip6(index: usize) -> Ipv6Addr {
    assert!((1..=MAX_NODES).contains(&index), "node index {index}");
    Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x100, 0, 0, 0, 10 + index as u16)
}

/// A pod's IPv6 address: the same host number as its IPv4 one, in its node's
/// fd00:10:244:<node>::/64.
pub fn pod_ip6(node: usize, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, node as u16, 0, 0, 0, host as u16)
}

fn unspecified6() -> Ipv6Addr {
    Ipv6Addr::UNSPECIFIED
}

/// What to build.
///
/// With the defaults (`nodes: 1`, `external_client: false`) the lab is the one-node lab:
/// `backends` backend pods and `clients` client pods on node 1, no fabric.
///
/// A lab with `nodes >= 2` or `external_client: true` also gets the fabric (a bridge in
/// `<prefix>-fab`) that every node and the external client (`<prefix>-ext`) are plugged into.
/// Pods per node: `backends_per_node` / `clients_per_node` if non-empty (one entry per node,
/// overriding `backends` / `clients`), else `backends` / `clients` on node 1 and none on the
/// other nodes. The external client is only created when asked for (`external_client`), also
/// in a multi-node lab.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// Unique name prefix (namespaces `<prefix>-node`, `<prefix>-be1`, ...); use
    /// [`Lab::unique_prefix`], or [`crate::PERSISTENT_PREFIX`] for `xtask lab up`.
    pub prefix: String,
    /// Backend pods on node 1 (ignored when `backends_per_node` is non-empty).
    pub backends: usize,
    /// Client pods on node 1 (ignored when `clients_per_node` is non-empty).
    pub clients: usize,
    pub tcp_ports: Vec<u16>,
    pub udp_ports: Vec<u16>,
    /// The `kpr-labtool` binary; `None`: [`crate::labtool_path`].
    pub labtool: Option<PathBuf>,
    /// Number of nodes, 1 to [`MAX_NODES`].
    pub nodes: usize,
    /// Backend pods on each node (entry `i` for node `i + 1`); empty: `backends` on node 1.
    pub backends_per_node: Vec<usize>,
    /// Client pods on each node (entry `i` for node `i + 1`); empty: `clients` on node 1.
    pub clients_per_node: Vec<usize>,
    /// Adds the external client `<prefix>-ext` (192.168.100.100 on the fabric, outside the
    /// cluster: in no node's cgroup).
    pub external_client: bool,
}

impl Default for LabSpec {
    fn default() -> Self {
        LabSpec {
            prefix: Lab::unique_prefix("t"),
            backends: 3,
            clients: 1,
            tcp_ports: vec![8080, 8081],
            udp_ports: vec![5353],
            labtool: None,
            nodes: 1,
            backends_per_node: Vec::new(),
            clients_per_node: Vec::new(),
            external_client: false,
        }
    }
}

impl LabSpec {
    /// (backends, clients) on each node, validated.
    fn per_node(&self) -> Result<Vec<(usize, usize)>> {
        if !(1..=MAX_NODES).contains(&self.nodes) {
            return Err(LabError::Other(format!(
                "nodes: {} (must be 1 to {MAX_NODES})",
                self.nodes
            )));
        }
        let counts = |per_node: &[usize], on_node1: usize, what: &str| -> Result<Vec<usize>> {
            if per_node.is_empty() {
                let mut v = vec![0; self.nodes];
                v[0] = on_node1;
                Ok(v)
            } else if per_node.len() == self.nodes {
                Ok(per_node.to_vec())
            } else {
                Err(LabError::Other(format!(
                    "{what}_per_node has {} entries for {} nodes",
                    per_node.len(),
                    self.nodes
                )))
            }
        };
        let b = counts(&self.backends_per_node, self.backends, "backends")?;
        let c = counts(&self.clients_per_node, self.clients, "clients")?;
        Ok(b.into_iter().zip(c).collect())
    }

    fn has_fabric(&self) -> bool {
        self.nodes > 1 || self.external_client
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodRole {
    Backend,
    Client,
    /// The external client: outside the cluster, on the fabric.
    External,
}

/// A pod: a network namespace with one veth (`eth0`) to its node. The external client is a
/// `Pod` too (role [`PodRole::External`], node 0), so that every per-pod helper works on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    /// `be1`, `cl1`, ..., `ext` for the external client.
    pub name: String,
    /// Its network namespace, `<prefix>-<name>`.
    pub ns: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address (every lab is dual-stack): [`pod_ip6`], or [`EXTERNAL_CLIENT_IP6`].
    #[serde(default = "unspecified6")]
    pub ip6: Ipv6Addr,
    pub role: PodRole,
    /// The node side of its veth (`vp<last octet>`), in its node's namespace; for the
    /// external client, its port on the fabric bridge (`ext`, in the fabric namespace).
    pub node_dev: String,
    /// The node it runs on (1-based); 0 for the external client.
    #[serde(default = "node_one")]
    pub node: usize,
}

fn node_one() -> usize {
    1
}

impl Pod {
    /// Its address in `family`'s form of `ip`: IPv4 when `ip` is, else IPv6.
    pub fn ip_like(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => self.ip.into(),
            IpAddr::V6(_) => self.ip6.into(),
        }
    }
}

/// A node: a network namespace running its own kpr, with its own cgroup and bpffs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabNode {
    /// 1-based.
    pub index: usize,
    /// `node1`, `node2`, ... (also its port on the fabric bridge).
    pub name: String,
    /// `<prefix>-node` for node 1, `<prefix>-node<index>` for the others.
    pub ns: String,
    /// Its address on the fabric (`eth0`, 192.168.100.(10+index)/24). Configured only when
    /// the lab has a fabric ([`Lab::fabric_ns`]); a one-node lab without an external client
    /// has no `eth0`.
    pub fabric_ip: Ipv4Addr,
    /// Its IPv6 address on the fabric ([`node_fabric_ip6`]), configured with `fabric_ip`.
    #[serde(default = "unspecified6")]
    pub fabric_ip6: Ipv6Addr,
    /// The cgroup v2 directory its pods are in (its kpr attaches socket LB here).
    pub cgroup_dir: PathBuf,
    /// Its own bpffs mount (its kpr pins under `<bpffs_dir>/<name>`).
    pub bpffs_dir: PathBuf,
}

impl LabNode {
    /// Its pods' addresses: `10.244.<index>.0/24`.
    pub fn pod_cidr(&self) -> String {
        format!("10.244.{}.0/24", self.index)
    }

    /// Its pods' IPv6 addresses: `fd00:10:244:<index>::/64`.
    pub fn pod_cidr6(&self) -> String {
        format!("fd00:10:244:{}::/64", self.index)
    }
}

/// A running lab. Dropping it tears everything down (unless it was persisted or attached).
#[derive(Debug)]
pub struct Lab {
    state: LabState,
    servers: Vec<ProcessGuard>,
    /// Whether Drop tears the lab down.
    owned: bool,
}

/// Names, addresses and directories of a lab, before anything is built.
#[derive(Debug)]
struct Plan {
    nodes: Vec<LabNode>,
    pods: Vec<Pod>,
    fabric_ns: Option<String>,
    external: Option<Pod>,
    external_cgroup_dir: Option<PathBuf>,
}

/// Lays the lab out. Cgroups: a lab without a fabric has the one directory
/// `<cgroup2>/<prefix>` (node 1's); a lab with a fabric has `<cgroup2>/<prefix>/node<n>` per
/// node and `<cgroup2>/<prefix>/ext` for the external client (siblings, so that a program
/// attached to one node's directory never applies to another node's pods or to the external
/// client). bpffs: `<work>/bpffs` for node 1, `<work>/bpffs-node<n>` for the others.
fn plan_lab(prefix: &str, spec: &LabSpec, work_dir: &Path) -> Result<Plan> {
    let per_node = spec.per_node()?;
    let fabric = spec.has_fabric();
    let cgroup_top = work_dir.join("cgroup2").join(prefix);
    let mut nodes = Vec::new();
    let (mut backends, mut clients) = (Vec::new(), Vec::new());
    for (i, &(b, c)) in per_node.iter().enumerate() {
        let index = i + 1;
        let name = format!("node{index}");
        let (ns, bpffs_dir) = if index == 1 {
            (format!("{prefix}-node"), work_dir.join("bpffs"))
        } else {
            (
                format!("{prefix}-{name}"),
                work_dir.join(format!("bpffs-{name}")),
            )
        };
        let cgroup_dir = if fabric {
            cgroup_top.join(&name)
        } else {
            cgroup_top.clone()
        };
        let (be, cl) = plan_node_pods(prefix, index, b, c, backends.len(), clients.len())?;
        backends.extend(be);
        clients.extend(cl);
        nodes.push(LabNode {
            index,
            fabric_ip: node_fabric_ip(index),
            fabric_ip6: node_fabric_ip6(index),
            name,
            ns,
            cgroup_dir,
            bpffs_dir,
        });
    }
    if backends.is_empty() && clients.is_empty() {
        return Err(LabError::Other("a lab needs at least one pod".into()));
    }
    let mut pods = backends;
    pods.extend(clients);
    let (external, external_cgroup_dir) = if spec.external_client {
        (
            Some(Pod {
                name: EXTERNAL_NAME.into(),
                ns: format!("{prefix}-{EXTERNAL_NAME}"),
                ip: EXTERNAL_CLIENT_IP,
                ip6: EXTERNAL_CLIENT_IP6,
                role: PodRole::External,
                node_dev: EXTERNAL_NAME.into(),
                node: 0,
            }),
            Some(cgroup_top.join(EXTERNAL_NAME)),
        )
    } else {
        (None, None)
    };
    Ok(Plan {
        nodes,
        pods,
        fabric_ns: fabric.then(|| format!("{prefix}-fab")),
        external,
        external_cgroup_dir,
    })
}

/// The pods of node `node`: backends at 10.244.<node>.11.., clients at .21.. (or right after
/// the backends if there are more than ten of them). Names are numbered across the lab:
/// `be<backends_before + 1>`, ..., `cl<clients_before + 1>`, ...
fn plan_node_pods(
    prefix: &str,
    node: usize,
    backends: usize,
    clients: usize,
    backends_before: usize,
    clients_before: usize,
) -> Result<(Vec<Pod>, Vec<Pod>)> {
    if backends > 200 || clients > 200 {
        return Err(LabError::Other(format!(
            "bad pod counts on node {node}: {backends} backends, {clients} clients"
        )));
    }
    let client_base = if backends <= 10 { 21 } else { 11 + backends };
    if client_base + clients > 255 {
        return Err(LabError::Other(format!(
            "too many pods for node {node}'s /24"
        )));
    }
    let make = |role, n: usize, base: usize, tag: &str, before: usize| -> Vec<Pod> {
        (0..n)
            .map(|i| {
                let host = (base + i) as u8;
                let name = format!("{tag}{}", before + i + 1);
                Pod {
                    ns: format!("{prefix}-{name}"),
                    name,
                    ip: Ipv4Addr::new(10, 244, node as u8, host),
                    ip6: pod_ip6(node, host),
                    role,
                    node_dev: format!("vp{host}"),
                    node,
                }
            })
            .collect()
    };
    Ok((
        make(PodRole::Backend, backends, 11, "be", backends_before),
        make(PodRole::Client, clients, client_base, "cl", clients_before),
    ))
}

impl Lab {
    /// A prefix unique to this process and call: `kl-<tag>-<pid>-<n>` (tag: up to 8
    /// alphanumerics). The pid lets [`crate::cleanup_stale`] find labs of dead processes.
    pub fn unique_prefix(tag: &str) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(8)
            .collect();
        let tag = if tag.is_empty() { "t".into() } else { tag };
        format!(
            "kl-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Builds the lab: mounts, namespaces, veths, the fabric (if any), routes, sysctls;
    /// checks connectivity (ping); starts `kpr-labtool serve` in each backend and waits
    /// (bounded) until every port answers. On error everything built so far is torn down.
    pub fn up(spec: LabSpec) -> Result<Lab> {
        if !crate::is_root() {
            return Err(LabError::NotRoot);
        }
        validate_prefix(&spec.prefix)?;
        let prefix = spec.prefix.clone();
        let work_dir = work_dir_for(&prefix);
        let plan = plan_lab(&prefix, &spec, &work_dir)?;
        let node_ns = plan.nodes[0].ns.clone();
        if work_dir.exists() || plan.nodes.iter().any(|n| netns_exists(&n.ns)) {
            return Err(LabError::Other(format!(
                "a lab named {prefix} already exists (tear it down with kpr_lab::down)"
            )));
        }
        let labtool = spec.labtool.clone().unwrap_or_else(crate::labtool_path);
        let any_backend = plan.pods.iter().any(|p| p.role == PodRole::Backend);
        if any_backend && !labtool.is_file() {
            return Err(LabError::Other(format!(
                "kpr-labtool not found at {} (build it: cargo build -p kpr-lab; or set KPR_LABTOOL)",
                labtool.display()
            )));
        }
        create_dir_all_retry(Path::new(crate::LAB_RUN_DIR))?;
        // Atomic claim of the prefix: whoever creates the work directory builds the lab.
        fs::create_dir(&work_dir)
            .map_err(|e| LabError::io(format!("mkdir {}", work_dir.display()), e))?;
        let me = std::process::id() as i32;
        let mut namespaces: Vec<String> = plan.nodes.iter().map(|n| n.ns.clone()).collect();
        namespaces.extend(plan.pods.iter().map(|p| p.ns.clone()));
        namespaces.extend(plan.fabric_ns.iter().cloned());
        namespaces.extend(plan.external.iter().map(|p| p.ns.clone()));
        let mut lab = Lab {
            state: LabState {
                prefix: prefix.clone(),
                creator_pid: me,
                creator_start: proc_start_time(me).unwrap_or(0),
                kept: false,
                node_ns,
                namespaces,
                pods: plan.pods,
                tcp_ports: spec.tcp_ports.clone(),
                udp_ports: spec.udp_ports.clone(),
                pids: Vec::new(),
                cgroup_mount: work_dir.join("cgroup2"),
                cgroup_dir: plan.nodes[0].cgroup_dir.clone(),
                bpffs_dir: plan.nodes[0].bpffs_dir.clone(),
                work_dir,
                labtool,
                nodes: plan.nodes,
                fabric_ns: plan.fabric_ns,
                external: plan.external,
                external_cgroup_dir: plan.external_cgroup_dir,
            },
            servers: Vec::new(),
            owned: true,
        };
        // From here on, an error drops `lab`, which tears down what exists.
        lab.state.save()?;
        lab.mount_fs()?;
        lab.build_network()?;
        lab.check_connectivity()?;
        lab.start_servers()?;
        lab.wait_ready()?;
        Ok(lab)
    }

    fn mount_fs(&mut self) -> Result<()> {
        let s = &self.state;
        let mut dirs = vec![&s.cgroup_mount];
        dirs.extend(s.nodes.iter().map(|n| &n.bpffs_dir));
        for dir in dirs {
            fs::create_dir_all(dir)
                .map_err(|e| LabError::io(format!("mkdir {}", dir.display()), e))?;
        }
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        mount(
            Some("none"),
            &s.cgroup_mount,
            Some("cgroup2"),
            flags,
            None::<&str>,
        )
        .map_err(|e| LabError::nix(format!("mount cgroup2 on {}", s.cgroup_mount.display()), e))?;
        // The lab's cgroups: a child of the hierarchy's root (never the root itself), and in a
        // lab with a fabric one child of that per node and one for the external client.
        let top = s.cgroup_mount.join(&s.prefix);
        let mut cgroups = vec![top.clone()];
        for dir in s
            .nodes
            .iter()
            .map(|n| &n.cgroup_dir)
            .chain(s.external_cgroup_dir.iter())
        {
            if !dir.starts_with(&top) {
                return Err(LabError::Other(format!(
                    "cgroup {} is outside the lab's {}",
                    dir.display(),
                    top.display()
                )));
            }
            if !cgroups.contains(dir) {
                cgroups.push(dir.clone());
            }
        }
        for dir in &cgroups {
            fs::create_dir(dir).map_err(|e| LabError::io(format!("mkdir {}", dir.display()), e))?;
        }
        for node in &s.nodes {
            mount(
                Some("bpf"),
                &node.bpffs_dir,
                Some("bpf"),
                flags,
                Some("mode=0700"),
            )
            .map_err(|e| {
                LabError::nix(format!("mount bpffs on {}", node.bpffs_dir.display()), e)
            })?;
        }
        Ok(())
    }

    fn build_network(&mut self) -> Result<()> {
        let nodes = self.state.nodes.clone();
        let pods = self.state.pods.clone();
        // Namespaces.
        let mut batch = String::new();
        for ns in &self.state.namespaces {
            batch.push_str(&format!("netns add {ns}\n"));
        }
        ip_batch(None, &batch)?;
        // Nodes: loopback with the gateway address; forwarding on, rp_filter off (before the
        // veths exist, so that they inherit `default`).
        for node in &nodes {
            ip_batch(
                Some(&node.ns),
                &format!("link set lo up\naddr add {GATEWAY}/32 dev lo\n"),
            )?;
            netns_exec(
                &node.ns,
                &[
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                    "net.ipv6.conf.all.forwarding=1",
                    // No duplicate address detection: addresses are usable at once, and the
                    // lab's are unique by construction.
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                ],
            )?;
        }
        // Pod veth pairs, created directly in their namespaces.
        let mut batch = String::new();
        for p in &pods {
            batch.push_str(&format!(
                "link add {} netns {} type veth peer name eth0 netns {}\n",
                p.node_dev,
                nodes[p.node - 1].ns,
                p.ns
            ));
        }
        ip_batch(None, &batch)?;
        for p in &pods {
            ip_batch(
                Some(&p.ns),
                &format!(
                    "link set lo up\n\
                     addr add {ip}/32 dev eth0\n\
                     addr add {ip6}/128 dev eth0 nodad\n\
                     link set eth0 up\n\
                     route add {GATEWAY} dev eth0 scope link\n\
                     route add default via {GATEWAY} dev eth0\n\
                     route add ::/0 via {GATEWAY6} dev eth0\n",
                    ip = p.ip,
                    ip6 = p.ip6,
                ),
            )?;
        }
        for node in &nodes {
            // Every node has a default route, as real nodes do (to their upstream router): here
            // into a veth whose peer stays down, where packets for unknown destinations vanish
            // (this kernel has no dummy devices). Netfilter filters forwarded packets only after
            // routing found them a way out, so without one a proxy's REJECT for a Service
            // without endpoints would never be reached.
            let mut batch = String::from(
                "link add uplink type veth peer name uplink-peer\nlink set uplink up\n\
                 route add default dev uplink\nroute add ::/0 dev uplink\n",
            );
            for p in pods.iter().filter(|p| p.node == node.index) {
                batch.push_str(&format!(
                    "addr add {GATEWAY6}/64 dev {dev} nodad\nlink set {dev} up\n\
                     route add {ip}/32 dev {dev}\nroute add {ip6}/128 dev {dev}\n",
                    dev = p.node_dev,
                    ip = p.ip,
                    ip6 = p.ip6,
                ));
            }
            ip_batch(Some(&node.ns), &batch)?;
        }
        if let Some(fab) = self.state.fabric_ns.clone() {
            self.build_fabric(&fab, &nodes)?;
        }
        Ok(())
    }

    /// The bridge in the fabric namespace, each node's `eth0` and the external client's
    /// `eth0` on it, and the routes between nodes' pod CIDRs.
    fn build_fabric(&self, fab: &str, nodes: &[LabNode]) -> Result<()> {
        ip_batch(
            Some(fab),
            &format!("link set lo up\nlink add {BRIDGE} type bridge\nlink set {BRIDGE} up\n"),
        )?;
        // (namespace, its bridge port)
        let mut members: Vec<(String, String)> = nodes
            .iter()
            .map(|n| (n.ns.clone(), n.name.clone()))
            .collect();
        if let Some(ext) = &self.state.external {
            members.push((ext.ns.clone(), ext.node_dev.clone()));
        }
        let mut batch = String::new();
        for (ns, port) in &members {
            batch.push_str(&format!(
                "link add eth0 netns {ns} type veth peer name {port} netns {fab}\n"
            ));
        }
        ip_batch(None, &batch)?;
        let mut batch = String::new();
        for (_, port) in &members {
            batch.push_str(&format!(
                "link set {port} master {BRIDGE}\nlink set {port} up\n"
            ));
        }
        ip_batch(Some(fab), &batch)?;
        for node in nodes {
            let mut batch = format!(
                "addr add {}/24 dev eth0\naddr add {}/64 dev eth0 nodad\nlink set eth0 up\n",
                node.fabric_ip, node.fabric_ip6
            );
            for other in nodes.iter().filter(|o| o.index != node.index) {
                batch.push_str(&format!(
                    "route add {} via {} dev eth0\nroute add {} via {} dev eth0\n",
                    other.pod_cidr(),
                    other.fabric_ip,
                    other.pod_cidr6(),
                    other.fabric_ip6
                ));
            }
            ip_batch(Some(&node.ns), &batch)?;
        }
        if let Some(ext) = &self.state.external {
            let mut batch = format!(
                "link set lo up\naddr add {}/24 dev eth0\naddr add {}/64 dev eth0 nodad\n\
                 link set eth0 up\n",
                ext.ip, ext.ip6
            );
            for node in nodes {
                batch.push_str(&format!(
                    "route add {} via {} dev eth0\nroute add {} via {} dev eth0\n",
                    node.pod_cidr(),
                    node.fabric_ip,
                    node.pod_cidr6(),
                    node.fabric_ip6
                ));
            }
            ip_batch(Some(&ext.ns), &batch)?;
        }
        Ok(())
    }

    /// pod → node for every pod, and pod → pod (first client ↔ first backend). With a
    /// fabric: node 1 ↔ every other node, the first pod on node 1 → the first pod on every
    /// other node, and the external client → every node and the first pod on every node.
    fn check_connectivity(&self) -> Result<()> {
        for p in &self.state.pods {
            ping(&p.ns, GATEWAY)?;
        }
        if let (Some(c), Some(b)) = (self.clients().first(), self.backends().first()) {
            ping(&c.ns, b.ip)?;
            ping(&b.ns, c.ip)?;
            ping(&c.ns, b.ip6)?;
            ping(&b.ns, c.ip6)?;
        }
        if self.state.fabric_ns.is_none() {
            return Ok(());
        }
        let nodes = &self.state.nodes;
        let first_pod = |n: usize| self.state.pods.iter().find(|p| p.node == n);
        for other in &nodes[1..] {
            ping(&nodes[0].ns, other.fabric_ip)?;
            ping(&other.ns, nodes[0].fabric_ip)?;
            if let (Some(a), Some(b)) = (first_pod(1), first_pod(other.index)) {
                ping(&a.ns, b.ip)?;
                ping(&a.ns, b.ip6)?;
            }
        }
        if let Some(ext) = &self.state.external {
            for node in nodes {
                ping(&ext.ns, node.fabric_ip)?;
                ping(&ext.ns, node.fabric_ip6)?;
                if let Some(p) = first_pod(node.index) {
                    ping(&ext.ns, p.ip)?;
                    ping(&ext.ns, p.ip6)?;
                }
            }
        }
        Ok(())
    }

    fn start_servers(&mut self) -> Result<()> {
        let tcp = join_ports(&self.state.tcp_ports);
        let udp = join_ports(&self.state.udp_ports);
        for pod in self.backends().to_vec() {
            let log = self.state.work_dir.join(format!("{}.log", pod.name));
            let out = fs::File::create(&log)
                .map_err(|e| LabError::io(format!("create {}", log.display()), e))?;
            let err = out
                .try_clone()
                .map_err(|e| LabError::io("dup log file", e))?;
            let mut cmd = Command::new(&self.state.labtool);
            let sctp = SCTP_PORT.to_string();
            cmd.args(["serve", "--name", &pod.name, "--tcp", &tcp, "--udp", &udp])
                .args(["--sctp", &sctp])
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err);
            let guard = self.spawn_in_pod(&pod, cmd)?;
            self.state.pids.push(guard.pid() as i32);
            self.servers.push(guard);
        }
        self.state.save()
    }

    /// Every backend answers on every port, asked from its node's namespace (which is not in
    /// any of the lab's cgroups, so no socket LB applies).
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let backends = self.backends().to_vec();
        let (tcp, udp) = (self.state.tcp_ports.clone(), self.state.udp_ports.clone());
        let mut pending: Vec<usize> = (0..backends.len()).collect();
        loop {
            for &i in &pending {
                if let Some(status) = self.servers[i].try_wait()? {
                    return Err(self.server_failed(&backends[i], &format!("exited: {status}")));
                }
            }
            let mut still = Vec::new();
            for node in &self.state.nodes {
                let on_node: Vec<usize> = pending
                    .iter()
                    .copied()
                    .filter(|&i| backends[i].node == node.index)
                    .collect();
                if on_node.is_empty() {
                    continue;
                }
                let ready: Vec<bool> = in_netns(&node.ns, || {
                    on_node
                        .iter()
                        .map(|&i| {
                            let pod = &backends[i];
                            [IpAddr::from(pod.ip), pod.ip6.into()].iter().all(|&ip| {
                                tcp.iter().all(|&port| probe_tcp(pod, ip, port))
                                    && udp.iter().all(|&port| probe_udp(pod, ip, port))
                            })
                        })
                        .collect()
                })?;
                still.extend(
                    on_node
                        .into_iter()
                        .zip(ready)
                        .filter(|(_, ok)| !ok)
                        .map(|(i, _)| i),
                );
            }
            still.sort_unstable();
            pending = still;
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let pod = backends[pending[0]].clone();
                return Err(self.server_failed(
                    &pod,
                    &format!("no answer within {READY_TIMEOUT:?} on tcp {tcp:?} udp {udp:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn server_failed(&self, pod: &Pod, why: &str) -> LabError {
        let log = fs::read_to_string(self.state.work_dir.join(format!("{}.log", pod.name)))
            .unwrap_or_default();
        let log: String = log.lines().take(5).collect::<Vec<_>>().join(" | ");
        LabError::Other(format!(
            "echo server in {} ({}): {why}; log: {log}",
            pod.name, pod.ip
        ))
    }

    /// Uses a lab that already exists (for example a persistent one made by `xtask lab up`)
    /// from its state file. Dropping the returned value does not tear the lab down.
    pub fn attach(prefix: &str) -> Result<Lab> {
        validate_prefix(prefix)?;
        let state = LabState::load(prefix)?;
        for ns in state.nodes.iter().map(|n| &n.ns) {
            if !netns_exists(ns) {
                return Err(LabError::Other(format!(
                    "lab {prefix}: state file exists but namespace {ns} does not"
                )));
            }
        }
        Ok(Lab {
            state,
            servers: Vec::new(),
            owned: false,
        })
    }

    /// Keeps the lab running after this value (and this process) is gone: marks it kept in
    /// its state file and lets its server processes run on. Tear it down with
    /// [`crate::down`] / [`crate::down_all`].
    pub fn persist(mut self) -> Result<LabState> {
        self.state.kept = true;
        self.state.save()?;
        for g in self.servers.drain(..) {
            g.detach();
        }
        self.owned = false;
        Ok(self.state.clone())
    }

    pub fn prefix(&self) -> &str {
        &self.state.prefix
    }
    pub fn state(&self) -> &LabState {
        &self.state
    }
    /// Node 1's network namespace.
    pub fn node_ns(&self) -> &str {
        &self.state.node_ns
    }
    /// Every node, node 1 first (`nodes()[i].index == i + 1`).
    pub fn nodes(&self) -> &[LabNode] {
        &self.state.nodes
    }
    /// Node `index` (1-based).
    pub fn node(&self, index: usize) -> Option<&LabNode> {
        index
            .checked_sub(1)
            .and_then(|i| self.state.nodes.get(i))
            .filter(|n| n.index == index)
    }
    fn node_or_err(&self, index: usize) -> Result<&LabNode> {
        self.node(index).ok_or_else(|| {
            LabError::Other(format!(
                "lab {} has no node {index} (it has {})",
                self.state.prefix,
                self.state.nodes.len()
            ))
        })
    }
    /// The fabric's namespace (`<prefix>-fab`, with the bridge `br0`), if the lab has one
    /// (more than one node, or an external client).
    pub fn fabric_ns(&self) -> Option<&str> {
        self.state.fabric_ns.as_deref()
    }
    /// The external client (`ext`, 192.168.100.100 on the fabric, node 0, outside every
    /// node's cgroup), if the lab has one. Use it with the per-pod helpers
    /// ([`Lab::run_in_pod`], [`Lab::tcp_spread`], ...).
    pub fn external_client(&self) -> Option<&Pod> {
        self.state.external.as_ref()
    }
    /// Routes `cidr` (LoadBalancer and external IPs) from the external client through the
    /// node address `via`, as a router in front of the cluster would.
    pub fn route_external_via(&self, cidr: &str, via: &str) -> Result<()> {
        let ext = self
            .external_client()
            .ok_or_else(|| LabError::Other("the lab has no external client".into()))?;
        let out = std::process::Command::new("ip")
            .args(["-n", &ext.ns, "route", "add", cidr, "via", via])
            .output()
            .map_err(|e| LabError::Other(format!("ip route add: {e}")))?;
        if !out.status.success() {
            return Err(LabError::Other(format!(
                "ip -n {} route add {cidr} via {via}: {}",
                ext.ns,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }
    /// A host-network pod on node `index`: the node's network namespace and its cgroup (so
    /// its kpr's socket programs apply, as to any process on a node). Use it with the per-pod
    /// helpers for a client on the node itself (localhost NodePorts, the node's own address).
    pub fn host_network_pod(&self, index: usize) -> Result<Pod> {
        let node = self.node_or_err(index)?;
        Ok(Pod {
            name: format!("{}-host", node.name),
            ns: node.ns.clone(),
            ip: node.fabric_ip,
            ip6: node.fabric_ip6,
            role: PodRole::Client,
            node_dev: String::new(),
            node: index,
        })
    }
    /// All pods of the nodes, backends first (the external client is not among them).
    pub fn pods(&self) -> &[Pod] {
        &self.state.pods
    }
    /// Every backend (node 1's first).
    pub fn backends(&self) -> &[Pod] {
        &self.state.pods[..self.backend_count()]
    }
    /// Every client pod (node 1's first; not the external client).
    pub fn clients(&self) -> &[Pod] {
        &self.state.pods[self.backend_count()..]
    }
    /// The pods (backends first) on node `index`.
    pub fn pods_on(&self, index: usize) -> Vec<&Pod> {
        self.state.pods.iter().filter(|p| p.node == index).collect()
    }
    /// The backends on node `index`.
    pub fn backends_on(&self, index: usize) -> Vec<&Pod> {
        self.backends().iter().filter(|p| p.node == index).collect()
    }
    /// The client pods on node `index`.
    pub fn clients_on(&self, index: usize) -> Vec<&Pod> {
        self.clients().iter().filter(|p| p.node == index).collect()
    }
    /// Pods are stored backends first, then clients.
    fn backend_count(&self) -> usize {
        self.state
            .pods
            .iter()
            .filter(|p| p.role == PodRole::Backend)
            .count()
    }
    /// A pod by name (`be1`, `cl1`, ..., `ext` for the external client).
    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.state
            .pods
            .iter()
            .chain(self.state.external.iter())
            .find(|p| p.name == name)
    }
    pub fn tcp_ports(&self) -> &[u16] {
        &self.state.tcp_ports
    }
    pub fn udp_ports(&self) -> &[u16] {
        &self.state.udp_ports
    }
    /// Node 1's cgroup v2 directory (node 1's pods are in it; attach node 1's socket LB
    /// here). In a one-node lab without an external client, every pod is node 1's.
    pub fn cgroup_dir(&self) -> &Path {
        &self.state.cgroup_dir
    }
    /// Node 1's bpffs (pin maps here).
    pub fn bpffs_dir(&self) -> &Path {
        &self.state.bpffs_dir
    }
    /// The cgroup directory `pod`'s processes are placed in: its node's, or the external
    /// client's own (which no kpr attaches to).
    pub fn pod_cgroup_dir(&self, pod: &Pod) -> Result<&Path> {
        if pod.role == PodRole::External || pod.node == 0 {
            self.state.external_cgroup_dir.as_deref().ok_or_else(|| {
                LabError::Other(format!(
                    "lab {} has no external client ({})",
                    self.state.prefix, pod.name
                ))
            })
        } else {
            Ok(&self.node_or_err(pod.node)?.cgroup_dir)
        }
    }
    /// `/run/kpr-lab/<prefix>`: state file, server logs; put manifests etc. here.
    pub fn work_dir(&self) -> &Path {
        &self.state.work_dir
    }
    /// `<work dir>/manifests`, created: where a test puts the manifests kpr reads.
    pub fn manifest_dir(&self) -> Result<PathBuf> {
        let dir = self.state.work_dir.join("manifests");
        std::fs::create_dir_all(&dir)
            .map_err(|e| LabError::Other(format!("creating {}: {e}", dir.display())))?;
        Ok(dir)
    }
    /// The `kpr-labtool` binary the lab uses.
    pub fn labtool(&self) -> &Path {
        &self.state.labtool
    }
    /// The pod-side gateway address (owned by every node on `lo`).
    pub fn gateway(&self) -> Ipv4Addr {
        GATEWAY
    }

    /// Starts `cmd` in node 1's network namespace, NOT in a lab cgroup (kpr runs here).
    /// The process is killed when the guard is dropped.
    pub fn spawn_in_node(&self, cmd: Command) -> Result<ProcessGuard> {
        self.spawn_in_node_n(1, cmd)
    }

    /// Like [`Lab::spawn_in_node`], in node `index`'s namespace.
    pub fn spawn_in_node_n(&self, index: usize, cmd: Command) -> Result<ProcessGuard> {
        let ns = &self.node_or_err(index)?.ns;
        let what = format!("{ns}: {}", describe(&cmd));
        let placement = Placement::open(Some(ns), None)?;
        Ok(ProcessGuard::new(spawn_placed(cmd, &placement)?, what))
    }

    /// Starts `cmd` in the pod's network namespace and cgroup ([`Lab::pod_cgroup_dir`]).
    pub fn spawn_in_pod(&self, pod: &Pod, cmd: Command) -> Result<ProcessGuard> {
        let what = format!("{}: {}", pod.ns, describe(&cmd));
        let placement = Placement::open(Some(&pod.ns), Some(self.pod_cgroup_dir(pod)?))?;
        Ok(ProcessGuard::new(spawn_placed(cmd, &placement)?, what))
    }

    /// Runs `cmd` in the pod (namespace and cgroup) to completion, capturing its output;
    /// killed (with its process group) after `timeout`. A non-zero exit is not an error:
    /// check `status`.
    pub fn run_in_pod(&self, pod: &Pod, cmd: Command, timeout: Duration) -> Result<Output> {
        let placement = Placement::open(Some(&pod.ns), Some(self.pod_cgroup_dir(pod)?))?;
        run_bounded_placed(cmd, None, timeout, Some(&placement))
    }

    /// Runs `cmd` in node 1's namespace (not in a cgroup) to completion; like
    /// [`Lab::run_in_pod`].
    pub fn run_in_node(
        &self,
        cmd: Command,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Output> {
        self.run_in_node_n(1, cmd, stdin, timeout)
    }

    /// Like [`Lab::run_in_node`], in node `index`'s namespace.
    pub fn run_in_node_n(
        &self,
        index: usize,
        cmd: Command,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Output> {
        let placement = Placement::open(Some(&self.node_or_err(index)?.ns), None)?;
        run_bounded_placed(cmd, stdin, timeout, Some(&placement))
    }

    /// Runs `args` (program and arguments, e.g. `["iptables-restore", "--noflush"]`) in
    /// node 1's namespace with optional standard input, bounded (10 min). Fails on a
    /// non-zero exit ([`LabError::Command`] with stderr). The process enters the namespace
    /// with setns, like `ip netns exec` but without remounting /sys.
    pub fn exec_in_node(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<Output> {
        self.exec_in_node_n(1, args, stdin)
    }

    /// Like [`Lab::exec_in_node`], in node `index`'s namespace.
    pub fn exec_in_node_n(
        &self,
        index: usize,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<Output> {
        let (prog, rest) = args
            .split_first()
            .ok_or_else(|| LabError::Other("exec_in_node: empty command".into()))?;
        let mut cmd = Command::new(prog);
        cmd.args(rest);
        let what = format!("{}: {}", self.node_or_err(index)?.ns, describe(&cmd));
        check(&what, self.run_in_node_n(index, cmd, stdin, EXEC_TIMEOUT)?)
    }

    /// Runs `kpr-labtool <args>` in the pod and parses its JSON output.
    pub fn labtool_json<T: DeserializeOwned>(
        &self,
        pod: &Pod,
        args: &[&str],
        timeout: Duration,
    ) -> Result<T> {
        let mut cmd = Command::new(&self.state.labtool);
        cmd.args(args);
        let what = format!("{}: {}", pod.ns, describe(&cmd));
        let out = check(&what, self.run_in_pod(pod, cmd, timeout)?)?;
        serde_json::from_slice(&out.stdout).map_err(|e| {
            LabError::Other(format!(
                "{what}: bad JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            ))
        })
    }

    /// Waits (up to 20 s) until 30 connections from `pod` to `target` reach exactly the
    /// backends (pod names) `want`: a change kpr still has to pick up and program. Every
    /// connection must succeed meanwhile: a failed one is an error at once. The error holds
    /// the last attempt.
    pub fn wait_until_reaching(
        &self,
        pod: &Pod,
        target: SocketAddr,
        want: &std::collections::BTreeSet<String>,
    ) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let r = self.tcp_spread(pod, target, 30)?;
            let reached: std::collections::BTreeSet<String> = r.counts.keys().cloned().collect();
            if r.errors == 0 && &reached == want {
                return Ok(());
            }
            if r.errors > 0 || std::time::Instant::now() > deadline {
                return Err(LabError::Other(format!(
                    "{} from {}: reached {reached:?}, want {want:?}: {r:?}",
                    target, pod.name
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `kpr-labtool sctp-spread` from `pod` (per-association timeout 5 s). SCTP picks client
    /// ports at random, so among many associations one reuses a port still in IPVS's table,
    /// whose first INIT IPVS drops (its connection-reuse handling, as for a TCP SYN); the
    /// retransmission comes after SCTP's initial RTO of 3 s, past TCP's 1 s.
    pub fn sctp_spread(&self, pod: &Pod, target: SocketAddr, count: u64) -> Result<TcpSpread> {
        self.stream_spread("sctp-spread", pod, target, count, 5000)
    }

    /// `kpr-labtool tcp-spread` from `pod` (per-connection timeout 1 s).
    pub fn tcp_spread(&self, pod: &Pod, target: SocketAddr, count: u64) -> Result<TcpSpread> {
        self.stream_spread("tcp-spread", pod, target, count, 1000)
    }

    /// `kpr-labtool <spread>` (a stream protocol's spread) from `pod`.
    fn stream_spread(
        &self,
        spread: &str,
        pod: &Pod,
        target: SocketAddr,
        count: u64,
        timeout_ms: u64,
    ) -> Result<TcpSpread> {
        let t = target.to_string();
        let c = count.to_string();
        let ms = timeout_ms.to_string();
        self.labtool_json(
            pod,
            &[spread, "--target", &t, "--count", &c, "--timeout-ms", &ms],
            Duration::from_secs(10 + 3 * count + timeout_ms / 1000),
        )
    }

    /// `kpr-labtool udp-spread` from `pod` (per-request timeout 500 ms).
    pub fn udp_spread(
        &self,
        pod: &Pod,
        target: SocketAddr,
        count: u64,
        mode: crate::tool::UdpMode,
    ) -> Result<UdpSpread> {
        let t = target.to_string();
        let c = count.to_string();
        let mut args = vec![
            "udp-spread",
            "--target",
            &t,
            "--count",
            &c,
            "--timeout-ms",
            "500",
        ];
        match mode {
            crate::tool::UdpMode::SocketPerRequest => {}
            crate::tool::UdpMode::OneSocket => args.push("--one-socket"),
            crate::tool::UdpMode::Connected => args.push("--connected"),
        }
        self.labtool_json(pod, &args, Duration::from_secs(10 + count))
    }

    /// `kpr-labtool bench-connect` from `pod`.
    pub fn bench_connect(
        &self,
        pod: &Pod,
        target: SocketAddr,
        duration: Duration,
        concurrency: usize,
    ) -> Result<BenchConnect> {
        let t = target.to_string();
        let d = duration.as_millis().to_string();
        let c = concurrency.to_string();
        self.labtool_json(
            pod,
            &[
                "bench-connect",
                "--target",
                &t,
                "--duration-ms",
                &d,
                "--concurrency",
                &c,
            ],
            duration + Duration::from_secs(15),
        )
    }

    /// A connection-rate load (`bench-connect`) from `pod` that runs until `stop` exists
    /// (bounded: 280 s). A connection gets 3 s: a SYN that a loaded machine drops is
    /// retransmitted after 1 s, so a connection fails only when nothing serves it for longer.
    pub fn bench_connect_until(
        &self,
        pod: &Pod,
        target: &str,
        stop: &Path,
    ) -> Result<BenchConnect> {
        let st = stop.to_string_lossy();
        self.labtool_json(
            pod,
            &[
                "bench-connect",
                "--target",
                target,
                "--duration-ms",
                "280000",
                // Bounded by the stop file and the duration, not by a count.
                "--max",
                "1000000000",
                "--timeout-ms",
                "3000",
                "--stop-file",
                &st,
            ],
            Duration::from_secs(300),
        )
    }

    /// A UDP request/response load (`udp-spread` in `mode`, one request every `interval_ms`)
    /// from `pod` that runs until `stop` exists (bounded: 10,000,000 requests, 300 s), writing
    /// its progress to `progress` if given.
    pub fn udp_until(
        &self,
        pod: &Pod,
        target: &str,
        mode: crate::tool::UdpMode,
        interval_ms: u64,
        stop: &Path,
        progress: Option<&Path>,
    ) -> Result<UdpSpread> {
        let (st, interval) = (stop.to_string_lossy(), interval_ms.to_string());
        let mut args = vec![
            "udp-spread",
            "--target",
            target,
            "--count",
            "10000000",
            "--interval-ms",
            &interval,
            "--stop-file",
            &st,
        ];
        match mode {
            crate::tool::UdpMode::SocketPerRequest => {}
            crate::tool::UdpMode::OneSocket => args.push("--one-socket"),
            crate::tool::UdpMode::Connected => args.push("--connected"),
        }
        let p = progress.map(|p| p.to_string_lossy().into_owned());
        if let Some(p) = &p {
            args.extend(["--progress-file", p]);
        }
        self.labtool_json(pod, &args, Duration::from_secs(300))
    }

    /// `kpr-labtool http-get` from `pod`.
    pub fn http_get(
        &self,
        pod: &Pod,
        target: SocketAddr,
        path: &str,
    ) -> Result<crate::tool::HttpGet> {
        let t = target.to_string();
        self.labtool_json(
            pod,
            &["http-get", "--target", &t, "--path", path],
            Duration::from_secs(10),
        )
    }

    /// `kpr-labtool connect-once` from `pod`.
    pub fn connect_once(
        &self,
        pod: &Pod,
        target: SocketAddr,
        timeout: Duration,
    ) -> Result<ConnectOnce> {
        let t = target.to_string();
        let ms = timeout.as_millis().to_string();
        self.labtool_json(
            pod,
            &["connect-once", "--target", &t, "--timeout-ms", &ms],
            timeout * 3 + Duration::from_secs(5),
        )
    }

    /// Tears the lab down now, returning the problems met (Drop does the same, logging them).
    pub fn down(mut self) -> Result<()> {
        let errors = self.teardown_now();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(LabError::Other(format!(
                "tearing down {}: {}",
                self.state.prefix,
                errors.join("; ")
            )))
        }
    }

    fn teardown_now(&mut self) -> Vec<String> {
        if !self.owned {
            return Vec::new();
        }
        self.owned = false;
        // Kill our own servers first and reap them (no zombies left in the cgroup).
        for g in &mut self.servers {
            let _ = g.signal(nix::sys::signal::Signal::SIGKILL);
        }
        self.servers.clear();
        teardown(&self.state.prefix, Some(&self.state))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for e in self.teardown_now() {
            eprintln!("kpr-lab: cleanup of {}: {e}", self.state.prefix);
        }
    }
}

const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

fn probe_tcp(pod: &Pod, ip: IpAddr, port: u16) -> bool {
    let a = SocketAddr::from((ip, port));
    let Ok(mut s) = TcpStream::connect_timeout(&a, PROBE_TIMEOUT) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
    let mut buf = [0u8; 64];
    s.write_all(b"x").is_ok()
        && s.read(&mut buf).is_ok_and(|n| {
            crate::tool::split_answer(String::from_utf8_lossy(&buf[..n]).trim()).0 == pod.name
        })
}

fn probe_udp(pod: &Pod, ip: IpAddr, port: u16) -> bool {
    let Ok(s) = UdpSocket::bind(crate::tool::unspecified_like(ip)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 64];
    s.send_to(b"x", (ip, port)).is_ok()
        && s.recv_from(&mut buf).is_ok_and(|(n, _)| {
            crate::tool::split_answer(String::from_utf8_lossy(&buf[..n]).trim()).0 == pod.name
        })
}

fn join_ports(p: &[u16]) -> String {
    p.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// `ip [-n NS] -batch -` with the given commands.
fn ip_batch(ns: Option<&str>, commands: &str) -> Result<()> {
    if commands.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"]);
    let what = format!("{} <<< {:?}", describe(&cmd), commands);
    check(
        &what,
        run_bounded(cmd, Some(commands.as_bytes()), Duration::from_secs(30))?,
    )?;
    Ok(())
}

/// One ping from `ns` to `dst`, retried (the first may wait for neighbour resolution).
fn ping(ns: &str, dst: impl Into<IpAddr>) -> Result<()> {
    let dst: IpAddr = dst.into();
    let dst_s = dst.to_string();
    let mut last = None;
    for _ in 0..3 {
        match netns_exec(ns, &["ping", "-n", "-q", "-c", "1", "-W", "1", &dst_s]) {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(LabError::Other(format!(
        "no connectivity from {ns} to {dst}: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    )))
}

/// The one-node lab with the external client that the north-south tests of test `tag` use
/// (failing where labs cannot run, [`crate::require_lab`]), with `manifest` written to
/// `svc.yaml` in its manifest directory: the lab and that directory.
pub fn external_client_lab(tag: &str, manifest: &str) -> (Lab, PathBuf) {
    crate::require_lab(tag);
    let lab = Lab::up(LabSpec {
        prefix: Lab::unique_prefix(tag),
        external_client: true,
        ..LabSpec::default()
    })
    .expect("lab up");
    let dir = lab.manifest_dir().expect("manifest directory");
    write_manifest(&dir.join("svc.yaml"), manifest);
    (lab, dir)
}

/// Writes the manifest `path` (in a [`Lab::manifest_dir`]) atomically: a temporary file
/// renamed over it, as kubectl and ConfigMap volumes replace files (kpr ignores `~` files), so
/// a kpr polling the directory never reads half a manifest. Panics on failure (tests only).
pub fn write_manifest(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("renaming to {}: {e}", path.display()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(f: impl FnOnce(&mut LabSpec)) -> LabSpec {
        let mut s = LabSpec {
            prefix: "kl-t-1-0".into(),
            ..LabSpec::default()
        };
        f(&mut s);
        s
    }

    fn plan(s: &LabSpec) -> Result<Plan> {
        plan_lab(&s.prefix, s, Path::new("/run/kpr-lab/kl-t-1-0"))
    }

    #[test]
    fn plan_one_node() {
        let p = plan(&spec(|s| s.clients = 2)).unwrap();
        let pods = &p.pods;
        assert_eq!(pods.len(), 5);
        assert_eq!(pods[0].name, "be1");
        assert_eq!(pods[0].ns, "kl-t-1-0-be1");
        assert_eq!(pods[0].ip, Ipv4Addr::new(10, 244, 1, 11));
        assert_eq!(pods[0].node_dev, "vp11");
        assert_eq!(pods[0].node, 1);
        assert_eq!(pods[3].name, "cl1");
        assert_eq!(pods[3].ip, Ipv4Addr::new(10, 244, 1, 21));
        assert_eq!(p.nodes.len(), 1);
        assert_eq!(p.nodes[0].ns, "kl-t-1-0-node");
        assert_eq!(p.nodes[0].name, "node1");
        assert_eq!(
            p.nodes[0].cgroup_dir,
            Path::new("/run/kpr-lab/kl-t-1-0/cgroup2/kl-t-1-0")
        );
        assert_eq!(
            p.nodes[0].bpffs_dir,
            Path::new("/run/kpr-lab/kl-t-1-0/bpffs")
        );
        assert!(p.fabric_ns.is_none() && p.external.is_none());
        let p = plan(&spec(|s| {
            s.backends = 12;
            s.clients = 1
        }))
        .unwrap();
        assert_eq!(p.pods[12].ip, Ipv4Addr::new(10, 244, 1, 23));
        assert!(plan(&spec(|s| {
            s.backends = 0;
            s.clients = 0
        }))
        .is_err());
    }

    #[test]
    fn plan_two_nodes() {
        let p = plan(&spec(|s| {
            s.nodes = 2;
            s.backends_per_node = vec![2, 1];
            s.clients_per_node = vec![1, 1];
            s.external_client = true;
        }))
        .unwrap();
        let names: Vec<(&str, Ipv4Addr, usize)> = p
            .pods
            .iter()
            .map(|p| (p.name.as_str(), p.ip, p.node))
            .collect();
        assert_eq!(
            names,
            [
                ("be1", Ipv4Addr::new(10, 244, 1, 11), 1),
                ("be2", Ipv4Addr::new(10, 244, 1, 12), 1),
                ("be3", Ipv4Addr::new(10, 244, 2, 11), 2),
                ("cl1", Ipv4Addr::new(10, 244, 1, 21), 1),
                ("cl2", Ipv4Addr::new(10, 244, 2, 21), 2),
            ]
        );
        assert_eq!(p.nodes[1].ns, "kl-t-1-0-node2");
        assert_eq!(p.nodes[1].fabric_ip, Ipv4Addr::new(192, 168, 100, 12));
        assert_eq!(p.nodes[1].pod_cidr(), "10.244.2.0/24");
        let cg = Path::new("/run/kpr-lab/kl-t-1-0/cgroup2/kl-t-1-0");
        assert_eq!(p.nodes[0].cgroup_dir, cg.join("node1"));
        assert_eq!(p.nodes[1].cgroup_dir, cg.join("node2"));
        assert_eq!(
            p.nodes[1].bpffs_dir,
            Path::new("/run/kpr-lab/kl-t-1-0/bpffs-node2")
        );
        assert_eq!(p.fabric_ns.as_deref(), Some("kl-t-1-0-fab"));
        let ext = p.external.unwrap();
        assert_eq!(ext.ns, "kl-t-1-0-ext");
        assert_eq!(ext.ip, EXTERNAL_CLIENT_IP);
        assert_eq!(ext.node, 0);
        assert_eq!(p.external_cgroup_dir.as_deref(), Some(&*cg.join("ext")));
        // Default pod counts: everything on node 1.
        let p = plan(&spec(|s| s.nodes = 3)).unwrap();
        assert!(p.pods.iter().all(|p| p.node == 1));
        assert_eq!(p.nodes.len(), 3);
        assert!(p.external.is_none());
        assert!(plan(&spec(|s| {
            s.nodes = 2;
            s.backends_per_node = vec![1];
        }))
        .is_err());
        assert!(plan(&spec(|s| s.nodes = 0)).is_err());
        assert!(plan(&spec(|s| s.nodes = MAX_NODES + 1)).is_err());
    }

    #[test]
    fn unique() {
        let a = Lab::unique_prefix("x-y");
        let b = Lab::unique_prefix("x-y");
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("kl-xy-{}-", std::process::id())));
        validate_prefix(&a).unwrap();
    }
}
