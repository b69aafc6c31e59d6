//! The kpr agent.
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use kpr::config::{self, Action, ConfigError, ProxyMode, Settings, DEFAULT_CGROUP};
use kpr::dataplane::Dataplane;
use kpr::ebpf::{EbpfConfig, EbpfDataplane};
use kpr::health::{serve_health, ProxyHealth};
use kpr::metrics::{serve_metrics, Metrics};
use kpr::model::Family;
use kpr::runner::{self, RunnerConfig};
use kpr::service_health::ServiceHealthServers;
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
        Action::Render { writer, args } => render(writer, &args),
        Action::Import(args) => import(&args),
        Action::Diff(args) => return diff(&args),
        Action::Cleanup { bpf_pin_dir } => cleanup(&bpf_pin_dir),
        Action::Status {
            bpf_pin_dir,
            admin_socket,
            json,
        } => status(&bpf_pin_dir, &admin_socket, json),
        Action::Trace {
            flow,
            scope,
            bpf_pin_dir,
            json,
        } => trace(flow, scope, &bpf_pin_dir, json),
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

/// `kpr import iptables-save`: the manifests a dump implies, on stdout or into `--out`; what
/// the dump cannot say on stderr. Nothing is written unless the whole dump was understood.
fn import(args: &config::flags::ImportArgs) -> anyhow::Result<()> {
    use kpr::import;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let mut imported =
        import::import(&text, &args.node).with_context(|| format!("{}", args.file.display()))?;
    let files = import::write::manifests(&imported.ports, &args.node, &mut imported.notes)?;
    match &args.out {
        Some(dir) => import::write::write_dir(dir, &files)?,
        None => {
            for (i, f) in files.iter().enumerate() {
                if i > 0 {
                    println!("---");
                }
                print!("{}", f.text);
            }
        }
    }
    eprintln!(
        "kpr: imported {} service ports of {} Services; guessed or left out:",
        imported.ports.len(),
        files.len()
    );
    for n in &imported.notes {
        eprintln!("  - {n}");
    }
    Ok(())
}

/// `kpr diff iptables-save`: exit 0 when the dump and kpr's state (the running agent's, or a
/// manifest directory's) agree, 1 when they differ (one line per difference on stdout), 2 when
/// either cannot be read.
fn diff(args: &config::flags::DiffArgs) -> ExitCode {
    match diff_lines(args) {
        Ok(lines) if lines.is_empty() => ExitCode::SUCCESS,
        Ok(lines) => {
            for l in lines {
                println!("{l}");
            }
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("kpr: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn diff_lines(args: &config::flags::DiffArgs) -> anyhow::Result<Vec<String>> {
    use kpr::import;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let imported =
        import::import(&text, &args.node).with_context(|| format!("{}", args.file.display()))?;
    let Some(manifests) = &args.manifests else {
        // The running agent's programmed frontends, whatever its proxy mode.
        let body = kpr::admin::query(&args.admin_socket, std::time::Duration::from_secs(10))
            .context("is the agent running? (or give --manifests DIR)")?;
        #[derive(serde::Deserialize)]
        struct Frontends {
            #[serde(default)]
            frontends: std::collections::BTreeMap<String, import::diff::LiveFrontend>,
        }
        let live: Frontends = serde_json::from_slice(&body)
            .with_context(|| format!("the agent's status on {}", args.admin_socket.display()))?;
        let live = import::diff::live_frontends(&live.frontends, imported.family)?;
        let dump = import::diff::frontends(&imported.ports);
        return Ok(import::diff::diff_views(&dump, &live, "agent"));
    };
    let (snapshot, errors) = manifest::load_dir(manifests)?;
    for e in &errors {
        tracing::warn!("skipped: {e}");
    }
    let context = kpr::model::NodeContext {
        node_name: Some(args.node.clone()),
        ..Default::default()
    };
    let (state, _) = kpr::model::build_for_node(&snapshot.services, &snapshot.slices, &context);
    let desired = import::same_family(&imported, &state.service_ports);
    Ok(import::diff::diff(&imported.ports, &desired))
}

/// `kpr status`: the live maps (and the agent's names for them).
fn status(
    pin_dir: &std::path::Path,
    admin_socket: &std::path::Path,
    json: bool,
) -> anyhow::Result<()> {
    let view = kpr::inspect::node_view(pin_dir, admin_socket)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", kpr::inspect::render::status(&view));
    }
    Ok(())
}

/// `kpr trace`: one flow through the live maps.
fn trace(
    flow: kpr::inspect::trace::Flow,
    scope: kpr::inspect::trace::Scope,
    pin_dir: &std::path::Path,
    json: bool,
) -> anyhow::Result<()> {
    let pinned = kpr::inspect::Pinned::open(pin_dir)?;
    let t = kpr::inspect::trace::trace(
        &pinned,
        flow,
        scope,
        &kpr::localaddr::list().unwrap_or_default(),
        kpr::ebpf::conntrack::monotonic_ns(),
    );
    if json {
        println!("{}", serde_json::to_string_pretty(&t)?);
    } else {
        print!("{}", kpr::inspect::render::trace(&t));
    }
    Ok(())
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

/// `kpr render-iptables` / `render-nftables`: the rules kube-proxy's iptables or nftables
/// mode would load for a manifest directory's Services, from kpr's planner and writers (which
/// the golden tests hold to kube-proxy's own expectations).
fn render(writer: config::RenderWriter, args: &config::flags::RenderArgs) -> anyhow::Result<()> {
    use kpr::netfilter::{iptables::render, nftables, plan};
    let node = args.node.as_deref();
    let (snapshot, errors) = manifest::load_dir_for(&args.manifests, node)?;
    for e in &errors {
        tracing::warn!("skipped: {e}");
    }
    let context = kpr::model::NodeContext {
        node_name: node.map(str::to_owned),
        // What kube-proxy would serve on the Node's primary address (there are no local
        // interfaces to read: the Node is a manifest's).
        node_ips: kpr::nodeaddr::nodeport_ips(
            snapshot.node.as_ref(),
            &[],
            &[kpr::config::NodePortAddress::Primary],
            false,
        ),
        node_ip: kpr::nodeaddr::primary_ip(snapshot.node.as_ref()),
        zone: kpr::nodeaddr::zone(snapshot.node.as_ref()),
        pod_cidrs: kpr::nodeaddr::pod_cidrs(snapshot.node.as_ref()),
    };
    let (state, _) = kpr::model::build_for_node(&snapshot.services, &snapshot.slices, &context);
    let mut cluster_cidrs = Vec::new();
    for c in args.cluster_cidr.iter().flat_map(|c| c.split(',')) {
        cluster_cidrs.push(kpr::cidr::parse(c.trim())?);
    }
    let cfg = plan::PlanConfig {
        local: plan::LocalDetector::for_family(
            &kpr::config::DetectLocal::ClusterCidr,
            &cluster_cidrs,
            kpr::model::Family::V4,
        ),
        node_ip: state.node_ip,
        ..Default::default()
    };
    let mut plan = plan::plan(&state, &cfg);
    if let Some(name) = &args.last {
        // The Service's rules after every other Service's: its KUBE-SERVICES rules are the last
        // of the linear chain, the worst case for a lookup.
        let is_it =
            |p: &plan::PortPlan| format!("{}/{}", p.info.name.namespace, p.info.name.name) == *name;
        if !plan.ports.iter().any(|p| is_it(p) && p.has_endpoints) {
            bail!("--last {name}: no such Service with endpoints");
        }
        let (mut it, rest): (Vec<_>, Vec<_>) = plan.ports.into_iter().partition(|p| is_it(p));
        plan.ports = rest;
        plan.ports.append(&mut it);
    }
    match writer {
        config::RenderWriter::Iptables => {
            let rules = render::write(
                &plan,
                &cfg,
                &render::IptablesConfig::for_mark_bit(kpr::config::DEFAULT_MASQUERADE_BIT),
                render::WriteScope::default(),
            );
            print!("{}", render::standalone(&rules.text));
        }
        config::RenderWriter::Nftables => {
            let ruleset =
                nftables::write::write(&plan, &cfg, &nftables::write::NftablesConfig::default());
            print!("{}", ruleset.dump());
        }
    }
    Ok(())
}

/// The dataplane of the configured proxy mode: the one place that knows which modes exist.
fn dataplane(settings: &Settings) -> anyhow::Result<Box<dyn Dataplane>> {
    // Before anything changes on the node: kube-proxy's IPVS mode exits when the kernel cannot
    // do IPVS; so does kpr's, with the usage status and the module's name.
    if settings.proxy_mode == ProxyMode::Ipvs {
        if let Err(e @ kpr::ipvs::IpvsError::NotAvailable) = kpr::ipvs::Ipvs::open() {
            eprintln!("kpr: --proxy-mode ipvs: {e}");
            std::process::exit(2);
        }
    }
    if settings.proxy_mode != ProxyMode::Ebpf {
        // The eBPF mode's programs stay attached after it exits (pinned links): a netfilter
        // mode would translate every connection twice. Its maps stay for `kpr cleanup`.
        for filter in kpr::ebpf::tc::detach_netlink_filters() {
            tracing::info!(%filter, "detached the eBPF mode's tc filter");
        }
        match kpr::ebpf::links::unpin_all(&settings.bpf_pin_dir) {
            Ok(removed) => {
                for pin in removed {
                    tracing::info!(pin = %pin.display(), "detached the eBPF mode's programs");
                }
            }
            Err(e) => bail!(
                "detaching the eBPF mode's programs (pins in {}): {e}",
                settings.bpf_pin_dir.display()
            ),
        }
    }
    match settings.proxy_mode {
        ProxyMode::Ebpf => Ok(Box::new(ebpf_dataplane(settings)?)),
        ProxyMode::Iptables => {
            let backend = kpr::netfilter::iptables::Backend::detect();
            tracing::info!(?backend, "proxy mode iptables");
            let mut modes: Vec<(Family, Box<dyn Dataplane>)> = Vec::new();
            for family in
                families(|family| kpr::netfilter::iptables::Tools { backend, family }.work())
            {
                let mut dataplane = kpr::netfilter::iptables::IptablesDataplane::new(
                    backend,
                    kpr::netfilter::iptables::RuleSyncer::new(
                        plan_config(settings, family)?,
                        !kpr::nodeaddr::matches_all(&settings.nodeport_addresses),
                        kpr::netfilter::iptables::IptablesConfig::for_mark_bit(
                            settings.masquerade_bit,
                        ),
                    ),
                );
                dataplane.stale_cleanup_period = settings.sync_period;
                modes.push((family, Box::new(dataplane)));
            }
            Ok(Box::new(kpr::netfilter::families::PerFamily::new(modes)))
        }
        ProxyMode::Nftables => {
            tracing::info!("proxy mode nftables");
            let mut modes: Vec<(Family, Box<dyn Dataplane>)> = Vec::new();
            for family in families(|_| true) {
                let dataplane = kpr::netfilter::nftables::NftablesDataplane::new(
                    kpr::netfilter::nftables::sync::NftSyncer::new(
                        plan_config(settings, family)?,
                        !settings.nodeport_addresses.is_empty(),
                        kpr::netfilter::nftables::write::NftablesConfig::default(),
                    ),
                );
                modes.push((family, Box::new(dataplane)));
            }
            Ok(Box::new(kpr::netfilter::families::PerFamily::new(modes)))
        }
        ProxyMode::Ipvs => {
            tracing::info!(scheduler = %settings.ipvs.scheduler, "proxy mode ipvs");
            let mut modes: Vec<(Family, Box<dyn Dataplane>)> = Vec::new();
            for family in families(|family| {
                kpr::netfilter::iptables::Tools {
                    backend: kpr::netfilter::iptables::Backend::detect(),
                    family,
                }
                .work()
            }) {
                let cfg = kpr::netfilter::ipvs::IpvsConfig {
                    scheduler: settings.ipvs.scheduler.clone(),
                    exclude_cidrs: settings.ipvs.exclude_cidrs.clone(),
                    strict_arp: settings.ipvs.strict_arp,
                    timeouts: (
                        secs(settings.ipvs.tcp_timeout),
                        secs(settings.ipvs.tcp_fin_timeout),
                        secs(settings.ipvs.udp_timeout),
                    ),
                };
                // No route_localnet: the IPVS mode has no localhost NodePorts (kube-proxy's
                // has none either).
                let planner = kpr::netfilter::plan::PlanConfig {
                    localhost_nodeports: false,
                    ..planner_settings(settings, family)
                };
                match kpr::netfilter::ipvs::IpvsDataplane::new(planner, cfg) {
                    Ok(d) => modes.push((family, Box::new(d))),
                    Err(e) => bail!("--proxy-mode ipvs: {e}"),
                }
            }
            Ok(Box::new(kpr::netfilter::families::PerFamily::new(modes)))
        }
    }
}

/// Whole seconds of an IPVS timeout (IPVS counts in seconds).
fn secs(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// The families a netfilter mode proxies: IPv4, and IPv6 where the kernel has it and `works`
/// says the mode's tools do (kube-proxy, too, falls back to single-stack, with a warning, when
/// the node cannot do the second family).
fn families(works: impl Fn(Family) -> bool) -> Vec<Family> {
    let mut out = vec![Family::V4];
    if !std::path::Path::new("/proc/net/if_inet6").exists() {
        tracing::warn!("the kernel has no IPv6: IPv6 Services are not proxied");
    } else if !works(Family::V6) {
        tracing::warn!("ip6tables does not work here: IPv6 Services are not proxied");
    } else {
        out.push(Family::V6);
    }
    out
}

/// The netfilter modes' node-wide settings for `family`.
fn plan_config(
    settings: &Settings,
    family: Family,
) -> anyhow::Result<kpr::netfilter::plan::PlanConfig> {
    // kube-proxy's NewProxier: localhost NodePorts need route_localnet (IPv4), in this
    // network namespace.
    if family == Family::V4 {
        if let Err(e) = std::fs::write("/proc/sys/net/ipv4/conf/all/route_localnet", "1") {
            tracing::warn!(
                "setting net.ipv4.conf.all.route_localnet=1: {e}; NodePorts on localhost will \
                 not work"
            );
        }
    }
    Ok(planner_settings(settings, family))
}

/// The netfilter planner's settings for `family`, from the flags.
fn planner_settings(settings: &Settings, family: Family) -> kpr::netfilter::plan::PlanConfig {
    kpr::netfilter::plan::PlanConfig {
        family,
        masquerade_all: settings.masquerade_all,
        local: local_detector(settings, family),
        local_from_node: local_from_node(settings),
        masquerade_mark: 1 << settings.masquerade_bit,
        localhost_nodeports: settings.localhost_nodeports,
        ..Default::default()
    }
}

/// The local-traffic detector `--detect-local-mode` configures for `family`, as every mode
/// matches it (NodeCIDR's starts empty: it follows the Node, see [`local_from_node`]).
fn local_detector(settings: &Settings, family: Family) -> kpr::netfilter::plan::LocalDetector {
    kpr::netfilter::plan::LocalDetector::for_family(
        &settings.detect_local,
        &settings.cluster_cidrs,
        family,
    )
}

/// NodeCIDR: the detector follows the Node's pod CIDRs, refreshed on every sync.
fn local_from_node(settings: &Settings) -> bool {
    settings.detect_local == kpr::config::DetectLocal::NodeCidr
}

/// The eBPF mode's accept in FORWARD (for hosts whose FORWARD policy is DROP), where iptables
/// is installed; without it the mode goes on, saying what it cannot do.
fn forward_accept(settings: &Settings) -> Option<kpr::netfilter::iptables::forward::ForwardAccept> {
    let forward = kpr::netfilter::iptables::forward::ForwardAccept::new(
        kpr::netfilter::iptables::Backend::detect(),
        kpr::nft::DEFAULT_MASQ_MARK,
        settings.conntrack.tcp_be_liberal,
    );
    if forward.tools_installed() {
        return Some(forward);
    }
    tracing::warn!(
        "iptables is not installed: forwarded Service traffic is not accepted in FORWARD \
         (a host whose FORWARD policy is DROP drops it)"
    );
    None
}

/// Loads and attaches the eBPF mode's programs.
fn ebpf_dataplane(settings: &Settings) -> anyhow::Result<EbpfDataplane> {
    let allow_root =
        settings.allow_cgroup_root || settings.cgroup_path == std::path::Path::new(DEFAULT_CGROUP);
    if settings.cgroup_path == std::path::Path::new(DEFAULT_CGROUP) {
        ensure_cgroup2_mounted(&settings.cgroup_path)?;
    }
    std::fs::create_dir_all(&settings.bpf_pin_dir)
        .with_context(|| format!("creating {}", settings.bpf_pin_dir.display()))?;
    // North-south: the devices given, else those carrying the node's addresses (in this
    // process's network namespace).
    let devices = if settings.devices.is_empty() {
        kpr::ebpf::tc::default_devices()
    } else {
        settings.devices.clone()
    };
    let dataplane = EbpfDataplane::load_with(
        &EbpfConfig {
            pin_dir: settings.bpf_pin_dir.clone(),
            cgroup: settings.cgroup_path.clone(),
            lb_capacity: settings.lb_capacity,
            allow_cgroup_root: allow_root,
            nftables_mark: Some(kpr::nft::DEFAULT_MASQ_MARK),
            forward_accept: forward_accept(settings),
            datapath_events: settings.datapath_events,
            pod_netns_dir: settings.pod_netns_dir.clone(),
            masquerade_all: settings.masquerade_all,
            local: local_detector(settings, Family::V4),
            local6: match local_detector(settings, Family::V6) {
                kpr::netfilter::plan::LocalDetector::Cidr(net) => Some(net),
                _ => None,
            },
            local_from_node: local_from_node(settings),
            drop_no_local_endpoints: !settings.reject_no_local_endpoints,
            masquerade_local_endpoints: settings.masquerade_local_endpoints,
            sctp: Some(kpr::ebpf::sctp::SctpConfig {
                plans: families(|_| true)
                    .into_iter()
                    .map(|family| planner_settings(settings, family))
                    .collect(),
                nodeport_addresses_given: !settings.nodeport_addresses.is_empty(),
            }),
        },
        &kpr::ebpf::TcConfig {
            devices,
            conntrack: kpr::ebpf::conntrack::ConntrackConfig::from_settings(
                &settings.conntrack,
                std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            ),
        },
    )?;
    tracing::info!(attached = ?dataplane.tc_attachments(), "tc programs");
    tracing::info!(
        cgroup = %settings.cgroup_path.display(),
        pins = %settings.bpf_pin_dir.display(),
        "socket-LB programs attached"
    );
    Ok(dataplane)
}

/// kube-proxy's conntrack set-up, in this network namespace (see `kpr::conntrack_sysctl`).
fn conntrack_sysctls(c: &kpr::config::ConntrackSettings) {
    use kpr::conntrack_sysctl::{planned, Sysctls};
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let (done, failed) = Sysctls::of_this_namespace().apply(&planned(c, cpus));
    for w in done {
        tracing::info!(sysctl = w.name, value = w.value, "set a conntrack sysctl");
    }
    for f in failed {
        tracing::warn!("{f}");
    }
}

/// Runs the agent with the resolved settings.
fn run_agent(settings: Settings) -> anyhow::Result<()> {
    tracing::debug!(settings = %settings.to_json(), "effective configuration");
    let mut dataplane = dataplane(&settings)?;
    conntrack_sysctls(&settings.conntrack);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (tx, rx) = watch::channel(None::<Arc<kpr::source::ClusterSnapshot>>);
        start_source(&settings, tx)?;

        let metrics = Metrics::new();
        let health =
            ProxyHealth::for_sync_period(settings.sync_period).with_metrics(metrics.clone());
        if let Some(addr) = settings.metrics_bind_address {
            serve("metrics", addr, |l| serve_metrics(l, metrics.clone())).await;
        }
        if let Some(addr) = settings.healthz_bind_address {
            serve("healthz", addr, |l| serve_health(l, health.clone())).await;
        }
        let cfg = RunnerConfig {
            min_sync_period: settings.min_sync_period,
            sync_period: settings.sync_period,
            status_file: settings.status_file.clone(),
            admin: admin_socket(&settings.admin_socket),
            observers: vec![
                Arc::new(metrics),
                Arc::new(ServiceHealthServers::new(
                    settings.bind_address,
                    health.clone(),
                )),
                Arc::new(health),
            ],
            node_name: node_name(&settings).ok(),
            nodeport_addresses: nodeport_addresses(&settings),
            // kube-proxy's nftables mode never serves NodePorts on localhost.
            localhost_nodeports: settings.localhost_nodeports
                && settings.proxy_mode != ProxyMode::Nftables,
            local_addresses: Some(kpr::localaddr::watch()?),
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = runner::run(dataplane.as_mut(), rx, &cfg) => tracing::warn!("source ended"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
            _ = term.recv() => tracing::info!("terminated"),
        }
        // Programs detach when `dataplane` drops; pinned maps stay for the next start.
        anyhow::Ok(())
    })
}

/// `--nodeport-addresses` with the mode's default: kube-proxy's nftables mode defaults to
/// `primary`, the others to every local address.
fn nodeport_addresses(settings: &Settings) -> Vec<kpr::config::NodePortAddress> {
    if settings.nodeport_addresses.is_empty() && settings.proxy_mode == ProxyMode::Nftables {
        return vec![kpr::config::NodePortAddress::Primary];
    }
    settings.nodeport_addresses.clone()
}

/// The manifest directory when one is given (the embedded single-machine source), else the
/// Kubernetes API server (--kubeconfig, --master, or in-cluster configuration).
fn start_source(
    settings: &Settings,
    tx: watch::Sender<Option<Arc<kpr::source::ClusterSnapshot>>>,
) -> anyhow::Result<()> {
    if let Some(dir) = &settings.manifests {
        tracing::info!(dir = %dir.display(), "source: manifest directory");
        let source = ManifestSource::new(dir.clone(), settings.manifest_poll)
            .with_node_name(node_name(settings).ok());
        tokio::spawn(source.run(tx));
        return Ok(());
    }
    let node_name = node_name(settings)?;
    let client =
        kpr::source::kube::client_from(settings.kubeconfig.as_deref(), settings.master.as_deref())
            .context("connecting to the Kubernetes API server")?;
    tracing::info!(node = %node_name, "source: Kubernetes API server");
    tokio::spawn(kpr::source::kube::KubeSource::new(client, node_name).run(tx));
    Ok(())
}

/// kube-proxy's node name: --hostname-override, else the host name, lower-cased.
fn node_name(settings: &Settings) -> anyhow::Result<String> {
    if let Some(name) = &settings.hostname_override {
        return Ok(name.clone());
    }
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the host name (or pass --hostname-override)")?;
    Ok(name.trim().to_lowercase())
}

/// The admin socket at `path` (none if empty). Failing to serve it is logged, not fatal: the
/// dataplane matters more than the diagnostics.
fn admin_socket(path: &std::path::Path) -> Option<kpr::admin::AdminSocket> {
    if path.as_os_str().is_empty() {
        return None;
    }
    match kpr::admin::AdminSocket::serve(path) {
        Ok(a) => {
            tracing::info!(path = %path.display(), "serving the admin socket");
            Some(a)
        }
        Err(e) => {
            tracing::error!("{e}; `kpr status` will show no Service names");
            None
        }
    }
}

/// Binds `addr` and serves on it in the background. A port that cannot be bound is logged and
/// left unserved, as kube-proxy does, rather than stopping the proxy.
async fn serve<F, Fut>(what: &str, addr: std::net::SocketAddr, server: F)
where
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            tracing::info!(%addr, "serving {what}");
            tokio::spawn(server(listener));
        }
        Err(e) => tracing::error!(%addr, "cannot serve {what}: {e}"),
    }
}

/// The production default: the host's cgroup v2 hierarchy, mounted at DEFAULT_CGROUP if it is
/// not mounted yet (hosts with cgroup v1 have none mounted).
fn ensure_cgroup2_mounted(path: &std::path::Path) -> anyhow::Result<()> {
    if path.join("cgroup.controllers").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(path)?;
    // mount(2) itself: the image has no `mount` binary.
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .context("cgroup path contains a NUL byte")?;
    let fstype = c"cgroup2";
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "mounting cgroup2 at {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// `kpr cleanup`: removes what any of kpr's modes created on this node (in this network
/// namespace) and prints what it removed: the eBPF mode's nftables table (`table ip kpr`), the
/// netfilter modes' (kube-proxy's) iptables chains and `kube-proxy` nftables tables, and, under
/// `pin_dir`, the pins whose names start with `KPR_`, then the directory itself if nothing else
/// is left in it. No other table or chain is touched. A `pin_dir` that is not on a bpffs is refused and left
/// untouched. Nothing to remove is success (exit 0); errors are reported after both parts were
/// attempted (exit 1).
///
/// It is meant for after the agent stopped: kpr's cgroup and tc programs stay attached through
/// their pinned links (`KPR_LINK_*`) while it is down, and removing those pins detaches them
/// (tc programs attached through netlink, on kernels without TCX, left with the agent).
fn cleanup(pin_dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::fs::MetadataExt as _;

    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    const PIN_PREFIX: &str = "KPR_";

    let mut removed: Vec<String> = Vec::new();
    let mut errors: Vec<String> = Vec::new();

    // tc filters of kernels without TCX (TCX links go with their pins, below).
    for filter in kpr::ebpf::tc::detach_netlink_filters() {
        removed.push(format!("tc filter {filter}"));
    }
    match kpr::nft::delete_table() {
        Ok(true) => removed.push(format!("nftables table ip {}", kpr::nft::TABLE)),
        Ok(false) => {}
        Err(e) => errors.push(format!("nftables table ip {}: {e}", kpr::nft::TABLE)),
    }
    match kpr::netfilter::cleanup::delete_tables(kpr::ebpf::sctp::TABLE) {
        Ok(r) => removed.extend(r.0),
        Err(e) => errors.push(format!("nftables tables kpr-sctp: {e}")),
    }
    removed.extend(kpr::netfilter::cleanup::ebpf_forward_chain().0);
    // The netfilter modes' state (kube-proxy's own, which those modes write).
    removed.extend(kpr::netfilter::cleanup::iptables().0);
    match kpr::netfilter::cleanup::nftables() {
        Ok(r) => removed.extend(r.0),
        Err(e) => errors.push(format!("nftables tables kube-proxy: {e}")),
    }
    // The IPVS mode's (after the iptables rules that match its ipsets).
    removed.extend(kpr::netfilter::ipvs::cleanup());

    let pins = |removed: &mut Vec<String>| -> anyhow::Result<()> {
        let shown = pin_dir.display();
        let meta = match std::fs::metadata(pin_dir) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("pin directory {shown}")),
        };
        if !meta.is_dir() {
            bail!("pin directory {shown}: not a directory; left alone");
        }
        // Absolute, so that its parent (for the mount-point check below) is known.
        let pin_dir =
            &std::fs::canonicalize(pin_dir).with_context(|| format!("pin directory {shown}"))?;
        let path = std::ffi::CString::new(pin_dir.as_os_str().as_bytes())
            .with_context(|| format!("pin directory {shown}: contains a NUL byte"))?;
        // SAFETY: a NUL-terminated path and a zeroed statfs buffer for the kernel to fill.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statfs(path.as_ptr(), &mut fs) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("pin directory {shown}: statfs"));
        }
        #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets.
        if fs.f_type as i64 != BPF_FS_MAGIC {
            bail!("pin directory {shown}: not on a bpffs; refusing to touch it");
        }
        let mut others = Vec::new();
        let entries =
            std::fs::read_dir(pin_dir).with_context(|| format!("pin directory {shown}"))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("pin directory {shown}"))?;
            let name = entry.file_name();
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(true);
            let kprs = name.to_str().is_some_and(|n| n.starts_with(PIN_PREFIX));
            if kprs && !is_dir {
                std::fs::remove_file(entry.path())
                    .with_context(|| format!("removing pin {}", entry.path().display()))?;
                removed.push(format!("pin {}", entry.path().display()));
            } else {
                others.push(name.to_string_lossy().into_owned());
            }
        }
        // The directory goes too when it held only kpr's pins, unless it is a mount point
        // (`--bpf-pin-dir /sys/fs/bpf`): that is the bpffs itself, not kpr's.
        let parent_dev = pin_dir
            .parent()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.dev());
        if !others.is_empty() {
            others.sort();
            println!(
                "kept {shown}: it holds entries that are not kpr's: {}",
                others.join(", ")
            );
        } else if parent_dev == Some(meta.dev()) {
            std::fs::remove_dir(pin_dir).with_context(|| format!("removing {shown}"))?;
            removed.push(format!("directory {shown}"));
        }
        Ok(())
    };
    if let Err(e) = pins(&mut removed) {
        errors.push(format!("{e:#}"));
    }

    for r in &removed {
        println!("removed {r}");
    }
    if removed.is_empty() && errors.is_empty() {
        println!("nothing to clean up");
    }
    if !errors.is_empty() {
        bail!("cleanup incomplete: {}", errors.join("; "));
    }
    Ok(())
}
