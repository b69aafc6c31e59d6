//! Project tasks: `cargo xtask setup|lab|demo|test|bench`. Each task that builds runs `setup`
//! first, so the README's two commands work on a fresh Debian 12 machine.
mod bench;
mod build;
mod chart;
mod demo;
mod image;
mod lab;
mod setup;
mod test;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "kpr's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks (apt packages, nightly rust-src, bpf-linker).
    Setup,
    /// Start or stop a lab cluster in network namespaces, with kpr running for it.
    Lab {
        #[command(subcommand)]
        action: lab::Action,
    },
    /// The main job: a lab with kpr serving real ClusterIP traffic, and an endpoint change.
    Demo,
    /// Every check: fmt, clippy, unit tests, integration tests in namespaces (needs root).
    Test,
    /// Only the VM stage of `test`: the lab subset on Debian's 6.1 and 6.12 kernels.
    Vm,
    /// kpr's container image from scratch (OCI layout and archive under target/image).
    Image,
    /// Connection rate and latency: direct pod IP vs kpr vs kube-proxy's iptables rules.
    Bench(bench::Args),
    /// Regenerate deploy/*.yaml from deploy/gen
    GenDeploy,
    /// Rewrite the golden files from kpr's current output (review the diff before committing).
    Goldens,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::run(&setup::SetupOptions { quiet: false }),
        Task::Lab { action } => lab::run(action),
        Task::Demo => demo::run(),
        Task::Test => test::run(),
        Task::Vm => test::vm_only(),
        Task::Goldens => test::goldens(),
        Task::Bench(args) => bench::run(args),
        Task::Image => image::run(),
        Task::GenDeploy => build::run(
            std::process::Command::new("cargo")
                .args(["run", "-q", "-p", "kpr-deploy", "--", "--out"])
                .arg(build::root().join("deploy")),
        ),
    }
}
