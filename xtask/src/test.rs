//! `cargo xtask test`: everything CI checks, in the order that fails fastest.
use std::process::Command;

use anyhow::{bail, Result};

use crate::{build, setup};

pub fn run() -> Result<()> {
    setup::run(&setup::SetupOptions { quiet: false })?;
    let before = lab_namespaces()?;

    step("cargo fmt --check");
    build::run(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))?;
    step("cargo clippy");
    build::run(Command::new("cargo").args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    step("build the agent and the lab tool");
    let bins = build::binaries(false)?;
    step("cargo test (unit, golden, and integration tests in network namespaces)");
    build::run(
        Command::new("cargo")
            .args([
                "test",
                "--workspace",
                "--exclude",
                "kpr-ebpf",
                "--no-fail-fast",
            ])
            .env("KPR_BIN", &bins.kpr)
            .env("KPR_LABTOOL", &bins.labtool),
    )?;

    let leaked: Vec<String> = lab_namespaces()?
        .into_iter()
        .filter(|n| !before.contains(n))
        .collect();
    if !leaked.is_empty() {
        bail!("tests left network namespaces behind: {leaked:?}");
    }
    println!("xtask test: all checks passed");
    Ok(())
}

fn step(what: &str) {
    println!("==> {what}");
}

/// Network namespaces the lab names (`kl-*`).
fn lab_namespaces() -> Result<Vec<String>> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("kl-"))
        .map(str::to_owned)
        .collect())
}
