//! kube-proxy's metrics and health, fed by the sync runner through [`SyncObserver`].

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Node;

use crate::health::ProxyHealth;
use crate::metrics::Metrics;
use crate::runner::{MapOccupancy, SyncObserver, SyncReport};

impl SyncObserver for Metrics {
    fn update_queued(&self, at: SystemTime) {
        self.set_last_queued(at);
    }

    fn sync_succeeded(&self, _report: &SyncReport, took: Duration, full: bool, at: SystemTime) {
        self.observe_sync(took, full);
        self.set_last_sync(at);
        // Everything seen so far is programmed.
        self.set_pending(0, 0);
    }

    fn sync_failed(&self) {
        self.inc_sync_failures();
    }

    fn changes_seen(&self, services: usize, endpoint_slices: usize) {
        self.add_service_changes(services);
        self.add_endpoint_changes(endpoint_slices);
    }

    fn network_programmed(&self, latency: Duration) {
        self.observe_network_programming(latency);
    }

    fn datapath(
        &self,
        counters: &[(&'static str, u64)],
        occupancy: &[MapOccupancy],
        model_errors: usize,
    ) {
        self.set_datapath_counters(counters);
        for m in occupancy {
            self.set_map_occupancy(m.map, m.entries, m.capacity);
        }
        self.set_model_errors(model_errors);
    }
}

impl SyncObserver for ProxyHealth {
    fn update_queued(&self, at: SystemTime) {
        self.queued_update(at);
    }

    fn sync_succeeded(&self, _report: &SyncReport, _took: Duration, _full: bool, at: SystemTime) {
        self.updated(at);
    }

    fn node_seen(&self, node: &Node) {
        self.sync_node(node);
    }
}

/// Keeps kpr's nftables table in line with the programmed state: the masquerade rule for the tc
/// programs' mark, and a reject for every frontend without any endpoint (kube-proxy's
/// "has no endpoints" REJECT), so such traffic is refused rather than left to time out.
pub struct NftObserver {
    table: std::sync::Mutex<crate::nft::NftTable>,
}

impl NftObserver {
    pub fn new(mark: u32) -> Self {
        Self {
            table: std::sync::Mutex::new(crate::nft::NftTable::new(mark)),
        }
    }
}

/// IPv4 frontends with no endpoint at all, as (address, protocol, port).
pub fn frontends_without_endpoints(
    state: &crate::model::DesiredState,
) -> Vec<(std::net::Ipv4Addr, u8, u16)> {
    state
        .services
        .iter()
        .filter(|(_, s)| s.backends.is_empty() && s.external_backends.is_empty())
        .filter_map(|(f, _)| match f.ip {
            std::net::IpAddr::V4(ip) => Some((ip, f.protocol.number(), f.port)),
            std::net::IpAddr::V6(_) => None,
        })
        .collect()
}

impl SyncObserver for NftObserver {
    fn desired_state(&self, state: &crate::model::DesiredState) {
        // The nat chain (and with it netfilter conntrack for every packet) only while some
        // frontend sends outside traffic to another node's backend.
        let masquerade = state
            .services
            .values()
            .any(|s| s.kind.is_external() && s.external_snat);
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = table.apply_with(&frontends_without_endpoints(state), masquerade) {
            // The next sync applies the whole set again.
            tracing::warn!("updating the nftables table: {e}");
        }
    }
}
