//! The command line: kube-proxy's flags (those kpr uses, and the rest accepted and ignored so that
//! a kube-proxy DaemonSet's arguments work unchanged) plus kpr's own.
//!
//! Syntax follows kube-proxy's (spf13/pflag): `--flag=value` or `--flag value`; boolean flags are
//! `--flag`, `--flag=true` or `--flag=false` (never `--flag false`); a repeated flag's last value
//! wins (lists such as `--nodeport-addresses` accumulate); `-v=2`, `-v 2` and `--v=2` set the
//! log verbosity.
use std::path::PathBuf;
use std::time::Duration;

use clap::{Arg, ArgAction, ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

use super::duration::parse_go_duration;
use super::ProxyMode;

const USED: &str = "kube-proxy flags";
const OWN: &str = "kpr flags";
const IGNORED: &str = "kube-proxy flags accepted and ignored by kpr";

#[derive(Parser, Debug, Clone)]
#[command(
    name = "kpr",
    version,
    about = "kpr: a kube-proxy replacement with an eBPF dataplane",
    long_about = "kpr: a kube-proxy replacement with an eBPF dataplane.\n\n\
        It takes kube-proxy's flags and its --config file (KubeProxyConfiguration, as kubeadm \
        writes it in the kube-proxy ConfigMap), so it can run in place of kube-proxy unchanged. \
        Settings kpr does not use are accepted with a warning.",
    args_override_self = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<CliCommand>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug, Clone)]
pub enum CliCommand {
    /// Print the iptables-restore input kube-proxy (iptables mode) would load for the Services
    /// in a manifest directory. The benchmark's baseline.
    RenderIptables(RenderArgs),
    /// Print the `nft -f` input kube-proxy (nftables mode) would load for the Services in a
    /// manifest directory. The benchmark's baseline for the nftables mode.
    RenderNftables(RenderArgs),
    /// Read back what a node's kube-proxy (iptables mode) implements, from its rules, as
    /// Service and EndpointSlice manifests that `kpr --manifests DIR` serves. What the rules
    /// cannot say is listed on stderr.
    Import {
        #[command(subcommand)]
        from: ImportFrom,
    },
    /// Compare the state kube-proxy's rules implement with a manifest directory's Services,
    /// frontend by frontend (endpoints, traffic policies, affinity, source ranges): one line
    /// per difference; exit status 1 if there is any, 0 if none, 2 on errors.
    Diff {
        #[command(subcommand)]
        from: DiffFrom,
    },
    /// Remove what any proxy mode left on this node, in this network namespace: the eBPF
    /// mode's nftables table (`table ip kpr`), pinned maps and program attachments (the
    /// `KPR_*` pins under --bpf-pin-dir, then the directory if it is left empty; removing the
    /// `KPR_LINK_*` pins detaches the programs), and the netfilter modes' (and kube-proxy's)
    /// iptables chains and nftables tables. Run it after the agent stopped. Exits 0 when there
    /// is nothing to remove.
    Cleanup {
        /// bpffs directory where kpr pinned its maps [default: /sys/fs/bpf/kpr].
        #[arg(long, value_name = "DIR")]
        bpf_pin_dir: Option<PathBuf>,
    },
    /// What this node's kpr (eBPF mode) programmed, read from the live pinned maps: every
    /// frontend with its backends, affinity and policies, then the datapath counters and the
    /// maps' occupancy. Works while the agent is down; the Service names come from the agent's
    /// admin socket when it runs.
    Status(InspectArgs),
    /// Which backend a flow from SRC to DST:PORT would reach, and why, from the live maps:
    /// frontend, scope, source ranges, endpoints, a known flow's conntrack entry, the client's
    /// affinity entry, and the slots a new flow is chosen from.
    Trace {
        /// The client address, optionally with its port (`ADDR`, `ADDR:PORT` or
        /// `[IPv6]:PORT`; the port finds a known flow's conntrack entry).
        src: String,
        /// The destination, `ADDR:PORT` or `[IPv6]:PORT`.
        dst: std::net::SocketAddr,
        /// `tcp` or `udp`.
        #[arg(default_value = "tcp")]
        proto: String,
        /// Which path: the socket programs (internal), the tc programs (external), or auto.
        #[arg(long, value_enum, default_value = "auto")]
        scope: crate::inspect::trace::Scope,
        #[command(flatten)]
        inspect: InspectArgs,
    },
}

/// What `kpr import` reads.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum ImportFrom {
    /// The output of `iptables-save` (or `ip6tables-save`) on a node running kube-proxy in
    /// iptables mode.
    IptablesSave(ImportArgs),
}

/// What `kpr diff` compares.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum DiffFrom {
    /// The output of `iptables-save` (or `ip6tables-save`) against --manifests.
    IptablesSave(DiffArgs),
}

#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct ImportArgs {
    /// The iptables-save output.
    pub file: PathBuf,
    /// Write one manifest per Service into this directory (created if missing) instead of
    /// printing them on stdout. Nothing is written when the dump cannot be imported.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// The name of the dump's node: the nodeName of its own endpoints (KUBE-SVL- chains).
    #[arg(long, value_name = "NAME", default_value = crate::import::DEFAULT_NODE)]
    pub node: String,
}

#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct DiffArgs {
    /// The iptables-save output.
    pub file: PathBuf,
    /// Compare with a manifest directory (as `kpr --manifests` reads it) instead of the
    /// running agent.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// The running agent's admin socket: what it programmed (in any proxy mode) is compared,
    /// unless `--manifests` is given.
    #[arg(long, value_name = "PATH", default_value = crate::admin::DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,
    /// The dump's node: endpoints of the manifests with this nodeName are its local ones.
    #[arg(long, value_name = "NAME", default_value = crate::import::DEFAULT_NODE)]
    pub node: String,
}

/// Where `kpr status` and `kpr trace` read from, and how they print.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct InspectArgs {
    /// bpffs directory where kpr pinned its maps [default: /sys/fs/bpf/kpr].
    #[arg(long, value_name = "DIR")]
    pub bpf_pin_dir: Option<PathBuf>,
    /// The agent's admin socket.
    #[arg(long, value_name = "PATH", default_value = crate::admin::DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,
    /// `table` or `json`.
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

/// The render commands' inputs: which Services, and the node-wide settings that shape rules.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct RenderArgs {
    #[arg(long)]
    pub manifests: PathBuf,
    #[arg(long)]
    pub cluster_cidr: Option<String>,
    /// Place this Service's ("namespace/name") rules last in the services chain or map
    /// (iptables: the worst case for the linear lookup).
    #[arg(long)]
    pub last: Option<String>,
    /// Render NodePorts for this node, whose v1/Node object is in the manifest directory.
    #[arg(long)]
    pub node: Option<String>,
}

/// The agent's flags as given. `None`: not on the command line (defaults are applied when the
/// flags and the config file are resolved into [`super::Settings`]).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// The path to the configuration file (KubeProxyConfiguration). When given, kube-proxy's
    /// configuration flags below are ignored, as in kube-proxy, except --hostname-override and -v.
    #[arg(long, value_name = "FILE", help_heading = USED)]
    pub config: Option<PathBuf>,
    /// Which proxy mode to use: 'ebpf' (kpr's, the default), or kube-proxy's 'nftables',
    /// 'iptables', 'ipvs' (not available in kpr); '' means the default.
    #[arg(long, value_name = "MODE", value_parser = parse_proxy_mode, help_heading = USED)]
    pub proxy_mode: Option<ProxyMode>,
    /// If non-empty, will be used as the name of the Node that kpr is running on (default: the
    /// hostname). Applies even with --config.
    #[arg(long, value_name = "NAME", help_heading = USED)]
    pub hostname_override: Option<String>,
    /// The CIDR range(s) of the pods in the cluster (a comma-separated dual-stack pair at most).
    #[arg(long, value_name = "CIDRS", help_heading = USED)]
    pub cluster_cidr: Option<String>,
    /// How traffic from local pods is told apart ('ClusterCIDR', the default: sources in
    /// --cluster-cidr; 'NodeCIDR': the Node's spec.podCIDRs; 'BridgeInterface': arriving on
    /// --pod-bridge-interface; 'InterfaceNamePrefix': arriving on an interface named
    /// --pod-interface-name-prefix*). ClusterIP traffic from elsewhere is masqueraded.
    #[arg(long, value_name = "MODE", help_heading = USED)]
    pub detect_local_mode: Option<String>,
    /// The bridge of the pods, for --detect-local-mode=BridgeInterface.
    #[arg(long, value_name = "NAME", help_heading = USED)]
    pub pod_bridge_interface: Option<String>,
    /// The prefix of the pods' interface names, for --detect-local-mode=InterfaceNamePrefix.
    #[arg(long, value_name = "PREFIX", help_heading = USED)]
    pub pod_interface_name_prefix: Option<String>,
    /// Comma-separated CIDR ranges of the node IPs that accept NodePort connections, or the
    /// keyword 'primary' (also 'localhost', 'all'), matched against the node's interface
    /// addresses. Default: all local IPs ('primary' in the nftables mode).
    #[arg(
        long,
        value_name = "CIDRS",
        value_delimiter = ',',
        action = ArgAction::Append,
        help_heading = USED
    )]
    pub nodeport_addresses: Option<Vec<String>>,
    /// SNAT all traffic sent via Service cluster IPs.
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = parse_go_bool,
        help_heading = USED
    )]
    pub masquerade_all: Option<bool>,
    /// If using the iptables or nftables proxy, the bit of the fwmark space to mark packets
    /// requiring SNAT with. Must be within the range [0, 31].
    #[arg(long, value_name = "INT", help_heading = USED)]
    pub iptables_masquerade_bit: Option<i32>,
    /// The IPVS scheduler (`--proxy-mode ipvs`): rr (default), wrr, lc, wlc, sh, mh (Maglev
    /// hashing), ... as the kernel has them.
    #[arg(long, value_name = "NAME", help_heading = USED)]
    pub ipvs_scheduler: Option<String>,
    /// CIDRs whose virtual servers the IPVS mode leaves alone when cleaning up.
    #[arg(
        long,
        value_name = "CIDRS",
        value_delimiter = ',',
        action = ArgAction::Append,
        help_heading = USED
    )]
    pub ipvs_exclude_cidrs: Option<Vec<String>>,
    /// Strict ARP (arp_ignore=1, arp_announce=2), so the service addresses on kube-ipvs0 are
    /// not answered for (IPVS mode).
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = parse_go_bool,
        help_heading = USED
    )]
    pub ipvs_strict_arp: Option<bool>,
    /// IPVS idle timeout of TCP connections (0: leave as it is).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = USED)]
    pub ipvs_tcp_timeout: Option<Duration>,
    /// IPVS timeout of TCP connections after a FIN (0: leave as it is).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = USED)]
    pub ipvs_tcpfin_timeout: Option<Duration>,
    /// IPVS timeout of UDP flows (0: leave as it is).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = USED)]
    pub ipvs_udp_timeout: Option<Duration>,
    /// If false, kube-proxy (iptables mode) will not accept NodePort traffic on localhost
    /// (IPv4 only; route_localnet is set when true).
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = parse_go_bool,
        help_heading = USED
    )]
    pub iptables_localhost_nodeports: Option<bool>,
    /// Path to kubeconfig file with authorization information (the master location can be
    /// overridden by the master flag).
    #[arg(long, value_name = "FILE", help_heading = USED)]
    pub kubeconfig: Option<PathBuf>,
    /// The address of the Kubernetes API server (overrides any value in kubeconfig). Applies
    /// even with --config.
    #[arg(long, value_name = "URL", help_heading = USED)]
    pub master: Option<String>,
    /// Overrides kpr's idea of what its node's primary IP is [default: 0.0.0.0].
    #[arg(long, value_name = "IP", help_heading = USED)]
    pub bind_address: Option<String>,
    /// The IP address and port for the health check server to serve on; empty to disable
    /// [default: 0.0.0.0:10256].
    #[arg(long, value_name = "IP:PORT", help_heading = USED)]
    pub healthz_bind_address: Option<String>,
    /// The IP address and port for the metrics server to serve on; empty to disable
    /// [default: 127.0.0.1:10249].
    #[arg(long, value_name = "IP:PORT", help_heading = USED)]
    pub metrics_bind_address: Option<String>,
    /// Deprecated (kube-proxy): the health check server's port; 0 disables it.
    #[arg(long, value_name = "PORT", hide = true)]
    pub healthz_port: Option<u16>,
    /// Deprecated (kube-proxy): the metrics server's port; 0 disables it.
    #[arg(long, value_name = "PORT", hide = true)]
    pub metrics_port: Option<u16>,
    /// kube-proxy's name for --sync-period (honoured: kpr replaces the iptables proxier).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = USED)]
    pub iptables_sync_period: Option<Duration>,
    /// kube-proxy's name for --min-sync-period (honoured: kpr replaces the iptables proxier).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = USED)]
    pub iptables_min_sync_period: Option<Duration>,
    /// Maximum number of NAT connections to track per CPU core (0 to leave the limit as-is
    /// and ignore conntrack-min). Sizes the eBPF mode's conntrack maps.
    #[arg(long, value_name = "INT", help_heading = USED)]
    pub conntrack_max_per_core: Option<i32>,
    /// Minimum number of conntrack entries to allocate, regardless of conntrack-max-per-core.
    #[arg(long, value_name = "INT", help_heading = USED)]
    pub conntrack_min: Option<i32>,
    /// Idle timeout for established TCP connections (0 to leave as-is: netfilter's 5 days).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = USED)]
    pub conntrack_tcp_timeout_established: Option<Duration>,
    /// NAT timeout for TCP connections in the CLOSE_WAIT state (0 to leave as-is: 60s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = USED)]
    pub conntrack_tcp_timeout_close_wait: Option<Duration>,
    /// Enable liberal mode for tracking TCP packets (netfilter's nf_conntrack_tcp_be_liberal).
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = parse_go_bool,
        help_heading = USED
    )]
    pub conntrack_tcp_be_liberal: Option<bool>,
    /// Idle timeout for UNREPLIED UDP connections (0 to leave as-is: 30s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = USED)]
    pub conntrack_udp_timeout: Option<Duration>,
    /// Idle timeout for ASSURED UDP connections (0 to leave as-is: 120s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = USED)]
    pub conntrack_udp_timeout_stream: Option<Duration>,
    /// Log level verbosity (0-3 info, 4-5 debug, 6+ trace; RUST_LOG, if set, wins).
    #[arg(short = 'v', long = "v", value_name = "LEVEL", help_heading = USED)]
    pub verbosity: Option<u32>,

    /// Read Services and EndpointSlices from YAML files in this directory (and follow changes).
    #[arg(long, env = "KPR_MANIFESTS", value_name = "DIR", help_heading = OWN)]
    pub manifests: Option<PathBuf>,
    /// bpffs directory where kpr pins its maps (kept across restarts).
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/kpr", help_heading = OWN)]
    pub bpf_pin_dir: PathBuf,
    /// cgroup v2 directory whose processes get socket-level load balancing. The default is the
    /// host's cgroup v2 root, mounted there if absent (what a DaemonSet wants).
    #[arg(long, value_name = "DIR", default_value = super::DEFAULT_CGROUP, help_heading = OWN)]
    pub cgroup_path: PathBuf,
    /// Allow attaching to the root of a cgroup v2 hierarchy (implied by the default path).
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value = "false",
        value_parser = parse_go_bool,
        help_heading = OWN
    )]
    pub allow_cgroup_root: bool,
    /// Interval of full resyncs [default: 30s]. Applies even with --config (it is kpr's flag).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = OWN)]
    pub sync_period: Option<Duration>,
    /// Minimum interval between syncs; changes closer together are coalesced [default: 1s].
    /// Applies even with --config.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = OWN)]
    pub min_sync_period: Option<Duration>,
    /// How often the manifest directory is checked for changes.
    #[arg(long, value_name = "DURATION", default_value = "200ms", value_parser = parse_duration, help_heading = OWN)]
    pub manifest_poll: Duration,
    /// Write a JSON status after every sync and every second: sync counts, datapath counters,
    /// and every programmed frontend with its backends (for tests, benchmarks and debugging).
    #[arg(long, value_name = "FILE", help_heading = OWN)]
    pub status_file: Option<PathBuf>,
    /// Entries of the eBPF mode's services map (each Service port takes one per frontend plus
    /// one per backend). Service ports that do not fit are refused, each with a log line.
    #[arg(long, value_name = "N", default_value_t = kpr_common::SERVICES_MAP_MAX as usize, help_heading = OWN)]
    pub bpf_services_map_max: usize,
    /// Entries of the eBPF mode's backends map (one per distinct backend address and port).
    #[arg(long, value_name = "N", default_value_t = kpr_common::BACKENDS_MAP_MAX as usize, help_heading = OWN)]
    pub bpf_backends_map_max: usize,
    /// Unix socket where the agent serves its status to `kpr status` and `kpr trace` (the
    /// Service names of what it programmed); empty: none.
    #[arg(long, value_name = "PATH", default_value = crate::admin::DEFAULT_ADMIN_SOCKET, help_heading = OWN)]
    pub admin_socket: PathBuf,
    /// eBPF mode: log every translation and every drop or refusal in the kernel programs,
    /// with the Service and the reason (target `kpr::datapath`; at most 200 events per second
    /// per CPU). For debugging: off, the programs carry no event code at all.
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value = "false",
        value_parser = parse_go_bool,
        help_heading = OWN
    )]
    pub datapath_events: bool,
    /// Comma-separated devices that receive traffic from outside the node (NodePort,
    /// externalIPs, LoadBalancer IPs, ClusterIPs routed to the node); kpr attaches its tc
    /// programs to them. A trailing '+' names every device with that prefix, looked up again
    /// on every full sync (e.g. 'tap+' for the pods of a sandboxed runtime, whose guests'
    /// traffic reaches the node without a socket of the node's). Default: every up,
    /// non-loopback Ethernet device with an IPv4 address (the node's addresses).
    #[arg(
        long,
        value_name = "DEVICES",
        value_delimiter = ',',
        action = ArgAction::Append,
        help_heading = OWN
    )]
    pub devices: Vec<String>,
    /// eBPF mode: the directory of the pods' network namespaces (where CRI runtimes and
    /// `ip netns` keep them). A connected UDP socket kpr balanced to a backend that left its
    /// Service is destroyed (its next call fails, so the client reconnects),
    /// in the node's namespace and in each of these. Empty: the node's namespace only.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_POD_NETNS_DIR, help_heading = OWN)]
    pub pod_netns_dir: PathBuf,
    /// eBPF mode: a connection to a ClusterIP with internalTrafficPolicy Local and no endpoint
    /// on this node (while the Service has endpoints elsewhere) is refused at once
    /// (ECONNREFUSED). false: dropped, as kube-proxy does (the client times out).
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value = "true",
        value_parser = parse_go_bool,
        help_heading = OWN
    )]
    pub reject_no_local_endpoints: bool,
    /// eBPF mode: masquerade externalTrafficPolicy Cluster traffic from outside the node to
    /// backends on this node too, as kube-proxy does. Default false: such traffic keeps the
    /// client's address (its replies come back through this node anyway); traffic to other
    /// nodes' backends is always masqueraded.
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value = "false",
        value_parser = parse_go_bool,
        help_heading = OWN
    )]
    pub masquerade_local_endpoints: bool,
}

/// Where containerd, CRI-O and `ip netns` keep named network namespaces.
pub const DEFAULT_POD_NETNS_DIR: &str = "/var/run/netns";

/// What kpr does with a kube-proxy flag it has no use for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Treatment {
    /// Accepted; one warning.
    Ignore,
    /// `--cleanup`, `--write-config-to`: they make kube-proxy do something else and exit;
    /// running the proxy instead would be wrong, so kpr refuses (exit 2).
    Refuse(&'static str),
    /// `--init-only`: kpr has no separate privileged init step; it checks its configuration
    /// and exits 0.
    InitOnly,
}

/// A kube-proxy flag kpr does not use.
pub struct OtherFlag {
    pub name: &'static str,
    /// Boolean flags take no value or `=BOOL`; the others take one.
    pub boolean: bool,
    /// Not shown by --help: removed from kube-proxy (klog's pre-1.26 flags, userspace proxy)
    /// but still found in old DaemonSets.
    pub hidden: bool,
    pub treatment: Treatment,
    pub help: &'static str,
}

const fn ignore(name: &'static str, boolean: bool, help: &'static str) -> OtherFlag {
    OtherFlag {
        name,
        boolean,
        hidden: false,
        treatment: Treatment::Ignore,
        help,
    }
}

const fn legacy(name: &'static str, boolean: bool) -> OtherFlag {
    OtherFlag {
        name,
        boolean,
        hidden: true,
        treatment: Treatment::Ignore,
        help: "removed from kube-proxy; ignored",
    }
}

/// kube-proxy's flags (cmd/kube-proxy/app/options.go and component-base's logging flags) that
/// kpr accepts without using them.
pub const OTHER_FLAGS: &[OtherFlag] = &[
    OtherFlag {
        name: "cleanup",
        boolean: true,
        hidden: false,
        treatment: Treatment::Refuse("kpr leaves no iptables or IPVS rules; `kpr cleanup` removes its nftables table and pinned maps"),
        help: "kube-proxy: clean up iptables and IPVS rules and exit (refused by kpr)",
    },
    OtherFlag {
        name: "write-config-to",
        boolean: false,
        hidden: false,
        treatment: Treatment::Refuse("kpr cannot write a default KubeProxyConfiguration; use kube-proxy's"),
        help: "kube-proxy: write the default configuration to this file and exit (refused by kpr)",
    },
    OtherFlag {
        name: "init-only",
        boolean: true,
        hidden: false,
        treatment: Treatment::InitOnly,
        help: "kube-proxy: do the privileged initialization and exit; kpr has none: it checks its configuration and exits 0",
    },
    ignore("feature-gates", false, "feature gates (key=value pairs)"),
    ignore("kube-api-content-type", false, "content type of requests sent to the apiserver"),
    ignore("kube-api-burst", false, "burst to use while talking with the apiserver"),
    ignore("kube-api-qps", false, "QPS to use while talking with the apiserver"),
    ignore("bind-address-hard-fail", true, "treat failure to bind a port as fatal"),
    ignore("profiling", true, "profiling via /debug/pprof"),
    ignore("show-hidden-metrics-for-version", false, "show metrics hidden in this version"),
    ignore("ipvs-sync-period", false, "IPVS mode's sync period"),
    ignore("ipvs-min-sync-period", false, "IPVS mode's minimum sync period"),
    ignore("oom-score-adj", false, "oom-score-adj of the process"),
    ignore("config-sync-period", false, "how often configuration from the apiserver is refreshed"),
    ignore("vmodule", false, "per-file log verbosity"),
    ignore("log-flush-frequency", false, "log flush interval"),
    ignore("logging-format", false, "log format (text, json)"),
    ignore("log-json-split-stream", true, "JSON logs: info to stdout"),
    ignore("log-json-info-buffer-size", false, "JSON logs: info buffer"),
    ignore("log-text-split-stream", true, "text logs: info to stdout"),
    ignore("log-text-info-buffer-size", false, "text logs: info buffer"),
    legacy("logtostderr", true),
    legacy("alsologtostderr", true),
    legacy("log-dir", false),
    legacy("log-file", false),
    legacy("log-file-max-size", false),
    legacy("skip-headers", true),
    legacy("skip-log-headers", true),
    legacy("one-output", true),
    legacy("stderrthreshold", false),
    legacy("add-dir-header", true),
    legacy("log-backtrace-at", false),
    legacy("proxy-port-range", false),
    legacy("udp-timeout", false),
    legacy("resource-container", false),
    legacy("conntrack-max", false),
    legacy("cleanup-ipvs", true),
    OtherFlag {
        name: "cleanup-iptables",
        boolean: true,
        hidden: true,
        treatment: Treatment::Refuse("kpr leaves no iptables rules; `kpr cleanup` removes what it created"),
        help: "removed from kube-proxy",
    },
];

/// The clap command: [`Cli`] plus [`OTHER_FLAGS`].
pub fn command() -> clap::Command {
    let mut cmd = Cli::command();
    for f in OTHER_FLAGS {
        let mut arg = Arg::new(f.name)
            .long(f.name)
            .help(f.help)
            .hide(f.hidden)
            .help_heading(IGNORED);
        arg = if f.boolean {
            arg.value_name("BOOL")
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value("true")
                .value_parser(parse_go_bool)
                .action(ArgAction::Append)
        } else {
            // Append: a flag kube-proxy takes as a list (--feature-gates, --ipvs-exclude-cidrs)
            // may be repeated.
            arg.value_name("VALUE")
                .num_args(1)
                .action(ArgAction::Append)
        };
        cmd = cmd.arg(arg);
    }
    cmd
}

/// A kube-proxy flag that kpr does not use, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GivenOther {
    pub name: &'static str,
    pub treatment: Treatment,
    /// A boolean flag's (last) value; true for the others.
    pub on: bool,
}

/// Parses the command line (`args[0]` is the program name). Errors are clap's (usage: exit 2;
/// `--help`, `--version`: exit 0; `clap::Error::exit` prints and exits accordingly).
pub fn parse<I, T>(args: I) -> Result<(Cli, Vec<GivenOther>), clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = command().try_get_matches_from(args)?;
    let cli = Cli::from_arg_matches(&matches)?;
    Ok((cli, given_others(&matches)))
}

fn given_others(m: &ArgMatches) -> Vec<GivenOther> {
    let mut given: Vec<(usize, GivenOther)> = Vec::new();
    for f in OTHER_FLAGS {
        let Some(index) = m.indices_of(f.name).and_then(|mut i| i.next()) else {
            continue;
        };
        let on = !f.boolean
            || m.get_many::<bool>(f.name)
                .and_then(|mut v| v.next_back().copied())
                .unwrap_or(false);
        given.push((
            index,
            GivenOther {
                name: f.name,
                treatment: f.treatment,
                on,
            },
        ));
    }
    // Command-line order, so warnings read like the command line.
    given.sort_by_key(|(i, _)| *i);
    given.into_iter().map(|(_, g)| g).collect()
}

/// pflag's (Go's strconv.ParseBool) booleans.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (true, false, 1, 0, t, f)")),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    parse_go_duration(s).map_err(|e| e.to_string())
}

fn parse_proxy_mode(s: &str) -> Result<ProxyMode, String> {
    ProxyMode::parse(s)
}
