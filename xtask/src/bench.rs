//! `cargo xtask bench`: new-connection rate and latency through a ClusterIP, as ratios to the
//! direct path measured in the same run.
//!
//! For each N (number of Services), in one lab:
//! (a) direct: client pod → backend pod IP, no service rules at all;
//! (b) kpr: client pod → ClusterIP, kpr programmed with N Services;
//! (c) kube-proxy: client pod → ClusterIP through kube-proxy's iptables rules for the same N
//!     Services (rendered by `kpr render-iptables` in kube-proxy's exact shape, the measured
//!     Service last in KUBE-SERVICES), loaded with iptables-restore in the node namespace;
//! (d) direct again while (c)'s rules are loaded: plain pod-to-pod traffic pays for them too.
//! A transaction is connect, 1-byte request, response, close with RST (so TIME_WAIT does not
//! cap the rate); latency is per transaction. Also: time to program N Services.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use kpr_lab::kpr::Kpr;
use kpr_lab::tool::BenchConnect;
use kpr_lab::{Lab, LabSpec};
use serde_json::json;

use crate::{build, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Numbers of Services to measure at.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000")]
    services: Vec<usize>,
    /// Length of each run of a measurement (each is run three times; the median is kept).
    #[arg(long, default_value_t = 2000)]
    duration_ms: u64,
    /// Number of Services for the NodePort measurement (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    nodeport_services: usize,
}

const VIP: &str = "10.96.0.10:80";
const TARGET_SERVICE: &str = "bench/target";
const EMPTY_TABLES: &str = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n\
*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n";

struct Row {
    services: usize,
    path: &'static str,
    result: BenchConnect,
    program_ms: Option<f64>,
    note: String,
}

pub fn run(args: Args) -> Result<()> {
    if args.services.iter().any(|n| *n == 0 || *n > 200_000) {
        bail!("--services: each N must be in 1..=200000");
    }
    setup::run(&setup::SetupOptions { quiet: false })?;
    println!("==> building kpr and the lab tool (release)");
    let bins = build::binaries(true)?;
    kpr_lab::cleanup_stale()?;
    let lab = Lab::up(LabSpec {
        prefix: Lab::unique_prefix("bench"),
        labtool: Some(bins.labtool.clone()),
        ..LabSpec::default()
    })?;
    let client = lab.clients()[0].clone();
    let direct: SocketAddr = SocketAddr::new(lab.backends()[0].ip.into(), 8080);
    let vip: SocketAddr = VIP.parse()?;
    let duration = Duration::from_millis(args.duration_ms);
    let measure = |target: SocketAddr| median_of_runs(&lab, &client, target, duration);

    let mut rows = Vec::new();
    for &n in &args.services {
        println!("==> N = {n} services");
        let dir = lab.work_dir().join(format!("bench-{n}"));
        std::fs::create_dir_all(&dir)?;
        let backends: Vec<String> = lab.backends().iter().map(|b| b.ip.to_string()).collect();
        std::fs::write(dir.join("services.yaml"), manifests(n, &backends))?;

        // (a) direct, nothing loaded.
        let a = measure(direct)?;
        println!("    direct            {:>9.0} conn/s", a.per_sec);
        rows.push(Row {
            services: n,
            path: "direct pod IP",
            result: a,
            program_ms: None,
            note: String::new(),
        });

        // (b) kpr.
        let kpr = Kpr::start(&lab, &bins.kpr, &dir, &format!("kpr-{n}"), &[])?;
        let status = kpr.status().unwrap_or_default();
        let rss = rss_kib(kpr.pid());
        let b = measure(vip)?;
        println!("    kpr               {:>9.0} conn/s", b.per_sec);
        let log = kpr.stop();
        if b.errors > 0 {
            eprintln!("kpr log:\n{log}");
        }
        rows.push(Row {
            services: n,
            path: "ClusterIP via kpr",
            result: b,
            program_ms: Some(status.last_sync_duration_ms),
            note: format!(
                "maps programmed in {:.1} ms; {:.0} ms from start (incl. reading YAML); agent RSS {} MiB",
                status.last_sync_duration_ms,
                status.first_sync_after_start_ms.unwrap_or_default(),
                rss.map(|k| format!("{:.1}", k as f64 / 1024.0)).unwrap_or_else(|| "?".into())
            ),
        });

        // (c) kube-proxy's iptables rules for the same services.
        let rules = render_iptables(&bins.kpr, &dir, &["--last", TARGET_SERVICE])?;
        let rule_count = rules.lines().filter(|l| l.starts_with("-A ")).count();
        let t0 = Instant::now();
        lab.exec_in_node(&["iptables-restore"], Some(rules.as_bytes()))
            .context("loading kube-proxy's rules with iptables-restore")?;
        let restore_ms = t0.elapsed().as_secs_f64() * 1e3;
        let c = measure(vip);
        // (d) direct while the rules are loaded.
        let d = measure(direct);
        lab.exec_in_node(&["iptables-restore"], Some(EMPTY_TABLES.as_bytes()))
            .context("flushing the node's tables")?;
        let (c, d) = (c?, d?);
        println!("    kube-proxy rules  {:>9.0} conn/s ({rule_count} rules, restored in {restore_ms:.0} ms)", c.per_sec);
        rows.push(Row {
            services: n,
            path: "ClusterIP via kube-proxy iptables",
            result: c,
            program_ms: Some(restore_ms),
            note: format!("{rule_count} rules; iptables-restore {restore_ms:.0} ms"),
        });
        rows.push(Row {
            services: n,
            path: "direct pod IP, kube-proxy rules loaded",
            result: d,
            program_ms: None,
            note: String::new(),
        });
    }
    drop(lab);
    if args.nodeport_services > 0 {
        rows.extend(nodeport_rows(&bins, args.nodeport_services, duration)?);
    }

    let table = render_table(&rows);
    println!("\n{table}");
    let out_dir = build::root().join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let json = json!({
        "kind": "clusterip-connect",
        "unix_time": stamp,
        "duration_ms": args.duration_ms,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "rows": rows.iter().map(|r| json!({
            "services": r.services,
            "path": r.path,
            "per_sec": r.result.per_sec,
            "connections": r.result.connections,
            "errors": r.result.errors,
            "p50_us": r.result.p50_us,
            "p99_us": r.result.p99_us,
            "ratio_per_sec": ratio(r, &rows, |b| b.per_sec),
            "ratio_p50": ratio(r, &rows, |b| b.p50_us),
            "ratio_p99": ratio(r, &rows, |b| b.p99_us),
            "program_ms": r.program_ms,
            "note": r.note,
        })).collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&json)?;
    let file = out_dir.join(format!("clusterip-{stamp}.json"));
    std::fs::write(&file, &text)?;
    std::fs::write(out_dir.join("clusterip-latest.json"), &text)?;
    std::fs::write(out_dir.join("clusterip-latest.md"), &table)?;
    println!("results: {}", file.display());
    Ok(())
}

/// Runs of each measurement; the run with the median rate is reported, so one noisy run
/// (another process on the machine, a CPU frequency change) does not decide a ratio.
const RUNS: usize = 3;

fn median_of_runs(
    lab: &Lab,
    from: &kpr_lab::Pod,
    target: SocketAddr,
    duration: Duration,
) -> Result<BenchConnect> {
    let mut runs = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let r = lab.bench_connect(from, target, duration, 1)?;
        if r.connections == 0 {
            bail!("no transaction completed to {target}: {:?}", r.error_kinds);
        }
        runs.push(r);
    }
    runs.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
    Ok(runs.swap_remove(RUNS / 2))
}

/// `r`'s figure over its direct path's figure (same N, same client) in this run.
fn ratio(r: &Row, rows: &[Row], f: impl Fn(&BenchConnect) -> f64) -> f64 {
    let direct = if r.path.starts_with("external") {
        EXT_DIRECT
    } else {
        "direct pod IP"
    };
    rows.iter()
        .find(|d| d.services == r.services && d.path == direct)
        .map(|d| f(&r.result) / f(&d.result))
        .unwrap_or(f64::NAN)
}

const EXT_DIRECT: &str = "external client → pod IP via the node";
const NODE_IP: &str = "192.168.100.11";

/// External client → NodePort with a local backend, among `n` Services: kpr's tc programs
/// against kube-proxy's iptables rules, as ratios to the external client → pod IP path
/// routed through the same node with no rules.
fn nodeport_rows(bins: &build::Bins, n: usize, duration: Duration) -> Result<Vec<Row>> {
    println!("==> NodePort, N = {n} services, external client");
    let lab = Lab::up(LabSpec {
        prefix: Lab::unique_prefix("benchnp"),
        labtool: Some(bins.labtool.clone()),
        external_client: true,
        ..LabSpec::default()
    })?;
    let ext = lab.external_client().expect("external client").clone();
    let be1 = lab.backends()[0].ip;
    let measure = |target: SocketAddr| median_of_runs(&lab, &ext, target, duration);
    let dir = lab.work_dir().join("bench-nodeport");
    std::fs::create_dir_all(&dir)?;
    let mut yaml = manifests(n.saturating_sub(1).max(1), &[]);
    // The measured Service: a NodePort whose one endpoint is on this node.
    yaml += &format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: np, namespace: bench}}\n\
         spec:\n  type: NodePort\n  clusterIP: 10.96.0.20\n  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30080}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: np-x\n  namespace: bench\n  labels: {{kubernetes.io/service-name: np}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n  - {{addresses: [{be1}], nodeName: node1}}\n---\n\
         apiVersion: v1\nkind: Node\nmetadata: {{name: node1}}\nstatus:\n  addresses: [{{type: InternalIP, address: {NODE_IP}}}]\n"
    );
    std::fs::write(dir.join("services.yaml"), yaml)?;
    let nodeport: SocketAddr = format!("{NODE_IP}:30080").parse()?;
    let mut rows = Vec::new();

    let a = measure(SocketAddr::new(be1.into(), 8080))?;
    println!("    direct            {:>9.0} conn/s", a.per_sec);
    rows.push(Row {
        services: n,
        path: EXT_DIRECT,
        result: a,
        program_ms: None,
        note: String::new(),
    });

    let dir_s = dir.to_str().context("path")?;
    let args = [
        "--manifests",
        dir_s,
        "--hostname-override",
        "node1",
        "--devices",
        "eth0",
    ];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    let kpr = Kpr::start_with(&lab, &bins.kpr, "kpr-np", &args)?;
    let b = measure(nodeport);
    let log = kpr.stop();
    let b = b.with_context(|| format!("NodePort through kpr; kpr log:\n{log}"))?;
    println!("    kpr               {:>9.0} conn/s", b.per_sec);
    rows.push(Row {
        services: n,
        path: "external client → NodePort via kpr (tc)",
        result: b,
        program_ms: None,
        note: String::new(),
    });

    let rules = render_iptables(&bins.kpr, &dir, &["--node", "node1"])?;
    lab.exec_in_node(&["iptables-restore"], Some(rules.as_bytes()))?;
    let c = measure(nodeport);
    lab.exec_in_node(&["iptables-restore"], Some(EMPTY_TABLES.as_bytes()))?;
    let c = c?;
    println!("    kube-proxy rules  {:>9.0} conn/s", c.per_sec);
    rows.push(Row {
        services: n,
        path: "external client → NodePort via kube-proxy iptables",
        result: c,
        program_ms: None,
        note: String::new(),
    });
    Ok(rows)
}

fn render_table(rows: &[Row]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| services | path | conn/s | ratio | p50 µs (ratio) | p99 µs (ratio) | notes |"
    );
    let _ = writeln!(t, "|---:|---|---:|---:|---:|---:|---|");
    for r in rows {
        let _ = writeln!(
            t,
            "| {} | {} | {:.0} | {:.2} | {:.0} ({:.2}) | {:.0} ({:.2}) | {} |",
            r.services,
            r.path,
            r.result.per_sec,
            ratio(r, rows, |b| b.per_sec),
            r.result.p50_us,
            ratio(r, rows, |b| b.p50_us),
            r.result.p99_us,
            ratio(r, rows, |b| b.p99_us),
            r.note
        );
    }
    t
}

/// N Services: N-1 fillers, each with one endpoint that no pod has (they exist only as rules
/// and map entries), then the measured Service backed by the lab's backends.
pub fn manifests(n: usize, backends: &[String]) -> String {
    let mut y = String::with_capacity(n * 700);
    for i in 0..n.saturating_sub(1) {
        let (hi, lo) = (i / 250, i % 250 + 1);
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n\
             spec:\n  clusterIP: 10.100.{hi}.{lo}\n  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-x\n  namespace: bench\n  labels: {{kubernetes.io/service-name: svc-{i}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n  - addresses: [10.245.{hi}.{lo}]\n---\n"
        );
    }
    let (vip_ip, vip_port) = VIP.split_once(':').unwrap_or(("10.96.0.10", "80"));
    let (ns, name) = TARGET_SERVICE
        .split_once('/')
        .unwrap_or(("bench", "target"));
    let _ = write!(
        y,
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  clusterIP: {vip_ip}\n  ports: [{{name: http, port: {vip_port}, protocol: TCP, targetPort: 8080}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-x\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {name}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n"
    );
    for b in backends {
        let _ = writeln!(y, "  - addresses: [{b}]");
    }
    y
}

/// kube-proxy's iptables rules for the Services in `dir` (`kpr render-iptables`), with the lab's
/// cluster CIDR and `extra` options.
fn render_iptables(kpr: &Path, dir: &Path, extra: &[&str]) -> Result<String> {
    let out = Command::new(kpr)
        .arg("render-iptables")
        .arg("--manifests")
        .arg(dir)
        .args(["--cluster-cidr", "10.244.0.0/16"])
        .args(extra)
        .output()
        .context("running kpr render-iptables")?;
    if !out.status.success() {
        bail!(
            "kpr render-iptables failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
