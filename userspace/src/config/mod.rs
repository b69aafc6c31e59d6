//! kube-proxy compatibility: kpr takes kube-proxy's flags and its `--config` file
//! (`KubeProxyConfiguration`), so it can replace kube-proxy in a DaemonSet unchanged, and
//! resolves them, with kpr's own flags, into [`Settings`], what the agent uses.
//!
//! Entry point: [`from_args`] (the command line → [`Resolved`]: what to do, the warnings to log
//! and the log verbosity). Errors are [`ConfigError`]: usage or configuration errors, exit code
//! 2 (clap's too); runtime errors elsewhere in the agent exit with 1.
//!
//! # Flags and `--config`: which wins
//!
//! kpr does what kube-proxy does (cmd/kube-proxy/app/options.go, `Options.Complete`): when
//! `--config` is given, the file's configuration *replaces* everything kube-proxy's flags set
//! (`o.config = c`), so those flags are ignored even when given explicitly. kube-proxy's own
//! help says "This parameter is ignored if a config file is specified by --config"; attempts
//! to make flags win (kubernetes PRs 98303 and 101273) were closed unmerged; issues 98302,
//! 107156, 120603 describe the behaviour. The exceptions, also kube-proxy's:
//! - `--hostname-override` wins over the file's `hostnameOverride` (`processHostnameOverrideFlag`);
//! - `-v`/`--v` wins over `logging.verbosity` (`copyLogsFromFlags`);
//! - `--master` always applies (it is not part of the configuration).
//!
//! Unlike kube-proxy, kpr warns about each flag it ignores because of `--config`. kpr's own
//! flags (`--manifests`, `--bpf-pin-dir`, `--cgroup-path`, `--allow-cgroup-root`,
//! `--sync-period`, `--min-sync-period`, `--manifest-poll`, `--status-file`, `--devices`) are
//! not part of the file and always apply; `--sync-period`/`--min-sync-period` thereby override the file's.
//!
//! # Proxy mode
//!
//! `--proxy-mode ebpf` (or `''`, or nothing) is kpr's own dataplane; `iptables` and `nftables`
//! are kube-proxy's modes with kube-proxy's own rules, for nodes where eBPF is not allowed and
//! as the step-by-step migration path. The flag and the config file's `mode:` are honoured
//! alike (kubeadm's default `mode: ""` is ebpf, kpr's default). `ipvs` needs IPVS, which this
//! kernel lacks: refused (exit 2). The mode the file names also selects, as in kube-proxy,
//! which section (`iptables`, `ipvs`, `nftables`) the sync periods and masqueradeAll are read
//! from.
pub mod duration;
pub mod file;
pub mod flags;

#[cfg(test)]
mod golden_tests;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Serialize, Serializer};

use self::file::KubeProxyConfiguration;
use self::flags::{CliCommand, RunArgs, Treatment};

/// The default `--cgroup-path`: the host's cgroup v2 hierarchy, mounted there if absent.
pub const DEFAULT_CGROUP: &str = "/run/kpr/cgroupv2";
pub const DEFAULT_BPF_PIN_DIR: &str = "/sys/fs/bpf/kpr";
pub const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);
pub const DEFAULT_MIN_SYNC_PERIOD: Duration = Duration::from_secs(1);
pub const DEFAULT_MANIFEST_POLL: Duration = Duration::from_millis(200);
/// kube-proxy's ports (pkg/cluster/ports): ProxyHealthzPort, ProxyStatusPort.
pub const HEALTHZ_PORT: u16 = 10256;
pub const METRICS_PORT: u16 = 10249;

/// Usage and configuration errors: the agent exits with [`ConfigError::EXIT_CODE`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// From clap, including `--help` and `--version`: `clap::Error::exit` prints it and exits
    /// with clap's code (0 for those two, 2 otherwise).
    #[error(transparent)]
    Cli(#[from] clap::Error),
    #[error("--{flag}={value:?}: {reason}")]
    Flag {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("--{flag} is not supported: {reason}")]
    Unsupported {
        flag: &'static str,
        reason: &'static str,
    },
    #[error("config file {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {}: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    /// A field with a wrong type or value; `field` is its path (`iptables.syncPeriod`).
    #[error("config file {}: {field}: {message}", path.display())]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}

impl ConfigError {
    pub const EXIT_CODE: u8 = 2;
}

/// The dataplane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    Ebpf,
    Nftables,
    Iptables,
    Ipvs,
}

impl ProxyMode {
    /// kube-proxy's spelling; `""` is the default (ebpf in kpr).
    pub fn parse(s: &str) -> Result<ProxyMode, String> {
        match s {
            "" | "ebpf" => Ok(ProxyMode::Ebpf),
            "nftables" => Ok(ProxyMode::Nftables),
            "iptables" => Ok(ProxyMode::Iptables),
            "ipvs" => Ok(ProxyMode::Ipvs),
            "kernelspace" => Err(
                "\"kernelspace\" is kube-proxy's Windows mode; kpr runs on Linux: use ebpf".into(),
            ),
            other => Err(format!(
                "{other:?} is not a proxy mode (ebpf, nftables, iptables, ipvs)"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Ebpf => "ebpf",
            ProxyMode::Nftables => "nftables",
            ProxyMode::Iptables => "iptables",
            ProxyMode::Ipvs => "ipvs",
        }
    }
}

impl fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of `--nodeport-addresses` / `nodePortAddresses`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodePortAddress {
    /// The Node object's primary IP(s).
    Primary,
    /// 127.0.0.0/8 and ::1/128.
    Localhost,
    /// 0.0.0.0/0 and ::/0.
    All,
    Cidr(IpNet),
}

impl FromStr for NodePortAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<NodePortAddress, String> {
        match s.trim() {
            "primary" => Ok(NodePortAddress::Primary),
            "localhost" => Ok(NodePortAddress::Localhost),
            "all" => Ok(NodePortAddress::All),
            cidr => crate::cidr::parse(cidr)
                .map(NodePortAddress::Cidr)
                .map_err(|_| format!("{s:?} is neither a CIDR nor one of primary, localhost, all")),
        }
    }
}

impl fmt::Display for NodePortAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodePortAddress::Primary => f.write_str("primary"),
            NodePortAddress::Localhost => f.write_str("localhost"),
            NodePortAddress::All => f.write_str("all"),
            NodePortAddress::Cidr(c) => c.fmt(f),
        }
    }
}

impl Serialize for NodePortAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The effective configuration: what the agent uses.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Settings {
    /// `ebpf`, `iptables` or `nftables` (`ipvs` is refused).
    pub proxy_mode: ProxyMode,
    /// `--config`, if given.
    pub config_file: Option<PathBuf>,
    /// The Node's name; `None`: the hostname. Trimmed and lowercased, as kube-proxy does.
    pub hostname_override: Option<String>,
    /// `--cluster-cidr` / `clusterCIDR`, split at commas.
    pub cluster_cidrs: Vec<IpNet>,
    /// `--detect-local-mode` and its interface (`detectLocalMode`, `detectLocal`). Not
    /// serialized when default (ClusterCIDR).
    #[serde(skip_serializing_if = "DetectLocal::is_default")]
    pub detect_local: DetectLocal,
    /// Empty: all local IPs.
    pub nodeport_addresses: Vec<NodePortAddress>,
    pub masquerade_all: bool,
    /// `--iptables-masquerade-bit` / the mode section's `masqueradeBit`: the netfilter modes'
    /// masquerade mark is `1 << bit`.
    pub masquerade_bit: u32,
    /// `--iptables-localhost-nodeports` / `iptables.localhostNodePorts` (iptables mode).
    pub localhost_nodeports: bool,
    /// The IPVS mode's settings (`--ipvs-*`, the file's `ipvs:`).
    pub ipvs: IpvsSettings,
    pub kubeconfig: Option<PathBuf>,
    /// API server URL, overriding the kubeconfig's.
    pub master: Option<String>,
    /// kube-proxy's "primary IP of the node" override (0.0.0.0: unset).
    pub bind_address: IpAddr,
    /// `None`: the server is disabled.
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    #[serde(serialize_with = "duration::serialize")]
    pub sync_period: Duration,
    #[serde(serialize_with = "duration::serialize")]
    pub min_sync_period: Duration,
    /// klog-style verbosity (`-v`, `logging.verbosity`); see [`log_filter`].
    pub verbosity: u32,
    pub manifests: Option<PathBuf>,
    pub bpf_pin_dir: PathBuf,
    pub cgroup_path: PathBuf,
    pub allow_cgroup_root: bool,
    #[serde(serialize_with = "duration::serialize")]
    pub manifest_poll: Duration,
    pub status_file: Option<PathBuf>,
    /// `--bpf-services-map-max`, `--bpf-backends-map-max`. Not serialized when default.
    #[serde(skip_serializing_if = "is_default_lb_capacity")]
    pub lb_capacity: crate::ebpf::sync::Capacity,
    /// `--admin-socket` (empty: none). Not serialized when default.
    #[serde(skip_serializing_if = "is_default_admin_socket")]
    pub admin_socket: PathBuf,
    /// `--datapath-events` (eBPF mode). Not serialized when off.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub datapath_events: bool,
    /// `--devices`: where the tc (north-south) programs attach. Empty: the default devices
    /// (`ebpf::tc::default_devices`). Not serialized when empty, so the effective
    /// configuration reads as before for the default.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// kube-proxy's conntrack settings. Not serialized when default (as `devices`).
    #[serde(skip_serializing_if = "ConntrackSettings::is_default")]
    pub conntrack: ConntrackSettings,
    /// `--pod-netns-dir` (None: empty, the node's namespace only). Not serialized when default.
    #[serde(skip_serializing_if = "is_default_pod_netns_dir")]
    pub pod_netns_dir: Option<PathBuf>,
    /// `--reject-no-local-endpoints` (eBPF mode). Not serialized when default (true).
    #[serde(skip_serializing_if = "is_true")]
    pub reject_no_local_endpoints: bool,
    /// `--masquerade-local-endpoints` (eBPF mode). Not serialized when default (false).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub masquerade_local_endpoints: bool,
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_default_pod_netns_dir(dir: &Option<PathBuf>) -> bool {
    dir.as_deref() == Some(Path::new(flags::DEFAULT_POD_NETNS_DIR))
}

/// kube-proxy's local-traffic detector (`--detect-local-mode`): which traffic to a ClusterIP
/// comes from local pods. Traffic from elsewhere is masqueraded (its reply must come back
/// through this node).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "mode", content = "interface")]
pub enum DetectLocal {
    /// Sources in `--cluster-cidr` (no detector without one). kube-proxy's default.
    ClusterCidr,
    /// Sources in the Node's `spec.podCIDRs` (no detector until it has one).
    NodeCidr,
    /// Packets arriving on this bridge (`--pod-bridge-interface`).
    BridgeInterface(String),
    /// Packets arriving on an interface whose name starts with this
    /// (`--pod-interface-name-prefix`).
    InterfaceNamePrefix(String),
}

impl DetectLocal {
    fn is_default(&self) -> bool {
        *self == DetectLocal::ClusterCidr
    }

    /// kube-proxy's validation: the interface modes need their interface.
    fn parse(
        mode: Option<&str>,
        bridge: Option<&str>,
        prefix: Option<&str>,
    ) -> Result<DetectLocal, String> {
        let given = |v: Option<&str>, what: &str| match v.map(str::trim).filter(|v| !v.is_empty()) {
            Some(v) => Ok(v.to_string()),
            None => Err(format!("{what} must be set")),
        };
        match mode.map(str::trim).unwrap_or_default() {
            "" | "ClusterCIDR" => Ok(DetectLocal::ClusterCidr),
            "NodeCIDR" => Ok(DetectLocal::NodeCidr),
            "BridgeInterface" => Ok(DetectLocal::BridgeInterface(given(
                bridge,
                "the bridge interface (--pod-bridge-interface, detectLocal.bridgeInterface)",
            )?)),
            "InterfaceNamePrefix" => Ok(DetectLocal::InterfaceNamePrefix(given(
                prefix,
                "the interface name prefix (--pod-interface-name-prefix, detectLocal.interfaceNamePrefix)",
            )?)),
            other => Err(format!(
                "unknown mode {other:?} (ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix)"
            )),
        }
    }
}

/// kube-proxy's conntrack settings (`--conntrack-*`, the file's `conntrack`). The eBPF mode
/// sizes its north-south conntrack maps and sets its entries' lifetimes from them; a zero
/// duration means netfilter's default, as kube-proxy then leaves the sysctl alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ConntrackSettings {
    pub max_per_core: u32,
    pub min: u32,
    #[serde(serialize_with = "duration::serialize")]
    pub tcp_established_timeout: Duration,
    #[serde(serialize_with = "duration::serialize")]
    pub tcp_close_wait_timeout: Duration,
    /// `--conntrack-tcp-be-liberal` / `tcpBeLiberal`: netfilter accepts TCP packets outside
    /// the window instead of marking them INVALID (kpr's own conntrack never checks windows).
    pub tcp_be_liberal: bool,
    #[serde(serialize_with = "duration::serialize")]
    pub udp_timeout: Duration,
    #[serde(serialize_with = "duration::serialize")]
    pub udp_stream_timeout: Duration,
}

impl Default for ConntrackSettings {
    /// kube-proxy's defaults.
    fn default() -> Self {
        Self {
            max_per_core: 32 * 1024,
            min: 128 * 1024,
            tcp_established_timeout: Duration::from_secs(24 * 3600),
            tcp_close_wait_timeout: Duration::from_secs(3600),
            tcp_be_liberal: false,
            udp_timeout: Duration::ZERO,
            udp_stream_timeout: Duration::ZERO,
        }
    }
}

fn is_default_lb_capacity(c: &crate::ebpf::sync::Capacity) -> bool {
    *c == crate::ebpf::sync::Capacity::default()
}

fn is_default_admin_socket(p: &std::path::Path) -> bool {
    p == std::path::Path::new(crate::admin::DEFAULT_ADMIN_SOCKET)
}

impl ConntrackSettings {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl Default for Settings {
    fn default() -> Settings {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        Settings {
            proxy_mode: ProxyMode::Ebpf,
            config_file: None,
            hostname_override: None,
            cluster_cidrs: Vec::new(),
            detect_local: DetectLocal::ClusterCidr,
            nodeport_addresses: Vec::new(),
            masquerade_all: false,
            masquerade_bit: DEFAULT_MASQUERADE_BIT,
            ipvs: IpvsSettings::default(),
            localhost_nodeports: true,
            kubeconfig: None,
            master: None,
            bind_address: any,
            healthz_bind_address: Some(default_healthz(any)),
            metrics_bind_address: Some(default_metrics(any)),
            sync_period: DEFAULT_SYNC_PERIOD,
            min_sync_period: DEFAULT_MIN_SYNC_PERIOD,
            verbosity: 0,
            manifests: None,
            bpf_pin_dir: DEFAULT_BPF_PIN_DIR.into(),
            cgroup_path: DEFAULT_CGROUP.into(),
            allow_cgroup_root: false,
            manifest_poll: DEFAULT_MANIFEST_POLL,
            status_file: None,
            admin_socket: crate::admin::DEFAULT_ADMIN_SOCKET.into(),
            datapath_events: false,
            lb_capacity: Default::default(),
            devices: Vec::new(),
            conntrack: ConntrackSettings::default(),
            pod_netns_dir: Some(flags::DEFAULT_POD_NETNS_DIR.into()),
            reject_no_local_endpoints: true,
            masquerade_local_endpoints: false,
        }
    }
}

impl Settings {
    /// Stable, pretty JSON (durations in Go syntax): logs and golden tests.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("settings serialize")
    }
}

/// kube-proxy's defaults (v1alpha1 defaults.go): 0.0.0.0:10256, or [::]:10256 when the bind
/// address is IPv6.
fn default_healthz(bind: IpAddr) -> SocketAddr {
    match bind {
        IpAddr::V4(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), HEALTHZ_PORT),
        IpAddr::V6(_) => SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), HEALTHZ_PORT),
    }
}

/// 127.0.0.1:10249, or [::1]:10249 when the bind address is IPv6.
fn default_metrics(bind: IpAddr) -> SocketAddr {
    match bind {
        IpAddr::V4(_) => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), METRICS_PORT),
        IpAddr::V6(_) => SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), METRICS_PORT),
    }
}

/// Which netfilter writer a render command prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenderWriter {
    Iptables,
    Nftables,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Action {
    /// Run the agent.
    Run(Box<Settings>),
    /// `--init-only`: the configuration is valid; exit 0.
    InitOnly(Box<Settings>),
    /// `kpr render-iptables`, `kpr render-nftables`.
    Render {
        writer: RenderWriter,
        args: flags::RenderArgs,
    },
    /// `kpr import iptables-save`.
    Import(flags::ImportArgs),
    /// `kpr diff iptables-save`.
    Diff(flags::DiffArgs),
    /// `kpr cleanup`: remove kpr's nftables table and the `KPR_*` pins under `bpf_pin_dir`.
    Cleanup { bpf_pin_dir: PathBuf },
    /// `kpr status`.
    Status {
        bpf_pin_dir: PathBuf,
        admin_socket: PathBuf,
        json: bool,
    },
    /// `kpr trace`.
    Trace {
        flow: crate::inspect::trace::Flow,
        scope: crate::inspect::trace::Scope,
        bpf_pin_dir: PathBuf,
        json: bool,
    },
}

#[derive(Debug)]
pub struct Resolved {
    pub action: Action,
    /// To log (at warn level) once logging is set up.
    pub warnings: Vec<String>,
    pub verbosity: u32,
}

/// The tracing filter for a klog verbosity (RUST_LOG, if set, wins): 0-3 info, 4-5 kpr's debug,
/// 6-7 kpr's trace, 8 everything's debug, 9+ everything's trace.
pub fn log_filter(verbosity: u32) -> &'static str {
    match verbosity {
        0..=3 => "info",
        4..=5 => "info,kpr=debug",
        6..=7 => "info,kpr=trace",
        8 => "debug,kpr=trace",
        _ => "trace",
    }
}

/// Parses the command line (`args[0]` is the program name) and resolves it, with the config
/// file if one is given.
pub fn from_args<I, T>(args: I) -> Result<Resolved, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let (cli, others) = flags::parse(args)?;
    let mut warnings = Vec::new();
    let mut init_only = false;
    for o in &others {
        match o.treatment {
            Treatment::Refuse(reason) if o.on => {
                return Err(ConfigError::Unsupported {
                    flag: o.name,
                    reason,
                })
            }
            Treatment::InitOnly if o.on => init_only = true,
            _ => warnings.push(format!("ignored: kpr does not use --{}", o.name)),
        }
    }
    match cli.command {
        Some(CliCommand::RenderIptables(args)) => {
            return Ok(Resolved {
                action: Action::Render {
                    writer: RenderWriter::Iptables,
                    args,
                },
                warnings,
                verbosity: cli.run.verbosity.unwrap_or(0),
            });
        }
        Some(CliCommand::RenderNftables(args)) => {
            return Ok(Resolved {
                action: Action::Render {
                    writer: RenderWriter::Nftables,
                    args,
                },
                warnings,
                verbosity: cli.run.verbosity.unwrap_or(0),
            });
        }
        Some(CliCommand::Import {
            from: flags::ImportFrom::IptablesSave(args),
        }) => {
            return Ok(Resolved {
                action: Action::Import(args),
                warnings,
                verbosity: cli.run.verbosity.unwrap_or(0),
            });
        }
        Some(CliCommand::Diff {
            from: flags::DiffFrom::IptablesSave(args),
        }) => {
            return Ok(Resolved {
                action: Action::Diff(args),
                warnings,
                verbosity: cli.run.verbosity.unwrap_or(0),
            });
        }
        Some(CliCommand::Cleanup { bpf_pin_dir }) => {
            return Ok(Resolved {
                // `kpr cleanup --bpf-pin-dir X`, else `kpr --bpf-pin-dir X cleanup`, else the
                // default.
                action: Action::Cleanup {
                    bpf_pin_dir: bpf_pin_dir.unwrap_or(cli.run.bpf_pin_dir),
                },
                warnings,
                verbosity: cli.run.verbosity.unwrap_or(0),
            });
        }
        Some(CliCommand::Status(a)) => {
            return Ok(Resolved {
                action: Action::Status {
                    bpf_pin_dir: a.bpf_pin_dir.unwrap_or(cli.run.bpf_pin_dir),
                    admin_socket: a.admin_socket,
                    json: a.output == "json",
                },
                warnings,
                verbosity: cli.run.verbosity.unwrap_or(0),
            });
        }
        Some(CliCommand::Trace {
            src,
            dst,
            proto,
            scope,
            inspect,
        }) => {
            let (src_ip, sport) = match src.parse::<std::net::SocketAddr>() {
                Ok(a) => (a.ip(), Some(a.port())),
                Err(_) => (
                    src.parse().map_err(|_| {
                        flag_error("trace SRC", &src, "not ADDR, ADDR:PORT or [IPv6]:PORT")
                    })?,
                    None,
                ),
            };
            let proto = match proto.to_ascii_lowercase().as_str() {
                "tcp" => kpr_common::IPPROTO_TCP,
                "udp" => kpr_common::IPPROTO_UDP,
                "sctp" => kpr_common::IPPROTO_SCTP,
                _ => return Err(flag_error("trace PROTO", &proto, "tcp, udp or sctp")),
            };
            return Ok(Resolved {
                action: Action::Trace {
                    flow: crate::inspect::trace::Flow {
                        src: src_ip,
                        sport,
                        dst,
                        proto,
                    },
                    scope,
                    bpf_pin_dir: inspect.bpf_pin_dir.unwrap_or(cli.run.bpf_pin_dir),
                    json: inspect.output == "json",
                },
                warnings,
                verbosity: cli.run.verbosity.unwrap_or(0),
            });
        }
        None => {}
    }
    let (settings, more) = resolve(&cli.run)?;
    warnings.extend(more);
    let verbosity = settings.verbosity;
    let settings = Box::new(settings);
    Ok(Resolved {
        action: if init_only {
            Action::InitOnly(settings)
        } else {
            Action::Run(settings)
        },
        warnings,
        verbosity,
    })
}

/// Resolves the agent's flags and, if `--config` is given, the file, into [`Settings`] and
/// warnings (see the module doc for the precedence).
pub fn resolve(args: &RunArgs) -> Result<(Settings, Vec<String>), ConfigError> {
    let mut warnings = Vec::new();
    // As in kube-proxy, `--config=""` is no config file.
    let config = args.config.clone().filter(|c| !c.as_os_str().is_empty());
    let mut s = Settings {
        config_file: config.clone(),
        master: args.master.clone().filter(|m| !m.is_empty()),
        manifests: args.manifests.clone(),
        bpf_pin_dir: args.bpf_pin_dir.clone(),
        cgroup_path: args.cgroup_path.clone(),
        allow_cgroup_root: args.allow_cgroup_root,
        manifest_poll: args.manifest_poll,
        status_file: args.status_file.clone(),
        admin_socket: args.admin_socket.clone(),
        datapath_events: args.datapath_events,
        lb_capacity: crate::ebpf::sync::Capacity {
            services: args.bpf_services_map_max,
            backends: args.bpf_backends_map_max,
        },
        devices: parse_devices(&args.devices)?,
        pod_netns_dir: Some(args.pod_netns_dir.clone()).filter(|d| !d.as_os_str().is_empty()),
        reject_no_local_endpoints: args.reject_no_local_endpoints,
        masquerade_local_endpoints: args.masquerade_local_endpoints,
        ..Settings::default()
    };
    match &config {
        Some(path) => {
            let (cfg, unknown) = file::load(path)?;
            for flag in config_flags_given(args) {
                warnings.push(format!(
                    "ignored: --{flag}, because --config is given (as in kube-proxy, the \
                     config file replaces kube-proxy's flags); set it in the config file"
                ));
            }
            from_file(&mut s, &cfg, path)?;
            warnings.extend(cfg.unused_fields());
            warnings.extend(unknown);
        }
        None => from_flags(&mut s, args)?,
    }
    // kube-proxy's exceptions to "the file replaces the flags".
    if let Some(h) = &args.hostname_override {
        if !h.is_empty() {
            let h = h.trim();
            if h.is_empty() {
                return Err(flag_error(
                    "hostname-override",
                    args.hostname_override.as_deref().unwrap_or_default(),
                    "empty hostname-override is invalid",
                ));
            }
            s.hostname_override = Some(h.to_lowercase());
        }
    }
    if let Some(v) = args.verbosity {
        s.verbosity = v;
    }
    // kpr's own flags.
    if let Some(d) = args.sync_period {
        s.sync_period = d;
    }
    if let Some(d) = args.min_sync_period {
        s.min_sync_period = d;
    }
    validate(&s)?;
    Ok((s, warnings))
}

/// kube-proxy's flags that the config file replaces, in the order they are declared.
fn config_flags_given(a: &RunArgs) -> Vec<&'static str> {
    let given: [(&'static str, bool); 24] = [
        ("proxy-mode", a.proxy_mode.is_some()),
        ("detect-local-mode", a.detect_local_mode.is_some()),
        ("pod-bridge-interface", a.pod_bridge_interface.is_some()),
        (
            "pod-interface-name-prefix",
            a.pod_interface_name_prefix.is_some(),
        ),
        (
            "iptables-masquerade-bit",
            a.iptables_masquerade_bit.is_some(),
        ),
        (
            "iptables-localhost-nodeports",
            a.iptables_localhost_nodeports.is_some(),
        ),
        ("cluster-cidr", a.cluster_cidr.is_some()),
        ("nodeport-addresses", a.nodeport_addresses.is_some()),
        ("masquerade-all", a.masquerade_all.is_some()),
        ("kubeconfig", a.kubeconfig.is_some()),
        ("bind-address", a.bind_address.is_some()),
        ("healthz-bind-address", a.healthz_bind_address.is_some()),
        ("metrics-bind-address", a.metrics_bind_address.is_some()),
        ("healthz-port", a.healthz_port.is_some()),
        ("metrics-port", a.metrics_port.is_some()),
        ("iptables-sync-period", a.iptables_sync_period.is_some()),
        (
            "iptables-min-sync-period",
            a.iptables_min_sync_period.is_some(),
        ),
        ("conntrack-max-per-core", a.conntrack_max_per_core.is_some()),
        ("conntrack-min", a.conntrack_min.is_some()),
        (
            "conntrack-tcp-be-liberal",
            a.conntrack_tcp_be_liberal.is_some(),
        ),
        (
            "conntrack-tcp-timeout-established",
            a.conntrack_tcp_timeout_established.is_some(),
        ),
        (
            "conntrack-tcp-timeout-close-wait",
            a.conntrack_tcp_timeout_close_wait.is_some(),
        ),
        ("conntrack-udp-timeout", a.conntrack_udp_timeout.is_some()),
        (
            "conntrack-udp-timeout-stream",
            a.conntrack_udp_timeout_stream.is_some(),
        ),
    ];
    given
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
}

/// `--devices`: names as given (comma lists may repeat the flag), blanks dropped, duplicates
/// removed in order. A name the kernel could never accept is a usage error here rather than
/// an attach failure later.
fn parse_devices(given: &[String]) -> Result<Vec<String>, ConfigError> {
    let mut out: Vec<String> = Vec::new();
    for d in given.iter().map(|d| d.trim()).filter(|d| !d.is_empty()) {
        // IFNAMSIZ is 16 with the NUL; '/' and whitespace are refused by the kernel. A
        // trailing '+' (iptables' wildcard) names every device with that prefix.
        let name = d.strip_suffix('+').unwrap_or(d);
        if name.is_empty()
            || name.len() > 15
            || name.contains(['/', '+'])
            || name.contains(char::is_whitespace)
        {
            return Err(flag_error("devices", d, "not a network device name"));
        }
        if !out.iter().any(|o| o == d) {
            out.push(d.to_string());
        }
    }
    Ok(out)
}

fn flag_error(flag: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Flag {
        flag,
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn from_flags(s: &mut Settings, a: &RunArgs) -> Result<(), ConfigError> {
    s.proxy_mode = a.proxy_mode.unwrap_or(ProxyMode::Ebpf);
    if let Some(name) = &a.ipvs_scheduler {
        s.ipvs.scheduler =
            ipvs_scheduler(name).map_err(|e| flag_error("ipvs-scheduler", name, e))?;
    }
    if let Some(list) = &a.ipvs_exclude_cidrs {
        let joined = list.join(",");
        s.ipvs.exclude_cidrs =
            parse_cidr_list(&joined).map_err(|e| flag_error("ipvs-exclude-cidrs", &joined, e))?;
    }
    if let Some(on) = a.ipvs_strict_arp {
        s.ipvs.strict_arp = on;
    }
    for (given, to) in [
        (a.ipvs_tcp_timeout, &mut s.ipvs.tcp_timeout),
        (a.ipvs_tcpfin_timeout, &mut s.ipvs.tcp_fin_timeout),
        (a.ipvs_udp_timeout, &mut s.ipvs.udp_timeout),
    ] {
        if let Some(d) = given {
            *to = d;
        }
    }
    if let Some(c) = &a.cluster_cidr {
        s.cluster_cidrs = parse_cidrs(c).map_err(|e| flag_error("cluster-cidr", c, e))?;
    }
    s.detect_local = DetectLocal::parse(
        a.detect_local_mode.as_deref(),
        a.pod_bridge_interface.as_deref(),
        a.pod_interface_name_prefix.as_deref(),
    )
    .map_err(|e| {
        flag_error(
            "detect-local-mode",
            a.detect_local_mode.as_deref().unwrap_or_default(),
            e,
        )
    })?;
    if let Some(list) = &a.nodeport_addresses {
        s.nodeport_addresses = parse_nodeport_addresses(list)
            .map_err(|e| flag_error("nodeport-addresses", &list.join(","), e))?;
    }
    s.masquerade_all = a.masquerade_all.unwrap_or(false);
    if let Some(bit) = a.iptables_masquerade_bit {
        s.masquerade_bit = masquerade_bit(bit)
            .map_err(|e| flag_error("iptables-masquerade-bit", &bit.to_string(), e))?;
    }
    s.localhost_nodeports = a.iptables_localhost_nodeports.unwrap_or(true);
    s.kubeconfig = a.kubeconfig.clone().filter(|k| !k.as_os_str().is_empty());
    if let Some(b) = &a.bind_address {
        if !b.is_empty() {
            s.bind_address = b
                .parse()
                .map_err(|_| flag_error("bind-address", b, "not an IP address"))?;
        }
    }
    s.healthz_bind_address = match &a.healthz_bind_address {
        None => Some(default_healthz(s.bind_address)),
        Some(v) if v.is_empty() => None,
        Some(v) => Some(
            parse_ip_port(v, HEALTHZ_PORT).map_err(|e| flag_error("healthz-bind-address", v, e))?,
        ),
    };
    s.metrics_bind_address = match &a.metrics_bind_address {
        None => Some(default_metrics(s.bind_address)),
        Some(v) if v.is_empty() => None,
        Some(v) => Some(
            parse_ip_port(v, METRICS_PORT).map_err(|e| flag_error("metrics-bind-address", v, e))?,
        ),
    };
    // kube-proxy's deprecated --healthz-port/--metrics-port (addressFromDeprecatedFlags,
    // without --config only): 0 disables the server, another port replaces the address's.
    if let Some(p) = a.healthz_port {
        s.healthz_bind_address =
            with_port(s.healthz_bind_address, p, default_healthz(s.bind_address));
    }
    if let Some(p) = a.metrics_port {
        s.metrics_bind_address =
            with_port(s.metrics_bind_address, p, default_metrics(s.bind_address));
    }
    // kube-proxy applies --iptables-(min-)sync-period unless the mode is ipvs
    // (processV1Alpha1Flags); kpr's --(min-)sync-period win (applied by the caller).
    if let Some(d) = a.iptables_sync_period {
        s.sync_period = d;
    }
    if let Some(d) = a.iptables_min_sync_period {
        s.min_sync_period = d;
    }
    let count = |flag: &'static str, v: Option<i32>, default: u32| match v {
        None => Ok(default),
        Some(n) => u32::try_from(n).map_err(|_| flag_error(flag, &n.to_string(), "must be >= 0")),
    };
    let c = &mut s.conntrack;
    c.max_per_core = count(
        "conntrack-max-per-core",
        a.conntrack_max_per_core,
        c.max_per_core,
    )?;
    c.min = count("conntrack-min", a.conntrack_min, c.min)?;
    if let Some(on) = a.conntrack_tcp_be_liberal {
        c.tcp_be_liberal = on;
    }
    for (given, field) in [
        (
            a.conntrack_tcp_timeout_established,
            &mut c.tcp_established_timeout,
        ),
        (
            a.conntrack_tcp_timeout_close_wait,
            &mut c.tcp_close_wait_timeout,
        ),
        (a.conntrack_udp_timeout, &mut c.udp_timeout),
        (a.conntrack_udp_timeout_stream, &mut c.udp_stream_timeout),
    ] {
        if let Some(d) = given {
            *field = d;
        }
    }
    Ok(())
}

fn with_port(addr: Option<SocketAddr>, port: u16, default: SocketAddr) -> Option<SocketAddr> {
    if port == 0 {
        return None;
    }
    let mut a = addr.unwrap_or(default);
    a.set_port(port);
    Some(a)
}

fn from_file(
    s: &mut Settings,
    cfg: &KubeProxyConfiguration,
    path: &std::path::Path,
) -> Result<(), ConfigError> {
    let field = |field: &str, message: String| ConfigError::Field {
        path: path.to_path_buf(),
        field: field.to_string(),
        message,
    };
    let mode = cfg.mode_str();
    s.proxy_mode = ProxyMode::parse(mode).map_err(|e| field("mode", e))?;
    if let Some(ipvs) = &cfg.ipvs {
        if let Some(name) = ipvs.scheduler.as_deref().filter(|n| !n.is_empty()) {
            s.ipvs.scheduler = ipvs_scheduler(name).map_err(|e| field("ipvs.scheduler", e))?;
        }
        if let Some(list) = &ipvs.exclude_cidrs {
            s.ipvs.exclude_cidrs =
                parse_cidr_list(&list.join(",")).map_err(|e| field("ipvs.excludeCIDRs", e))?;
        }
        if let Some(on) = ipvs.strict_arp {
            s.ipvs.strict_arp = on;
        }
        for (given, to) in [
            (&ipvs.tcp_timeout, &mut s.ipvs.tcp_timeout),
            (&ipvs.tcp_fin_timeout, &mut s.ipvs.tcp_fin_timeout),
            (&ipvs.udp_timeout, &mut s.ipvs.udp_timeout),
        ] {
            if let Some(d) = given {
                *to = d.0;
            }
        }
    }
    if let Some(h) = cfg.hostname_override.as_deref().map(str::trim) {
        if !h.is_empty() {
            s.hostname_override = Some(h.to_lowercase());
        }
    }
    if let Some(c) = cfg.cluster_cidr.as_deref().filter(|c| !c.trim().is_empty()) {
        s.cluster_cidrs = parse_cidrs(c).map_err(|e| field("clusterCIDR", e))?;
    }
    s.detect_local = DetectLocal::parse(
        cfg.detect_local_mode.as_deref(),
        cfg.detect_local
            .as_ref()
            .and_then(|d| d.bridge_interface.as_deref()),
        cfg.detect_local
            .as_ref()
            .and_then(|d| d.interface_name_prefix.as_deref()),
    )
    .map_err(|e| field("detectLocalMode", e))?;
    if let Some(list) = &cfg.node_port_addresses {
        s.nodeport_addresses =
            parse_nodeport_addresses(list).map_err(|e| field("nodePortAddresses", e))?;
    }
    s.kubeconfig = cfg
        .client_connection
        .as_ref()
        .and_then(|c| c.kubeconfig.as_deref())
        .filter(|k| !k.is_empty())
        .map(PathBuf::from);
    if let Some(b) = cfg.bind_address.as_deref().filter(|b| !b.is_empty()) {
        s.bind_address = b
            .parse()
            .map_err(|_| field("bindAddress", format!("{b:?} is not an IP address")))?;
    }
    // In the file, empty means the default (kube-proxy's defaulting runs before anything else).
    s.healthz_bind_address = Some(match cfg.healthz_bind_address.as_deref() {
        None | Some("") => default_healthz(s.bind_address),
        Some(v) => parse_ip_port(v, HEALTHZ_PORT).map_err(|e| field("healthzBindAddress", e))?,
    });
    s.metrics_bind_address = Some(match cfg.metrics_bind_address.as_deref() {
        None | Some("") => default_metrics(s.bind_address),
        Some(v) => parse_ip_port(v, METRICS_PORT).map_err(|e| field("metricsBindAddress", e))?,
    });
    let v = cfg.values();
    s.masquerade_all = v.masquerade_all;
    if let Some(bit) = v.masquerade_bit {
        let section = cfg.section().name();
        s.masquerade_bit =
            masquerade_bit(bit).map_err(|e| field(&format!("{section}.masqueradeBit"), e))?;
    }
    s.localhost_nodeports = v.localhost_nodeports.unwrap_or(true);
    s.sync_period = v.sync_period.unwrap_or(DEFAULT_SYNC_PERIOD);
    s.min_sync_period = v.min_sync_period.unwrap_or(DEFAULT_MIN_SYNC_PERIOD);
    s.verbosity = cfg.logging.as_ref().and_then(|l| l.verbosity).unwrap_or(0);
    if let Some(c) = &cfg.conntrack {
        let count = |name: &str, v: Option<i32>, default: u32| match v {
            None => Ok(default),
            Some(n) => u32::try_from(n)
                .map_err(|_| field(&format!("conntrack.{name}"), format!("{n} must be >= 0"))),
        };
        let t = &mut s.conntrack;
        t.max_per_core = count("maxPerCore", c.max_per_core, t.max_per_core)?;
        t.min = count("min", c.min, t.min)?;
        if let Some(on) = c.tcp_be_liberal {
            t.tcp_be_liberal = on;
        }
        for (given, to) in [
            (&c.tcp_established_timeout, &mut t.tcp_established_timeout),
            (&c.tcp_close_wait_timeout, &mut t.tcp_close_wait_timeout),
            (&c.udp_timeout, &mut t.udp_timeout),
            (&c.udp_stream_timeout, &mut t.udp_stream_timeout),
        ] {
            if let Some(d) = given {
                *to = d.0;
            }
        }
    }
    Ok(())
}

/// An IPVS scheduler name as IPVS takes it (at most 15 bytes, a word).
fn ipvs_scheduler(name: &str) -> Result<String, String> {
    let name = name.trim();
    if name.is_empty()
        || name.len() > 15
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(format!(
            "{name:?} is not an IPVS scheduler name (rr, wrr, lc, wlc, sh, mh, ...)"
        ));
    }
    Ok(name.to_string())
}

/// A comma-separated list of CIDRs (`--ipvs-exclude-cidrs`), any number of either family.
fn parse_cidr_list(s: &str) -> Result<Vec<IpNet>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| c.parse::<IpNet>().map_err(|e| format!("{c:?}: {e}")))
        .collect()
}

/// The IPVS mode's settings, kube-proxy's `--ipvs-*` flags.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct IpvsSettings {
    pub scheduler: String,
    pub exclude_cidrs: Vec<IpNet>,
    pub strict_arp: bool,
    /// 0: leave the kernel's as they are.
    #[serde(serialize_with = "duration::serialize")]
    pub tcp_timeout: Duration,
    #[serde(serialize_with = "duration::serialize")]
    pub tcp_fin_timeout: Duration,
    #[serde(serialize_with = "duration::serialize")]
    pub udp_timeout: Duration,
}

impl Default for IpvsSettings {
    fn default() -> Self {
        IpvsSettings {
            scheduler: "rr".into(),
            exclude_cidrs: Vec::new(),
            strict_arp: false,
            tcp_timeout: Duration::ZERO,
            tcp_fin_timeout: Duration::ZERO,
            udp_timeout: Duration::ZERO,
        }
    }
}

/// kube-proxy's default `--iptables-masquerade-bit`.
pub const DEFAULT_MASQUERADE_BIT: u32 = 14;

/// A masquerade bit as kube-proxy validates it: 0 to 31.
fn masquerade_bit(bit: i32) -> Result<u32, String> {
    u32::try_from(bit)
        .ok()
        .filter(|b| *b <= 31)
        .ok_or_else(|| format!("{bit} is not a bit of the 32-bit mark (0 to 31)"))
}

/// `--cluster-cidr`: one CIDR or a dual-stack pair, comma-separated (kube-proxy trims each).
pub fn parse_cidrs(s: &str) -> Result<Vec<IpNet>, String> {
    let cidrs = s
        .split(',')
        .map(|c| crate::cidr::parse(c.trim()).map_err(|e| e.to_string()))
        .collect::<Result<Vec<IpNet>, String>>()?;
    if cidrs.len() > 2 {
        return Err(format!(
            "{s:?}: at most one IPv4 and one IPv6 CIDR (a dual-stack pair)"
        ));
    }
    Ok(cidrs)
}

fn parse_nodeport_addresses(list: &[String]) -> Result<Vec<NodePortAddress>, String> {
    list.iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.parse())
        .collect()
}

/// `IP:PORT`, `[IPv6]:PORT`, or a bare IP (kube-proxy appends the default port).
fn parse_ip_port(s: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let ip = s.trim_start_matches('[').trim_end_matches(']');
    ip.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, default_port))
        .map_err(|_| format!("{s:?} is not IP:PORT"))
}

fn validate(s: &Settings) -> Result<(), ConfigError> {
    use duration::format_go_duration as show;
    if s.sync_period.is_zero() {
        return Err(ConfigError::Invalid(
            "sync period must be greater than 0".into(),
        ));
    }
    if s.min_sync_period > s.sync_period {
        return Err(ConfigError::Invalid(format!(
            "sync period ({}) must be greater than or equal to the minimum sync period ({})",
            show(s.sync_period),
            show(s.min_sync_period)
        )));
    }
    if s.manifest_poll.is_zero() {
        return Err(ConfigError::Invalid(
            "--manifest-poll must be greater than 0".into(),
        ));
    }
    Ok(())
}
