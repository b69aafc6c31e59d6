//! kpr's container image (`cargo xtask image`) with a real OCI runtime: umoci unpacks it, crun
//! runs it. First `kpr --version`; then the agent itself, inside a lab node's network
//! namespace with the host mounts kpr's DaemonSet gives it (bpffs, the cgroup v2 directory,
//! the manifests), serving a ClusterIP to a lab pod.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kpr_lab::container::{image_layout, image_tag, Container, BINARY_IN_IMAGE};
use kpr_lab::kpr::KprStatus;
use kpr_lab::{Lab, LabSpec};

#[track_caller]
fn require(test: &str) {
    kpr_lab::require_lab(test);
    kpr_lab::preconditions::require(test, &["umoci", "crun"]);
}

#[test]
fn the_image_runs_kpr_version() {
    require("image_version");
    let layout = image_layout();
    let dir = tempfile::tempdir().unwrap();
    let id = format!("kpr-version-{}", std::process::id());
    let mut c = Container::unpack(&layout, dir.path(), &id).unwrap();
    // Nothing but the agent and the libraries it links: no shell, no package manager.
    let rootfs = c.bundle().join("rootfs");
    for absent in ["bin/sh", "usr/bin/apt", "usr/bin/dpkg"] {
        assert!(!rootfs.join(absent).exists(), "{absent} is in the image");
    }
    c.set_args(&[BINARY_IN_IMAGE, "--version"]).unwrap();
    let out = c.run(Duration::from_secs(30)).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}: {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let version = image_tag();
    assert!(
        stdout.contains(version.trim_start_matches('v')),
        "{stdout:?} does not name {version}"
    );
}

const MANIFEST: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: demo}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: demo\n  labels: {kubernetes.io/service-name: echo}\naddressType: IPv4\nports: [{name: http, protocol: TCP, port: 8080}]\nendpoints:\n  - {addresses: [10.244.1.11], conditions: {ready: true}}\n  - {addresses: [10.244.1.12], conditions: {ready: true}}\n  - {addresses: [10.244.1.13], conditions: {ready: true}}\n";

#[test]
fn the_image_serves_a_clusterip_in_a_lab_node() {
    let lab = serve_a_clusterip_from_the_image("image_agent", "img", &[]);
    // The eBPF mode's FORWARD accept, written with the image's own iptables.
    let rules = lab
        .exec_in_node(&["iptables-save", "-t", "filter"], None)
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        rules.contains("-A FORWARD -m comment --comment \"kpr forwarding rules\" -j KPR-FORWARD"),
        "{rules}"
    );
}

#[test]
fn the_image_runs_the_iptables_mode() {
    let lab =
        serve_a_clusterip_from_the_image("image_iptables", "imgipt", &["--proxy-mode", "iptables"]);
    let rules = lab
        .exec_in_node(&["iptables-save", "-t", "nat"], None)
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(rules.contains("-d 10.96.0.10/32"), "{rules}");
}

/// Runs the image's agent (with `extra` flags) in a lab node as the DaemonSet would, and checks
/// that a pod reaches all three backends through the ClusterIP. Returns the lab, for more
/// checks.
fn serve_a_clusterip_from_the_image(test: &str, tag: &str, extra: &[&str]) -> Lab {
    require(test);
    let layout = image_layout();
    let lab = Lab::up(LabSpec {
        prefix: Lab::unique_prefix(tag),
        ..LabSpec::default()
    })
    .expect("lab up");
    let dir = lab.manifest_dir().unwrap();
    std::fs::write(dir.join("all.yaml"), MANIFEST).unwrap();
    let work = lab.work_dir().to_path_buf();
    let id = format!("{}-kpr", lab.prefix());
    let mut c = Container::unpack(&layout, &work.join("container"), &id).unwrap();
    c.set_privileged().unwrap();
    c.set_netns(&std::path::Path::new("/var/run/netns").join(lab.node_ns()))
        .unwrap();
    // The DaemonSet's hostPath volumes, here the lab node's own.
    c.bind(lab.bpffs_dir(), "/sys/fs/bpf").unwrap();
    c.bind(lab.cgroup_dir(), "/run/kpr/cgroup").unwrap();
    c.bind(&dir, "/manifests").unwrap();
    c.bind(&work, "/work").unwrap();
    let mut args = vec![
        BINARY_IN_IMAGE,
        "--manifests",
        "/manifests",
        "--bpf-pin-dir",
        "/sys/fs/bpf/kpr",
        "--cgroup-path",
        "/run/kpr/cgroup",
        "--status-file",
        "/work/container-status.json",
        "--healthz-bind-address",
        "127.0.0.1:10256",
    ];
    args.extend(extra);
    c.set_args(&args).unwrap();
    let log = work.join("container.log");
    c.start_detached(&log).unwrap();

    let status_file = work.join("container-status.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status: Option<KprStatus> = std::fs::read(&status_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if status.is_some_and(|s| s.frontends.contains_key("10.96.0.10:80/tcp")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the containerised agent did not program the Service in 30 s:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let client = lab.clients()[0].clone();
    let target: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let r = lab.tcp_spread(&client, target, 60).unwrap();
    assert_eq!(
        r.errors,
        0,
        "{r:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(r.counts.len(), 3, "{r:?}");
    drop(c);
    lab
}
