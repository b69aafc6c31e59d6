//! `cargo xtask lab up|down|exec`: a lab that outlives the command, with kpr running for it.
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::Subcommand;
use kpr_lab::kpr::Kpr;
use kpr_lab::{Lab, LabSpec, PERSISTENT_PREFIX};

use crate::{build, demo, setup};

#[derive(Subcommand)]
pub enum Action {
    /// Build the lab (one node, three backends, one client) and start kpr on the example manifests.
    Up {
        /// Number of nodes (only 1 so far).
        #[arg(long, default_value_t = 1)]
        nodes: usize,
    },
    /// Remove every lab `lab up` made, and leftovers of crashed tests.
    Down,
    /// Run a command in a pod of the running lab (in its namespace and cgroup), e.g.
    /// `cargo xtask lab exec cl1 -- kpr-labtool tcp-spread --target 10.96.0.10:80 --count 30`.
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

fn up(nodes: usize) -> Result<()> {
    if nodes != 1 {
        bail!("--nodes {nodes}: only a one-node lab exists so far (multi-node comes with NodePort support)");
    }
    setup::run(&setup::SetupOptions { quiet: false })?;
    let bins = build::binaries(true)?;
    kpr_lab::cleanup_stale()?;
    let lab = Lab::up(LabSpec {
        prefix: PERSISTENT_PREFIX.into(),
        labtool: Some(bins.labtool.clone()),
        ..LabSpec::default()
    })
    .context("building the lab (is one already up? `cargo xtask lab down`)")?;
    let manifests = lab.work_dir().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let demo_yaml = std::fs::read_to_string(build::root().join("examples/manifests/demo.yaml"))?;
    demo::write_atomically(&manifests.join("demo.yaml"), &demo_yaml)?;
    let kpr = Kpr::start(&lab, &bins.kpr, &manifests, "kpr", &[])?;
    let pid = kpr.detach();
    let work = lab.work_dir().to_path_buf();
    let node = lab.node_ns().to_string();
    let pods: Vec<String> = lab
        .pods()
        .iter()
        .map(|p| format!("{} {}", p.name, p.ip))
        .collect();
    lab.persist()?;
    println!("lab up: node namespace {node}; pods: {}", pods.join(", "));
    println!(
        "kpr (pid {pid}) serves the manifests in {}",
        manifests.display()
    );
    println!(
        "  edit them and kpr follows; its log: {}",
        work.join("kpr.log").display()
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
