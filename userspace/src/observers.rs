//! kube-proxy's metrics and health, fed by the sync runner through [`SyncObserver`].

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Node;

use crate::health::ProxyHealth;
use crate::metrics::Metrics;
use crate::runner::{MapOccupancy, ModeMetrics, SyncObserver, SyncReport};

impl SyncObserver for Metrics {
    fn update_queued(&self, at: SystemTime) {
        self.set_last_queued(at);
    }

    fn sync_succeeded(&self, report: &SyncReport, took: Duration, full: bool, at: SystemTime) {
        self.observe_sync(took, full);
        self.set_refused(report.refused);
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

    fn mode_metrics(&self, m: &ModeMetrics) {
        self.set_mode_metrics(m);
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
