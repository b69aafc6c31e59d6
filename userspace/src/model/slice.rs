//! EndpointSlice parsing: a slice reduced to what the model uses, checked once.
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::service::ServicePortView;
use super::*;

/// Checks an EndpointSlice (name, service-name label, address type). Bad ports and
/// endpoints are not errors here: the model skips them one by one, as kube-proxy does.
pub fn validate_slice(slice: &EndpointSlice) -> Result<(), ModelError> {
    parse_slice(slice, &mut Vec::new()).map(|_| ())
}

/// An EndpointSlice reduced to what the model uses, already checked.
pub(super) struct SliceView<'a> {
    pub(super) namespace: &'a str,
    pub(super) service: &'a str,
    pub(super) family: Family,
    /// Only ports that carry a number.
    pub(super) ports: Vec<ServicePortView<'a>>,
    /// Only endpoints that have an address.
    pub(super) endpoints: Vec<EndpointView<'a>>,
}

pub(super) struct EndpointView<'a> {
    pub(super) ip: IpAddr,
    pub(super) ready: bool,
    pub(super) serving: bool,
    pub(super) terminating: bool,
    /// `nodeName`: the endpoint is local to the node of that name.
    pub(super) node_name: Option<&'a str>,
    /// `hints.forZones` (trafficDistribution PreferClose / PreferSameZone).
    pub(super) zone_hints: Vec<&'a str>,
    /// `hints.forNodes` (trafficDistribution PreferSameNode).
    pub(super) node_hints: Vec<&'a str>,
}

/// `Ok(None)`: an FQDN slice, which kube-proxy ignores. A port or an endpoint kube-proxy
/// would not use is left out, with its reason in `skipped`; the rest of the slice is used.
pub(super) fn parse_slice<'a>(
    slice: &'a EndpointSlice,
    skipped: &mut Vec<ModelError>,
) -> Result<Option<SliceView<'a>>, ModelError> {
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
        let protocol = match parse_protocol(p.protocol.as_deref()) {
            Ok(protocol) => protocol,
            Err(reason) => {
                skipped.push(fail(format!("ports[{i}]: {reason}; that port is skipped")));
                continue;
            }
        };
        // A port without a number would mean "all ports", which kube-proxy does not implement.
        let Some(number) = p.port else { continue };
        let Some(port) = u16::try_from(number).ok().filter(|&n| n != 0) else {
            skipped.push(fail(format!(
                "ports[{i}]: port {number} is out of range 1-65535; that port is skipped"
            )));
            continue;
        };
        ports.push(ServicePortView {
            name: p.name.as_deref().unwrap_or_default(),
            port,
            protocol,
            node_port: None,
        });
    }

    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        // Like kube-proxy: an endpoint is its first address; one without any is ignored, one
        // of the other family (or no address at all) is skipped.
        let Some(first) = ep.addresses.first() else {
            continue;
        };
        let ip = match crate::cidr::parse_ip(first) {
            Ok(ip) if Family::of(ip) == family => ip,
            _ => {
                skipped.push(fail(format!(
                    "endpoints[{i}]: {first:?} is not an {} address; that endpoint is skipped",
                    slice.address_type
                )));
                continue;
            }
        };
        let c = ep.conditions.as_ref();
        let hints = ep.hints.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        endpoints.push(EndpointView {
            ip,
            ready,
            // kube-proxy (endpointslicecache.go) and the API docs read a missing `serving` as
            // true, not as a copy of `ready`.
            serving: c.and_then(|c| c.serving).unwrap_or(true),
            terminating: c.and_then(|c| c.terminating).unwrap_or(false),
            node_name: ep.node_name.as_deref(),
            zone_hints: hints
                .and_then(|h| h.for_zones.as_deref())
                .unwrap_or_default()
                .iter()
                .map(|z| z.name.as_str())
                .collect(),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_deref())
                .unwrap_or_default()
                .iter()
                .map(|n| n.name.as_str())
                .collect(),
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
