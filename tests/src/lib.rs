//! The kpr lab: a Kubernetes-shaped cluster built from network namespaces on one machine,
//! plus the traffic tool (`kpr-labtool`) that runs inside its pods.
//!
//! Topology (one node, see `shared/design/ARCHITECTURE.md`, "The lab"):
//!
//! ```text
//!   <prefix>-node   lo: 127.0.0.1, 169.254.1.1/32; ip_forward=1, rp_filter=0
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
//! [`Lab`] cleans everything up on drop. [`Lab::persist`] keeps a lab alive beyond the
//! process (for `cargo xtask lab up`); [`down`]/[`down_all`] tear such labs down from their
//! state file, and [`cleanup_stale`] removes what crashed test processes left behind.

mod error;
pub mod kpr;
mod lab;
mod netns;
mod process;
mod state;
pub mod tool;

pub use error::LabError;
pub use lab::{Lab, LabSpec, Pod, PodRole};
pub use netns::in_netns;
pub use process::{run_bounded, ProcessGuard};
pub use state::{cleanup_stale, down, down_all, LabState, PERSISTENT_PREFIX};

use std::path::PathBuf;

/// Where every lab keeps its mounts and files: `/run/kpr-lab/<prefix>/`.
pub const LAB_RUN_DIR: &str = "/run/kpr-lab";

/// Whether the current process runs as root (the lab needs CAP_SYS_ADMIN and CAP_NET_ADMIN).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// For tests: returns `true` (after printing a note) when the test must be skipped because
/// the process is not root.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        false
    } else {
        eprintln!("note: skipping {test}: the lab needs root");
        true
    }
}

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
