//! `cargo xtask lab up|down|exec`: a lab that outlives the command, with kpr running for it.
use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::Subcommand;
use kpr_lab::kpr::Kpr;
use kpr_lab::{Lab, LabSpec, MAX_NODES, PERSISTENT_PREFIX};

use crate::{build, demo, setup};

#[derive(Subcommand)]
pub enum Action {
    /// Build the lab and start kpr on the example manifests: one node with three backends and
    /// one client; with `--nodes N` (N >= 2), N nodes on a fabric (two backends and a client
    /// on node 1, one backend on every other node), an external client, and one kpr per node.
    Up {
        /// Number of nodes (1 to 50).
        #[arg(long, default_value_t = 1)]
        nodes: usize,
    },
    /// Remove every lab `lab up` made, and leftovers of crashed tests.
    Down,
    /// Run a command in a pod of the running lab (in its namespace and cgroup), e.g.
    /// `cargo xtask lab exec cl1 -- kpr-labtool tcp-spread --target 10.96.0.10:80 --count 30`
    /// (`ext` is the external client of a multi-node lab).
    Exec {
        pod: String,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
}

pub fn run(action: Action) -> Result<()> {
    match action {
        Action::Up { nodes } => up(nodes),
        Action::Down => {
            let n = kpr_lab::down_all()?;
            println!("lab down: removed {n} lab(s)");
            Ok(())
        }
        Action::Exec { pod, command } => exec(&pod, &command),
    }
}

/// The lab `lab up --nodes N` builds.
pub(crate) fn spec(nodes: usize, labtool: PathBuf) -> LabSpec {
    let base = LabSpec {
        prefix: PERSISTENT_PREFIX.into(),
        labtool: Some(labtool),
        ..LabSpec::default()
    };
    if nodes == 1 {
        return base;
    }
    let mut backends_per_node = vec![1; nodes];
    backends_per_node[0] = 2;
    LabSpec {
        nodes,
        backends_per_node,
        external_client: true,
        ..base
    }
}

/// The example manifest names its backends' addresses as in the one-node lab (`be<k>` at
/// 10.244.1.<10+k>); in a multi-node lab some backends live elsewhere (be3 at 10.244.2.11 on
/// node 2), so the manifest's addresses are rewritten to the lab's.
/// The lab's Node objects, with their fabric addresses: kpr on each node reads its own from
/// the manifest directory to know where NodePorts are served.
pub(crate) fn nodes_manifest(lab: &Lab) -> String {
    lab.nodes()
        .iter()
        .map(|n| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nstatus:\n  addresses: [{{type: InternalIP, address: {}}}]\n",
                n.name, n.fabric_ip
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

pub(crate) fn demo_manifest(lab: &Lab, shipped: &str) -> String {
    let mut text = shipped.to_string();
    for (k, be) in lab.backends().iter().enumerate().take(200) {
        let documented = Ipv4Addr::new(10, 244, 1, 11 + k as u8);
        if be.name == format!("be{}", k + 1) && be.ip != documented {
            text = text.replace(&format!("[{documented}]"), &format!("[{}]", be.ip));
        }
    }
    text
}

fn up(nodes: usize) -> Result<()> {
    if !(1..=MAX_NODES).contains(&nodes) {
        bail!("--nodes {nodes}: must be 1 to {MAX_NODES}");
    }
    setup::run(&setup::SetupOptions { quiet: false })?;
    let bins = build::binaries(true)?;
    kpr_lab::cleanup_stale()?;
    let lab = Lab::up(spec(nodes, bins.labtool.clone()))
        .context("building the lab (is one already up? `cargo xtask lab down`)")?;
    let manifests = lab.work_dir().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let demo_yaml = std::fs::read_to_string(build::root().join("examples/manifests/demo.yaml"))?;
    demo::write_atomically(
        &manifests.join("demo.yaml"),
        &demo_manifest(&lab, &demo_yaml),
    )?;
    if nodes > 1 {
        demo::write_atomically(&manifests.join("nodes.yaml"), &nodes_manifest(&lab))?;
    }
    // One kpr per node, all on the same manifest directory (the lab's "API server").
    // Started kprs are killed again if a later one fails (dropped before the lab).
    let mut kprs = Vec::new();
    if nodes == 1 {
        kprs.push(Kpr::start(&lab, &bins.kpr, &manifests, "kpr", &[])?);
    } else {
        for node in lab.nodes() {
            let args: [&OsStr; 4] = [
                "--manifests".as_ref(),
                manifests.as_os_str(),
                "--hostname-override".as_ref(),
                node.name.as_ref(),
            ];
            let kpr = Kpr::start_on(&lab, node.index, &bins.kpr, "kpr", &args)
                .with_context(|| format!("starting kpr on {}", node.name))?;
            kprs.push(kpr);
        }
    }
    let logs: Vec<PathBuf> = kprs.iter().map(|k| k.log_path().to_path_buf()).collect();
    let pids: Vec<u32> = kprs.into_iter().map(Kpr::detach).collect();
    let mut lines = Vec::new();
    for (node, (pid, log)) in lab.nodes().iter().zip(pids.iter().zip(&logs)) {
        let pods: Vec<String> = lab
            .pods_on(node.index)
            .iter()
            .map(|p| format!("{} {}", p.name, p.ip))
            .collect();
        let fabric = if lab.fabric_ns().is_some() {
            format!(", fabric {}", node.fabric_ip)
        } else {
            String::new()
        };
        lines.push(format!(
            "  {} (namespace {}{fabric}): pods {}; kpr pid {pid}, log {}",
            node.name,
            node.ns,
            pods.join(", "),
            log.display()
        ));
    }
    let ext = lab
        .external_client()
        .map(|e| format!("{} {} (namespace {})", e.name, e.ip, e.ns));
    let fabric = lab.fabric_ns().map(str::to_string);
    lab.persist()?;
    println!("lab up: {nodes} node(s)");
    for l in &lines {
        println!("{l}");
    }
    if let (Some(ext), Some(fabric)) = (ext, fabric) {
        println!("  external client {ext}, on the bridge in {fabric}");
    }
    println!(
        "kpr serves the manifests in {}; edit them and kpr follows",
        manifests.display()
    );
    println!(
        "try:  cargo xtask lab exec cl1 -- {} tcp-spread --target 10.96.0.10:80 --count 30",
        bins.labtool.display()
    );
    println!("stop: cargo xtask lab down");
    Ok(())
}

fn exec(pod: &str, command: &[String]) -> Result<()> {
    let lab = Lab::attach(PERSISTENT_PREFIX).context("no lab is up (cargo xtask lab up)")?;
    let Some(pod) = lab.pod(pod).cloned() else {
        bail!("no pod {pod} in the lab");
    };
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..]);
    let out = lab.run_in_pod(&pod, cmd, Duration::from_secs(60))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("{} exited with {}", command[0], out.status);
    }
    Ok(())
}
