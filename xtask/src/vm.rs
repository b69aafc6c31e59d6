//! The VM stage of `cargo xtask test`: a functional subset of the lab suite on other kernels.
//!
//! Debian's own kernels boot under qemu (TCG: nested KVM hangs on these machines) through
//! virtme-ng, which shares the host's root filesystem with the guest read-only plus writable
//! overlays. So the guest runs the very test binaries and agent the host stage built, and only
//! the kernel differs: its verifier, helpers, attach types and modules (IPVS, SCTP). The guest
//! is slow (no KVM), so the subset is functional checks, one test at a time, no benchmarks.
//!
//! What runs where is one table, [`VM_TESTS`] (and the IPVS client's tests); the kernels,
//! with the modes each runs, are [`KERNELS`]. A kernel's run
//! writes one line per test to its output directory, which the host reads back; a failing run
//! prints the guest's console and the failing tests' output.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::build;

/// A kernel of the matrix: the Debian package that installs it and how its image is named.
pub struct Kernel {
    /// As printed in the matrix ("6.1").
    pub name: &'static str,
    /// The package `cargo xtask setup` installs. 6.1 is pinned to one ABI (bookworm's main
    /// archive keeps it); 6.12 is bookworm's meta-package for the newest 6.12 build.
    pub package: &'static str,
    /// `/boot/vmlinuz-<prefix>…`: the newest matching image is booted.
    pub image_prefix: &'static str,
    /// The modes the per-mode tests run in on this kernel (the stage's time is bounded: the
    /// oldest kernel runs every mode, the other the eBPF mode and the netfilter modes whose
    /// kernel parts differ most, nftables and IPVS).
    pub modes: &'static [&'static str],
}

pub const KERNELS: [Kernel; 2] = [
    Kernel {
        name: "6.1",
        package: "linux-image-6.1.0-50-amd64",
        image_prefix: "6.1.0-50-amd64",
        modes: &["ebpf", "iptables", "nftables", "ipvs"],
    },
    Kernel {
        name: "6.12",
        package: "linux-image-6.12-amd64",
        image_prefix: "6.12.",
        modes: &["ebpf", "nftables", "ipvs"],
    },
];

/// Debian packages the VM stage needs besides the kernels: qemu, and a static busybox
/// virtme-ng's init uses.
pub const APT_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static"];

/// virtme-ng from PyPI, and the command it installs.
pub const VIRTME_NG: &str = "virtme-ng";
const VNG: &str = "vng";

/// Which modes a VM test runs in: every mode of the kernel (a `per_mode!` test, named
/// `test::mode`), the eBPF mode only (a plain test, about pins or programs), or none (a test
/// of kernel parts, such as the IPVS netlink client).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Modes {
    All,
    EbpfOnly,
    /// These modes, where the kernel runs them: the rest of the acceptance suite for the
    /// IPVS mode, whose other modes run it on the host.
    Only(&'static [&'static str]),
    Kernel,
}

/// One row of the matrix: a group name (as the closing table prints it), the lab test binary
/// and the test's name in it.
#[derive(Clone, Copy)]
struct VmTest {
    group: &'static str,
    binary: &'static str,
    test: &'static str,
    modes: Modes,
}

/// The lab tests the VM stage runs on every kernel, each in the modes it says.
const VM_TESTS: &[VmTest] = &[
    VmTest {
        group: "ClusterIP TCP, getpeername",
        binary: "clusterip",
        test: "tcp_clusterip_reaches_all_backends_and_getpeername_shows_the_clusterip",
        modes: Modes::All,
    },
    VmTest {
        group: "ClusterIP UDP (unconnected, connected)",
        binary: "clusterip",
        test: "udp_clusterip_unconnected_and_connected",
        modes: Modes::All,
    },
    VmTest {
        group: "no-endpoint reject",
        binary: "clusterip",
        test: "a_service_without_endpoints_is_refused_at_once",
        modes: Modes::All,
    },
    VmTest {
        group: "NodePort/externalIP/LB from outside",
        binary: "northsouth",
        test: "external_client_reaches_nodeports_external_ips_and_lb_ips_on_both_nodes",
        modes: Modes::All,
    },
    VmTest {
        group: "ClientIP affinity",
        binary: "affinity_policy",
        test: "client_ip_affinity_keeps_a_client_on_its_backend_until_the_timeout",
        modes: Modes::All,
    },
    VmTest {
        group: "eTP Local, health-check ports",
        binary: "northsouth",
        test: "external_traffic_policy_local_keeps_the_client_address_and_health_checks",
        modes: Modes::Only(&["ipvs"]),
    },
    VmTest {
        group: "source ranges, no endpoints from outside",
        binary: "northsouth",
        test: "no_endpoints_refused_fast_and_source_ranges_enforced",
        modes: Modes::Only(&["ipvs"]),
    },
    VmTest {
        group: "iTP Local",
        binary: "affinity_policy",
        test: "internal_traffic_policy_local_uses_only_this_nodes_endpoints",
        modes: Modes::Only(&["ipvs"]),
    },
    VmTest {
        group: "SCTP ClusterIP and NodePort",
        binary: "sctp",
        test: "sctp_clusterip_and_nodeport_reach_all_backends",
        modes: Modes::All,
    },
    VmTest {
        group: "restart with pins",
        binary: "clusterip",
        test: "restarting_kpr_keeps_the_programmed_state",
        modes: Modes::EbpfOnly,
    },
    VmTest {
        group: "cleanup",
        binary: "cleanup_lab",
        test: "cleanup_removes_the_table_programs_and_pins",
        modes: Modes::EbpfOnly,
    },
];

/// The IPVS netlink client's tests against the guest's IPVS (`userspace/tests/ipvs_netlink.rs`).
const IPVS_NETLINK_TESTS: &[&str] = &[
    "each_namespace_has_its_own_virtual_servers",
    "flush_deletes_every_virtual_server_and_its_real_servers",
    "ipv4_real_servers_read_back_as_written_drained_and_deleted",
    "ipv4_virtual_servers_read_back_as_written_and_updated",
    "ipv6_real_servers_read_back_as_written_drained_and_deleted",
    "ipv6_virtual_servers_read_back_as_written_and_updated",
    "long_lists_span_several_dump_messages",
    "refusals_say_whether_the_object_exists",
    "the_kernels_proc_listing_shows_what_netlink_wrote",
    "timeouts_read_back_and_zero_leaves_one_as_it_is",
    "version_is_the_kernels",
];

/// Every row of the stage: the lab tests, then the IPVS client's, one row each.
fn vm_tests() -> Vec<VmTest> {
    let mut all: Vec<VmTest> = VM_TESTS.to_vec();
    all.extend(IPVS_NETLINK_TESTS.iter().map(|test| VmTest {
        group: "IPVS netlink client",
        binary: "ipvs_netlink",
        test,
        modes: Modes::Kernel,
    }));
    all
}

impl VmTest {
    /// `(mode, libtest name)` of each test this row runs on a kernel that runs `modes`.
    fn cases(&self, modes: &[&'static str]) -> Vec<(&'static str, String)> {
        match self.modes {
            Modes::All => modes
                .iter()
                .map(|m| (*m, format!("{}::{m}", self.test)))
                .collect(),
            Modes::EbpfOnly => vec![("ebpf", self.test.to_string())],
            Modes::Only(only) => only
                .iter()
                .filter(|m| modes.contains(m))
                .map(|m| (*m, format!("{}::{m}", self.test)))
                .collect(),
            Modes::Kernel => vec![("-", self.test.to_string())],
        }
    }
}

/// The binaries the guest runs, as the host stage built them.
pub struct Binaries<'a> {
    pub kpr: &'a Path,
    pub labtool: &'a Path,
    pub variant: &'a Path,
}

/// The outcome of one test on one kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed,
    /// No result line: the guest stopped (or hung) before the test ended.
    NotRun,
}

/// One kernel's run.
pub struct KernelRun {
    pub kernel: &'static str,
    /// `(group, mode) → outcomes of the group's tests in that mode`.
    pub results: BTreeMap<(&'static str, &'static str), Vec<Outcome>>,
    pub took: Duration,
    /// The guest's console and the failing tests' output, when something failed.
    pub log: Option<String>,
}

impl KernelRun {
    pub fn passed(&self) -> bool {
        self.log.is_none()
    }

    pub fn counts(&self) -> (u64, u64) {
        let all = self.results.values().flatten();
        let run = all.clone().filter(|o| **o != Outcome::NotRun).count() as u64;
        let failed = all.filter(|o| **o != Outcome::Passed).count() as u64;
        (run, failed)
    }
}

/// Runs the VM subset on every kernel of the matrix, one kernel after the other (each guest
/// takes both cores).
pub fn run_all(bins: &Binaries) -> Result<Vec<KernelRun>> {
    let tests = test_binaries()?;
    let vng = vng()?;
    let mut runs = Vec::new();
    for kernel in &KERNELS {
        println!("==> VM: kernel {}", kernel.name);
        runs.push(run_kernel(&vng, kernel, &tests, bins)?);
    }
    Ok(runs)
}

/// The table of the closing note: one row per group and mode, one column per kernel.
pub fn matrix(runs: &[KernelRun]) -> String {
    let mut out = String::new();
    let _ = write!(out, "    {:<40} {:<9}", "test group", "mode");
    for r in runs {
        let _ = write!(out, " {:<8}", r.kernel);
    }
    out.push('\n');
    let mut rows: Vec<(&str, &str)> = Vec::new();
    let all_modes: Vec<&'static str> = ["ebpf", "iptables", "nftables", "ipvs"].to_vec();
    for t in vm_tests() {
        for (mode, _) in t.cases(&all_modes) {
            if !rows.contains(&(t.group, mode)) {
                rows.push((t.group, mode));
            }
        }
    }
    for (group, mode) in rows {
        let _ = write!(out, "    {group:<40} {mode:<9}");
        for r in runs {
            let cell = match r.results.get(&(group, mode)) {
                Some(v) if v.iter().all(|o| *o == Outcome::Passed) => "pass",
                Some(v) if v.contains(&Outcome::Failed) => "FAIL",
                Some(_) => "not run",
                // A mode this kernel's share of the stage leaves out.
                None => "-",
            };
            let _ = write!(out, " {cell:<8}");
        }
        out.push('\n');
    }
    for r in runs {
        let _ = writeln!(
            out,
            "    kernel {}: {:.0} s",
            r.kernel,
            r.took.as_secs_f64()
        );
    }
    out
}

/// The lab test binaries by name (`clusterip` → its path), from nextest's list of what the
/// host stage built.
fn test_binaries() -> Result<BTreeMap<String, PathBuf>> {
    let out = Command::new("cargo")
        .current_dir(build::root())
        .args([
            "nextest",
            "list",
            "--workspace",
            "--exclude",
            "kpr-ebpf",
            "--message-format",
            "json",
            "-E",
            "package(kpr-lab) & kind(test)",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("starting cargo nextest list")?;
    if !out.status.success() {
        bail!("cargo nextest list failed ({})", out.status);
    }
    let list: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("reading cargo nextest list's JSON")?;
    let suites = list["rust-suites"]
        .as_object()
        .context("cargo nextest list: no rust-suites")?;
    let mut found = BTreeMap::new();
    for (id, suite) in suites {
        if !id.starts_with("kpr-lab::") && !id.starts_with("kpr::") {
            continue;
        }
        if let (Some(name), Some(path)) =
            (suite["binary-name"].as_str(), suite["binary-path"].as_str())
        {
            found.insert(name.to_string(), PathBuf::from(path));
        }
    }
    for t in vm_tests() {
        if !found.contains_key(t.binary) {
            bail!(
                "the VM test {} is in the lab binary `{}`, which nextest does not list",
                t.test,
                t.binary
            );
        }
    }
    Ok(found)
}

/// The `vng` command: on PATH, or in the scripts directory of the Python pip installed into.
pub fn vng() -> Result<PathBuf> {
    if let Some(p) = find_in_path(VNG) {
        return Ok(p);
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .context("starting python3")?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join(VNG);
    if p.exists() {
        return Ok(p);
    }
    bail!("no `{VNG}` on PATH nor in Python's scripts directory: `pip install {VIRTME_NG}`")
}

/// The newest `/boot/vmlinuz-<prefix>*` of `kernel`.
pub fn image(kernel: &Kernel) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .context("reading /boot")?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .is_some_and(|v| v.starts_with(kernel.image_prefix))
        })
        .collect();
    found.sort_by(|a, b| version_order(a, b));
    found.pop().with_context(|| {
        format!(
            "no /boot/vmlinuz-{}* (package {}): run `cargo xtask setup`",
            kernel.image_prefix, kernel.package
        )
    })
}

/// Orders image paths by the numbers in their names (6.12.9 before 6.12.10).
fn version_order(a: &Path, b: &Path) -> std::cmp::Ordering {
    let nums = |p: &Path| -> Vec<u64> {
        p.to_string_lossy()
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|s| s.parse().ok())
            .collect()
    };
    nums(a).cmp(&nums(b))
}

/// How long one kernel's run may take before the guest is stopped: boot (about 40 s without
/// KVM) and the subset (a few minutes), with room for a loaded machine.
const KERNEL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long one test binary may run in the guest.
const TEST_TIMEOUT_SECS: u64 = 600;

fn run_kernel(
    vng: &Path,
    kernel: &Kernel,
    tests: &BTreeMap<String, PathBuf>,
    bins: &Binaries,
) -> Result<KernelRun> {
    let image = image(kernel)?;
    let dir = build::root().join(format!("target/vm/{}", kernel.name));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let script = dir.join("run.sh");
    std::fs::write(&script, guest_script(&dir, kernel.modes, tests, bins))
        .with_context(|| format!("writing {}", script.display()))?;
    let console = dir.join("console.log");
    let started = Instant::now();
    let console_file = std::fs::File::create(&console)?;
    let mut child = Command::new(vng)
        // -v: the guest kernel's messages go to the console log too (an oops, a panic).
        .args([
            "-v",
            "--disable-kvm",
            "--disable-microvm",
            "--memory",
            "2G",
            "--cpus",
            "2",
        ])
        .arg("-r")
        .arg(&image)
        .arg("--rwdir")
        .arg(&dir)
        .arg("--")
        .arg("sh")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(console_file.try_clone()?)
        .stderr(console_file)
        .spawn()
        .with_context(|| format!("starting {}", vng.display()))?;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if started.elapsed() > KERNEL_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let took = started.elapsed();
    let results_text = std::fs::read_to_string(dir.join("results")).unwrap_or_default();
    let outcomes = parse_results(&results_text);

    let mut results: BTreeMap<(&'static str, &'static str), Vec<Outcome>> = BTreeMap::new();
    let mut failed_bins = Vec::new();
    for t in vm_tests() {
        for (mode, name) in t.cases(kernel.modes) {
            let o = outcomes.get(&(t.binary.to_string(), name)).cloned();
            let o = o.unwrap_or(Outcome::NotRun);
            if o != Outcome::Passed && !failed_bins.contains(&t.binary) {
                failed_bins.push(t.binary);
            }
            results.entry((t.group, mode)).or_default().push(o);
        }
    }
    let ok = status.is_some_and(|s| s.success()) && failed_bins.is_empty();
    let log = (!ok).then(|| {
        let mut log = format!(
            "kernel {} ({}): {}\n--- guest console ---\n{}",
            kernel.name,
            image.display(),
            match status {
                None => format!("stopped after {} s", KERNEL_TIMEOUT.as_secs()),
                Some(s) => format!("vng exited with {s}"),
            },
            std::fs::read_to_string(&console).unwrap_or_default()
        );
        for b in failed_bins {
            let f = dir.join(format!("{b}.log"));
            let _ = write!(
                log,
                "\n--- {} ---\n{}",
                f.display(),
                std::fs::read_to_string(&f).unwrap_or_else(|e| format!("({e})"))
            );
        }
        log
    });
    Ok(KernelRun {
        kernel: kernel.name,
        results,
        took,
        log,
    })
}

/// The shell script the guest runs: each test binary once, with its tests of the subset, one
/// at a time; a line `result <binary> <test> ok|FAILED` per test goes to `results`.
fn guest_script(
    dir: &Path,
    modes: &[&'static str],
    tests: &BTreeMap<String, PathBuf>,
    bins: &Binaries,
) -> String {
    let q = |p: &Path| shell_quote(&p.to_string_lossy());
    let mut s = String::new();
    let _ = writeln!(s, "set -u");
    let _ = writeln!(
        s,
        "export PATH={}",
        shell_quote(&std::env::var("PATH").unwrap_or_default())
    );
    let _ = writeln!(
        s,
        "export KPR_BIN={} KPR_LABTOOL={} KPR_VARIANT_BIN={}",
        q(bins.kpr),
        q(bins.labtool),
        q(bins.variant)
    );
    let _ = writeln!(s, "export RUST_BACKTRACE=1");
    let _ = writeln!(s, "cd {}", q(&build::root()));
    let _ = writeln!(s, "echo \"guest kernel $(uname -r)\"");
    // What the host kernel lacks, the guest's modules have; tests that need them are ignored
    // on the host, so they are included here.
    let _ = writeln!(
        s,
        "for m in sctp ip_vs ip_vs_rr ip_vs_sh ip_vs_mh; do modprobe $m || echo \"no module $m\"; done"
    );
    let _ = writeln!(s, "out={}", q(dir));
    let mut by_binary: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for t in vm_tests() {
        by_binary
            .entry(t.binary)
            .or_default()
            .extend(t.cases(modes).into_iter().map(|(_, n)| n));
    }
    for (binary, names) in by_binary {
        let path = &tests[binary];
        let names: Vec<String> = names.iter().map(|n| shell_quote(n)).collect();
        let _ = writeln!(
            s,
            "echo \"== {binary}\"; timeout {TEST_TIMEOUT_SECS} {} --exact --include-ignored --test-threads 1 {} \
             > \"$out/{binary}.log\" 2>&1; echo \"== {binary}: exit $?\"",
            q(path),
            names.join(" ")
        );
        let _ = writeln!(
            s,
            "sed -n 's/^test \\(.*\\) \\.\\.\\. \\(ok\\|FAILED\\)$/result {binary} \\1 \\2/p' \
             \"$out/{binary}.log\" >> \"$out/results\""
        );
    }
    s
}

/// `(binary, test) → outcome` from the guest's `results` lines.
fn parse_results(text: &str) -> BTreeMap<(String, String), Outcome> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            if f.next()? != "result" {
                return None;
            }
            let (binary, test, verdict) = (f.next()?, f.next()?, f.next()?);
            let o = match verdict {
                "ok" => Outcome::Passed,
                _ => Outcome::Failed,
            };
            Some(((binary.to_string(), test.to_string()), o))
        })
        .collect()
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_read_per_binary_and_test() {
        let r = parse_results(
            "result clusterip udp_clusterip_unconnected_and_connected::ebpf ok\n\
             result clusterip restarting_kpr_keeps_the_programmed_state FAILED\n\
             noise\n",
        );
        assert_eq!(
            r[&(
                "clusterip".into(),
                "udp_clusterip_unconnected_and_connected::ebpf".into()
            )],
            Outcome::Passed
        );
        assert_eq!(
            r[&(
                "clusterip".into(),
                "restarting_kpr_keeps_the_programmed_state".into()
            )],
            Outcome::Failed
        );
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn newest_image_is_chosen_by_version_numbers() {
        let mut v = [
            PathBuf::from("/boot/vmlinuz-6.12.10+deb12-amd64"),
            PathBuf::from("/boot/vmlinuz-6.12.9+deb12-amd64"),
        ];
        v.sort_by(|a, b| version_order(a, b));
        assert!(v[1].to_string_lossy().contains("6.12.10"));
    }

    #[test]
    fn every_mode_runs_a_per_mode_test() {
        let t = &VM_TESTS[0];
        let cases = t.cases(KERNELS[0].modes);
        assert_eq!(cases.len(), 4);
        assert_eq!(cases[1], ("iptables", format!("{}::iptables", t.test)));
    }
}
