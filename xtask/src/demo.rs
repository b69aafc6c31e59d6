//! `cargo xtask demo`: a lab cluster with kpr serving real traffic.
//!
//! Starts a two-node lab (three backend pods running TCP and UDP echo servers, a client pod, an
//! external client outside the cluster), runs one kpr per node on the manifests shipped in
//! examples/manifests, and shows which backend answered: through the ClusterIP from a pod (TCP,
//! UDP), and through each node's NodePort from the external client. Then it edits the
//! EndpointSlice in the manifest directory and shows the new distribution, and the refusal once
//! no endpoint is left. The lab is removed at the end, also on failure.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use kpr_lab::kpr::Kpr;
use kpr_lab::tool::UdpMode;
use kpr_lab::Lab;

use crate::{build, lab, setup};

const VIP_TCP: &str = "10.96.0.10:80";
const VIP_UDP: &str = "10.96.0.10:53";
const REQUESTS: u64 = 300;

pub fn run() -> Result<()> {
    setup::run(&setup::SetupOptions { quiet: false })?;
    println!("==> building kpr and the lab tool (release)");
    let bins = build::binaries(true)?;
    kpr_lab::cleanup_stale()?;

    println!(
        "==> starting the lab: two nodes, three backend pods, a client pod, an external client"
    );
    let mut spec = lab::spec(2, bins.labtool.clone());
    spec.prefix = Lab::unique_prefix("demo");
    let lab = Lab::up(spec)?;
    for node in lab.nodes() {
        println!(
            "    {} {:<15} (namespace {})",
            node.name, node.fabric_ip, node.ns
        );
    }
    for pod in lab.pods() {
        println!(
            "    pod {:<4} {:<14} on node{} (namespace {})",
            pod.name, pod.ip, pod.node, pod.ns
        );
    }
    let ext = lab.external_client().context("external client")?.clone();
    println!("    external client {} (namespace {})", ext.ip, ext.ns);

    let manifests = lab.work_dir().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let shipped = build::root().join("examples/manifests/demo.yaml");
    let text = std::fs::read_to_string(&shipped)
        .with_context(|| format!("reading {}", shipped.display()))?;
    let demo_yaml = lab::demo_manifest(&lab, &text);
    write_atomically(&manifests.join("demo.yaml"), &demo_yaml)?;
    write_atomically(&manifests.join("nodes.yaml"), &lab::nodes_manifest(&lab))?;

    println!("==> starting kpr on each node, on {}", shipped.display());
    let mut kprs = Vec::new();
    for node in lab.nodes() {
        let args = [
            "--manifests".as_ref(),
            manifests.as_os_str(),
            "--hostname-override".as_ref(),
            std::ffi::OsStr::new(&node.name),
        ];
        let kpr = Kpr::start_on(&lab, node.index, &bins.kpr, "kpr", &args)?;
        let status = kpr.status().unwrap_or_default();
        println!(
            "    {}: programmed in {:.1} ms ({:.0} ms after start)",
            node.name,
            status.last_sync_duration_ms,
            status.first_sync_after_start_ms.unwrap_or_default()
        );
        kprs.push(kpr);
    }

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

    for node in lab.nodes() {
        let target = SocketAddr::new(node.fabric_ip.into(), 30080);
        println!(
            "\n==> {REQUESTS} TCP connections from the external client to {}'s NodePort {target}",
            node.name
        );
        let np = lab.tcp_spread(&ext, target, REQUESTS)?;
        print_table(&np.counts, np.errors);
        println!(
            "    the backends saw the client as {:?} (externalTrafficPolicy: Cluster masquerades)",
            np.clients.keys().collect::<Vec<_>>()
        );
        ensure!(
            np.errors == 0,
            "NodePort requests failed: {:?}",
            np.error_kinds
        );
    }

    let be3 = lab.pod("be3").context("be3")?.ip.to_string();
    println!(
        "\n==> removing be3 from the EndpointSlice in {}",
        manifests.display()
    );
    let t0 = Instant::now();
    apply(&mut kprs, || {
        write_atomically(
            &manifests.join("demo.yaml"),
            &without_endpoint(&demo_yaml, &be3),
        )
    })?;
    println!(
        "    every node's kpr applied the change {} ms after the file was written",
        t0.elapsed().as_millis()
    );
    let tcp = lab.tcp_spread(&client, vip_tcp, REQUESTS)?;
    print_table(&tcp.counts, tcp.errors);
    ensure!(
        !tcp.counts.contains_key("be3"),
        "be3 still answered after it was removed"
    );

    println!("\n==> removing every endpoint: the Service now refuses connections at once");
    let empty = lab
        .backends()
        .iter()
        .fold(demo_yaml.clone(), |y, b| {
            without_endpoint(&y, &b.ip.to_string())
        })
        .replace("endpoints:\n", "endpoints: []\n");
    apply(&mut kprs, || {
        write_atomically(&manifests.join("demo.yaml"), &empty)
    })?;
    let once = lab.connect_once(&client, vip_tcp, Duration::from_secs(1))?;
    println!(
        "    connect() from {} to the ClusterIP: {} after {} µs",
        client.name,
        once.error.as_deref().unwrap_or("connected"),
        once.elapsed_us
    );
    let target = SocketAddr::new(lab.nodes()[0].fabric_ip.into(), 30080);
    let once = lab.connect_once(&ext, target, Duration::from_secs(1))?;
    println!(
        "    connect() from the external client to the NodePort {target}: {} after {} µs",
        once.error.as_deref().unwrap_or("connected"),
        once.elapsed_us
    );

    // The status file refreshes the counters every second.
    std::thread::sleep(Duration::from_millis(1100));
    if let Some(s) = kprs[0].status() {
        println!("\n==> node1 kpr's datapath counters (non-zero)");
        for (name, value) in s.counters.iter().filter(|(_, v)| **v > 0) {
            println!("    {name:<22} {value}");
        }
    }

    println!("\n==> cleaning up");
    drop(kprs);
    lab.down()?;
    println!("demo done: the lab is removed");
    Ok(())
}

/// Runs `change`, then waits until every node's kpr has applied it.
fn apply(kprs: &mut [Kpr], change: impl FnOnce() -> Result<()>) -> Result<()> {
    let before: Vec<u64> = kprs
        .iter()
        .map(|k| k.status().map(|s| s.syncs).unwrap_or(0))
        .collect();
    change()?;
    for (kpr, n) in kprs.iter_mut().zip(before) {
        kpr.wait_for_syncs(n + 1, Duration::from_secs(5))?;
    }
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
