//! Building the workspace's binaries for the lab.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// Runs a command in the workspace root, failing with its name if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Paths of the binaries the lab runs.
pub struct Bins {
    pub kpr: PathBuf,
    pub labtool: PathBuf,
}

/// Builds (debug) the agent with the `variant` kernel programs, which differ from the default
/// build's and behave the same, as `target/debug/kpr-variant`: the upgrade test replaces the
/// programs of a running node with it and back. Build it before [`binaries`], which writes
/// `target/debug/kpr` again.
pub fn variant_binary() -> Result<PathBuf> {
    run(Command::new("cargo").args([
        "build",
        "--quiet",
        "-p",
        "kpr",
        "--bin",
        "kpr",
        "--features",
        "program-variant",
    ]))?;
    let dir = root().join("target/debug");
    let out = dir.join("kpr-variant");
    std::fs::copy(dir.join("kpr"), &out)
        .with_context(|| format!("copying the variant build to {}", out.display()))?;
    Ok(out)
}

/// Builds the agent and the lab's traffic tool; `release` for the demo and benchmark.
pub fn binaries(release: bool) -> Result<Bins> {
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "--quiet", "-p", "kpr", "-p", "kpr-lab", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let dir = root()
        .join("target")
        .join(if release { "release" } else { "debug" });
    Ok(Bins {
        kpr: dir.join("kpr"),
        labtool: dir.join("kpr-labtool"),
    })
}
