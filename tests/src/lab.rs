//! Building and using a lab.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};
use crate::netns::{in_netns, netns_exec, netns_exists};
use crate::process::{
    check, describe, run_bounded, run_bounded_placed, spawn_placed, Placement, ProcessGuard,
};
use crate::state::{
    create_dir_all_retry, proc_start_time, teardown, validate_prefix, work_dir_for, LabState,
};
use crate::tool::{BenchConnect, ConnectOnce, TcpSpread, UdpSpread};

/// The node's number: pods get 10.244.<NODE_INDEX>.<n>.
pub const NODE_INDEX: u8 = 1;
/// The address every pod's default route points to; the node owns it on `lo`.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// How long `up` waits for the echo servers to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound for `exec_in_node` (an iptables-restore of 100k services takes a while).
const EXEC_TIMEOUT: Duration = Duration::from_secs(600);

/// What to build.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// Unique name prefix (namespaces `<prefix>-node`, `<prefix>-be1`, ...); use
    /// [`Lab::unique_prefix`], or [`crate::PERSISTENT_PREFIX`] for `xtask lab up`.
    pub prefix: String,
    pub backends: usize,
    pub clients: usize,
    pub tcp_ports: Vec<u16>,
    pub udp_ports: Vec<u16>,
    /// The `kpr-labtool` binary; `None`: [`crate::labtool_path`].
    pub labtool: Option<PathBuf>,
}

impl Default for LabSpec {
    fn default() -> Self {
        LabSpec {
            prefix: Lab::unique_prefix("t"),
            backends: 3,
            clients: 1,
            tcp_ports: vec![8080, 8081],
            udp_ports: vec![5353],
            labtool: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodRole {
    Backend,
    Client,
}

/// A pod: a network namespace with one veth (`eth0`) to the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    /// `be1`, `cl1`, ...
    pub name: String,
    /// Its network namespace, `<prefix>-<name>`.
    pub ns: String,
    pub ip: Ipv4Addr,
    pub role: PodRole,
    /// The node side of its veth (`vp<last octet>`), in the node namespace.
    pub node_dev: String,
}

/// A running lab. Dropping it tears everything down (unless it was persisted or attached).
#[derive(Debug)]
pub struct Lab {
    state: LabState,
    servers: Vec<ProcessGuard>,
    /// Whether Drop tears the lab down.
    owned: bool,
}

impl Lab {
    /// A prefix unique to this process and call: `kl-<tag>-<pid>-<n>` (tag: up to 8
    /// alphanumerics). The pid lets [`crate::cleanup_stale`] find labs of dead processes.
    pub fn unique_prefix(tag: &str) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(8)
            .collect();
        let tag = if tag.is_empty() { "t".into() } else { tag };
        format!(
            "kl-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Builds the lab: mounts, namespaces, veths, routes, sysctls; checks connectivity
    /// (ping); starts `kpr-labtool serve` in each backend and waits (bounded) until every
    /// port answers. On error everything built so far is torn down.
    pub fn up(spec: LabSpec) -> Result<Lab> {
        if !crate::is_root() {
            return Err(LabError::NotRoot);
        }
        validate_prefix(&spec.prefix)?;
        let prefix = spec.prefix.clone();
        let pods = plan_pods(&prefix, spec.backends, spec.clients)?;
        let node_ns = format!("{prefix}-node");
        let work_dir = work_dir_for(&prefix);
        if work_dir.exists() || netns_exists(&node_ns) {
            return Err(LabError::Other(format!(
                "a lab named {prefix} already exists (tear it down with kpr_lab::down)"
            )));
        }
        let labtool = spec.labtool.clone().unwrap_or_else(crate::labtool_path);
        if spec.backends > 0 && !labtool.is_file() {
            return Err(LabError::Other(format!(
                "kpr-labtool not found at {} (build it: cargo build -p kpr-lab; or set KPR_LABTOOL)",
                labtool.display()
            )));
        }
        create_dir_all_retry(Path::new(crate::LAB_RUN_DIR))?;
        // Atomic claim of the prefix: whoever creates the work directory builds the lab.
        fs::create_dir(&work_dir)
            .map_err(|e| LabError::io(format!("mkdir {}", work_dir.display()), e))?;
        let me = std::process::id() as i32;
        let mut namespaces = vec![node_ns.clone()];
        namespaces.extend(pods.iter().map(|p| p.ns.clone()));
        let mut lab = Lab {
            state: LabState {
                prefix: prefix.clone(),
                creator_pid: me,
                creator_start: proc_start_time(me).unwrap_or(0),
                kept: false,
                node_ns,
                namespaces,
                pods,
                tcp_ports: spec.tcp_ports.clone(),
                udp_ports: spec.udp_ports.clone(),
                pids: Vec::new(),
                cgroup_mount: work_dir.join("cgroup2"),
                cgroup_dir: work_dir.join("cgroup2").join(&prefix),
                bpffs_dir: work_dir.join("bpffs"),
                work_dir,
                labtool,
            },
            servers: Vec::new(),
            owned: true,
        };
        // From here on, an error drops `lab`, which tears down what exists.
        lab.state.save()?;
        lab.mount_fs()?;
        lab.build_network()?;
        lab.check_connectivity()?;
        lab.start_servers()?;
        lab.wait_ready()?;
        Ok(lab)
    }

    fn mount_fs(&mut self) -> Result<()> {
        let s = &self.state;
        for dir in [&s.cgroup_mount, &s.bpffs_dir] {
            fs::create_dir_all(dir)
                .map_err(|e| LabError::io(format!("mkdir {}", dir.display()), e))?;
        }
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        mount(
            Some("none"),
            &s.cgroup_mount,
            Some("cgroup2"),
            flags,
            None::<&str>,
        )
        .map_err(|e| LabError::nix(format!("mount cgroup2 on {}", s.cgroup_mount.display()), e))?;
        // The lab's cgroup: a child of the hierarchy's root, never the root itself.
        fs::create_dir(&s.cgroup_dir)
            .map_err(|e| LabError::io(format!("mkdir {}", s.cgroup_dir.display()), e))?;
        mount(
            Some("bpf"),
            &s.bpffs_dir,
            Some("bpf"),
            flags,
            Some("mode=0700"),
        )
        .map_err(|e| LabError::nix(format!("mount bpffs on {}", s.bpffs_dir.display()), e))?;
        Ok(())
    }

    fn build_network(&mut self) -> Result<()> {
        let node = self.state.node_ns.clone();
        let pods = self.state.pods.clone();
        // Namespaces.
        let mut batch = String::new();
        for ns in &self.state.namespaces {
            batch.push_str(&format!("netns add {ns}\n"));
        }
        ip_batch(None, &batch)?;
        // Node: loopback with the gateway address; forwarding on, rp_filter off (before the
        // veths exist, so that they inherit `default`).
        ip_batch(
            Some(&node),
            &format!("link set lo up\naddr add {GATEWAY}/32 dev lo\n"),
        )?;
        netns_exec(
            &node,
            &[
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )?;
        // Veth pairs, created directly in their namespaces.
        let mut batch = String::new();
        for p in &pods {
            batch.push_str(&format!(
                "link add {} netns {node} type veth peer name eth0 netns {}\n",
                p.node_dev, p.ns
            ));
        }
        ip_batch(None, &batch)?;
        for p in &pods {
            ip_batch(
                Some(&p.ns),
                &format!(
                    "link set lo up\n\
                     addr add {ip}/32 dev eth0\n\
                     link set eth0 up\n\
                     route add {GATEWAY} dev eth0 scope link\n\
                     route add default via {GATEWAY} dev eth0\n",
                    ip = p.ip
                ),
            )?;
        }
        let mut batch = String::new();
        for p in &pods {
            batch.push_str(&format!(
                "link set {dev} up\nroute add {ip}/32 dev {dev}\n",
                dev = p.node_dev,
                ip = p.ip
            ));
        }
        ip_batch(Some(&node), &batch)?;
        Ok(())
    }

    /// pod → node for every pod, and pod → pod (first client ↔ first backend).
    fn check_connectivity(&self) -> Result<()> {
        for p in &self.state.pods {
            ping(&p.ns, GATEWAY)?;
        }
        if let (Some(c), Some(b)) = (self.clients().first(), self.backends().first()) {
            ping(&c.ns, b.ip)?;
            ping(&b.ns, c.ip)?;
        }
        Ok(())
    }

    fn start_servers(&mut self) -> Result<()> {
        let tcp = join_ports(&self.state.tcp_ports);
        let udp = join_ports(&self.state.udp_ports);
        for pod in self.backends().to_vec() {
            let log = self.state.work_dir.join(format!("{}.log", pod.name));
            let out = fs::File::create(&log)
                .map_err(|e| LabError::io(format!("create {}", log.display()), e))?;
            let err = out
                .try_clone()
                .map_err(|e| LabError::io("dup log file", e))?;
            let mut cmd = Command::new(&self.state.labtool);
            cmd.args(["serve", "--name", &pod.name, "--tcp", &tcp, "--udp", &udp])
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err);
            let guard = self.spawn_in_pod(&pod, cmd)?;
            self.state.pids.push(guard.pid() as i32);
            self.servers.push(guard);
        }
        self.state.save()
    }

    /// Every backend answers on every port, asked from the node namespace (which is not in
    /// the lab's cgroup, so no socket LB applies).
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let backends = self.backends().to_vec();
        let (tcp, udp) = (self.state.tcp_ports.clone(), self.state.udp_ports.clone());
        let mut pending: Vec<usize> = (0..backends.len()).collect();
        loop {
            for &i in &pending {
                if let Some(status) = self.servers[i].try_wait()? {
                    return Err(self.server_failed(&backends[i], &format!("exited: {status}")));
                }
            }
            let ready: Vec<bool> = in_netns(&self.state.node_ns, || {
                pending
                    .iter()
                    .map(|&i| {
                        let pod = &backends[i];
                        tcp.iter().all(|&port| probe_tcp(pod, port))
                            && udp.iter().all(|&port| probe_udp(pod, port))
                    })
                    .collect()
            })?;
            pending = pending
                .into_iter()
                .zip(ready)
                .filter(|(_, ok)| !ok)
                .map(|(i, _)| i)
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let pod = backends[pending[0]].clone();
                return Err(self.server_failed(
                    &pod,
                    &format!("no answer within {READY_TIMEOUT:?} on tcp {tcp:?} udp {udp:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn server_failed(&self, pod: &Pod, why: &str) -> LabError {
        let log = fs::read_to_string(self.state.work_dir.join(format!("{}.log", pod.name)))
            .unwrap_or_default();
        let log: String = log.lines().take(5).collect::<Vec<_>>().join(" | ");
        LabError::Other(format!(
            "echo server in {} ({}): {why}; log: {log}",
            pod.name, pod.ip
        ))
    }

    /// Uses a lab that already exists (for example a persistent one made by `xtask lab up`)
    /// from its state file. Dropping the returned value does not tear the lab down.
    pub fn attach(prefix: &str) -> Result<Lab> {
        validate_prefix(prefix)?;
        let state = LabState::load(prefix)?;
        if !netns_exists(&state.node_ns) {
            return Err(LabError::Other(format!(
                "lab {prefix}: state file exists but namespace {} does not",
                state.node_ns
            )));
        }
        Ok(Lab {
            state,
            servers: Vec::new(),
            owned: false,
        })
    }

    /// Keeps the lab running after this value (and this process) is gone: marks it kept in
    /// its state file and lets its server processes run on. Tear it down with
    /// [`crate::down`] / [`crate::down_all`].
    pub fn persist(mut self) -> Result<LabState> {
        self.state.kept = true;
        self.state.save()?;
        for g in self.servers.drain(..) {
            g.detach();
        }
        self.owned = false;
        Ok(self.state.clone())
    }

    pub fn prefix(&self) -> &str {
        &self.state.prefix
    }
    pub fn state(&self) -> &LabState {
        &self.state
    }
    pub fn node_ns(&self) -> &str {
        &self.state.node_ns
    }
    /// All pods, backends first.
    pub fn pods(&self) -> &[Pod] {
        &self.state.pods
    }
    pub fn backends(&self) -> &[Pod] {
        &self.state.pods[..self.backend_count()]
    }
    pub fn clients(&self) -> &[Pod] {
        &self.state.pods[self.backend_count()..]
    }
    /// Pods are stored backends first, then clients.
    fn backend_count(&self) -> usize {
        self.state
            .pods
            .iter()
            .filter(|p| p.role == PodRole::Backend)
            .count()
    }
    /// A pod by name (`be1`, `cl1`, ...).
    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.state.pods.iter().find(|p| p.name == name)
    }
    pub fn tcp_ports(&self) -> &[u16] {
        &self.state.tcp_ports
    }
    pub fn udp_ports(&self) -> &[u16] {
        &self.state.udp_ports
    }
    /// The lab's cgroup v2 directory (all pod processes are in it; attach socket LB here).
    pub fn cgroup_dir(&self) -> &Path {
        &self.state.cgroup_dir
    }
    /// A bpffs mounted for this lab (pin maps here).
    pub fn bpffs_dir(&self) -> &Path {
        &self.state.bpffs_dir
    }
    /// `/run/kpr-lab/<prefix>`: state file, server logs; put manifests etc. here.
    pub fn work_dir(&self) -> &Path {
        &self.state.work_dir
    }
    /// The `kpr-labtool` binary the lab uses.
    pub fn labtool(&self) -> &Path {
        &self.state.labtool
    }
    /// The pod-side gateway address (owned by the node on `lo`).
    pub fn gateway(&self) -> Ipv4Addr {
        GATEWAY
    }

    /// Starts `cmd` in the node's network namespace, NOT in the lab's cgroup (kpr runs
    /// here). The process is killed when the guard is dropped.
    pub fn spawn_in_node(&self, cmd: Command) -> Result<ProcessGuard> {
        let what = format!("{}: {}", self.state.node_ns, describe(&cmd));
        let placement = Placement::open(Some(&self.state.node_ns), None)?;
        Ok(ProcessGuard::new(spawn_placed(cmd, &placement)?, what))
    }

    /// Starts `cmd` in the pod's network namespace and in the lab's cgroup.
    pub fn spawn_in_pod(&self, pod: &Pod, cmd: Command) -> Result<ProcessGuard> {
        let what = format!("{}: {}", pod.ns, describe(&cmd));
        let placement = Placement::open(Some(&pod.ns), Some(&self.state.cgroup_dir))?;
        Ok(ProcessGuard::new(spawn_placed(cmd, &placement)?, what))
    }

    /// Runs `cmd` in the pod (namespace and cgroup) to completion, capturing its output;
    /// killed (with its process group) after `timeout`. A non-zero exit is not an error:
    /// check `status`.
    pub fn run_in_pod(&self, pod: &Pod, cmd: Command, timeout: Duration) -> Result<Output> {
        let placement = Placement::open(Some(&pod.ns), Some(&self.state.cgroup_dir))?;
        run_bounded_placed(cmd, None, timeout, Some(&placement))
    }

    /// Runs `cmd` in the node namespace (not in the cgroup) to completion; like
    /// [`Lab::run_in_pod`].
    pub fn run_in_node(
        &self,
        cmd: Command,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Output> {
        let placement = Placement::open(Some(&self.state.node_ns), None)?;
        run_bounded_placed(cmd, stdin, timeout, Some(&placement))
    }

    /// Runs `args` (program and arguments, e.g. `["iptables-restore", "--noflush"]`) in the
    /// node namespace with optional standard input, bounded (10 min). Fails on a non-zero
    /// exit ([`LabError::Command`] with stderr). The process enters the namespace with
    /// setns, like `ip netns exec` but without remounting /sys.
    pub fn exec_in_node(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<Output> {
        let (prog, rest) = args
            .split_first()
            .ok_or_else(|| LabError::Other("exec_in_node: empty command".into()))?;
        let mut cmd = Command::new(prog);
        cmd.args(rest);
        let what = format!("{}: {}", self.state.node_ns, describe(&cmd));
        check(&what, self.run_in_node(cmd, stdin, EXEC_TIMEOUT)?)
    }

    /// Runs `kpr-labtool <args>` in the pod and parses its JSON output.
    pub fn labtool_json<T: DeserializeOwned>(
        &self,
        pod: &Pod,
        args: &[&str],
        timeout: Duration,
    ) -> Result<T> {
        let mut cmd = Command::new(&self.state.labtool);
        cmd.args(args);
        let what = format!("{}: {}", pod.ns, describe(&cmd));
        let out = check(&what, self.run_in_pod(pod, cmd, timeout)?)?;
        serde_json::from_slice(&out.stdout).map_err(|e| {
            LabError::Other(format!(
                "{what}: bad JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            ))
        })
    }

    /// `kpr-labtool tcp-spread` from `pod` (per-connection timeout 1 s).
    pub fn tcp_spread(&self, pod: &Pod, target: SocketAddr, count: u64) -> Result<TcpSpread> {
        let t = target.to_string();
        let c = count.to_string();
        self.labtool_json(
            pod,
            &[
                "tcp-spread",
                "--target",
                &t,
                "--count",
                &c,
                "--timeout-ms",
                "1000",
            ],
            Duration::from_secs(10 + 3 * count),
        )
    }

    /// `kpr-labtool udp-spread` from `pod` (per-request timeout 500 ms).
    pub fn udp_spread(
        &self,
        pod: &Pod,
        target: SocketAddr,
        count: u64,
        mode: crate::tool::UdpMode,
    ) -> Result<UdpSpread> {
        let t = target.to_string();
        let c = count.to_string();
        let mut args = vec![
            "udp-spread",
            "--target",
            &t,
            "--count",
            &c,
            "--timeout-ms",
            "500",
        ];
        match mode {
            crate::tool::UdpMode::SocketPerRequest => {}
            crate::tool::UdpMode::OneSocket => args.push("--one-socket"),
            crate::tool::UdpMode::Connected => args.push("--connected"),
        }
        self.labtool_json(pod, &args, Duration::from_secs(10 + count))
    }

    /// `kpr-labtool bench-connect` from `pod`.
    pub fn bench_connect(
        &self,
        pod: &Pod,
        target: SocketAddr,
        duration: Duration,
        concurrency: usize,
    ) -> Result<BenchConnect> {
        let t = target.to_string();
        let d = duration.as_millis().to_string();
        let c = concurrency.to_string();
        self.labtool_json(
            pod,
            &[
                "bench-connect",
                "--target",
                &t,
                "--duration-ms",
                &d,
                "--concurrency",
                &c,
            ],
            duration + Duration::from_secs(15),
        )
    }

    /// `kpr-labtool connect-once` from `pod`.
    pub fn connect_once(
        &self,
        pod: &Pod,
        target: SocketAddr,
        timeout: Duration,
    ) -> Result<ConnectOnce> {
        let t = target.to_string();
        let ms = timeout.as_millis().to_string();
        self.labtool_json(
            pod,
            &["connect-once", "--target", &t, "--timeout-ms", &ms],
            timeout * 3 + Duration::from_secs(5),
        )
    }

    /// Tears the lab down now, returning the problems met (Drop does the same, logging them).
    pub fn down(mut self) -> Result<()> {
        let errors = self.teardown_now();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(LabError::Other(format!(
                "tearing down {}: {}",
                self.state.prefix,
                errors.join("; ")
            )))
        }
    }

    fn teardown_now(&mut self) -> Vec<String> {
        if !self.owned {
            return Vec::new();
        }
        self.owned = false;
        // Kill our own servers first and reap them (no zombies left in the cgroup).
        for g in &mut self.servers {
            let _ = g.signal(nix::sys::signal::Signal::SIGKILL);
        }
        self.servers.clear();
        teardown(&self.state.prefix, Some(&self.state))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for e in self.teardown_now() {
            eprintln!("kpr-lab: cleanup of {}: {e}", self.state.prefix);
        }
    }
}

fn plan_pods(prefix: &str, backends: usize, clients: usize) -> Result<Vec<Pod>> {
    if backends + clients == 0 || backends > 200 || clients > 200 {
        return Err(LabError::Other(format!(
            "bad pod counts: {backends} backends, {clients} clients"
        )));
    }
    // Backends at .11.., clients at .21.. (or right after the backends if there are more
    // than ten of them).
    let client_base = if backends <= 10 { 21 } else { 11 + backends };
    if client_base + clients > 255 {
        return Err(LabError::Other("too many pods for one /24".into()));
    }
    let mut pods = Vec::new();
    for (role, n, base, tag) in [
        (PodRole::Backend, backends, 11, "be"),
        (PodRole::Client, clients, client_base, "cl"),
    ] {
        for i in 0..n {
            let host = (base + i) as u8;
            let name = format!("{tag}{}", i + 1);
            pods.push(Pod {
                ns: format!("{prefix}-{name}"),
                name,
                ip: Ipv4Addr::new(10, 244, NODE_INDEX, host),
                role,
                node_dev: format!("vp{host}"),
            });
        }
    }
    Ok(pods)
}

const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

fn probe_tcp(pod: &Pod, port: u16) -> bool {
    let a = SocketAddr::from((pod.ip, port));
    let Ok(mut s) = TcpStream::connect_timeout(&a, PROBE_TIMEOUT) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
    let mut buf = [0u8; 64];
    s.write_all(b"x").is_ok()
        && s.read(&mut buf).is_ok_and(|n| {
            crate::tool::split_answer(String::from_utf8_lossy(&buf[..n]).trim()).0 == pod.name
        })
}

fn probe_udp(pod: &Pod, port: u16) -> bool {
    let Ok(s) = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 64];
    s.send_to(b"x", (pod.ip, port)).is_ok()
        && s.recv_from(&mut buf).is_ok_and(|(n, _)| {
            crate::tool::split_answer(String::from_utf8_lossy(&buf[..n]).trim()).0 == pod.name
        })
}

fn join_ports(p: &[u16]) -> String {
    p.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// `ip [-n NS] -batch -` with the given commands.
fn ip_batch(ns: Option<&str>, commands: &str) -> Result<()> {
    if commands.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"]);
    let what = format!("{} <<< {:?}", describe(&cmd), commands);
    check(
        &what,
        run_bounded(cmd, Some(commands.as_bytes()), Duration::from_secs(30))?,
    )?;
    Ok(())
}

/// One ping from `ns` to `dst`, retried (the first may wait for neighbour resolution).
fn ping(ns: &str, dst: Ipv4Addr) -> Result<()> {
    let dst_s = dst.to_string();
    let mut last = None;
    for _ in 0..3 {
        match netns_exec(ns, &["ping", "-n", "-q", "-c", "1", "-W", "1", &dst_s]) {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(LabError::Other(format!(
        "no connectivity from {ns} to {dst}: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan() {
        let p = plan_pods("kl-t-1-0", 3, 2).unwrap();
        assert_eq!(p.len(), 5);
        assert_eq!(p[0].name, "be1");
        assert_eq!(p[0].ns, "kl-t-1-0-be1");
        assert_eq!(p[0].ip, Ipv4Addr::new(10, 244, 1, 11));
        assert_eq!(p[0].node_dev, "vp11");
        assert_eq!(p[3].name, "cl1");
        assert_eq!(p[3].ip, Ipv4Addr::new(10, 244, 1, 21));
        let p = plan_pods("kl-t-1-0", 12, 1).unwrap();
        assert_eq!(p[12].ip, Ipv4Addr::new(10, 244, 1, 23));
        assert!(plan_pods("kl-t-1-0", 0, 0).is_err());
    }

    #[test]
    fn unique() {
        let a = Lab::unique_prefix("x-y");
        let b = Lab::unique_prefix("x-y");
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("kl-xy-{}-", std::process::id())));
        validate_prefix(&a).unwrap();
    }
}
