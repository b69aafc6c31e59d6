//! `cargo xtask test`: everything CI checks, in the order that fails fastest.
//!
//! The tests run in groups, one cargo-nextest run each (settings in `.config/nextest.toml`):
//! - unit: pure logic, golden files, the fake API server, generated manifests (no root);
//! - datapath: kpr's programs and netfilter code against the real kernel, in throw-away
//!   network namespaces and bpffs mounts, without the lab;
//! - lab: the real `kpr` binary serving real traffic in the lab (namespaces, cgroup, bpffs);
//! - VM: a functional subset of the lab suite on Debian's 6.1 and 6.12 kernels, in qemu
//!   guests sharing the host's filesystem (`vm.rs`), after the host groups.
//!
//! A missing precondition (not root, a tool missing) fails the run up front, naming it; every
//! datapath and lab test also fails on its own when run without them, so nothing passes
//! untested. After the run, the number of tests each group ran is printed, and the run fails
//! if a group ran none or something (namespaces, agents, mounts) was left behind.
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::{build, setup};

/// A group of tests: its name, the nextest filter that selects it (`None`: every test no
/// other group selects), and how many of its tests may run at once (lab tests each start
/// agents and push traffic; on a loaded 2-core machine more than two at a time only makes them
/// slower and their bounds tighter).
struct Group {
    name: &'static str,
    filter: Option<&'static str>,
    threads: usize,
}

const GROUPS: [Group; 3] = [
    Group {
        name: "unit",
        filter: None,
        threads: 2,
    },
    Group {
        name: "datapath",
        filter: Some(
            "package(kpr) & (binary(tc_datapath) | binary(tc_conntrack) | binary(nft) \
             | binary(cleanup) | binary(iptables_restore) | binary(nftables_netlink))",
        ),
        threads: 2,
    },
    Group {
        name: "lab",
        filter: Some("package(kpr-lab) & kind(test)"),
        threads: 2,
    },
];

impl Group {
    fn filter(&self) -> String {
        match self.filter {
            Some(f) => f.to_string(),
            None => GROUPS
                .iter()
                .filter_map(|g| g.filter)
                .map(|f| format!("not ({f})"))
                .collect::<Vec<_>>()
                .join(" & "),
        }
    }
}

/// What one group's run reported.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    run: u64,
    failed: u64,
}

pub fn run() -> Result<()> {
    // Root first (setup needs it too), then the tools setup installs.
    require(&[])?;
    setup::run(&setup::SetupOptions { quiet: false })?;
    require(kpr_lab::preconditions::TOOLS)?;
    ensure_nextest()?;
    let before = Leftovers::now();

    step("cargo fmt --check");
    build::run(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))?;
    step("cargo clippy");
    build::run(Command::new("cargo").args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    step("build the agent and the lab tool");
    let variant = build::variant_binary()?;
    let bins = build::binaries(false)?;
    step("build the container image");
    let image = crate::image::build_image()?;

    let mut results = Vec::new();
    for group in &GROUPS {
        step(&format!("{} tests", group.name));
        let status = Command::new("cargo")
            .current_dir(build::root())
            .args([
                "nextest",
                "run",
                "--workspace",
                "--exclude",
                "kpr-ebpf",
                "--profile",
                "ci",
                "--no-fail-fast",
                "--test-threads",
                &group.threads.to_string(),
                "-E",
                &group.filter(),
            ])
            .env("KPR_BIN", &bins.kpr)
            .env("KPR_LABTOOL", &bins.labtool)
            .env("KPR_VARIANT_BIN", &variant)
            .env("KPR_IMAGE_OCI", &image.layout)
            .status()
            .context("starting cargo nextest")?;
        let junit = build::root().join("target/nextest/ci/junit.xml");
        let counts = std::fs::read_to_string(&junit)
            .ok()
            .and_then(|x| parse_junit(&x))
            .unwrap_or_default();
        results.push((group.name, counts, status.success()));
    }

    step("VM tests");
    let vm_runs = crate::vm::run_all(&crate::vm::Binaries {
        kpr: &bins.kpr,
        labtool: &bins.labtool,
        variant: &variant,
    })?;

    println!("==> tests run per group");
    for (name, c, _) in &results {
        println!("    {name:<9} {:>4} run, {:>4} failed", c.run, c.failed);
    }
    for r in &vm_runs {
        let (run, failed) = r.counts();
        let name = format!("VM {}", r.kernel);
        println!("    {name:<9} {run:>4} run, {failed:>4} failed");
    }
    println!("==> kernel matrix (VM stage)");
    print!("{}", crate::vm::matrix(&vm_runs));

    let mut problems = Vec::new();
    for (name, c, ok) in &results {
        if !ok || c.failed > 0 {
            problems.push(format!("{name} tests failed"));
        } else if c.run == 0 {
            problems.push(format!(
                "the {name} group ran no test (a filter that matches nothing?)"
            ));
        }
    }
    for r in &vm_runs {
        if let Some(log) = &r.log {
            eprintln!("==> VM {} failed\n{log}", r.kernel);
            problems.push(format!("the VM stage failed on kernel {}", r.kernel));
        }
    }
    let left = Leftovers::now().since(&before);
    if !left.is_empty() {
        problems.push(format!("tests left behind: {}", left.join("; ")));
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    println!("xtask test: all checks passed");
    Ok(())
}

/// `cargo xtask vm`: the VM stage alone, for work on one kernel's failure.
pub fn vm_only() -> Result<()> {
    require(&[])?;
    setup::run(&setup::SetupOptions { quiet: true })?;
    let variant = build::variant_binary()?;
    let bins = build::binaries(false)?;
    let runs = crate::vm::run_all(&crate::vm::Binaries {
        kpr: &bins.kpr,
        labtool: &bins.labtool,
        variant: &variant,
    })?;
    print!("{}", crate::vm::matrix(&runs));
    let failed: Vec<&str> = runs
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.kernel)
        .collect();
    for r in &runs {
        if let Some(log) = &r.log {
            eprintln!("==> VM {} failed\n{log}", r.kernel);
        }
    }
    if !failed.is_empty() {
        bail!("the VM stage failed on kernel {}", failed.join(", "));
    }
    Ok(())
}

/// `cargo xtask goldens`: rewrites the golden files (the ignored `write_goldens` tests), for a
/// change whose new output is intended. Review the diff before committing it.
pub fn goldens() -> Result<()> {
    build::run(Command::new("cargo").args([
        "test",
        "-p",
        "kpr",
        "--lib",
        "--",
        "--ignored",
        "write_goldens",
    ]))?;
    println!("goldens rewritten: review `git diff -- '*golden*'` before committing");
    Ok(())
}

/// Fails, naming everything missing, unless the run is root with `tools` on PATH.
fn require(tools: &[&str]) -> Result<()> {
    let missing = kpr_lab::preconditions::missing(tools);
    if !missing.is_empty() {
        bail!(
            "cannot run the datapath and lab tests: missing {}. Run `cargo xtask test` as root \
             on a machine where `cargo xtask setup` can install the tools.",
            missing.join(", ")
        );
    }
    Ok(())
}

fn step(what: &str) {
    println!("==> {what}");
}

/// cargo-nextest is on this project's machines; elsewhere it is installed from crates.io.
fn ensure_nextest() -> Result<()> {
    let have = Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        step("cargo install cargo-nextest --locked");
        build::run(Command::new("cargo").args(["install", "cargo-nextest", "--locked"]))?;
    }
    Ok(())
}

/// The totals of a nextest JUnit report (`<testsuites tests=".." failures=".." errors="..">`).
fn parse_junit(xml: &str) -> Option<Counts> {
    let start = xml.find("<testsuites ")?;
    let tag = &xml[start..start + xml[start..].find('>')?];
    let attr = |name: &str| -> Option<u64> {
        let key = format!(" {name}=\"");
        let from = tag.find(&key)? + key.len();
        tag[from..].split('"').next()?.parse().ok()
    };
    Some(Counts {
        run: attr("tests")?,
        failed: attr("failures")? + attr("errors")?,
    })
}

/// What tests could leave behind on the machine: lab and test namespaces, agents, lab
/// directories. Compared before and after the run, so that whatever was there before (a lab
/// someone keeps up) is not blamed on the tests.
#[derive(Debug, Default)]
struct Leftovers(Vec<String>);

impl Leftovers {
    fn now() -> Leftovers {
        let mut found = Vec::new();
        let out = Command::new("ip").args(["netns", "list"]).output();
        if let Ok(out) = out {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or_default();
                if name.starts_with("kl-") || name.starts_with("kpr-") {
                    found.push(format!("namespace {name}"));
                }
            }
        }
        if let Ok(out) = Command::new("pgrep").args(["-x", "kpr"]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                found.push(format!("kpr process {pid}"));
            }
        }
        if let Ok(dir) = std::fs::read_dir(Path::new(kpr_lab::LAB_RUN_DIR)) {
            for e in dir.flatten() {
                found.push(format!("lab directory {}", e.path().display()));
            }
        }
        Leftovers(found)
    }

    fn since(&self, before: &Leftovers) -> Vec<String> {
        self.0
            .iter()
            .filter(|x| !before.0.contains(x))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_totals() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<testsuites name="nextest-run" tests="12" skipped="3" failures="1" errors="2" uuid="x">
    <testsuite name="kpr-lab" tests="10" skipped="0" errors="0" failures="0">"#;
        assert_eq!(parse_junit(xml), Some(Counts { run: 12, failed: 3 }));
        assert_eq!(parse_junit("<testsuite tests=\"1\">"), None);
    }

    #[test]
    fn unit_is_every_test_no_other_group_selects() {
        assert_eq!(
            GROUPS[0].filter(),
            format!(
                "not ({}) & not ({})",
                GROUPS[1].filter.unwrap(),
                GROUPS[2].filter.unwrap()
            )
        );
    }
}
