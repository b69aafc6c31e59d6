//! kube-proxy's service health-check servers (pkg/proxy/healthcheck/service_health.go): for
//! each Service with `externalTrafficPolicy: Local` and a `healthCheckNodePort`, an HTTP server
//! on that port tells a cloud load balancer whether this node has local endpoints — 200 with
//! some (and a healthy proxy), 503 without — so it only sends traffic to nodes that can serve it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use hyper::StatusCode;

use crate::health::ProxyHealth;
use crate::model::DesiredState;
use crate::runner::SyncObserver;

type ServiceName = (String, String);

struct Instance {
    port: u16,
    endpoints: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// The set of running health-check servers, kept in line with the desired state.
pub struct ServiceHealthServers {
    bind_ip: IpAddr,
    proxy: ProxyHealth,
    servers: Mutex<HashMap<ServiceName, Instance>>,
}

impl ServiceHealthServers {
    /// Servers listen on `bind_ip` (kube-proxy: the node addresses; 0.0.0.0 serves them all).
    pub fn new(bind_ip: IpAddr, proxy: ProxyHealth) -> Self {
        Self {
            bind_ip,
            proxy,
            servers: Mutex::new(HashMap::new()),
        }
    }

    /// Starts, stops and updates servers for `state`. Must run inside a Tokio runtime.
    pub fn sync(&self, state: &DesiredState) {
        let mut want: HashMap<ServiceName, (u16, usize)> = HashMap::new();
        for s in state.services.values() {
            if let Some(port) = s.health_check_node_port {
                let key = (s.name.namespace.clone(), s.name.name.clone());
                let entry = want.entry(key).or_insert((port, 0));
                entry.1 = entry.1.max(s.local_endpoints);
            }
        }
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        servers.retain(|name, inst| {
            let keep = want.get(name).is_some_and(|(port, _)| *port == inst.port);
            if !keep {
                inst.task.abort();
            }
            keep
        });
        for (name, (port, count)) in want {
            if let Some(inst) = servers.get(&name) {
                inst.endpoints.store(count, Ordering::Relaxed);
                continue;
            }
            match self.start(&name, port, count) {
                Ok(inst) => {
                    servers.insert(name, inst);
                }
                // Retried at the next sync, as kube-proxy does.
                Err(e) => tracing::warn!(
                    service = %format!("{}/{}", name.0, name.1),
                    port,
                    "cannot serve the health-check node port: {e}"
                ),
            }
        }
    }

    fn start(&self, name: &ServiceName, port: u16, count: usize) -> std::io::Result<Instance> {
        let listener = bind_any_family(self.bind_ip, port)?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let endpoints = Arc::new(AtomicUsize::new(count));
        let (ns, svc) = name.clone();
        let (count_ref, proxy) = (endpoints.clone(), self.proxy.clone());
        let task = tokio::spawn(crate::http_server::serve(
            listener,
            "service-health",
            move |_req| {
                let count = count_ref.load(Ordering::Relaxed);
                let healthy = proxy.is_healthy(SystemTime::now());
                let (code, body) = respond(&ns, &svc, count, healthy);
                crate::http_server::response(
                    StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                    "application/json",
                    &[("x-content-type-options", "nosniff")],
                    body,
                )
            },
        ));
        tracing::info!(service = %format!("{}/{}", name.0, name.1), port, "serving health-check node port");
        Ok(Instance {
            port,
            endpoints,
            task,
        })
    }

    /// Ports currently served, by Service (for tests and logs).
    pub fn ports(&self) -> Vec<(String, String, u16)> {
        let servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = servers
            .iter()
            .map(|((ns, n), i)| (ns.clone(), n.clone(), i.port))
            .collect();
        v.sort();
        v
    }
}

impl Drop for ServiceHealthServers {
    fn drop(&mut self) {
        let servers = self.servers.get_mut().unwrap_or_else(|e| e.into_inner());
        for inst in servers.values() {
            inst.task.abort();
        }
    }
}

impl SyncObserver for ServiceHealthServers {
    fn desired_state(&self, state: &DesiredState) {
        self.sync(state);
    }
}

/// kube-proxy's answer, byte for byte: 200 only with local endpoints and a healthy proxy.
pub fn respond(
    namespace: &str,
    name: &str,
    local_endpoints: usize,
    proxy_healthy: bool,
) -> (u16, String) {
    let code = if local_endpoints != 0 && proxy_healthy {
        200
    } else {
        503
    };
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
        q(namespace),
        q(name)
    );
    (code, body)
}

/// A listener on `ip`:`port`; the IPv4 wildcard (0.0.0.0, the default) listens on both
/// families (`[::]`, which on Linux takes IPv4 too unless `net.ipv6.bindv6only` says otherwise),
/// so that a load balancer health-checks a dual-stack node over either. Without IPv6, 0.0.0.0.
fn bind_any_family(ip: IpAddr, port: u16) -> std::io::Result<std::net::TcpListener> {
    if ip == IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED) {
        let both = SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), port);
        if let Ok(l) = std::net::TcpListener::bind(both) {
            return Ok(l);
        }
    }
    std::net::TcpListener::bind(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FrontendKind, ServicePortName, ServicePortState};
    use std::io::{Read, Write};
    use std::time::Duration;

    #[test]
    fn the_answer_is_kube_proxys() {
        let (code, body) = respond("default", "web", 2, true);
        assert_eq!(code, 200);
        assert_eq!(
            body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(respond("default", "web", 0, true).0, 503);
        assert_eq!(respond("default", "web", 3, false).0, 503);
    }

    fn state(port: u16, local: usize) -> DesiredState {
        let mut d = DesiredState::default();
        d.services.insert(
            crate::model::Frontend {
                ip: "192.168.1.10".parse().unwrap(),
                port: 30080,
                protocol: crate::model::Protocol::Tcp,
            },
            ServicePortState {
                name: ServicePortName {
                    namespace: "default".into(),
                    name: "web".into(),
                    port: "http".into(),
                },
                kind: FrontendKind::LoadBalancer,
                health_check_node_port: Some(port),
                local_endpoints: local,
                ..Default::default()
            },
        );
        d
    }

    fn get(port: u16) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
        (code, text.split_once("\r\n\r\n").unwrap().1.to_string())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn servers_follow_the_desired_state() {
        // A free port for the health-check node port.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let proxy = ProxyHealth::new(Duration::from_secs(60));
        let hcs = ServiceHealthServers::new("127.0.0.1".parse().unwrap(), proxy);
        hcs.sync(&state(port, 1));
        assert_eq!(hcs.ports(), vec![("default".into(), "web".into(), port)]);
        let (code, body) = tokio::task::spawn_blocking(move || get(port))
            .await
            .unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"localEndpoints\": 1"));

        hcs.sync(&state(port, 0));
        let (code, _) = tokio::task::spawn_blocking(move || get(port))
            .await
            .unwrap();
        assert_eq!(code, 503);

        hcs.sync(&DesiredState::default());
        assert!(hcs.ports().is_empty());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "server still up"
        );
    }
}
