//! Running the kpr agent for a lab: in a node's network namespace, attached to that node's
//! cgroup, pinning in that node's bpffs, reading a manifest directory (or an API server).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::{Lab, LabError, ProcessGuard};

type Result<T> = std::result::Result<T, LabError>;

/// How long to wait for kpr's first sync (a 100,000-service manifest takes a while to parse).
const FIRST_SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a change may take to be programmed before a test gives up (a bound for a loaded
/// machine, not a latency claim: the benchmark measures latency).
pub const PROGRAMMED_TIMEOUT: Duration = Duration::from_secs(10);

/// The part of kpr's `--status-file` the lab reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct KprStatus {
    pub syncs: u64,
    pub failed_syncs: u64,
    pub last_sync_duration_ms: f64,
    #[serde(default)]
    pub last_sync_full: bool,
    #[serde(default)]
    pub last_sync_dataplane_ms: f64,
    pub first_sync_after_start_ms: Option<f64>,
    pub model_errors: usize,
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
    /// When `counters` were read (ms since the epoch).
    #[serde(default)]
    pub counters_unix_ms: u128,
    /// Every frontend the last successful sync programmed (`10.96.0.10:80/tcp`).
    #[serde(default)]
    pub frontends: BTreeMap<String, FrontendStatus>,
    /// The netfilter modes' own figures.
    #[serde(default)]
    pub mode: ModeStatus,
}

/// The part of kpr's per-mode figures the lab reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ModeStatus {
    #[serde(default)]
    pub restore_failures: u64,
    #[serde(default)]
    pub partial_restore_failures: u64,
    /// iptables mode: rules per table after the last sync.
    #[serde(default)]
    pub iptables_rules: Vec<(String, u64)>,
    /// nftables mode: objects (chains, rules, elements) after the last sync.
    #[serde(default)]
    pub nftables_objects: Vec<(String, u64)>,
}

/// One programmed frontend in kpr's status.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct FrontendStatus {
    /// `ClusterIP`, `NodePort`, `ExternalIP` or `LoadBalancer`.
    #[serde(default)]
    pub kind: String,
    /// `ip:port`, sorted; empty: refused.
    pub backends: Vec<String>,
    /// For traffic from outside the node, where it differs from `backends`.
    #[serde(default)]
    pub external_backends: Option<Vec<String>>,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    #[serde(default)]
    pub affinity_timeout_s: Option<u64>,
    /// `loadBalancerSourceRanges`.
    #[serde(default)]
    pub source_ranges: Vec<String>,
}

/// A running kpr. Killed when dropped (its programs detach; pins stay in the lab's bpffs
/// until the lab is torn down).
pub struct Kpr {
    process: ProcessGuard,
    status_file: PathBuf,
    log_file: PathBuf,
    admin_socket: PathBuf,
}

/// The agent built with the `variant` kernel programs (`cargo xtask test` builds it):
/// `$KPR_VARIANT_BIN`, else `kpr-variant` beside [`kpr_path`]. Fails naming how to get it.
pub fn kpr_variant_path() -> PathBuf {
    let p = std::env::var_os("KPR_VARIANT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| kpr_path().with_file_name("kpr-variant"));
    assert!(
        p.is_file(),
        "{} is missing: `cargo xtask test` builds it (cargo build -p kpr --features \
         program-variant, copied to kpr-variant), or set KPR_VARIANT_BIN",
        p.display()
    );
    p
}

/// Locates the `kpr` binary: `$KPR_BIN`, else `target/<profile>/kpr` next to (or above) the
/// current executable.
pub fn kpr_path() -> PathBuf {
    if let Some(p) = std::env::var_os("KPR_BIN") {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent().map(Path::to_path_buf);
        for _ in 0..2 {
            let Some(d) = dir else { break };
            let candidate = d.join("kpr");
            if candidate.is_file() {
                return candidate;
            }
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    PathBuf::from("kpr")
}

impl Kpr {
    /// Starts kpr for `lab` on `manifests` and waits until it has programmed them once.
    /// `name` keeps pins, status and log of several kpr runs in one lab apart.
    pub fn start(
        lab: &Lab,
        bin: &Path,
        manifests: &Path,
        name: &str,
        extra: &[&str],
    ) -> Result<Kpr> {
        Self::start_within(lab, bin, manifests, name, extra, FIRST_SYNC_TIMEOUT)
    }

    /// [`Kpr::start`], waiting up to `timeout` for the first sync (large benchmarks); a
    /// [`LabError::Timeout`] when it did not come.
    pub fn start_within(
        lab: &Lab,
        bin: &Path,
        manifests: &Path,
        name: &str,
        extra: &[&str],
        timeout: Duration,
    ) -> Result<Kpr> {
        let mut args: Vec<&OsStr> = vec!["--manifests".as_ref(), manifests.as_os_str()];
        args.extend(extra.iter().map(OsStr::new));
        Self::spawn(lab, 1, bin, name, &args, &[], timeout)
    }

    /// Starts kpr for `lab` (on node 1) with its source given in `args` (e.g. `--master
    /// URL`), and waits until it has completed its first sync.
    pub fn start_with(lab: &Lab, bin: &Path, name: &str, args: &[&OsStr]) -> Result<Kpr> {
        Self::start_on(lab, 1, bin, name, args)
    }

    /// Starts kpr on node `node` (1-based) of `lab` with `args` (its source, e.g.
    /// `--manifests DIR` or `--master URL`, and any other flags), and waits until it has
    /// completed its first sync. It runs in the node's namespace with `--cgroup-path` the
    /// node's cgroup directory and `--bpf-pin-dir <node's bpffs>/<name>`. Its status and
    /// log files are `<work>/<stem>-status.json` and `<work>/<stem>.log` with `stem` =
    /// `name` on node 1 and `<name>-node<n>` on node `n` ≥ 2.
    pub fn start_on(
        lab: &Lab,
        node: usize,
        bin: &Path,
        name: &str,
        args: &[&OsStr],
    ) -> Result<Kpr> {
        Self::start_on_env(lab, node, bin, name, args, &[])
    }

    /// One kpr on each of the lab's nodes `node1`..`nodeN`, serving the manifest directory
    /// `dir` in `mode` as its node, north-south on the node's fabric device (`eth0`).
    pub fn start_on_every_node(lab: &Lab, dir: &Path, mode: ProxyMode) -> Result<Vec<Kpr>> {
        (1..=lab.nodes().len())
            .map(|n| {
                let node = format!("node{n}");
                let dir = dir.to_string_lossy();
                let args = [
                    "--manifests",
                    &dir,
                    "--hostname-override",
                    &node,
                    "--devices",
                    "eth0",
                    "--healthz-bind-address",
                    "127.0.0.1:10256",
                    mode.args()[0],
                    mode.args()[1],
                ];
                let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
                Kpr::start_on(lab, n, &kpr_path(), "kpr", &args)
            })
            .collect()
    }

    /// [`Kpr::start_on`] with extra environment variables.
    pub fn start_on_env(
        lab: &Lab,
        node: usize,
        bin: &Path,
        name: &str,
        args: &[&OsStr],
        env: &[(&str, &str)],
    ) -> Result<Kpr> {
        Self::spawn(lab, node, bin, name, args, env, FIRST_SYNC_TIMEOUT)
    }

    fn spawn(
        lab: &Lab,
        node: usize,
        bin: &Path,
        name: &str,
        args: &[&OsStr],
        env: &[(&str, &str)],
        first_sync: Duration,
    ) -> Result<Kpr> {
        let n = lab.node(node).ok_or_else(|| {
            LabError::Other(format!(
                "Kpr::start_on: the lab has no node {node} (it has {})",
                lab.nodes().len()
            ))
        })?;
        let stem = if node == 1 {
            name.to_string()
        } else {
            format!("{name}-{}", n.name)
        };
        let pin_dir = n.bpffs_dir.join(name);
        let status_file = lab.work_dir().join(format!("{stem}-status.json"));
        let log_file = lab.work_dir().join(format!("{stem}.log"));
        let admin_socket = lab.work_dir().join(format!("{stem}-admin.sock"));
        let _ = std::fs::remove_file(&status_file);
        let log = std::fs::File::create(&log_file)
            .map_err(|e| LabError::Other(format!("creating {}: {e}", log_file.display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| LabError::Other(format!("{}: {e}", log_file.display())))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--bpf-pin-dir")
            .arg(&pin_dir)
            .arg("--cgroup-path")
            .arg(&n.cgroup_dir)
            .arg("--status-file")
            .arg(&status_file)
            .arg("--admin-socket")
            .arg(&admin_socket)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let process = lab.spawn_in_node_n(node, cmd)?;
        let mut kpr = Kpr {
            process,
            status_file,
            log_file,
            admin_socket,
        };
        match kpr.wait_for_syncs(1, first_sync) {
            Ok(_) => Ok(kpr),
            // Still running: it was slow, not broken.
            Err(e) if matches!(kpr.process.try_wait(), Ok(None)) => Err(LabError::Timeout {
                what: format!("kpr's first sync: {e}"),
                timeout: first_sync,
            }),
            Err(e) => Err(e),
        }
    }

    /// Kills kpr with SIGKILL, as a crash or the OOM killer would: nothing of it runs on the
    /// way out. Waits until it is gone.
    pub fn kill(mut self) -> Result<()> {
        self.process.signal(nix::sys::signal::Signal::SIGKILL)?;
        match self.process.wait_timeout(Duration::from_secs(10))? {
            Some(_) => Ok(()),
            None => Err(LabError::Other("kpr did not exit after SIGKILL".into())),
        }
    }

    /// The last status kpr wrote, if any.
    pub fn status(&self) -> Option<KprStatus> {
        let bytes = std::fs::read(&self.status_file).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Waits (bounded) until kpr's status satisfies `pred`; fails early if kpr exits, and on
    /// timeout names `what` and shows the last status and kpr's log.
    pub fn wait_for_status(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&KprStatus) -> bool,
    ) -> Result<KprStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if let Some(s) = status.as_ref().filter(|s| pred(s)) {
                return Ok(s.clone());
            }
            if let Ok(Some(exit)) = self.process.try_wait() {
                return Err(LabError::Other(format!(
                    "kpr exited ({exit}) before {what}; log:\n{}",
                    self.log()
                )));
            }
            if Instant::now() > deadline {
                return Err(LabError::Other(format!(
                    "kpr: no {what} within {timeout:?}; last status: {status:?}; log:\n{}",
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) until kpr has completed `n` successful syncs.
    pub fn wait_for_syncs(&mut self, n: u64, timeout: Duration) -> Result<KprStatus> {
        self.wait_for_status(&format!("sync #{n}"), timeout, |s| s.syncs >= n)
    }

    /// Waits until kpr has programmed `frontend` (as kpr names it: `10.96.0.10:80/tcp`) with
    /// exactly `backends` (`ip:port`, any order) for clients on the node. An empty list waits
    /// for the frontend to be programmed as refused (no endpoints).
    pub fn wait_for_backends(&mut self, frontend: &str, backends: &[&str]) -> Result<KprStatus> {
        let mut want: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
        want.sort();
        self.wait_for_frontend(frontend, &format!("backends {want:?}"), |f| {
            f.backends == want
        })
    }

    /// Waits until kpr has programmed `frontend` so that `pred` holds (`what` names it).
    pub fn wait_for_frontend(
        &mut self,
        frontend: &str,
        what: &str,
        pred: impl Fn(&FrontendStatus) -> bool,
    ) -> Result<KprStatus> {
        self.wait_for_status(
            &format!("{frontend} programmed with {what}"),
            PROGRAMMED_TIMEOUT,
            |s| s.frontends.get(frontend).is_some_and(&pred),
        )
    }

    /// Waits until kpr no longer programs `frontend`.
    pub fn wait_for_no_frontend(&mut self, frontend: &str) -> Result<KprStatus> {
        self.wait_for_status(
            &format!("sync that removed {frontend}"),
            PROGRAMMED_TIMEOUT,
            |s| s.syncs > 0 && !s.frontends.contains_key(frontend),
        )
    }

    /// kpr's datapath counters as read after this call: waits for the status refresh that
    /// follows (kpr refreshes them every second), so they include all traffic that ended
    /// before the call.
    pub fn counters_now(&mut self) -> Result<BTreeMap<String, u64>> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        self.wait_for_status("counter refresh", PROGRAMMED_TIMEOUT, |s| {
            s.counters_unix_ms > now
        })
        .map(|s| s.counters)
    }

    /// The count of refusals for `reason` in `mode`, read after this call (`None`: the mode
    /// counts no such thing, see [`ProxyMode::refusal_counter`]).
    pub fn refusals(&mut self, mode: ProxyMode, reason: Refusal) -> Option<u64> {
        let name = mode.refusal_counter(reason)?;
        let counters = self.counters_now().ok()?;
        Some(
            counters
                .get(name)
                .copied()
                .unwrap_or_else(|| panic!("kpr's status has no counter {name}: {counters:?}")),
        )
    }

    /// Waits (bounded) until kpr's datapath counter `name` reaches `at_least`.
    pub fn wait_for_counter(
        &mut self,
        name: &str,
        at_least: u64,
        timeout: Duration,
    ) -> Result<KprStatus> {
        self.wait_for_status(&format!("counter {name} >= {at_least}"), timeout, |s| {
            s.counters.get(name).copied().unwrap_or(0) >= at_least
        })
    }

    /// kpr's log so far (stderr and stdout).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// The file kpr's stdout and stderr go to.
    pub fn log_path(&self) -> &Path {
        &self.log_file
    }

    /// The agent's admin socket (`--admin-socket`), which `kpr status`, `kpr trace` and
    /// `kpr diff` ask.
    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// The file kpr writes its status to (`--status-file`).
    pub fn status_path(&self) -> &Path {
        &self.status_file
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Leaves kpr running beyond this handle (for a persistent lab, whose teardown kills
    /// every process in the lab's namespaces). Returns its pid.
    pub fn detach(self) -> u32 {
        self.process.detach()
    }

    /// Stops kpr (SIGTERM, then SIGKILL) and returns its log.
    pub fn stop(self) -> String {
        let log_file = self.log_file.clone();
        let _ = self.process.terminate();
        std::fs::read_to_string(log_file).unwrap_or_default()
    }
}

/// A kpr proxy mode, as the lab runs it: every mode serves the same acceptance suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    Ebpf,
    Iptables,
    Nftables,
    /// Needs a kernel with IPVS: its tests run in the VM stage (ignored on the host).
    Ipvs,
}

/// Why a connection that must not succeed did not: each mode counts it in its own layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A ClusterIP (or an external frontend reached from a pod) without endpoints.
    NoEndpoints,
    /// An external frontend without endpoints, reached from outside the node.
    NoEndpointsFromOutside,
    /// `externalTrafficPolicy: Local` on a node without a local endpoint.
    NoLocalEndpoints,
    /// A client outside `loadBalancerSourceRanges`.
    SourceRange,
}

impl ProxyMode {
    /// The modes the host kernel can run (IPVS needs the VM stage's kernels).
    pub const ALL: [ProxyMode; 3] = [ProxyMode::Ebpf, ProxyMode::Iptables, ProxyMode::Nftables];

    pub fn name(self) -> &'static str {
        match self {
            ProxyMode::Ebpf => "ebpf",
            ProxyMode::Iptables => "iptables",
            ProxyMode::Nftables => "nftables",
            ProxyMode::Ipvs => "ipvs",
        }
    }

    /// kpr's flags for this mode.
    pub fn args(self) -> [&'static str; 2] {
        ["--proxy-mode", self.name()]
    }

    pub fn is_netfilter(self) -> bool {
        self != ProxyMode::Ebpf
    }

    /// The counter (in kpr's status) of the layer that refuses for `reason` in this mode: the
    /// eBPF programs' drop reasons, or the iptables mode's rule counters. kube-proxy's nftables
    /// ruleset counts nothing (its refusals are verdicts of map elements), so there the check
    /// is the error kind, the refusal kpr says it programmed, and a positive control. This
    /// table is where the modes' inherent differences are pinned (docs/DESIGN.md, "Proxy
    /// modes").
    pub fn refusal_counter(self, reason: Refusal) -> Option<&'static str> {
        Some(match (self, reason) {
            // IPVS counts nothing either: a frontend without real servers is refused by the
            // local stack (its address is on kube-ipvs0), and drops are iptables DROPs it
            // does not count per reason.
            (ProxyMode::Nftables | ProxyMode::Ipvs, _) => return None,
            (ProxyMode::Ebpf, Refusal::NoEndpoints) => "drop_no_backend",
            (ProxyMode::Ebpf, Refusal::NoEndpointsFromOutside) => "tc_no_backend_passed",
            (ProxyMode::Ebpf, Refusal::NoLocalEndpoints) => "drop_no_local_backend",
            (ProxyMode::Ebpf, Refusal::SourceRange) => "drop_source_range",
            (_, Refusal::NoEndpoints | Refusal::NoEndpointsFromOutside) => "reject_no_endpoints",
            (_, Refusal::NoLocalEndpoints) => "drop_no_local_endpoints",
            (_, Refusal::SourceRange) => "drop_source_range",
        })
    }
}

/// Defines one test per proxy mode: `per_mode! { fn name(mode) { ... } }` makes the tests
/// `name::ebpf`, `name::iptables`, `name::nftables` and `name::ipvs`, each running the body
/// with `mode` set, so that no mode can drift from the others. The `ipvs` one is ignored on
/// the host (no IPVS there) and run by the VM stage with `--include-ignored`.
///
/// `#[ignore = "why"]` first marks every mode's test ignored: for tests that need what only
/// the VM stage's kernels have (SCTP), which it runs with `--include-ignored`.
#[macro_export]
macro_rules! per_mode {
    (#[ignore = $why:literal] $(#[$meta:meta])* fn $name:ident($mode:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            fn run($mode: $crate::kpr::ProxyMode) $body
            #[test]
            #[ignore = $why]
            fn ebpf() {
                run($crate::kpr::ProxyMode::Ebpf)
            }
            #[test]
            #[ignore = $why]
            fn iptables() {
                run($crate::kpr::ProxyMode::Iptables)
            }
            #[test]
            #[ignore = $why]
            fn nftables() {
                run($crate::kpr::ProxyMode::Nftables)
            }
            #[test]
            #[ignore = $why]
            fn ipvs() {
                run($crate::kpr::ProxyMode::Ipvs)
            }
        }
    };
    ($(#[$meta:meta])* fn $name:ident($mode:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            fn run($mode: $crate::kpr::ProxyMode) $body
            #[test]
            fn ebpf() {
                run($crate::kpr::ProxyMode::Ebpf)
            }
            #[test]
            fn iptables() {
                run($crate::kpr::ProxyMode::Iptables)
            }
            #[test]
            fn nftables() {
                run($crate::kpr::ProxyMode::Nftables)
            }
            #[test]
            #[ignore = "--proxy-mode ipvs needs a kernel with IPVS (ip_vs): runs in the VM stage"]
            fn ipvs() {
                run($crate::kpr::ProxyMode::Ipvs)
            }
        }
    };
}

/// Checks that a refusal counter read `before` and `after` some traffic went up by at least
/// `by` (`None`: the mode has no such counter, nothing to check; see
/// [`ProxyMode::refusal_counter`]).
#[track_caller]
pub fn assert_refused(before: Option<u64>, after: Option<u64>, by: u64, what: &str) {
    match (before, after) {
        (Some(b), Some(a)) => assert!(
            a >= b + by,
            "{what}: the refusing layer counted {} (from {b} to {a}), not {by} or more",
            a.saturating_sub(b)
        ),
        (None, None) => {}
        _ => panic!("{what}: the counter appeared or vanished: {before:?} -> {after:?}"),
    }
}
