//! `cargo xtask demo`: a lab cluster with kpr serving real ClusterIP traffic.
//!
//! Starts a one-node lab (three backend pods running TCP and UDP echo servers, one client
//! pod), runs kpr on the manifests shipped in examples/manifests, sends real requests through
//! the ClusterIP and shows which backend answered; then edits the EndpointSlice in the manifest
//! directory and shows the new distribution. The lab is removed at the end, also on failure.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use kpr_lab::kpr::Kpr;
use kpr_lab::tool::UdpMode;
use kpr_lab::{Lab, LabSpec};

use crate::{build, setup};

const VIP_TCP: &str = "10.96.0.10:80";
const VIP_UDP: &str = "10.96.0.10:53";
const REQUESTS: u64 = 300;

pub fn run() -> Result<()> {
    setup::run(&setup::SetupOptions { quiet: false })?;
    println!("==> building kpr and the lab tool (release)");
    let bins = build::binaries(true)?;
    kpr_lab::cleanup_stale()?;

    println!("==> starting the lab");
    let lab = Lab::up(LabSpec {
        prefix: Lab::unique_prefix("demo"),
        labtool: Some(bins.labtool.clone()),
        ..LabSpec::default()
    })?;
    println!("    node namespace {}", lab.node_ns());
    for pod in lab.pods() {
        println!(
            "    pod {:<4} {:<14} (namespace {})",
            pod.name, pod.ip, pod.ns
        );
    }
    println!(
        "    cgroup v2 directory for the pods: {}",
        lab.cgroup_dir().display()
    );

    let manifests = lab.work_dir().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let shipped = build::root().join("examples/manifests/demo.yaml");
    let demo_yaml = std::fs::read_to_string(&shipped)
        .with_context(|| format!("reading {}", shipped.display()))?;
    write_atomically(&manifests.join("demo.yaml"), &demo_yaml)?;

    println!("==> starting kpr on {}", shipped.display());
    let mut kpr = Kpr::start(&lab, &bins.kpr, &manifests, "kpr", &[])?;
    let status = kpr.status().unwrap_or_default();
    println!(
        "    kpr programmed the Service in {:.1} ms ({:.0} ms after start)",
        status.last_sync_duration_ms,
        status.first_sync_after_start_ms.unwrap_or_default()
    );

    let client = lab.clients()[0].clone();
    let vip_tcp: SocketAddr = VIP_TCP.parse()?;
    let vip_udp: SocketAddr = VIP_UDP.parse()?;

    println!(
        "\n==> {REQUESTS} TCP connections from {} to demo/echo at {VIP_TCP}",
        client.name
    );
    let tcp = lab.tcp_spread(&client, vip_tcp, REQUESTS)?;
    print_table(&tcp.counts, tcp.errors);
    println!(
        "    getpeername() in the client: {:?}",
        tcp.peers.keys().collect::<Vec<_>>()
    );
    ensure!(
        tcp.errors == 0,
        "TCP requests failed: {:?}",
        tcp.error_kinds
    );

    println!("\n==> {REQUESTS} UDP requests to {VIP_UDP}, each from a new unconnected socket");
    let udp = lab.udp_spread(&client, vip_udp, REQUESTS, UdpMode::SocketPerRequest)?;
    print_table(&udp.counts, udp.errors);
    println!(
        "    replies came from: {:?}",
        udp.sources.keys().collect::<Vec<_>>()
    );

    println!(
        "\n==> removing be3 from the EndpointSlice in {}",
        manifests.display()
    );
    let before = kpr.status().map(|s| s.syncs).unwrap_or(0);
    let t0 = Instant::now();
    write_atomically(
        &manifests.join("demo.yaml"),
        &without_endpoint(&demo_yaml, "10.244.1.13"),
    )?;
    kpr.wait_for_syncs(before + 1, Duration::from_secs(5))?;
    println!(
        "    kpr applied the change {} ms after the file was written",
        t0.elapsed().as_millis()
    );
    let tcp = lab.tcp_spread(&client, vip_tcp, REQUESTS)?;
    print_table(&tcp.counts, tcp.errors);
    ensure!(
        !tcp.counts.contains_key("be3"),
        "be3 still answered after it was removed"
    );

    println!("\n==> removing every endpoint: the ClusterIP now refuses connections at once");
    let before = kpr.status().map(|s| s.syncs).unwrap_or(0);
    let empty = ["10.244.1.11", "10.244.1.12", "10.244.1.13"]
        .iter()
        .fold(demo_yaml.clone(), |y, ip| without_endpoint(&y, ip))
        .replace("endpoints:\n", "endpoints: []\n");
    write_atomically(&manifests.join("demo.yaml"), &empty)?;
    kpr.wait_for_syncs(before + 1, Duration::from_secs(5))?;
    let once = lab.connect_once(&client, vip_tcp, Duration::from_secs(1))?;
    println!(
        "    connect(): {} after {} µs",
        once.error.as_deref().unwrap_or("connected"),
        once.elapsed_us
    );

    if let Some(s) = kpr.status() {
        println!("\n==> kpr's datapath counters");
        for (name, value) in &s.counters {
            println!("    {name:<22} {value}");
        }
    }

    println!("\n==> cleaning up");
    drop(kpr);
    lab.down()?;
    println!("demo done: the lab is removed");
    Ok(())
}

fn print_table(counts: &BTreeMap<String, u64>, errors: u64) {
    let total: u64 = counts.values().sum::<u64>() + errors;
    println!("    | backend | answers | share |");
    println!("    |---------|---------|-------|");
    for (name, n) in counts {
        println!(
            "    | {name:<7} | {n:>7} | {:>4.0}% |",
            100.0 * *n as f64 / total.max(1) as f64
        );
    }
    if errors > 0 {
        println!("    | errors  | {errors:>7} |       |");
    }
}

/// The shipped manifest without the endpoint entry for `ip` (three lines: addresses,
/// conditions, targetRef).
pub fn without_endpoint(yaml: &str, ip: &str) -> String {
    let mut out = Vec::new();
    let mut skip = 0;
    for line in yaml.lines() {
        if line.trim_start().starts_with("- addresses:") && line.contains(ip) {
            skip = 3;
        }
        if skip > 0 {
            skip -= 1;
            continue;
        }
        out.push(line);
    }
    out.join("\n") + "\n"
}

/// Writes a file the way kubectl or a ConfigMap volume would replace it: never half-written.
pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("yaml.tmp~");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
