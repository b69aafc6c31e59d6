//! `cargo xtask bench`: new-connection rate and latency through a ClusterIP, as ratios to the
//! direct path measured in the same run.
//!
//! For each N (number of Services), in one lab:
//! (a) direct: client pod → backend pod IP, no service rules at all;
//! (b) kpr, in each proxy mode (ebpf, iptables, nftables): client pod → ClusterIP, kpr
//!     programmed with N Services; then the time to program them, and the time to apply one
//!     endpoint change to the measured Service (a partial sync in the netfilter modes);
//! (c) kube-proxy: client pod → ClusterIP through kube-proxy's iptables rules for the same N
//!     Services (rendered by `kpr render-iptables` in kube-proxy's exact shape, the measured
//!     Service last in KUBE-SERVICES), loaded with iptables-restore in the node namespace;
//! (d) direct again while (c)'s rules are loaded: plain pod-to-pod traffic pays for them too;
//! (e) kube-proxy's nftables rules for the same N Services (`kpr render-nftables`), loaded
//!     with `nft -f` as kube-proxy's nftables mode loads them.
//! A transaction is connect, 1-byte request, response, close with RST (so TIME_WAIT does not
//! cap the rate); latency is per transaction.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use kpr_lab::kpr::{Kpr, KprStatus, ProxyMode};
use kpr_lab::tool::BenchConnect;
use kpr_lab::{Lab, LabSpec};
use serde_json::json;

use crate::{build, chart, setup};

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
    /// Number of IPv6 Services for the IPv6 ClusterIP and NodePort measurements (0 skips them).
    #[arg(long, default_value_t = 10_000)]
    ipv6_services: usize,
    /// kpr's proxy modes to measure (`none`: only the baselines).
    #[arg(long, value_delimiter = ',', default_value = "ebpf,iptables,nftables")]
    modes: Vec<String>,
    /// kube-proxy's rules to measure as baselines (`iptables`, `nftables`; `none`).
    #[arg(long, value_delimiter = ',', default_value = "iptables,nftables")]
    kube_proxy: Vec<String>,
    /// Bound on loading kube-proxy's rules (and on kpr's first sync): a path that takes
    /// longer is reported as not fitting, and the run goes on.
    #[arg(long, default_value_t = 600)]
    load_timeout_s: u64,
}

const VIP: &str = "10.96.0.10:80";
/// The measured Service's frontend as kpr's status names it.
const FRONTEND: &str = "10.96.0.10:80/tcp";
const CLUSTER_CIDR: &str = "10.244.0.0/16";
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
    let modes: Vec<ProxyMode> = ProxyMode::ALL
        .into_iter()
        .filter(|m| args.modes.iter().any(|a| a == m.name()))
        .collect();
    for a in &args.modes {
        if a != "none" && !ProxyMode::ALL.iter().any(|m| m.name() == a) {
            bail!("--modes: {a:?} is not one of ebpf, iptables, nftables, none");
        }
    }
    for a in &args.kube_proxy {
        if !["iptables", "nftables", "none"].contains(&a.as_str()) {
            bail!("--kube-proxy: {a:?} is not one of iptables, nftables, none");
        }
    }
    let baseline = |what: &str| args.kube_proxy.iter().any(|a| a == what);
    let load_timeout = Duration::from_secs(args.load_timeout_s);
    // Paths that did not fit the bounds, with why: reported with the table.
    let mut unmeasured: Vec<String> = Vec::new();
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
        // The measured Service in a file of its own, so that one endpoint change rewrites
        // only it.
        std::fs::write(dir.join("services.yaml"), fillers(n.saturating_sub(1)))?;
        std::fs::write(dir.join("target.yaml"), target(&backends))?;

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

        // (b) kpr, each mode.
        for &mode in &modes {
            let mut args = mode.args().to_vec();
            if mode.is_netfilter() {
                args.extend(["--cluster-cidr", CLUSTER_CIDR]);
            }
            let name = format!("kpr-{}-{n}", mode.name());
            let mut kpr = match Kpr::start_within(&lab, &bins.kpr, &dir, &name, &args, load_timeout)
            {
                Ok(kpr) => kpr,
                Err(kpr_lab::LabError::Timeout { timeout, .. }) => {
                    unmeasured.push(format!(
                        "{n} Services, kpr {}: not programmed within {timeout:?}",
                        mode.name()
                    ));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let programmed = kpr.status().unwrap_or_default();
            let rss = rss_kib(kpr.pid());
            let b = measure(vip);
            let change = b
                .is_ok()
                .then(|| one_endpoint_change(&mut kpr, &dir, &backends))
                .transpose();
            std::fs::write(dir.join("target.yaml"), target(&backends))?;
            let log = kpr.stop();
            let (b, change) = match (b, change) {
                (Ok(b), Ok(c)) => (b, c.unwrap_or_default()),
                (Err(e), _) | (_, Err(e)) => {
                    return Err(e.context(format!("kpr {} mode; log:\n{log}", mode.name())))
                }
            };
            println!(
                "    kpr {:<13} {:>9.0} conn/s; programmed in {:.0} ms; one endpoint change {}",
                mode.name(),
                b.per_sec,
                programmed.last_sync_duration_ms,
                change.summary()
            );
            rows.push(Row {
                services: n,
                path: match mode {
                    ProxyMode::Ebpf => "ClusterIP via kpr ebpf",
                    ProxyMode::Iptables => "ClusterIP via kpr iptables",
                    ProxyMode::Nftables => "ClusterIP via kpr nftables",
                    ProxyMode::Ipvs => "ClusterIP via kpr ipvs",
                },
                result: b,
                program_ms: Some(programmed.last_sync_duration_ms),
                note: format!(
                    "{}programmed in {:.1} ms ({:.0} ms from start, incl. reading YAML); one endpoint change: {}; agent RSS {} MiB",
                    mode_objects(&programmed),
                    programmed.last_sync_duration_ms,
                    programmed.first_sync_after_start_ms.unwrap_or_default(),
                    change.summary(),
                    rss.map(|k| format!("{:.1}", k as f64 / 1024.0)).unwrap_or_else(|| "?".into())
                ),
            });
        }

        // (c) kube-proxy's iptables rules for the same services.
        if baseline("iptables") {
            let rules = render(
                &bins.kpr,
                "render-iptables",
                &dir,
                &["--last", TARGET_SERVICE],
            )?;
            let rule_count = rules.lines().filter(|l| l.starts_with("-A ")).count();
            let t0 = Instant::now();
            if let Some(why) = load_bounded(&lab, &["iptables-restore"], &rules, load_timeout)
                .context("loading kube-proxy's rules with iptables-restore")?
            {
                lab.exec_in_node(&["iptables-restore"], Some(EMPTY_TABLES.as_bytes()))
                    .context("flushing the node's tables")?;
                unmeasured.push(format!(
                    "{n} Services, kube-proxy iptables ({rule_count} rules): {why}"
                ));
            } else {
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
        }

        // (e) kube-proxy's nftables rules for the same services.
        if baseline("nftables") {
            let ruleset = render(&bins.kpr, "render-nftables", &dir, &[])?;
            let lines = ruleset.lines().count();
            let t0 = Instant::now();
            if let Some(why) = load_bounded(&lab, &["nft", "-f", "-"], &ruleset, load_timeout)
                .context("loading kube-proxy's nftables rules with nft -f")?
            {
                // One transaction: a killed nft loaded nothing, but make sure.
                let _ = lab.exec_in_node(&["nft", "delete", "table", "ip", "kube-proxy"], None);
                unmeasured.push(format!(
                    "{n} Services, kube-proxy nftables ({lines} nft commands): {why}"
                ));
            } else {
                let load_ms = t0.elapsed().as_secs_f64() * 1e3;
                let e = measure(vip);
                lab.exec_in_node(&["nft", "delete", "table", "ip", "kube-proxy"], None)
                    .context("deleting kube-proxy's nftables table")?;
                let e = e?;
                println!(
            "    kube-proxy nft    {:>9.0} conn/s ({lines} nft commands, loaded in {load_ms:.0} ms)",
            e.per_sec
        );
                rows.push(Row {
                    services: n,
                    path: "ClusterIP via kube-proxy nftables",
                    result: e,
                    program_ms: Some(load_ms),
                    note: format!("{lines} nft commands; nft -f {load_ms:.0} ms"),
                });
            }
        }
    }
    drop(lab);
    if args.nodeport_services > 0 {
        rows.extend(nodeport_rows(&bins, args.nodeport_services, duration)?);
    }
    if args.ipv6_services > 0 {
        rows.extend(ipv6_rows(&bins, args.ipv6_services, duration)?);
    }

    let mut table = render_table(&rows);
    for u in &unmeasured {
        let _ = writeln!(table, "\nNot measured: {u}");
    }
    println!("\n{table}");
    let out_dir = build::root().join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let json = json!({
        "kind": "clusterip-connect",
        "unix_time": stamp,
        "duration_ms": args.duration_ms,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "unmeasured": unmeasured,
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
    let points: Vec<chart::Point<'_>> = rows
        .iter()
        .map(|r| chart::Point {
            path: r.path,
            services: r.services,
            per_sec: r.result.per_sec,
            p99_us: r.result.p99_us,
        })
        .collect();
    let svg = out_dir.join(format!("clusterip-{stamp}.svg"));
    chart::write_svg(&points, &svg)?;
    std::fs::copy(&svg, out_dir.join("clusterip-latest.svg"))?;
    println!("results: {} (chart: {})", file.display(), svg.display());
    Ok(())
}

/// Loads `input` with `cmd` in the node, within `timeout`: `Some(why)` when it did not fit.
fn load_bounded(lab: &Lab, cmd: &[&str], input: &str, timeout: Duration) -> Result<Option<String>> {
    let mut c = Command::new(cmd[0]);
    c.args(&cmd[1..]);
    match lab.run_in_node(c, Some(input.as_bytes()), timeout) {
        Ok(out) if out.status.success() => Ok(None),
        Ok(out) => bail!(
            "{}: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(kpr_lab::LabError::Timeout { timeout, .. }) => {
            Ok(Some(format!("not loaded within {timeout:?}")))
        }
        Err(e) => Err(e.into()),
    }
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

/// `r`'s figure over its direct path's figure (same N, same client, same family) in this run.
fn ratio(r: &Row, rows: &[Row], f: impl Fn(&BenchConnect) -> f64) -> f64 {
    let direct = match (r.path.starts_with("external"), r.path.contains("IPv6")) {
        (true, false) => EXT_DIRECT,
        (true, true) => EXT_DIRECT6,
        (false, false) => "direct pod IP",
        (false, true) => DIRECT6,
    };
    rows.iter()
        .find(|d| d.services == r.services && d.path == direct)
        .map(|d| f(&r.result) / f(&d.result))
        .unwrap_or(f64::NAN)
}

const EXT_DIRECT: &str = "external client → pod IP via the node";
const EXT_DIRECT6: &str = "external client → pod IPv6 via the node";
const DIRECT6: &str = "direct pod IPv6";
const VIP6: &str = "[fd00:10:96::10]:80";
const NODE_IP6: &str = "fd00:192:168:100::b";

/// IPv6, among `n` IPv6 Services: client pod → IPv6 ClusterIP in each kpr mode, and the
/// external client → IPv6 NodePort through kpr's tc programs, as ratios to the IPv6 direct
/// paths (pod → pod IPv6; external client → pod IPv6 routed through the node) in the same lab.
fn ipv6_rows(bins: &build::Bins, n: usize, duration: Duration) -> Result<Vec<Row>> {
    println!("==> IPv6, N = {n} services");
    let lab = Lab::up(LabSpec {
        prefix: Lab::unique_prefix("bench6"),
        labtool: Some(bins.labtool.clone()),
        external_client: true,
        ..LabSpec::default()
    })?;
    let client = lab.clients()[0].clone();
    let ext = lab.external_client().expect("external client").clone();
    let backends: Vec<String> = lab.backends().iter().map(|b| b.ip6.to_string()).collect();
    let be1 = lab.backends()[0].ip6;
    let dir = lab.work_dir().join("bench-ipv6");
    std::fs::create_dir_all(&dir)?;
    let mut yaml = fillers6(n.saturating_sub(1));
    yaml += &target6(&backends);
    // The NodePort Service: its one endpoint on this node.
    yaml += &format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: np6, namespace: bench}}\n\
         spec:\n  type: NodePort\n  clusterIP: \"fd00:10:96::20\"\n  ipFamilies: [IPv6]\n  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30080}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: np6-x\n  namespace: bench\n  labels: {{kubernetes.io/service-name: np6}}\n\
         addressType: IPv6\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n  - {{addresses: [\"{be1}\"], nodeName: node1}}\n---\n\
         apiVersion: v1\nkind: Node\nmetadata: {{name: node1}}\nstatus:\n  addresses: [{{type: InternalIP, address: {NODE_IP}}}, {{type: InternalIP, address: \"{NODE_IP6}\"}}]\n"
    );
    std::fs::write(dir.join("services.yaml"), yaml)?;
    let mut rows = Vec::new();
    let measure =
        |from: &kpr_lab::Pod, target: SocketAddr| median_of_runs(&lab, from, target, duration);
    let direct = measure(&client, SocketAddr::new(be1.into(), 8080))?;
    println!("    direct IPv6       {:>9.0} conn/s", direct.per_sec);
    rows.push(Row {
        services: n,
        path: DIRECT6,
        result: direct,
        program_ms: None,
        note: String::new(),
    });
    let ext_direct = measure(&ext, SocketAddr::new(be1.into(), 8080))?;
    rows.push(Row {
        services: n,
        path: EXT_DIRECT6,
        result: ext_direct,
        program_ms: None,
        note: String::new(),
    });
    let vip: SocketAddr = VIP6.parse()?;
    let nodeport: SocketAddr = SocketAddr::new(NODE_IP6.parse()?, 30080);
    for mode in ProxyMode::ALL {
        let dir_s = dir.to_str().context("path")?;
        let mut args = vec![
            "--manifests",
            dir_s,
            "--hostname-override",
            "node1",
            "--devices",
            "eth0",
        ];
        args.extend(mode.args());
        let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        let name = format!("kpr6-{}", mode.name());
        let kpr = Kpr::start_with(&lab, &bins.kpr, &name, &args)?;
        let programmed = kpr.status().unwrap_or_default();
        let b = measure(&client, vip);
        let np = if mode == ProxyMode::Ebpf {
            Some(measure(&ext, nodeport))
        } else {
            None
        };
        let log = kpr.stop();
        let b =
            b.with_context(|| format!("IPv6 ClusterIP via kpr {}; log:\n{log}", mode.name()))?;
        println!(
            "    kpr {:<13} {:>9.0} conn/s (IPv6)",
            mode.name(),
            b.per_sec
        );
        rows.push(Row {
            services: n,
            path: match mode {
                ProxyMode::Ebpf => "IPv6 ClusterIP via kpr ebpf",
                ProxyMode::Iptables => "IPv6 ClusterIP via kpr iptables",
                ProxyMode::Nftables => "IPv6 ClusterIP via kpr nftables",
                ProxyMode::Ipvs => "IPv6 ClusterIP via kpr ipvs",
            },
            result: b,
            program_ms: Some(programmed.last_sync_duration_ms),
            note: format!("programmed in {:.1} ms", programmed.last_sync_duration_ms),
        });
        if let Some(np) = np {
            let np = np.with_context(|| format!("IPv6 NodePort via kpr; log:\n{log}"))?;
            println!("    kpr NodePort IPv6 {:>9.0} conn/s", np.per_sec);
            rows.push(Row {
                services: n,
                path: "external client → IPv6 NodePort via kpr (tc)",
                result: np,
                program_ms: None,
                note: String::new(),
            });
        }
    }
    Ok(rows)
}

/// `n` filler IPv6 Services (see [`fillers`]).
fn fillers6(n: usize) -> String {
    let mut y = String::with_capacity(n * 760);
    for i in 0..n {
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc6-{i}, namespace: bench}}\n\
             spec:\n  clusterIP: \"fd00:100::{i:x}\"\n  ipFamilies: [IPv6]\n  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc6-{i}-x\n  namespace: bench\n  labels: {{kubernetes.io/service-name: svc6-{i}}}\n\
             addressType: IPv6\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n  - addresses: [\"fd00:245::{i:x}\"]\n---\n"
        );
    }
    y
}

/// The measured IPv6 Service on [`VIP6`], backed by `backends`.
fn target6(backends: &[String]) -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: target6, namespace: bench}\n\
         spec:\n  clusterIP: \"fd00:10:96::10\"\n  ipFamilies: [IPv6]\n  ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: target6-x\n  namespace: bench\n  labels: {kubernetes.io/service-name: target6}\n\
         addressType: IPv6\nports: [{name: http, port: 8080, protocol: TCP}]\nendpoints:\n",
    );
    for b in backends {
        let _ = writeln!(y, "  - addresses: [\"{b}\"]");
    }
    y
}
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
    let mut yaml = fillers(n.saturating_sub(1));
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

    let rules = render(&bins.kpr, "render-iptables", &dir, &["--node", "node1"])?;
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

/// `n` filler Services, each with one endpoint that no pod has (they exist only as rules and
/// map entries).
fn fillers(n: usize) -> String {
    let mut y = String::with_capacity(n * 700);
    for i in 0..n {
        // From 10.100.0.1 and 10.245.0.1 on, 250 per /24: 200,000 fit below 10.104 and 10.249.
        let (hi, lo) = (i / 250, i % 250 + 1);
        let (b, c) = (100 + hi / 256, hi % 256);
        let (eb, ec) = (245 + hi / 256, hi % 256);
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n\
             spec:\n  clusterIP: 10.{b}.{c}.{lo}\n  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-x\n  namespace: bench\n  labels: {{kubernetes.io/service-name: svc-{i}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n  - addresses: [10.{eb}.{ec}.{lo}]\n---\n"
        );
    }
    y
}

/// The measured Service, backed by `backends`.
fn target(backends: &[String]) -> String {
    let mut y = String::new();
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

/// How one endpoint change was applied.
#[derive(Default)]
struct Change {
    /// The sync that applied it (kpr's own figure: the model built for every Service, the
    /// dataplane updated), and the dataplane's part of it.
    sync_ms: f64,
    dataplane_ms: f64,
    full: bool,
    /// From the manifest rewrite to kpr's status showing it: includes the manifest source's
    /// poll interval and its re-reading of all N Services.
    observed_ms: f64,
}

impl Change {
    fn summary(&self) -> String {
        format!(
            "{} sync {:.1} ms (dataplane {:.1} ms; seen {:.0} ms after the write)",
            if self.full { "full" } else { "partial" },
            self.sync_ms,
            self.dataplane_ms,
            self.observed_ms
        )
    }
}

/// Removes the measured Service's last endpoint and waits until kpr has applied it.
fn one_endpoint_change(kpr: &mut Kpr, dir: &Path, backends: &[String]) -> Result<Change> {
    let fewer = &backends[..backends.len().saturating_sub(1)];
    let want: Vec<String> = fewer.iter().map(|b| format!("{b}:8080")).collect();
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    let t0 = Instant::now();
    std::fs::write(dir.join("target.yaml"), target(fewer))?;
    let s: KprStatus = kpr
        .wait_for_backends(FRONTEND, &want)
        .context("the endpoint change")?;
    Ok(Change {
        sync_ms: s.last_sync_duration_ms,
        dataplane_ms: s.last_sync_dataplane_ms,
        full: s.last_sync_full,
        observed_ms: t0.elapsed().as_secs_f64() * 1e3,
    })
}

/// The netfilter mode's object counts, for the notes.
fn mode_objects(s: &KprStatus) -> String {
    let list = |v: &[(String, u64)]| {
        v.iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !s.mode.iptables_rules.is_empty() {
        format!("rules: {}; ", list(&s.mode.iptables_rules))
    } else if !s.mode.nftables_objects.is_empty() {
        format!("{}; ", list(&s.mode.nftables_objects))
    } else {
        String::new()
    }
}

/// kube-proxy's rules for the Services in `dir` (`kpr render-iptables` or `render-nftables`),
/// with the lab's cluster CIDR and `extra` options.
fn render(kpr: &Path, command: &str, dir: &Path, extra: &[&str]) -> Result<String> {
    let out = Command::new(kpr)
        .arg(command)
        .arg("--manifests")
        .arg(dir)
        .args(["--cluster-cidr", CLUSTER_CIDR])
        .args(extra)
        .output()
        .with_context(|| format!("running kpr {command}"))?;
    if !out.status.success() {
        bail!(
            "kpr {command} failed: {}",
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
