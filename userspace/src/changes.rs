//! What changed between two snapshots: kube-proxy's change counters and the trigger times
//! behind its network-programming latency (pkg/proxy/metrics, endpointschangetracker.go).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::Metadata;

use crate::source::{same_object, ClusterSnapshot};

/// The EndpointSlice controller stamps a slice with the time of the Pod or Service change that
/// caused it; kube-proxy's network-programming latency is "programmed" minus this.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Changes between the last programmed snapshot and a new one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Services added, changed or removed.
    pub services: usize,
    /// EndpointSlices added, changed or removed.
    pub endpoint_slices: usize,
    /// Trigger times of the added or changed slices that carry one.
    pub trigger_times: Vec<SystemTime>,
}

/// Compares by (namespace, name) and content. `old` is `None` before the first sync, when
/// everything counts as added.
pub fn between(old: Option<&ClusterSnapshot>, new: &ClusterSnapshot) -> Changes {
    let empty = ClusterSnapshot::default();
    let old = old.unwrap_or(&empty);
    let (services, _) = diff::<Service>(&old.services, &new.services);
    let (endpoint_slices, changed) = diff::<EndpointSlice>(&old.slices, &new.slices);
    let trigger_times = changed.into_iter().filter_map(trigger_time).collect();
    Changes {
        services,
        endpoint_slices,
        trigger_times,
    }
}

fn key(meta: &ObjectMeta) -> (&str, &str) {
    (
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or(""),
    )
}

/// Number of objects added, changed or removed, and the added or changed ones.
fn diff<'a, T>(old: &'a [Arc<T>], new: &'a [Arc<T>]) -> (usize, Vec<&'a T>)
where
    T: Metadata<Ty = ObjectMeta> + PartialEq,
{
    // Sources keep unchanged objects (the same allocations) in their places: what is the same
    // at both ends is unchanged, and only the middle, where the change is, needs the names.
    let prefix = old
        .iter()
        .zip(new)
        .take_while(|(a, b)| Arc::ptr_eq(a, b))
        .count();
    let (old, new) = (&old[prefix..], &new[prefix..]);
    let suffix = old
        .iter()
        .rev()
        .zip(new.iter().rev())
        .take_while(|(a, b)| Arc::ptr_eq(a, b))
        .count();
    let (old, new) = (&old[..old.len() - suffix], &new[..new.len() - suffix]);
    let before: HashMap<(&str, &str), &Arc<T>> =
        old.iter().map(|o| (key(o.metadata()), o)).collect();
    let mut seen = 0;
    let mut changed = Vec::new();
    for o in new {
        match before.get(&key(o.metadata())) {
            Some(prev) => {
                seen += 1;
                if !same_object(prev, o) {
                    changed.push(&**o);
                }
            }
            None => changed.push(&**o),
        }
    }
    let removed = before.len() - seen.min(before.len());
    (changed.len() + removed, changed)
}

fn trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    let text = slice
        .metadata
        .annotations
        .as_ref()?
        .get(TRIGGER_TIME_ANNOTATION)?;
    let t: k8s_openapi::jiff::Timestamp = text.parse().ok()?;
    Some(SystemTime::from(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn svc(name: &str, ip: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}
        }))
        .unwrap()
    }

    fn slice(name: &str, ip: &str, trigger: Option<&str>) -> EndpointSlice {
        let mut s: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns",
                         "labels": {"kubernetes.io/service-name": "a"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip]}]
        }))
        .unwrap();
        if let Some(t) = trigger {
            s.metadata.annotations = Some(BTreeMap::from([(
                TRIGGER_TIME_ANNOTATION.to_string(),
                t.to_string(),
            )]));
        }
        s
    }

    #[test]
    fn counts_adds_changes_and_removals_and_collects_trigger_times() {
        let old = ClusterSnapshot {
            services: vec![
                Arc::new(svc("a", "10.96.0.1")),
                Arc::new(svc("b", "10.96.0.2")),
            ],
            slices: vec![
                Arc::new(slice("a-1", "10.0.0.1", None)),
                Arc::new(slice("b-1", "10.0.0.2", None)),
            ],
            node: None,
            rejected: Vec::new(),
        };
        let new = ClusterSnapshot {
            // a unchanged, b changed, c added.
            services: vec![
                Arc::new(svc("a", "10.96.0.1")),
                Arc::new(svc("b", "10.96.0.9")),
                Arc::new(svc("c", "10.96.0.3")),
            ],
            // a-1 changed (with a trigger time), b-1 removed.
            slices: vec![Arc::new(slice(
                "a-1",
                "10.0.0.7",
                Some("2026-11-23T10:00:00Z"),
            ))],
            node: None,
            rejected: Vec::new(),
        };
        let c = between(Some(&old), &new);
        assert_eq!((c.services, c.endpoint_slices), (2, 2));
        assert_eq!(c.trigger_times.len(), 1);
        let expected = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_428_000);
        assert_eq!(c.trigger_times[0], expected);
        assert_eq!(between(Some(&new), &new), Changes::default());
    }

    #[test]
    fn shared_objects_count_as_unchanged_wherever_the_change_is() {
        let services: Vec<_> = (0..5)
            .map(|i| Arc::new(svc(&format!("s{i}"), &format!("10.96.0.{i}"))))
            .collect();
        let old = ClusterSnapshot {
            services: services.clone(),
            ..ClusterSnapshot::default()
        };
        for at in 0..5 {
            let mut new = old.clone();
            new.services[at] = Arc::new(svc(&format!("s{at}"), "10.96.1.1"));
            assert_eq!(between(Some(&old), &new).services, 1, "changed at {at}");
            // Removed, and another added in its place.
            new.services[at] = Arc::new(svc("other", "10.96.1.2"));
            assert_eq!(between(Some(&old), &new).services, 2, "replaced at {at}");
            new.services.remove(at);
            assert_eq!(between(Some(&old), &new).services, 1, "removed at {at}");
        }
        // Equal contents in new allocations are unchanged too.
        let mut copied = old.clone();
        copied.services[2] = Arc::new((*services[2]).clone());
        assert_eq!(between(Some(&old), &copied), Changes::default());
    }

    #[test]
    fn the_first_snapshot_counts_everything_as_added() {
        let new = ClusterSnapshot {
            services: vec![Arc::new(svc("a", "10.96.0.1"))],
            slices: vec![Arc::new(slice("a-1", "10.0.0.1", Some("not a time")))],
            node: None,
            rejected: Vec::new(),
        };
        let c = between(None, &new);
        assert_eq!((c.services, c.endpoint_slices), (1, 1));
        assert!(c.trigger_times.is_empty(), "an unparseable time is ignored");
    }
}
