//! The pure model: (Services, EndpointSlices) → the frontends to program and their backends.
//!
//! No I/O happens here. This is where kube-proxy's semantics live (pkg/proxy/servicechangetracker.go,
//! endpointschangetracker.go, topology.go): which Services are proxied at all, how slices are matched
//! to Services, which endpoints are usable, how named target ports resolve. Every backend
//! (eBPF, nftables, iptables) consumes the same [`DesiredState`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Transport protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// IANA protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// Lower-case name, as kube-proxy uses it in chain-name hashes and iptables `-p`.
    pub const fn as_lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// kube-proxy's ServicePortName: `namespace/name:port` (`namespace/name` when the port is unnamed).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The Service port's `name`; empty for a single unnamed port.
    pub port: String,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}/{}", self.namespace, self.name)
        } else {
            write!(f, "{}/{}:{}", self.namespace, self.name, self.port)
        }
    }
}

/// An address:port:protocol that clients dial (a ClusterIP port, for now).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, self.protocol.as_lower()),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, self.protocol.as_lower()),
        }
    }
}

/// A backend address:port (an endpoint with the resolved target port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub ip: IpAddr,
    pub port: u16,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

/// One service port as it should be programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortState {
    pub name: ServicePortName,
    /// Usable backends, sorted and de-duplicated. Empty means "reject": the Service exists
    /// but has no usable endpoint.
    pub backends: Vec<Backend>,
}

/// Everything the dataplane should serve, keyed by frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<Frontend, ServicePortState>,
}

/// Why an object was not used. Carries enough to name the object in a log line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("Service {namespace}/{name}: {reason}")]
    InvalidService {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("EndpointSlice {namespace}/{name}: {reason}")]
    InvalidSlice {
        namespace: String,
        name: String,
        reason: String,
    },
}

/// Label that ties an EndpointSlice to its Service (same namespace).
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Services carrying this label are handled by the cluster's headless machinery, not a proxy.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Services carrying this label ask for a different proxy; kube-proxy ignores them whatever the
/// value, and so do we.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

// Manifests often omit the namespace; `kubectl apply` would put them in "default", so the
// Service and its slices must agree on that.
const DEFAULT_NAMESPACE: &str = "default";

/// Checks a Service the way kpr needs it to be well-formed (metadata name, parseable
/// ClusterIP(s), ports with a valid number and a known protocol). Sources call this per
/// document so that a bad object is reported with its origin and skipped.
pub fn validate_service(svc: &Service) -> Result<(), ModelError> {
    parse_service(svc).map(|_| ())
}

/// Checks an EndpointSlice (name, service-name label, address type, parseable addresses
/// for IPv4/IPv6 slices, port numbers).
pub fn validate_slice(slice: &EndpointSlice) -> Result<(), ModelError> {
    parse_slice(slice).map(|_| ())
}

/// Builds the desired state. Invalid objects are skipped (their errors returned alongside)
/// and never affect other objects.
pub fn build(services: &[Service], slices: &[EndpointSlice]) -> (DesiredState, Vec<ModelError>) {
    let mut errors = Vec::new();

    let mut slices_by_service: BTreeMap<(&str, &str), Vec<SliceView<'_>>> = BTreeMap::new();
    for slice in slices {
        match parse_slice(slice) {
            Ok(Some(view)) => slices_by_service
                .entry((view.namespace, view.service))
                .or_default()
                .push(view),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }

    let mut views = Vec::new();
    for svc in services {
        match parse_service(svc) {
            Ok(Some(view)) => views.push(view),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    // Processing in name order makes the winner of any conflict independent of input order.
    views.sort_by(|a, b| (a.namespace, a.name).cmp(&(b.namespace, b.name)));

    let mut state = DesiredState::default();
    let mut seen = BTreeSet::new();
    for view in &views {
        if !seen.insert((view.namespace, view.name)) {
            errors.push(view.error("defined more than once; the first definition is used"));
            continue;
        }
        let slices = slices_by_service
            .get(&(view.namespace, view.name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let ports = service_ports(view, slices);
        // Two Services claiming one ClusterIP:port is something the API server prevents; from
        // hand-written manifests it can happen, and half a Service is worse than none.
        if let Some((frontend, owner)) = ports
            .keys()
            .find_map(|f| state.services.get(f).map(|owner| (f, owner)))
        {
            errors.push(view.error(&format!(
                "frontend {frontend} is already used by {}",
                owner.name
            )));
            continue;
        }
        state.services.extend(ports);
    }
    (state, errors)
}

/// A Service reduced to what the model uses, already checked.
struct ServiceView<'a> {
    namespace: &'a str,
    name: &'a str,
    ips: Vec<IpAddr>,
    ports: Vec<ServicePortView<'a>>,
}

struct ServicePortView<'a> {
    name: &'a str,
    port: u16,
    protocol: Protocol,
}

impl ServiceView<'_> {
    fn error(&self, reason: &str) -> ModelError {
        ModelError::InvalidService {
            namespace: self.namespace.to_owned(),
            name: self.name.to_owned(),
            reason: reason.to_owned(),
        }
    }
}

/// `Ok(None)`: a valid Service that kube-proxy does not proxy (headless, ExternalName, or
/// claimed by another proxy).
fn parse_service(svc: &Service) -> Result<Option<ServiceView<'_>>, ModelError> {
    let namespace = namespace_of(&svc.metadata);
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    let fail = |reason: String| ModelError::InvalidService {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(fail("metadata.name is missing".into()));
    }
    if let Some(label) = [LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME]
        .into_iter()
        .find(|l| has_label(&svc.metadata, l))
    {
        tracing::debug!("Service {namespace}/{name}: not proxied (label {label})");
        return Ok(None);
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(None);
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    // kube-proxy keys "is this Service proxied" on the primary ClusterIP alone.
    let primary = spec.cluster_ip.as_deref().unwrap_or_default();
    if primary.is_empty() || primary == "None" {
        return Ok(None);
    }

    let ip_strings: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => vec![primary],
    };
    let mut ips = Vec::with_capacity(ip_strings.len());
    for s in ip_strings {
        let ip: IpAddr = s
            .parse()
            .map_err(|_| fail(format!("invalid ClusterIP {s:?}")))?;
        if ips.contains(&ip) {
            return Err(fail(format!("ClusterIP {ip} is listed twice")));
        }
        ips.push(ip);
    }

    let mut ports: Vec<ServicePortView<'_>> = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let port = u16::try_from(p.port)
            .ok()
            .filter(|&n| n != 0)
            .ok_or_else(|| {
                fail(format!(
                    "ports[{i}]: port {} is out of range 1-65535",
                    p.port
                ))
            })?;
        let protocol = parse_protocol(p.protocol.as_deref())
            .map_err(|reason| fail(format!("ports[{i}]: {reason}")))?;
        let name = p.name.as_deref().unwrap_or_default();
        // Either duplicate would make two frontends share a key or a slice port ambiguous.
        if ports
            .iter()
            .any(|q| q.port == port && q.protocol == protocol)
        {
            return Err(fail(format!(
                "ports[{i}]: port {port}/{} is listed twice",
                protocol.as_lower()
            )));
        }
        if ports
            .iter()
            .any(|q| q.name == name && q.protocol == protocol)
        {
            return Err(fail(format!(
                "ports[{i}]: port name {name:?} is used twice for {}",
                protocol.as_lower()
            )));
        }
        ports.push(ServicePortView {
            name,
            port,
            protocol,
        });
    }
    Ok(Some(ServiceView {
        namespace,
        name,
        ips,
        ports,
    }))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

/// An EndpointSlice reduced to what the model uses, already checked.
struct SliceView<'a> {
    namespace: &'a str,
    service: &'a str,
    family: Family,
    /// Only ports that carry a number.
    ports: Vec<ServicePortView<'a>>,
    /// Only endpoints that have an address.
    endpoints: Vec<EndpointView>,
}

struct EndpointView {
    ip: IpAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
}

/// `Ok(None)`: an FQDN slice, which kube-proxy ignores.
fn parse_slice(slice: &EndpointSlice) -> Result<Option<SliceView<'_>>, ModelError> {
    let namespace = namespace_of(&slice.metadata);
    let name = slice.metadata.name.as_deref().unwrap_or_default();
    let fail = |reason: String| ModelError::InvalidSlice {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(fail("metadata.name is missing".into()));
    }
    let family = match slice.address_type.as_str() {
        "IPv4" => Family::V4,
        "IPv6" => Family::V6,
        "FQDN" => {
            tracing::debug!("EndpointSlice {namespace}/{name}: FQDN slices are not proxied");
            return Ok(None);
        }
        other => return Err(fail(format!("unsupported addressType {other:?}"))),
    };
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_NAME))
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| fail(format!("label {LABEL_SERVICE_NAME} is missing")))?;

    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let protocol = parse_protocol(p.protocol.as_deref())
            .map_err(|reason| fail(format!("ports[{i}]: {reason}")))?;
        // A port without a number would mean "all ports", which kube-proxy does not implement.
        let Some(number) = p.port else { continue };
        let port = u16::try_from(number)
            .ok()
            .filter(|&n| n != 0)
            .ok_or_else(|| fail(format!("ports[{i}]: port {number} is out of range 1-65535")))?;
        ports.push(ServicePortView {
            name: p.name.as_deref().unwrap_or_default(),
            port,
            protocol,
        });
    }

    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        for a in &ep.addresses {
            match a.parse::<IpAddr>() {
                Ok(ip) if Family::of(ip) == family => {}
                _ => {
                    return Err(fail(format!(
                        "endpoints[{i}]: {a:?} is not an {} address",
                        slice.address_type
                    )));
                }
            }
        }
        // Like kube-proxy: an endpoint is its first address; one without any is ignored.
        let Some(ip) = ep.addresses.first().and_then(|a| a.parse().ok()) else {
            continue;
        };
        let c = ep.conditions.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        endpoints.push(EndpointView {
            ip,
            ready,
            // kube-proxy (endpointslicecache.go) and the API docs read a missing `serving` as
            // true, not as a copy of `ready`.
            serving: c.and_then(|c| c.serving).unwrap_or(true),
            terminating: c.and_then(|c| c.terminating).unwrap_or(false),
        });
    }
    Ok(Some(SliceView {
        namespace,
        service,
        family,
        ports,
        endpoints,
    }))
}

/// The frontends of one Service with their backends.
fn service_ports(
    view: &ServiceView<'_>,
    slices: &[SliceView<'_>],
) -> BTreeMap<Frontend, ServicePortState> {
    let mut out = BTreeMap::new();
    for port in &view.ports {
        let name = ServicePortName {
            namespace: view.namespace.to_owned(),
            name: view.name.to_owned(),
            port: port.name.to_owned(),
        };
        for &ip in &view.ips {
            let backends = backends_for(Family::of(ip), port, slices);
            out.insert(
                Frontend {
                    ip,
                    port: port.port,
                    protocol: port.protocol,
                },
                ServicePortState {
                    name: name.clone(),
                    backends,
                },
            );
        }
    }
    out
}

/// kube-proxy's endpoint selection for a cluster-wide traffic policy (topology.go): ready
/// endpoints, or, when there are none, the ones that still serve while terminating so that
/// connections drain instead of being rejected.
fn backends_for(
    family: Family,
    port: &ServicePortView<'_>,
    slices: &[SliceView<'_>],
) -> Vec<Backend> {
    #[derive(Default)]
    struct Usable {
        ready: bool,
        draining: bool,
    }
    // The same ip:port may come from several slices (e.g. mid-migration between slices); it
    // counts once, usable if any copy says so, so the result does not depend on slice order.
    let mut seen: BTreeMap<Backend, Usable> = BTreeMap::new();
    for slice in slices.iter().filter(|s| s.family == family) {
        // A named targetPort resolves per pod, so the number comes from the slice port with the
        // same name and protocol; several of them (rollouts) all contribute.
        for sp in slice
            .ports
            .iter()
            .filter(|sp| sp.name == port.name && sp.protocol == port.protocol)
        {
            for ep in &slice.endpoints {
                let u = seen
                    .entry(Backend {
                        ip: ep.ip,
                        port: sp.port,
                    })
                    .or_default();
                u.ready |= ep.ready;
                u.draining |= ep.serving && ep.terminating;
            }
        }
    }
    let ready: Vec<Backend> = seen
        .iter()
        .filter(|(_, u)| u.ready)
        .map(|(b, _)| *b)
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    seen.iter()
        .filter(|(_, u)| u.draining)
        .map(|(b, _)| *b)
        .collect()
}

fn parse_protocol(p: Option<&str>) -> Result<Protocol, String> {
    match p {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(format!("unknown protocol {other:?}")),
    }
}

fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace
        .as_deref()
        .filter(|ns| !ns.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE)
}

fn has_label(meta: &ObjectMeta, label: &str) -> bool {
    meta.labels.as_ref().is_some_and(|l| l.contains_key(label))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn svc(ns: &str, name: &str, spec: Value) -> Service {
        svc_obj(json!({"metadata": {"namespace": ns, "name": name}, "spec": spec}))
    }

    fn svc_obj(v: Value) -> Service {
        serde_json::from_value(v).expect("test Service")
    }

    /// A ClusterIP Service with the given IPs and `[name, port, protocol]` ports.
    fn cluster_ip(ns: &str, name: &str, ips: &[&str], ports: Value) -> Service {
        svc(
            ns,
            name,
            json!({"clusterIP": ips[0], "clusterIPs": ips, "ports": ports}),
        )
    }

    fn slice(
        ns: &str,
        name: &str,
        service: &str,
        family: &str,
        ports: Value,
        endpoints: Value,
    ) -> EndpointSlice {
        slice_obj(json!({
            "metadata": {"namespace": ns, "name": name, "labels": {LABEL_SERVICE_NAME: service}},
            "addressType": family,
            "ports": ports,
            "endpoints": endpoints,
        }))
    }

    fn slice_obj(v: Value) -> EndpointSlice {
        serde_json::from_value(v).expect("test EndpointSlice")
    }

    fn ready(ip: &str) -> Value {
        json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false}})
    }

    fn fe(ip: &str, port: u16, protocol: Protocol) -> Frontend {
        Frontend {
            ip: ip.parse().expect("test IP"),
            port,
            protocol,
        }
    }

    fn be(ip: &str, port: u16) -> Backend {
        Backend {
            ip: ip.parse().expect("test IP"),
            port,
        }
    }

    fn backends(state: &DesiredState, f: Frontend) -> Vec<Backend> {
        state
            .services
            .get(&f)
            .unwrap_or_else(|| {
                panic!(
                    "no frontend {f} in {:?}",
                    state.services.keys().collect::<Vec<_>>()
                )
            })
            .backends
            .clone()
    }

    fn web() -> (Service, EndpointSlice) {
        (
            cluster_ip(
                "demo",
                "web",
                &["10.96.0.10"],
                json!([{"name": "http", "port": 80}]),
            ),
            slice(
                "demo",
                "web-1",
                "web",
                "IPv4",
                json!([{"name": "http", "port": 8080}]),
                json!([ready("10.244.0.3"), ready("10.244.0.1")]),
            ),
        )
    }

    #[test]
    fn basic_service_gets_sorted_backends_and_port_name() {
        let (s, sl) = web();
        let (state, errors) = build(&[s], &[sl]);
        assert_eq!(errors, vec![]);
        assert_eq!(state.services.len(), 1);
        let f = fe("10.96.0.10", 80, Protocol::Tcp);
        assert_eq!(
            backends(&state, f),
            vec![be("10.244.0.1", 8080), be("10.244.0.3", 8080)]
        );
        let name = &state.services[&f].name;
        assert_eq!(name.to_string(), "demo/web:http");
    }

    #[test]
    fn headless_and_unset_cluster_ip_are_skipped_silently() {
        let ports = json!([{"port": 80}]);
        let services = [
            svc("a", "none", json!({"clusterIP": "None", "ports": ports})),
            svc("a", "empty", json!({"clusterIP": "", "ports": ports})),
            svc("a", "absent", json!({"ports": ports})),
            svc_obj(json!({"metadata": {"name": "nospec"}})),
        ];
        for s in &services {
            assert_eq!(validate_service(s), Ok(()));
        }
        let (state, errors) = build(&services, &[]);
        assert_eq!(errors, vec![]);
        assert!(state.services.is_empty(), "{:?}", state.services);
    }

    #[test]
    fn external_name_is_skipped_silently() {
        let s = svc(
            "a",
            "ext",
            json!({"type": "ExternalName", "externalName": "example.com", "clusterIP": "10.96.0.1", "ports": [{"port": 80}]}),
        );
        let (state, errors) = build(&[s], &[]);
        assert_eq!(errors, vec![]);
        assert!(state.services.is_empty());
    }

    #[test]
    fn services_labelled_for_other_proxies_are_skipped() {
        for label in [LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME] {
            let s = svc_obj(json!({
                "metadata": {"namespace": "a", "name": "x", "labels": {label: ""}},
                "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]},
            }));
            let (state, errors) = build(&[s], &[]);
            assert_eq!(errors, vec![], "{label}");
            assert!(state.services.is_empty(), "{label}");
        }
    }

    #[test]
    fn protocol_defaults_to_tcp_and_udp_sctp_are_kept_apart() {
        let s = cluster_ip(
            "a",
            "p",
            &["10.96.0.1"],
            json!([{"name": "a", "port": 53}, {"name": "b", "port": 53, "protocol": "UDP"}, {"name": "c", "port": 53, "protocol": "SCTP"}]),
        );
        let (state, errors) = build(&[s], &[]);
        assert_eq!(errors, vec![]);
        let keys: Vec<Frontend> = state.services.keys().copied().collect();
        assert_eq!(
            keys,
            vec![
                fe("10.96.0.1", 53, Protocol::Tcp),
                fe("10.96.0.1", 53, Protocol::Udp),
                fe("10.96.0.1", 53, Protocol::Sctp),
            ]
        );
    }

    #[test]
    fn frontend_without_endpoints_exists_with_no_backends() {
        let (s, _) = web();
        let (state, errors) = build(&[s], &[]);
        assert_eq!(errors, vec![]);
        assert_eq!(
            backends(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            vec![]
        );
    }

    fn assert_invalid_service(s: Service, needle: &str) {
        let err = validate_service(&s).expect_err(needle);
        match &err {
            ModelError::InvalidService { reason, .. } => {
                assert!(
                    reason.contains(needle),
                    "{reason:?} should mention {needle:?}"
                )
            }
            other => panic!("unexpected {other:?}"),
        }
        let (good, _) = web();
        let (state, errors) = build(&[s, good], &[]);
        assert_eq!(errors, vec![err]);
        assert_eq!(state.services.len(), 1, "the valid Service is kept");
    }

    #[test]
    fn invalid_services_are_reported_and_skipped_without_affecting_others() {
        assert_invalid_service(
            cluster_ip("a", "bad-ip", &["10.96.0.300"], json!([{"port": 80}])),
            "invalid ClusterIP",
        );
        // A bad secondary IP spoils the Service as a whole, not just one family.
        assert_invalid_service(
            cluster_ip(
                "a",
                "bad-ip6",
                &["10.96.0.3", "fd00::zz"],
                json!([{"port": 80}]),
            ),
            "invalid ClusterIP \"fd00::zz\"",
        );
        assert_invalid_service(
            cluster_ip("a", "p0", &["10.96.0.3"], json!([{"port": 0}])),
            "out of range",
        );
        assert_invalid_service(
            cluster_ip("a", "pbig", &["10.96.0.3"], json!([{"port": 65536}])),
            "out of range",
        );
        assert_invalid_service(
            cluster_ip(
                "a",
                "proto",
                &["10.96.0.3"],
                json!([{"port": 80, "protocol": "tcp"}]),
            ),
            "unknown protocol",
        );
        assert_invalid_service(
            svc_obj(json!({"metadata": {"namespace": "a"}, "spec": {"clusterIP": "10.96.0.3"}})),
            "metadata.name",
        );
        assert_invalid_service(
            cluster_ip(
                "a",
                "dup",
                &["10.96.0.3"],
                json!([{"name": "x", "port": 80}, {"name": "y", "port": 80}]),
            ),
            "listed twice",
        );
    }

    #[test]
    fn cluster_ip_is_used_when_cluster_ips_is_absent() {
        let s = svc(
            "a",
            "old",
            json!({"clusterIP": "10.96.0.7", "ports": [{"port": 80}]}),
        );
        let (state, errors) = build(&[s], &[]);
        assert_eq!(errors, vec![]);
        assert!(state
            .services
            .contains_key(&fe("10.96.0.7", 80, Protocol::Tcp)));
    }

    #[test]
    fn dual_stack_frontends_get_backends_of_their_own_family() {
        let s = cluster_ip(
            "a",
            "ds",
            &["10.96.0.5", "fd00:96::5"],
            json!([{"port": 80}]),
        );
        let v4 = slice(
            "a",
            "ds-4",
            "ds",
            "IPv4",
            json!([{"port": 8080}]),
            json!([ready("10.244.0.5")]),
        );
        let v6 = slice(
            "a",
            "ds-6",
            "ds",
            "IPv6",
            json!([{"port": 8080}]),
            json!([ready("fd00:244::5")]),
        );
        let (state, errors) = build(&[s], &[v6, v4]);
        assert_eq!(errors, vec![]);
        assert_eq!(state.services.len(), 2);
        assert_eq!(
            backends(&state, fe("10.96.0.5", 80, Protocol::Tcp)),
            vec![be("10.244.0.5", 8080)]
        );
        assert_eq!(
            backends(&state, fe("fd00:96::5", 80, Protocol::Tcp)),
            vec![be("fd00:244::5", 8080)]
        );
    }

    #[test]
    fn named_target_ports_resolve_by_name_and_protocol() {
        let s = cluster_ip(
            "a",
            "multi",
            &["10.96.0.9"],
            json!([
                {"name": "http", "port": 80, "targetPort": "web"},
                {"name": "metrics", "port": 9090, "targetPort": "prom"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ]),
        );
        // Port order in the slice differs from the Service, and "dns" exists only for TCP.
        let sl = slice(
            "a",
            "multi-x",
            "multi",
            "IPv4",
            json!([
                {"name": "metrics", "port": 9100},
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 5353, "protocol": "TCP"},
            ]),
            json!([ready("10.244.1.1")]),
        );
        let (state, errors) = build(&[s], &[sl]);
        assert_eq!(errors, vec![]);
        assert_eq!(
            backends(&state, fe("10.96.0.9", 80, Protocol::Tcp)),
            vec![be("10.244.1.1", 8080)]
        );
        assert_eq!(
            backends(&state, fe("10.96.0.9", 9090, Protocol::Tcp)),
            vec![be("10.244.1.1", 9100)]
        );
        assert_eq!(backends(&state, fe("10.96.0.9", 53, Protocol::Udp)), vec![]);
    }

    #[test]
    fn unnamed_ports_match_empty_and_missing_names() {
        let s = cluster_ip("a", "u", &["10.96.0.2"], json!([{"port": 80}]));
        let missing = slice(
            "a",
            "u-1",
            "u",
            "IPv4",
            json!([{"port": 8080}]),
            json!([ready("10.244.0.1")]),
        );
        let empty = slice(
            "a",
            "u-2",
            "u",
            "IPv4",
            json!([{"name": "", "port": 8080}]),
            json!([ready("10.244.0.2")]),
        );
        let named = slice(
            "a",
            "u-3",
            "u",
            "IPv4",
            json!([{"name": "x", "port": 8080}]),
            json!([ready("10.244.0.3")]),
        );
        let (state, errors) = build(&[s], &[missing, empty, named]);
        assert_eq!(errors, vec![]);
        assert_eq!(
            backends(&state, fe("10.96.0.2", 80, Protocol::Tcp)),
            vec![be("10.244.0.1", 8080), be("10.244.0.2", 8080)]
        );
        assert_eq!(
            state.services[&fe("10.96.0.2", 80, Protocol::Tcp)]
                .name
                .to_string(),
            "a/u"
        );
    }

    fn endpoint(
        ip: &str,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> Value {
        json!({"addresses": [ip], "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
    }

    fn backends_of(endpoints: Value) -> Vec<Backend> {
        let (s, _) = web();
        let sl = slice(
            "demo",
            "web-1",
            "web",
            "IPv4",
            json!([{"name": "http", "port": 8080}]),
            endpoints,
        );
        let (state, errors) = build(&[s], &[sl]);
        assert_eq!(errors, vec![]);
        backends(&state, fe("10.96.0.10", 80, Protocol::Tcp))
    }

    #[test]
    fn ready_endpoints_win_over_terminating_ones() {
        let got = backends_of(json!([
            endpoint("10.0.0.1", Some(true), Some(true), Some(false)),
            endpoint("10.0.0.2", Some(false), Some(true), Some(true)),
            endpoint("10.0.0.3", Some(false), Some(false), Some(false)),
        ]));
        assert_eq!(got, vec![be("10.0.0.1", 8080)]);
    }

    #[test]
    fn without_ready_endpoints_serving_terminating_ones_are_used() {
        let got = backends_of(json!([
            endpoint("10.0.0.2", Some(false), Some(true), Some(true)),
            endpoint("10.0.0.3", Some(false), Some(false), Some(true)),
            endpoint("10.0.0.4", Some(false), Some(true), Some(false)),
            endpoint("10.0.0.5", Some(false), None, Some(true)),
        ]));
        assert_eq!(got, vec![be("10.0.0.2", 8080), be("10.0.0.5", 8080)]);
    }

    #[test]
    fn missing_conditions_mean_ready() {
        let got = backends_of(json!([
            {"addresses": ["10.0.0.1"]},
            endpoint("10.0.0.2", None, None, None),
            endpoint("10.0.0.3", Some(false), None, None),
        ]));
        assert_eq!(got, vec![be("10.0.0.1", 8080), be("10.0.0.2", 8080)]);
    }

    #[test]
    fn not_ready_and_not_terminating_means_reject() {
        let got = backends_of(json!([endpoint(
            "10.0.0.1",
            Some(false),
            Some(false),
            Some(false)
        )]));
        assert_eq!(got, vec![]);
    }

    #[test]
    fn only_the_first_address_is_used_and_empty_endpoints_are_ignored() {
        let got = backends_of(json!([
            {"addresses": ["10.0.0.9", "10.0.0.1"]},
            {"addresses": []},
        ]));
        assert_eq!(got, vec![be("10.0.0.9", 8080)]);
    }

    #[test]
    fn duplicate_endpoints_count_once() {
        let (s, a) = web();
        let b = slice(
            "demo",
            "web-2",
            "web",
            "IPv4",
            json!([{"name": "http", "port": 8080}]),
            json!([
                ready("10.244.0.3"),
                ready("10.244.0.3"),
                ready("10.244.0.2")
            ]),
        );
        let (state, errors) = build(&[s], &[a, b]);
        assert_eq!(errors, vec![]);
        assert_eq!(
            backends(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            vec![
                be("10.244.0.1", 8080),
                be("10.244.0.2", 8080),
                be("10.244.0.3", 8080)
            ]
        );
    }

    #[test]
    fn fqdn_slices_are_ignored_silently() {
        let (s, _) = web();
        let fqdn = slice(
            "demo",
            "web-f",
            "web",
            "FQDN",
            json!([{"name": "http", "port": 8080}]),
            json!([{"addresses": ["example.com"]}]),
        );
        assert_eq!(validate_slice(&fqdn), Ok(()));
        let (state, errors) = build(&[s], &[fqdn]);
        assert_eq!(errors, vec![]);
        assert_eq!(
            backends(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            vec![]
        );
    }

    fn assert_invalid_slice(bad: EndpointSlice, needle: &str) {
        let err = validate_slice(&bad).expect_err(needle);
        match &err {
            ModelError::InvalidSlice { reason, .. } => {
                assert!(
                    reason.contains(needle),
                    "{reason:?} should mention {needle:?}"
                )
            }
            other => panic!("unexpected {other:?}"),
        }
        let (s, good) = web();
        let (state, errors) = build(&[s], &[bad, good]);
        assert_eq!(errors, vec![err]);
        assert_eq!(
            backends(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            vec![be("10.244.0.1", 8080), be("10.244.0.3", 8080)],
            "only the good slice contributes"
        );
    }

    #[test]
    fn invalid_slices_are_reported_and_skipped_alone() {
        let http = json!([{"name": "http", "port": 8080}]);
        assert_invalid_slice(
            slice_obj(json!({
                "metadata": {"namespace": "demo", "name": "nolabel"},
                "addressType": "IPv4", "ports": http, "endpoints": [ready("10.9.9.9")],
            })),
            LABEL_SERVICE_NAME,
        );
        assert_invalid_slice(
            slice(
                "demo",
                "bad-addr",
                "web",
                "IPv4",
                http.clone(),
                json!([ready("10.9.9.9"), ready("10.9.9")]),
            ),
            "\"10.9.9\" is not an IPv4 address",
        );
        // Every address is checked, though only the first one is used.
        assert_invalid_slice(
            slice(
                "demo",
                "mixed",
                "web",
                "IPv4",
                http.clone(),
                json!([{"addresses": ["10.9.9.9", "fd00::1"]}]),
            ),
            "not an IPv4 address",
        );
        assert_invalid_slice(
            slice(
                "demo",
                "v6-in-v4",
                "web",
                "IPv6",
                http.clone(),
                json!([ready("10.9.9.9")]),
            ),
            "not an IPv6 address",
        );
        assert_invalid_slice(
            slice(
                "demo",
                "port",
                "web",
                "IPv4",
                json!([{"name": "http", "port": 70000}]),
                json!([ready("10.9.9.9")]),
            ),
            "out of range",
        );
        assert_invalid_slice(
            slice(
                "demo",
                "proto",
                "web",
                "IPv4",
                json!([{"name": "http", "port": 1, "protocol": "ICMP"}]),
                json!([]),
            ),
            "unknown protocol",
        );
        assert_invalid_slice(
            slice("demo", "family", "web", "IPv5", http.clone(), json!([])),
            "addressType",
        );
        assert_invalid_slice(
            slice_obj(json!({
                "metadata": {"namespace": "demo", "labels": {LABEL_SERVICE_NAME: "web"}},
                "addressType": "IPv4", "ports": http, "endpoints": [ready("10.9.9.9")],
            })),
            "metadata.name",
        );
    }

    #[test]
    fn slice_ports_without_a_number_are_ignored() {
        let (s, _) = web();
        let sl = slice(
            "demo",
            "web-1",
            "web",
            "IPv4",
            json!([{"name": "http"}, {"name": "http", "port": 8081}]),
            json!([ready("10.244.0.1")]),
        );
        let (state, errors) = build(&[s], &[sl]);
        assert_eq!(errors, vec![]);
        assert_eq!(
            backends(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            vec![be("10.244.0.1", 8081)]
        );
    }

    #[test]
    fn slices_match_by_label_within_the_namespace_only() {
        let (s, _) = web();
        let other_ns = slice(
            "prod",
            "web-1",
            "web",
            "IPv4",
            json!([{"name": "http", "port": 8080}]),
            json!([ready("10.1.1.1")]),
        );
        // The slice name alone means nothing; only the label ties it to a Service.
        let other_svc = slice(
            "demo",
            "web",
            "api",
            "IPv4",
            json!([{"name": "http", "port": 8080}]),
            json!([ready("10.1.1.2")]),
        );
        let (state, errors) = build(&[s], &[other_ns, other_svc]);
        assert_eq!(errors, vec![]);
        assert_eq!(
            backends(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            vec![]
        );
    }

    #[test]
    fn missing_namespace_means_default_on_both_sides() {
        let s = svc_obj(
            json!({"metadata": {"name": "n"}, "spec": {"clusterIP": "10.96.0.4", "ports": [{"port": 80}]}}),
        );
        let sl = slice_obj(json!({
            "metadata": {"name": "n-1", "labels": {LABEL_SERVICE_NAME: "n"}},
            "addressType": "IPv4", "ports": [{"port": 8080}], "endpoints": [ready("10.0.0.1")],
        }));
        let (state, errors) = build(&[s], &[sl]);
        assert_eq!(errors, vec![]);
        let f = fe("10.96.0.4", 80, Protocol::Tcp);
        assert_eq!(backends(&state, f), vec![be("10.0.0.1", 8080)]);
        assert_eq!(state.services[&f].name.namespace, "default");
    }

    #[test]
    fn conflicting_frontends_keep_the_first_service_by_name() {
        let a = cluster_ip("x", "a", &["10.96.0.1"], json!([{"port": 80}]));
        let b = cluster_ip(
            "x",
            "b",
            &["10.96.0.1"],
            json!([{"port": 80}, {"name": "other", "port": 81}]),
        );
        for input in [vec![a.clone(), b.clone()], vec![b.clone(), a.clone()]] {
            let (state, errors) = build(&input, &[]);
            assert_eq!(state.services.len(), 1, "all of b is dropped");
            assert_eq!(
                state.services[&fe("10.96.0.1", 80, Protocol::Tcp)]
                    .name
                    .name,
                "a"
            );
            assert!(
                matches!(&errors[..], [ModelError::InvalidService { name, .. }] if name == "b"),
                "{errors:?}"
            );
        }
    }

    #[test]
    fn build_does_not_depend_on_input_order() {
        let (s1, sl1) = web();
        let s2 = cluster_ip(
            "demo",
            "api",
            &["10.96.0.11", "fd00::11"],
            json!([{"name": "grpc", "port": 9000}]),
        );
        let sl2 = slice(
            "demo",
            "api-1",
            "api",
            "IPv4",
            json!([{"name": "grpc", "port": 9000}]),
            json!([ready("10.0.0.9"), ready("10.0.0.8")]),
        );
        // Same backend, ready in one slice and terminating in the other: usable whatever the order.
        let sl3 = slice(
            "demo",
            "api-2",
            "api",
            "IPv4",
            json!([{"name": "grpc", "port": 9000}]),
            json!([
                endpoint("10.0.0.8", Some(false), Some(true), Some(true)),
                ready("10.0.0.7")
            ]),
        );
        let (a, ea) = build(
            &[s1.clone(), s2.clone()],
            &[sl1.clone(), sl2.clone(), sl3.clone()],
        );
        let (b, eb) = build(&[s2, s1], &[sl3, sl2, sl1]);
        assert_eq!(a, b);
        assert_eq!(ea, eb);
        assert_eq!(
            backends(&a, fe("10.96.0.11", 9000, Protocol::Tcp)),
            vec![
                be("10.0.0.7", 9000),
                be("10.0.0.8", 9000),
                be("10.0.0.9", 9000)
            ]
        );
        assert_eq!(backends(&a, fe("fd00::11", 9000, Protocol::Tcp)), vec![]);
    }

    #[test]
    fn a_service_defined_twice_is_reported_once_and_kept_once() {
        let (s, _) = web();
        let (state, errors) = build(&[s.clone(), s], &[]);
        assert_eq!(state.services.len(), 1);
        assert_eq!(errors.len(), 1, "{errors:?}");
    }
}
