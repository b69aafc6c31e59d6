//! The kpr lab: a Kubernetes-shaped cluster built from network namespaces on one machine,
//! plus the traffic tool (`kpr-labtool`) that runs inside its pods.
//!
//! Topology of the default lab (one node; docs/DESIGN.md, "The lab", says why it is built so):
//!
//! ```text
//!   <prefix>-node   lo: 127.0.0.1, 169.254.1.1/32; ip_forward=1, rp_filter=0;
//!                   uplink (a veth, its peer down): the default route, where unknown
//!                   destinations vanish
//!     vp11 ──veth── eth0  <prefix>-be1   10.244.1.11/32, default via 169.254.1.1
//!     vp12 ──veth── eth0  <prefix>-be2   10.244.1.12/32
//!     vp13 ──veth── eth0  <prefix>-be3   10.244.1.13/32
//!     vp21 ──veth── eth0  <prefix>-cl1   10.244.1.21/32
//! ```
//!
//! Every pod process joins the lab's cgroup v2 directory (a child of a cgroup2 hierarchy the
//! lab mounts under `/run/kpr-lab/<prefix>/cgroup2`; never the hierarchy's root), which is
//! where kpr attaches its socket-LB programs. A fresh bpffs is mounted for kpr's pins.
//!
//! A multi-node lab ([`LabSpec::nodes`] ≥ 2) and a lab with an external client
//! ([`LabSpec::external_client`]) also have a fabric: a bridge in its own namespace that
//! every node and the external client are plugged into. Node `n` (namespace `<prefix>-node`
//! for node 1, `<prefix>-node<n>` for the others) has its pods at 10.244.n.x/32 (backends
//! .11.., clients .21..), `eth0` at 192.168.100.(10+n)/24 and a route to every other node's
//! pod CIDR via that node; the external client (outside the cluster, in no node's cgroup)
//! has routes to every pod CIDR via its node:
//!
//! ```text
//!   <prefix>-fab    br0 (no address); ports node1, node2, ..., ext
//!   <prefix>-node   eth0 192.168.100.11/24; 10.244.2.0/24 via 192.168.100.12, ...
//!   <prefix>-node2  eth0 192.168.100.12/24; 10.244.1.0/24 via 192.168.100.11, ...
//!                   vp11 ──veth── eth0 <prefix>-be3  10.244.2.11/32 (names count across nodes)
//!   <prefix>-ext    eth0 192.168.100.100/24; 10.244.n.0/24 via 192.168.100.(10+n)
//! ```
//!
//! Each node has its own cgroup directory (`<cgroup2>/<prefix>/node<n>`; the external
//! client's is `<cgroup2>/<prefix>/ext`) and its own bpffs (`<work>/bpffs` for node 1,
//! `<work>/bpffs-node<n>`), since each node runs its own kpr ([`kpr::Kpr::start_on`]).
//!
//! [`Lab`] cleans everything up on drop. [`Lab::persist`] keeps a lab alive beyond the
//! process (for `cargo xtask lab up`); [`down`]/[`down_all`] tear such labs down from their
//! state file, and [`cleanup_stale`] removes what crashed test processes left behind.

pub mod container;
mod error;
pub mod kpr;
mod lab;
mod netns;
pub mod preconditions;
mod process;
mod state;
pub mod tool;

pub use error::LabError;
pub use lab::{
    external_client_lab, node_fabric_ip, write_manifest, Lab, LabNode, LabSpec, Pod, PodRole,
    EXTERNAL_CLIENT_IP, MAX_NODES, SCTP_PORT,
};
pub use netns::{in_netns, TestNetns};
pub use preconditions::{is_root, require_lab};
pub use process::{run_bounded, ProcessGuard};
pub use state::{cleanup_stale, down, down_all, LabState, PERSISTENT_PREFIX};

use std::path::PathBuf;

/// Where every lab keeps its mounts and files: `/run/kpr-lab/<prefix>/`.
pub const LAB_RUN_DIR: &str = "/run/kpr-lab";

/// Locates the `kpr-labtool` binary: `$KPR_LABTOOL` if set; else next to the current
/// executable (`target/<profile>/kpr-labtool`), or in its parent directory (tests run from
/// `target/<profile>/deps/`). Falls back to `kpr-labtool` (looked up in `$PATH`).
pub fn labtool_path() -> PathBuf {
    if let Some(p) = std::env::var_os("KPR_LABTOOL") {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent().map(|d| d.to_path_buf());
        for _ in 0..2 {
            let Some(d) = dir else { break };
            let candidate = d.join("kpr-labtool");
            if candidate.is_file() {
                return candidate;
            }
            dir = d.parent().map(|p| p.to_path_buf());
        }
    }
    PathBuf::from("kpr-labtool")
}

/// For tests of stale-lab cleanup: runs this test binary's test `test` (which builds a lab and
/// then aborts, as a crashed test would) in a child process with `env_var` set, and returns
/// the lab prefix the child printed as `PREFIX=...`. Panics (it is for tests) if the child did
/// not abort or printed no prefix.
pub fn run_aborting_child(test: &str, env_var: &str) -> String {
    let mut cmd = std::process::Command::new(std::env::current_exe().expect("current exe"));
    cmd.args(["--exact", test, "--include-ignored", "--nocapture"])
        .env(env_var, "1");
    let out = run_bounded(cmd, None, std::time::Duration::from_secs(60)).expect("child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let prefix = stdout
        .lines()
        .find_map(|l| l.strip_prefix("PREFIX="))
        .unwrap_or_else(|| {
            panic!(
                "no prefix from child: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_string();
    assert!(!out.status.success(), "the child did not abort");
    prefix
}

/// Network namespace names as `ip netns list` reports them: for tests that check the lab's
/// cleanup through the user-facing tool rather than through the lab's own bookkeeping.
pub fn ip_netns_names() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}
