//! The real `kpr` binary's command line: kube-proxy's flags and --config, exit codes (2 for
//! usage and configuration errors, 1 for runtime errors) and messages.
//!
//! SAFETY: these tests never let the agent touch the system. Every run gets, LAST on its
//! command line (the last value of a flag wins), a `--cgroup-path` that is a plain directory
//! (not a cgroup: the default would mount cgroup2 and attach at its root) and a
//! `--bpf-pin-dir` in a temporary directory (not a bpffs), so an agent that gets past its
//! configuration fails at once, before loading anything, with exit code 1.
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const KPR: &str = env!("CARGO_BIN_EXE_kpr");
/// A run that has not exited by then is killed and the test fails.
const TIMEOUT: Duration = Duration::from_secs(30);

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/config")
        .join(name)
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs kpr with `args` followed by the harmless --cgroup-path and --bpf-pin-dir.
fn kpr(args: &[&str]) -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let not_a_cgroup = tmp.path().join("not-a-cgroup");
    std::fs::create_dir(&not_a_cgroup).unwrap();
    let pins = tmp.path().join("pins");
    let mut child = Command::new(KPR)
        .args(args)
        .arg("--cgroup-path")
        .arg(&not_a_cgroup)
        .arg("--bpf-pin-dir")
        .arg(&pins)
        .env_remove("RUST_LOG")
        .env_remove("KPR_MANIFESTS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > TIMEOUT {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "kpr {args:?} still running after {TIMEOUT:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().unwrap();
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

#[test]
fn bad_config_file_exits_2_naming_the_field() {
    let bad = golden("bad-sync-period-type.yaml");
    let r = kpr(&[
        "--config",
        bad.to_str().unwrap(),
        "--manifests",
        "/nonexistent",
    ]);
    assert_eq!(r.code, Some(2), "stderr: {}", r.stderr);
    assert!(r.stderr.contains("iptables.syncPeriod"), "{}", r.stderr);
    assert!(
        r.stderr.contains("bad-sync-period-type.yaml"),
        "{}",
        r.stderr
    );

    let bad = golden("bad-mode-type.yaml");
    let r = kpr(&["--config", bad.to_str().unwrap()]);
    assert_eq!(r.code, Some(2), "stderr: {}", r.stderr);
    assert!(r.stderr.contains(": mode: invalid type"), "{}", r.stderr);

    let r = kpr(&["--config", "/nonexistent/config.conf"]);
    assert_eq!(r.code, Some(2), "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains("/nonexistent/config.conf"),
        "{}",
        r.stderr
    );
}

/// On a kernel without IPVS (this host's), `--proxy-mode ipvs` exits 2 naming the module,
/// before it changes anything on the node (so this can run in the host's namespace). Where
/// IPVS exists the test is moot, and says so by failing: it must not pass untested.
#[test]
fn proxy_mode_ipvs_exits_2_without_ipvs() {
    assert!(
        kpr::ipvs::Ipvs::open().is_err(),
        "this kernel has IPVS: the no-IPVS exit cannot be checked here"
    );
    let r = kpr(&["--proxy-mode", "ipvs", "--manifests", "/nonexistent"]);
    assert_eq!(r.code, Some(2), "stderr: {}", r.stderr);
    assert!(
        r.stderr
            .contains("--proxy-mode ipvs: the kernel has no IPVS")
            && r.stderr.contains("modprobe ip_vs"),
        "{}",
        r.stderr
    );
}

#[test]
fn help_exits_0_and_lists_kube_proxys_flags() {
    let r = kpr(&["--help"]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    for flag in [
        "--config",
        "--proxy-mode",
        "--hostname-override",
        "--cluster-cidr",
        "--nodeport-addresses",
        "--masquerade-all",
        "--kubeconfig",
        "--master",
        "--bind-address",
        "--healthz-bind-address",
        "--metrics-bind-address",
        "--v <LEVEL>",
        "--conntrack-max-per-core",
        "--iptables-masquerade-bit",
        "--ipvs-scheduler",
        "--oom-score-adj",
        "--feature-gates",
        "--detect-local-mode",
        "--manifests",
        "--bpf-pin-dir",
        "--cgroup-path",
        "--sync-period",
        "--min-sync-period",
    ] {
        assert!(
            r.stdout.contains(flag),
            "{flag} missing from --help:\n{}",
            r.stdout
        );
    }
    let r = kpr(&["--version"]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["--no-such-flag"][..],
        &["--sync-period", "5"],
        &["--masquerade-all", "false"],
        &["--cleanup"],
        &["--cluster-cidr", "10.0.0.0"],
    ] {
        let r = kpr(args);
        assert_eq!(r.code, Some(2), "{args:?}: stderr: {}", r.stderr);
    }
}

/// The acceptance check: a kubeadm kube-proxy ConfigMap works unchanged as --config. The agent
/// gets past configuration and fails later, harmlessly, on the pin directory (not a bpffs).
#[test]
fn kubeadm_config_gets_past_configuration() {
    let cfg = golden("kubeadm.yaml");
    let r = kpr(&[
        "--config",
        cfg.to_str().unwrap(),
        "--hostname-override=$(NODE_NAME)",
        "--manifests",
        "/nonexistent",
    ]);
    assert_eq!(r.code, Some(1), "stderr: {}", r.stderr);
    assert!(!r.stderr.contains("config file"), "{}", r.stderr);
    assert!(r.stderr.contains("pin directory"), "{}", r.stderr);
    assert!(r.stderr.contains("not on a bpffs"), "{}", r.stderr);
}

/// An edited ConfigMap with `mode: iptables` and settings kpr does not use: warnings, and
/// the agent runs (ebpf) until the harmless pin-directory failure; kube-proxy flags from a
/// DaemonSet are accepted with a warning each.
#[test]
fn unused_flags_and_fields_warn_but_run() {
    // The file's `mode: iptables` would start the iptables mode, which programs the network
    // namespace it runs in: here (the host's) it must stay ebpf, which fails at once on the
    // harmless pin directory.
    let text = std::fs::read_to_string(golden("kubeadm-iptables-tuned.yaml")).unwrap();
    assert!(text.contains("mode: iptables"), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(&cfg, text.replace("mode: iptables", "mode: \"\"")).unwrap();
    let r = kpr(&[
        "--config",
        cfg.to_str().unwrap(),
        "--oom-score-adj=-999",
        "--manifests",
        "/nonexistent",
    ]);
    assert_eq!(r.code, Some(1), "stderr: {}", r.stderr);
    for want in [
        "ignored: kpr does not use --oom-score-adj",
        "config: enableProfiling is not supported by kpr; ignored",
        "config: ipvs.syncPeriod is ignored: with mode \"\" the iptables section applies",
        "not on a bpffs",
    ] {
        assert!(
            r.stderr.contains(want),
            "{want:?} missing from:\n{}",
            r.stderr
        );
    }
}

#[test]
fn init_only_checks_the_configuration_and_exits_0() {
    let cfg = golden("kubeadm.yaml");
    let r = kpr(&["--config", cfg.to_str().unwrap(), "--init-only"]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    let bad = golden("bad-kind.yaml");
    let r = kpr(&["--config", bad.to_str().unwrap(), "--init-only"]);
    assert_eq!(r.code, Some(2), "stderr: {}", r.stderr);
}
