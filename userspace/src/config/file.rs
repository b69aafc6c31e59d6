//! The `--config` file: kube-proxy's `KubeProxyConfiguration`
//! (`apiVersion: kubeproxy.config.k8s.io/v1alpha1`), as kubeadm writes it into the `kube-proxy`
//! ConfigMap (key `config.conf`).
//!
//! The schema is k8s.io/kube-proxy/config/v1alpha1 (types.go). Every field is optional and
//! `null` is accepted everywhere, as with kube-proxy (kubeadm writes `masqueradeBit: null`,
//! `mode: ""`, `syncPeriod: 0s` and the like, all meaning "default").
//!
//! Unknown fields: kube-proxy decodes strictly first and, for v1alpha1, falls back to lenient
//! decoding with one log line (options.go, `loadConfig`). kpr is lenient too, but loud: each
//! unknown field is a warning naming its path. Fields kpr does not use are warnings only when
//! they are set to something other than their zero value or kube-proxy's default, so an
//! unchanged kubeadm file (or one written by `kube-proxy --write-config-to`) warns little.
//! Wrong types, bad syntax, a wrong apiVersion or kind are errors naming the field's path.
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::duration::GoDuration;
use super::ConfigError;

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KubeProxyConfiguration {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub feature_gates: Option<BTreeMap<String, bool>>,
    pub client_connection: Option<ClientConnection>,
    pub logging: Option<Logging>,
    pub hostname_override: Option<String>,
    pub bind_address: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub bind_address_hard_fail: Option<bool>,
    pub enable_profiling: Option<bool>,
    pub show_hidden_metrics_for_version: Option<String>,
    pub mode: Option<String>,
    pub iptables: Option<IptablesSection>,
    pub ipvs: Option<IpvsSection>,
    pub nftables: Option<NftablesSection>,
    pub winkernel: Option<Winkernel>,
    pub detect_local_mode: Option<String>,
    pub detect_local: Option<DetectLocal>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub node_port_addresses: Option<Vec<String>>,
    pub oom_score_adj: Option<i32>,
    pub conntrack: Option<Conntrack>,
    pub config_sync_period: Option<GoDuration>,
    pub port_range: Option<String>,
    pub windows_run_as_service: Option<bool>,
    /// Not in v1alpha1 (the internal config and the proposed v1alpha2 have them): if set, they
    /// win over the mode-specific sections' values.
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
    /// Removed from v1alpha1, still in files written by older kubeadm versions.
    pub udp_idle_timeout: Option<GoDuration>,
    pub resource_container: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClientConnection {
    pub kubeconfig: Option<String>,
    pub accept_content_types: Option<String>,
    pub content_type: Option<String>,
    pub qps: Option<f64>,
    pub burst: Option<i64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Logging {
    pub format: Option<String>,
    pub flush_frequency: Option<TimeOrDuration>,
    pub verbosity: Option<u32>,
    pub vmodule: Option<Vec<VModuleItem>>,
    pub options: Option<LoggingOptions>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VModuleItem {
    pub file_pattern: Option<String>,
    pub verbosity: Option<u32>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LoggingOptions {
    pub json: Option<FormatOptions>,
    pub text: Option<FormatOptions>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FormatOptions {
    pub split_stream: Option<bool>,
    pub info_buffer_size: Option<Quantity>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct IptablesSection {
    pub masquerade_bit: Option<i32>,
    pub masquerade_all: Option<bool>,
    pub localhost_node_ports: Option<bool>,
    #[serde(rename = "snatNodeInternalIP")]
    pub snat_node_internal_ip: Option<bool>,
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct IpvsSection {
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
    pub scheduler: Option<String>,
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Option<Vec<String>>,
    #[serde(rename = "strictARP")]
    pub strict_arp: Option<bool>,
    pub tcp_timeout: Option<GoDuration>,
    pub tcp_fin_timeout: Option<GoDuration>,
    pub udp_timeout: Option<GoDuration>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NftablesSection {
    pub masquerade_bit: Option<i32>,
    pub masquerade_all: Option<bool>,
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Winkernel {
    pub network_name: Option<String>,
    pub source_vip: Option<String>,
    #[serde(rename = "enableDSR")]
    pub enable_dsr: Option<bool>,
    pub root_hns_endpoint_name: Option<String>,
    pub forward_health_check_vip: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DetectLocal {
    pub bridge_interface: Option<String>,
    pub interface_name_prefix: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Conntrack {
    pub max_per_core: Option<i32>,
    pub min: Option<i32>,
    pub tcp_established_timeout: Option<GoDuration>,
    pub tcp_close_wait_timeout: Option<GoDuration>,
    pub tcp_be_liberal: Option<bool>,
    pub udp_timeout: Option<GoDuration>,
    pub udp_stream_timeout: Option<GoDuration>,
    /// Removed; older kubeadm versions write `max: null`.
    pub max: Option<i32>,
}

/// `logging.flushFrequency`: nanoseconds (a number) or a duration string, as component-base's
/// `TimeOrMetaDuration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeOrDuration(pub Duration);

impl<'de> Deserialize<'de> for TimeOrDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = TimeOrDuration;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("nanoseconds or a duration string such as \"5s\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<TimeOrDuration, E> {
                Ok(TimeOrDuration(Duration::from_nanos(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<TimeOrDuration, E> {
                u64::try_from(v)
                    .map(|v| TimeOrDuration(Duration::from_nanos(v)))
                    .map_err(|_| E::custom("negative duration"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TimeOrDuration, E> {
                super::duration::parse_go_duration(v)
                    .map(TimeOrDuration)
                    .map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A resource quantity (`infoBufferSize: "0"`, `5Mi`, or a number); kept as text.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantity(pub String);

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Quantity;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a quantity such as \"0\" or \"5Mi\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Reads and parses a config file; returns the configuration and the warnings about unknown
/// fields (the unused-field warnings come from [`KubeProxyConfiguration::unused_fields`]).
pub fn load(path: &Path) -> Result<(KubeProxyConfiguration, Vec<String>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Parses config file text (`path` is for messages).
pub fn parse(
    path: &Path,
    text: &str,
) -> Result<(KubeProxyConfiguration, Vec<String>), ConfigError> {
    let mut unknown = Vec::new();
    let de = yaml_serde::Deserializer::from_str(text);
    let mut on_ignored = |p: serde_ignored::Path| unknown.push(ignored_path(&p));
    let ignoring = serde_ignored::Deserializer::new(de, &mut on_ignored);
    let cfg: KubeProxyConfiguration = serde_path_to_error::deserialize(ignoring).map_err(|e| {
        let field = e.path().to_string();
        let message = e.into_inner().to_string();
        // yaml_serde's messages carry the path too ("mode: invalid type: ..."): once is enough.
        let message = match message.strip_prefix(&format!("{field}: ")) {
            Some(rest) => rest.to_string(),
            None => message,
        };
        // No field ("." or "?"): the YAML itself is malformed.
        if field.split('.').all(|s| s.is_empty() || s == "?") {
            ConfigError::Syntax {
                path: path.to_path_buf(),
                message,
            }
        } else {
            ConfigError::Field {
                path: path.to_path_buf(),
                field,
                message,
            }
        }
    })?;
    let field_error = |field: &str, message: String| ConfigError::Field {
        path: path.to_path_buf(),
        field: field.to_string(),
        message,
    };
    match cfg.api_version.as_deref() {
        Some(API_VERSION) => {}
        None => {
            return Err(field_error(
                "apiVersion",
                format!("missing; want {API_VERSION:?}"),
            ))
        }
        Some(other) => {
            return Err(field_error(
                "apiVersion",
                format!("{other:?} is not supported; want {API_VERSION:?}"),
            ))
        }
    }
    match cfg.kind.as_deref() {
        Some(KIND) => {}
        None => return Err(field_error("kind", format!("missing; want {KIND:?}"))),
        Some(other) => {
            return Err(field_error(
                "kind",
                format!("{other:?} is not supported; want {KIND:?}"),
            ))
        }
    }
    let warnings = unknown
        .into_iter()
        .map(|p| format!("config: {p} is not a KubeProxyConfiguration field; ignored"))
        .collect();
    Ok((cfg, warnings))
}

/// `iptables.fooBar`, `ipvs.excludeCIDRs[0]` (serde_ignored's own Display marks `Option`s).
fn ignored_path(p: &serde_ignored::Path) -> String {
    use serde_ignored::Path as P;
    match p {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", ignored_path(parent)),
        P::Map { parent, key } => {
            let parent = ignored_path(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            ignored_path(parent)
        }
    }
}

/// Which mode-specific section kube-proxy reads the sync periods and masqueradeAll from
/// (pkg/proxy/apis/config/v1alpha1/conversion.go): ipvs for `ipvs`, nftables for `nftables`,
/// iptables for anything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    Iptables,
    Ipvs,
    Nftables,
}

impl Section {
    pub fn for_mode(mode: &str) -> Section {
        match mode {
            "ipvs" => Section::Ipvs,
            "nftables" => Section::Nftables,
            _ => Section::Iptables,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Section::Iptables => "iptables",
            Section::Ipvs => "ipvs",
            Section::Nftables => "nftables",
        }
    }
}

/// The values kpr takes from the file.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FileValues {
    /// Zero means unset (kube-proxy's defaulting treats 0s as unset too).
    pub sync_period: Option<Duration>,
    pub min_sync_period: Option<Duration>,
    pub masquerade_all: bool,
    /// The mode's section's `masqueradeBit` (kube-proxy's default 14 when unset).
    pub masquerade_bit: Option<i32>,
    /// `iptables.localhostNodePorts` (kube-proxy's default true when unset).
    pub localhost_nodeports: Option<bool>,
}

fn dur(v: &Option<GoDuration>) -> Option<Duration> {
    v.map(|d| d.0).filter(|d| !d.is_zero())
}

impl KubeProxyConfiguration {
    pub fn mode_str(&self) -> &str {
        self.mode.as_deref().unwrap_or("")
    }

    pub fn section(&self) -> Section {
        Section::for_mode(self.mode_str())
    }

    /// Sync periods and masqueradeAll the way kube-proxy converts them: from the section of
    /// the mode ([`Section::for_mode`]); the top-level sync periods win if set.
    pub fn values(&self) -> FileValues {
        let ipt = self.iptables.clone().unwrap_or_default();
        let ipvs = self.ipvs.clone().unwrap_or_default();
        let nft = self.nftables.clone().unwrap_or_default();
        let (sync, min_sync) = match self.section() {
            Section::Iptables => (dur(&ipt.sync_period), dur(&ipt.min_sync_period)),
            Section::Ipvs => (dur(&ipvs.sync_period), dur(&ipvs.min_sync_period)),
            Section::Nftables => (dur(&nft.sync_period), dur(&nft.min_sync_period)),
        };
        let masquerade_all = match self.section() {
            Section::Nftables => nft.masquerade_all,
            _ => ipt.masquerade_all,
        }
        .unwrap_or(false);
        let masquerade_bit = match self.section() {
            Section::Nftables => nft.masquerade_bit,
            _ => ipt.masquerade_bit,
        };
        FileValues {
            sync_period: dur(&self.sync_period).or(sync),
            min_sync_period: dur(&self.min_sync_period).or(min_sync),
            masquerade_all,
            masquerade_bit,
            localhost_nodeports: ipt.localhost_node_ports,
        }
    }

    /// One warning per field that is set (not null, its zero value, or kube-proxy's default)
    /// but that kpr does not use, in schema order.
    pub fn unused_fields(&self) -> Vec<String> {
        let mut l = Lint::default();
        if let Some(gates) = &self.feature_gates {
            for gate in gates.keys() {
                l.unsupported(&format!("featureGates.{gate}"), true);
            }
        }
        if let Some(c) = &self.client_connection {
            let p = "clientConnection";
            l.str(p, "acceptContentTypes", &c.accept_content_types, &[]);
            l.str(
                p,
                "contentType",
                &c.content_type,
                &["application/vnd.kubernetes.protobuf"],
            );
            l.unsupported(
                "clientConnection.qps",
                c.qps.is_some_and(|q| q != 0.0 && q != 5.0),
            );
            l.val(p, "burst", &c.burst, &[0, 10]);
        }
        if let Some(g) = &self.logging {
            let p = "logging";
            l.str(p, "format", &g.format, &["text"]);
            l.unsupported(
                "logging.flushFrequency",
                g.flush_frequency
                    .is_some_and(|f| !f.0.is_zero() && f.0 != Duration::from_secs(5)),
            );
            l.unsupported(
                "logging.vmodule",
                g.vmodule.as_ref().is_some_and(|v| !v.is_empty()),
            );
            if let Some(o) = &g.options {
                for (name, f) in [("json", &o.json), ("text", &o.text)] {
                    let Some(f) = f else { continue };
                    let p = format!("logging.options.{name}");
                    l.val(&p, "splitStream", &f.split_stream, &[false]);
                    l.unsupported(
                        &format!("{p}.infoBufferSize"),
                        f.info_buffer_size
                            .as_ref()
                            .is_some_and(|q| !matches!(q.0.as_str(), "" | "0")),
                    );
                }
            }
        }
        l.val(
            "",
            "bindAddressHardFail",
            &self.bind_address_hard_fail,
            &[false],
        );
        l.val("", "enableProfiling", &self.enable_profiling, &[false]);
        l.str(
            "",
            "showHiddenMetricsForVersion",
            &self.show_hidden_metrics_for_version,
            &[],
        );
        let section = self.section();
        let mode = self.mode_str();
        if let Some(s) = &self.iptables {
            let p = "iptables";

            l.ptr(p, "snatNodeInternalIP", &s.snat_node_internal_ip, &[false]);
            if section != Section::Iptables {
                l.other_section(p, "masqueradeAll", mode, s.masquerade_all == Some(true));
                l.other_section_dur(p, "syncPeriod", mode, &s.sync_period, 30);
                l.other_section_dur(p, "minSyncPeriod", mode, &s.min_sync_period, 1);
            }
        }
        if let Some(s) = &self.ipvs {
            let p = "ipvs";
            // The IPVS mode's settings; in another mode they are the other section's.
            if section != Section::Ipvs {
                let set = |d: &Option<GoDuration>| dur(d).is_some();
                for (name, given) in [
                    (
                        "scheduler",
                        s.scheduler
                            .as_deref()
                            .is_some_and(|n| !n.is_empty() && n != "rr"),
                    ),
                    (
                        "excludeCIDRs",
                        s.exclude_cidrs.as_ref().is_some_and(|v| !v.is_empty()),
                    ),
                    ("strictARP", s.strict_arp == Some(true)),
                    ("tcpTimeout", set(&s.tcp_timeout)),
                    ("tcpFinTimeout", set(&s.tcp_fin_timeout)),
                    ("udpTimeout", set(&s.udp_timeout)),
                ] {
                    l.other_section(p, name, mode, given);
                }
                l.other_section_dur(p, "syncPeriod", mode, &s.sync_period, 30);
                l.other_section_dur(p, "minSyncPeriod", mode, &s.min_sync_period, 1);
            }
        }
        if let Some(s) = &self.nftables {
            let p = "nftables";

            if section != Section::Nftables {
                l.other_section(p, "masqueradeAll", mode, s.masquerade_all == Some(true));
                l.other_section_dur(p, "syncPeriod", mode, &s.sync_period, 30);
                l.other_section_dur(p, "minSyncPeriod", mode, &s.min_sync_period, 1);
            }
        }
        if let Some(w) = &self.winkernel {
            let p = "winkernel";
            l.str(p, "networkName", &w.network_name, &[]);
            l.str(p, "sourceVip", &w.source_vip, &[]);
            l.val(p, "enableDSR", &w.enable_dsr, &[false]);
            l.str(p, "rootHnsEndpointName", &w.root_hns_endpoint_name, &[]);
            l.val(
                p,
                "forwardHealthCheckVip",
                &w.forward_health_check_vip,
                &[false],
            );
        }
        l.ptr("", "oomScoreAdj", &self.oom_score_adj, &[-999]);
        if let Some(c) = &self.conntrack {
            let p = "conntrack";
            // maxPerCore, min, tcpBeLiberal and the timeouts are used (Settings::conntrack).
            l.ptr(p, "max", &c.max, &[0]);
        }
        l.dur(
            "",
            "configSyncPeriod",
            &self.config_sync_period,
            &[Duration::from_secs(15 * 60)],
        );
        l.str("", "portRange", &self.port_range, &[]);
        l.val(
            "",
            "windowsRunAsService",
            &self.windows_run_as_service,
            &[false],
        );
        l.dur(
            "",
            "udpIdleTimeout",
            &self.udp_idle_timeout,
            &[Duration::from_millis(250)],
        );
        l.str(
            "",
            "resourceContainer",
            &self.resource_container,
            &["/kube-proxy"],
        );
        l.0
    }
}

#[derive(Default)]
struct Lint(Vec<String>);

fn join(parent: &str, field: &str) -> String {
    if parent.is_empty() {
        field.to_string()
    } else {
        format!("{parent}.{field}")
    }
}

impl Lint {
    fn unsupported(&mut self, path: &str, set: bool) {
        if set {
            self.0
                .push(format!("config: {path} is not supported by kpr; ignored"));
        }
    }

    /// For Go pointer fields (`*int32`): set unless null or one of `defaults` (0 is a value).
    fn ptr<T: PartialEq>(&mut self, p: &str, f: &str, v: &Option<T>, defaults: &[T]) {
        let set = v.as_ref().is_some_and(|v| !defaults.contains(v));
        self.unsupported(&join(p, f), set);
    }

    /// Set: not null, not the zero value, not one of `defaults`.
    fn val<T: PartialEq + Default>(&mut self, p: &str, f: &str, v: &Option<T>, defaults: &[T]) {
        let set = v
            .as_ref()
            .is_some_and(|v| *v != T::default() && !defaults.contains(v));
        self.unsupported(&join(p, f), set);
    }

    fn str(&mut self, p: &str, f: &str, v: &Option<String>, defaults: &[&str]) {
        let set = v
            .as_deref()
            .is_some_and(|v| !v.is_empty() && !defaults.contains(&v));
        self.unsupported(&join(p, f), set);
    }

    fn dur(&mut self, p: &str, f: &str, v: &Option<GoDuration>, defaults: &[Duration]) {
        let set = dur(v).is_some_and(|d| !defaults.contains(&d));
        self.unsupported(&join(p, f), set);
    }

    /// A field of a mode-specific section that kube-proxy would not read with this mode.
    fn other_section(&mut self, p: &str, f: &str, mode: &str, set: bool) {
        if set {
            let read = Section::for_mode(mode).name();
            self.0.push(format!(
                "config: {} is ignored: with mode {mode:?} the {read} section applies",
                join(p, f)
            ));
        }
    }

    fn other_section_dur(
        &mut self,
        p: &str,
        f: &str,
        mode: &str,
        v: &Option<GoDuration>,
        default_secs: u64,
    ) {
        let set = dur(v).is_some_and(|d| d != Duration::from_secs(default_secs));
        self.other_section(p, f, mode, set);
    }
}
