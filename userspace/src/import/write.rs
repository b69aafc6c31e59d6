//! Imported service ports → Service and EndpointSlice manifests, as `kpr --manifests DIR`
//! reads them (one file per Service: the Service, then its slices).
//!
//! The objects are k8s-openapi's own types, serialised by serde, so the text is what the
//! manifest source (and `kubectl`) parse. Everything is built in memory before the first file
//! is written: an error leaves the output directory untouched.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{
    ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort, ServiceSpec,
    ServiceStatus, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::interpret::Note;
use crate::model::{Backend, Protocol, ServicePortInfo, LABEL_SERVICE_NAME};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot serialise {what}: {message}")]
    Serialise { what: String, message: String },
    #[error("cannot write {}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// One Service's manifest file: its name and YAML text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    pub file_name: String,
    pub text: String,
}

fn protocol_name(p: Protocol) -> String {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
    .to_string()
}

/// The Service and its EndpointSlices for the imported ports of one Service.
/// `node` is written as the `nodeName` of the endpoints found in `KUBE-SVL-` chains (this
/// node's); the others get none (the dump does not say where they run).
pub fn objects(
    ports: &[&ServicePortInfo],
    node: &str,
    notes: &mut Vec<Note>,
) -> Option<(Service, Vec<EndpointSlice>)> {
    let first = *ports.first()?;
    let (namespace, name) = (first.name.namespace.clone(), first.name.name.clone());
    let disagree = |what: &str, notes: &mut Vec<Note>| {
        notes.push(Note {
            line: None,
            text: format!(
                "{namespace}/{name}: its ports disagree on {what}; the first port's is written"
            ),
        })
    };
    let same = |f: &dyn Fn(&ServicePortInfo) -> String| ports.iter().all(|p| f(p) == f(first));
    for (what, f) in [
        (
            "the ClusterIP",
            &(|p: &ServicePortInfo| p.cluster_ip.to_string())
                as &dyn Fn(&ServicePortInfo) -> String,
        ),
        ("the internal traffic policy", &|p| {
            p.internal_policy_local.to_string()
        }),
        ("the external traffic policy", &|p| {
            p.external_policy_local.to_string()
        }),
        ("session affinity", &|p| format!("{:?}", p.session_affinity)),
    ] {
        if !same(f) {
            disagree(what, notes);
        }
    }
    let mut external_ips: Vec<String> = Vec::new();
    let mut lb_ips: Vec<String> = Vec::new();
    let mut ranges: Vec<String> = Vec::new();
    for p in ports {
        for ip in &p.external_ips {
            push_new(&mut external_ips, ip.to_string());
        }
        for ip in &p.load_balancer_ips {
            push_new(&mut lb_ips, ip.to_string());
        }
        for r in &p.load_balancer_source_ranges {
            push_new(&mut ranges, r.to_string());
        }
    }
    let any_node_port = ports.iter().any(|p| p.node_port.is_some());
    let type_ = if !lb_ips.is_empty() {
        "LoadBalancer"
    } else if any_node_port {
        "NodePort"
    } else {
        "ClusterIP"
    };
    let policy = |local: bool| Some(if local { "Local" } else { "Cluster" }.to_string());
    // (endpoint, this node's, serving-terminating).
    type Written = (Backend, bool, bool);
    let mut slices: BTreeMap<(String, Protocol, u16), Vec<Written>> = BTreeMap::new();
    let mut spec_ports = Vec::new();
    for p in ports {
        // Endpoints of the port: cluster and local chains together; a local chain's are this
        // node's.
        // A local endpoint missing from a non-empty cluster chain cannot be ready (every ready
        // endpoint is a cluster endpoint): it is serving-terminating, which kube-proxy uses
        // locally only when no local endpoint is ready.
        let mut endpoints: Vec<Written> = Vec::new();
        for b in &p.local_endpoints {
            let terminating = !p.cluster_endpoints.is_empty() && !p.cluster_endpoints.contains(b);
            endpoints.push((*b, true, terminating));
        }
        for b in &p.cluster_endpoints {
            if !p.local_endpoints.contains(b) {
                endpoints.push((*b, false, false));
            }
        }
        let mut target_ports: Vec<u16> = endpoints.iter().map(|(b, _, _)| b.port).collect();
        target_ports.sort_unstable();
        target_ports.dedup();
        for (b, local, terminating) in endpoints {
            slices
                .entry((p.name.port.clone(), p.protocol, b.port))
                .or_default()
                .push((b, local, terminating));
        }
        spec_ports.push(ServicePort {
            name: (!p.name.port.is_empty()).then(|| p.name.port.clone()),
            port: i32::from(p.port),
            protocol: Some(protocol_name(p.protocol)),
            node_port: p.node_port.map(i32::from),
            // A single target port is the Service's; several (a named targetPort resolving
            // differently per pod) are only in the slices.
            target_port: match target_ports.as_slice() {
                [one] => Some(IntOrString::Int(i32::from(*one))),
                _ => None,
            },
            ..ServicePort::default()
        });
    }
    let externally = any_node_port || !external_ips.is_empty() || !lb_ips.is_empty();
    let service = Service {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some(type_.to_string()),
            cluster_ip: Some(first.cluster_ip.to_string()),
            cluster_ips: Some(vec![first.cluster_ip.to_string()]),
            ip_families: Some(vec![first.family.label().to_string()]),
            ports: Some(spec_ports),
            external_ips: (!external_ips.is_empty()).then_some(external_ips),
            load_balancer_source_ranges: (!ranges.is_empty()).then_some(ranges),
            internal_traffic_policy: policy(first.internal_policy_local),
            external_traffic_policy: externally
                .then(|| policy(first.external_policy_local))
                .flatten(),
            health_check_node_port: ports
                .iter()
                .find_map(|p| p.health_check_node_port)
                .map(i32::from),
            session_affinity: Some(
                if first.session_affinity.is_some() {
                    "ClientIP"
                } else {
                    "None"
                }
                .to_string(),
            ),
            session_affinity_config: first.session_affinity.map(|d| SessionAffinityConfig {
                client_ip: Some(ClientIPConfig {
                    timeout_seconds: i32::try_from(d.as_secs()).ok(),
                }),
            }),
            ..ServiceSpec::default()
        }),
        status: (!lb_ips.is_empty()).then(|| ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(
                    lb_ips
                        .iter()
                        .map(|ip| LoadBalancerIngress {
                            ip: Some(ip.clone()),
                            ..LoadBalancerIngress::default()
                        })
                        .collect(),
                ),
            }),
            ..ServiceStatus::default()
        }),
    };
    let slices = slices
        .into_iter()
        .enumerate()
        .map(
            |(i, ((port_name, protocol, port), endpoints))| EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(format!("{name}-imported-{}", i + 1)),
                    namespace: Some(namespace.clone()),
                    labels: Some([(LABEL_SERVICE_NAME.to_string(), name.clone())].into()),
                    ..ObjectMeta::default()
                },
                address_type: first.family.label().to_string(),
                endpoints: Some(
                    endpoints
                        .into_iter()
                        .map(|(b, local, terminating)| Endpoint {
                            addresses: vec![b.ip.to_string()],
                            conditions: Some(EndpointConditions {
                                ready: Some(!terminating),
                                serving: Some(true),
                                terminating: Some(terminating),
                            }),
                            node_name: local.then(|| node.to_string()),
                            ..Endpoint::default()
                        })
                        .collect(),
                ),
                ports: Some(vec![EndpointPort {
                    name: Some(port_name),
                    port: Some(i32::from(port)),
                    protocol: Some(protocol_name(protocol)),
                    ..EndpointPort::default()
                }]),
            },
        )
        .collect();
    Some((service, slices))
}

fn push_new(v: &mut Vec<String>, s: String) {
    if !v.contains(&s) {
        v.push(s);
    }
}

fn yaml<T: serde::Serialize>(what: &str, object: &T) -> Result<String, WriteError> {
    yaml_serde::to_string(object).map_err(|e| WriteError::Serialise {
        what: what.to_string(),
        message: e.to_string(),
    })
}

/// One manifest file per Service (`<namespace>_<name>.yaml`), in name order.
pub fn manifests(
    ports: &[ServicePortInfo],
    node: &str,
    notes: &mut Vec<Note>,
) -> Result<Vec<ManifestFile>, WriteError> {
    let mut by_service: BTreeMap<(&str, &str), Vec<&ServicePortInfo>> = BTreeMap::new();
    for p in ports {
        by_service
            .entry((p.name.namespace.as_str(), p.name.name.as_str()))
            .or_default()
            .push(p);
    }
    let mut files = Vec::new();
    for ((namespace, name), ports) in by_service {
        let Some((service, slices)) = objects(&ports, node, notes) else {
            continue;
        };
        let what = format!("{namespace}/{name}");
        let mut text =
            String::from("# Imported from iptables-save by `kpr import iptables-save`.\n");
        text.push_str(&yaml(&what, &service)?);
        for s in &slices {
            text.push_str("---\n");
            text.push_str(&yaml(&what, s)?);
        }
        files.push(ManifestFile {
            file_name: format!("{namespace}_{name}.yaml"),
            text,
        });
    }
    Ok(files)
}

/// Writes `files` into `dir` (created if missing).
pub fn write_dir(dir: &Path, files: &[ManifestFile]) -> Result<(), WriteError> {
    std::fs::create_dir_all(dir).map_err(|source| WriteError::Io {
        path: dir.to_owned(),
        source,
    })?;
    for f in files {
        let path = dir.join(&f.file_name);
        std::fs::write(&path, &f.text).map_err(|source| WriteError::Io { path, source })?;
    }
    Ok(())
}
