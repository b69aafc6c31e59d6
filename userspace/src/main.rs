//! The kpr agent.
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use kpr::config::{self, Action, ConfigError, Settings, DEFAULT_CGROUP};
use kpr::ebpf::{EbpfConfig, EbpfDataplane};
use kpr::iptables::{render_kube_proxy_iptables_with_last, KubeProxyIptablesConfig};
use kpr::runner::{self, RunnerConfig};
use kpr::source::manifest::{self, ManifestSource};
use tokio::sync::watch;

/// Exit codes: 0 success, 2 usage or configuration error (as clap's), 1 runtime error.
fn main() -> ExitCode {
    let resolved = match config::from_args(std::env::args_os()) {
        Ok(r) => r,
        // --help, --version (exit 0) and usage errors (exit 2), printed by clap.
        Err(ConfigError::Cli(e)) => e.exit(),
        Err(e) => {
            init_logging(0);
            eprintln!("kpr: {e}");
            return ExitCode::from(ConfigError::EXIT_CODE);
        }
    };
    init_logging(resolved.verbosity);
    for w in &resolved.warnings {
        tracing::warn!("{w}");
    }
    let result = match resolved.action {
        Action::RenderIptables {
            manifests,
            cluster_cidr,
            last,
        } => render_iptables(&manifests, cluster_cidr, last.as_deref()),
        Action::InitOnly(_) => {
            tracing::info!("--init-only: configuration is valid; kpr has no separate init step");
            Ok(())
        }
        Action::Run(settings) => run_agent(*settings),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kpr: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Logs to stderr; RUST_LOG, if set, wins over the verbosity (`-v`, `logging.verbosity`).
fn init_logging(verbosity: u32) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(config::log_filter(verbosity))
            }),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: logs usually land in files and collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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

/// Runs the agent with the resolved settings (the proxy mode is ebpf: the config module refuses
/// or replaces the others).
fn run_agent(settings: Settings) -> anyhow::Result<()> {
    tracing::debug!(settings = %settings.to_json(), "effective configuration");
    let Some(dir) = settings.manifests.clone() else {
        bail!("no source of cluster state: pass --manifests DIR");
    };

    let allow_root =
        settings.allow_cgroup_root || settings.cgroup_path == std::path::Path::new(DEFAULT_CGROUP);
    if settings.cgroup_path == std::path::Path::new(DEFAULT_CGROUP) {
        ensure_cgroup2_mounted(&settings.cgroup_path)?;
    }
    std::fs::create_dir_all(&settings.bpf_pin_dir)
        .with_context(|| format!("creating {}", settings.bpf_pin_dir.display()))?;
    let mut dataplane = EbpfDataplane::load(&EbpfConfig {
        pin_dir: settings.bpf_pin_dir.clone(),
        cgroup: settings.cgroup_path.clone(),
        allow_cgroup_root: allow_root,
    })?;
    tracing::info!(
        cgroup = %settings.cgroup_path.display(),
        pins = %settings.bpf_pin_dir.display(),
        "socket-LB programs attached"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (tx, rx) = watch::channel(None::<Arc<kpr::source::ClusterSnapshot>>);
        let source = ManifestSource::new(dir, settings.manifest_poll);
        tokio::spawn(source.run(tx));
        let cfg = RunnerConfig {
            min_sync_period: settings.min_sync_period,
            sync_period: settings.sync_period,
            status_file: settings.status_file.clone(),
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
