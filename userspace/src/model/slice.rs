//! EndpointSlice parsing: a slice reduced to what the model uses, checked once.
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::service::ServicePortView;
use super::*;

/// Checks an EndpointSlice (name, service-name label, address type, parseable addresses
/// for IPv4/IPv6 slices, port numbers).
pub fn validate_slice(slice: &EndpointSlice) -> Result<(), ModelError> {
    parse_slice(slice).map(|_| ())
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
}

/// `Ok(None)`: an FQDN slice, which kube-proxy ignores.
pub(super) fn parse_slice(slice: &EndpointSlice) -> Result<Option<SliceView<'_>>, ModelError> {
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
            node_port: None,
        });
    }

    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        for a in &ep.addresses {
            match crate::cidr::parse_ip(a) {
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
        let Some(ip) = ep
            .addresses
            .first()
            .and_then(|a| crate::cidr::parse_ip(a).ok())
        else {
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
            node_name: ep.node_name.as_deref(),
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
