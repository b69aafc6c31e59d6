//! The kpr agent.
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use kpr::ebpf::{EbpfConfig, EbpfDataplane};
use kpr::iptables::{render_kube_proxy_iptables_with_last, KubeProxyIptablesConfig};
use kpr::runner::{self, RunnerConfig};
use kpr::source::manifest::{self, ManifestSource};
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(
    name = "kpr",
    version,
    about = "kpr: a kube-proxy replacement with an eBPF dataplane"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the iptables-restore input kube-proxy (iptables mode) would load for the Services
    /// in a manifest directory. The benchmark's baseline.
    RenderIptables {
        #[arg(long)]
        manifests: PathBuf,
        #[arg(long)]
        cluster_cidr: Option<String>,
        /// Place this Service's ("namespace/name") rules last in KUBE-SERVICES (worst case).
        #[arg(long)]
        last: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ProxyMode {
    Ebpf,
    Nftables,
    Iptables,
    Ipvs,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Read Services and EndpointSlices from YAML files in this directory (and follow changes).
    #[arg(long, env = "KPR_MANIFESTS")]
    manifests: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "ebpf")]
    proxy_mode: ProxyMode,
    /// bpffs directory where kpr pins its maps (kept across restarts).
    #[arg(long, default_value = "/sys/fs/bpf/kpr")]
    bpf_pin_dir: PathBuf,
    /// cgroup v2 directory whose processes get socket-level load balancing. The default is the
    /// host's cgroup v2 root, mounted there if absent (what a DaemonSet wants).
    #[arg(long, default_value = "/run/kpr/cgroupv2")]
    cgroup_path: PathBuf,
    /// Allow attaching to the root of a cgroup v2 hierarchy (implied by the default path).
    #[arg(long)]
    allow_cgroup_root: bool,
    /// Minimum interval between syncs; changes closer together are coalesced.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    min_sync_period: Duration,
    /// Interval of full resyncs.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    sync_period: Duration,
    /// How often the manifest directory is checked for changes.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    manifest_poll: Duration,
    /// Write a JSON status after every sync.
    #[arg(long)]
    status_file: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .ok_or_else(|| format!("{s:?}: missing unit (ms, s, m)"))?;
    let n: f64 = num.parse().map_err(|_| format!("{s:?}: bad number"))?;
    let secs = match unit {
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

const DEFAULT_CGROUP: &str = "/run/kpr/cgroupv2";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: logs usually land in files and collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::RenderIptables {
            manifests,
            cluster_cidr,
            last,
        }) => render_iptables(&manifests, cluster_cidr, last.as_deref()),
        None => run_agent(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kpr: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn render_iptables(
    dir: &std::path::Path,
    cluster_cidr: Option<String>,
    last: Option<&str>,
) -> anyhow::Result<()> {
    let (snapshot, errors) = manifest::load_dir(dir)?;
    for e in &errors {
        tracing::warn!("skipped: {e}");
    }
    let (state, _) = kpr::model::build(&snapshot.services, &snapshot.slices);
    let last = match last {
        Some(name) => Some(
            state
                .services
                .iter()
                .find(|(_, s)| format!("{}/{}", s.name.namespace, s.name.name) == name)
                .map(|(f, _)| *f)
                .with_context(|| format!("--last {name}: no such Service with endpoints"))?,
        ),
        None => None,
    };
    let cfg = KubeProxyIptablesConfig {
        cluster_cidr,
        masquerade_all: false,
    };
    print!(
        "{}",
        render_kube_proxy_iptables_with_last(&state, &cfg, last.as_ref())
    );
    Ok(())
}

fn run_agent(args: RunArgs) -> anyhow::Result<()> {
    match args.proxy_mode {
        ProxyMode::Ebpf => {}
        ProxyMode::Nftables | ProxyMode::Iptables => {
            bail!(
                "--proxy-mode {:?} is not implemented yet; use --proxy-mode ebpf",
                args.proxy_mode
            )
        }
        ProxyMode::Ipvs => bail!(
            "--proxy-mode ipvs is not supported (this kernel has no IPVS); use --proxy-mode ebpf"
        ),
    }
    let Some(dir) = args.manifests.clone() else {
        bail!("no source of cluster state: pass --manifests DIR");
    };

    let allow_root =
        args.allow_cgroup_root || args.cgroup_path == std::path::Path::new(DEFAULT_CGROUP);
    if args.cgroup_path == std::path::Path::new(DEFAULT_CGROUP) {
        ensure_cgroup2_mounted(&args.cgroup_path)?;
    }
    std::fs::create_dir_all(&args.bpf_pin_dir)
        .with_context(|| format!("creating {}", args.bpf_pin_dir.display()))?;
    let mut dataplane = EbpfDataplane::load(&EbpfConfig {
        pin_dir: args.bpf_pin_dir.clone(),
        cgroup: args.cgroup_path.clone(),
        allow_cgroup_root: allow_root,
    })?;
    tracing::info!(
        cgroup = %args.cgroup_path.display(),
        pins = %args.bpf_pin_dir.display(),
        "socket-LB programs attached"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (tx, rx) = watch::channel(None::<Arc<kpr::source::ClusterSnapshot>>);
        let source = ManifestSource::new(dir, args.manifest_poll);
        tokio::spawn(source.run(tx));
        let cfg = RunnerConfig {
            min_sync_period: args.min_sync_period,
            sync_period: args.sync_period,
            status_file: args.status_file.clone(),
            observers: Vec::new(),
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = runner::run(&mut dataplane, rx, &cfg) => tracing::warn!("source ended"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
            _ = term.recv() => tracing::info!("terminated"),
        }
        // Programs detach when `dataplane` drops; pinned maps stay for the next start.
        anyhow::Ok(())
    })
}

/// The production default: the host's cgroup v2 hierarchy, mounted at DEFAULT_CGROUP if it is
/// not mounted yet (hosts with cgroup v1 have none mounted).
fn ensure_cgroup2_mounted(path: &std::path::Path) -> anyhow::Result<()> {
    if path.join("cgroup.controllers").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(path)?;
    let status = std::process::Command::new("mount")
        .args(["-t", "cgroup2", "none"])
        .arg(path)
        .status()
        .context("running mount")?;
    if !status.success() {
        bail!("mounting cgroup2 at {} failed", path.display());
    }
    Ok(())
}
