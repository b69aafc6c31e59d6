//! The model built again after a change, reusing every Service whose objects did not change.
//!
//! kube-proxy's change trackers apply only the objects that changed to its service and
//! endpoints maps; building every Service again from its objects took 50 ms of a one-endpoint
//! change at 10,000 Services. Here a Service's own model (its frontends and ports, before
//! conflicts with other Services are settled) is kept with the objects it was built from, and
//! reused while the Service, the slices naming it and the node are equal to them. Settling the
//! conflicts still looks at every Service: it is cheap, and a change in one Service can free
//! or take a frontend another one wants. Objects are compared whole, not by `resourceVersion`:
//! manifests copied from `kubectl get -o yaml` keep theirs when edited. Objects a source kept
//! from its last snapshot are the same allocations, so most comparisons are of addresses.

use std::sync::Arc;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::build::{build_for_node, settle, BuiltService};
use super::service::parse_service;
use super::slice::parse_slice;
use super::{namespace_of, DesiredState, ModelError, NodeContext, LABEL_SERVICE_NAME};
use crate::source::{same_object, ClusterSnapshot};

/// What the last build made of each Service, and the snapshot it was made from.
#[derive(Default)]
pub struct ModelCache {
    last: Option<Arc<ClusterSnapshot>>,
    ctx: NodeContext,
    /// In namespace/name order, as Services are built: a build walks them alongside its own
    /// sorted Services instead of hashing 10,000 names.
    entries: Vec<Entry>,
    reused: usize,
    /// The last snapshot's Services in namespace/name order, and its slices that name a
    /// Service in that order (and those that do not): while every position holds the same
    /// key, the next snapshot sorts the same, and is not sorted again.
    service_order: Vec<usize>,
    slice_order: Vec<usize>,
    slice_orphans: Vec<usize>,
}

/// One Service of the last build: its name, where its objects are in that build's snapshot,
/// the errors they gave, and its model (`None`: not proxied, or invalid).
struct Entry {
    namespace: String,
    name: String,
    service: usize,
    slices: Vec<usize>,
    errors: Vec<ModelError>,
    built: Option<Arc<BuiltService>>,
}

/// The Service an EndpointSlice names, as [`parse_slice`] reads it.
fn named_service(slice: &EndpointSlice) -> Option<&str> {
    slice
        .metadata
        .labels
        .as_ref()?
        .get(LABEL_SERVICE_NAME)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

impl ModelCache {
    /// How many Services the last build took from the cache.
    pub fn reused(&self) -> usize {
        self.reused
    }

    /// The same as [`build_for_node`] on the snapshot's objects.
    pub fn build(
        &mut self,
        snapshot: &Arc<ClusterSnapshot>,
        ctx: &NodeContext,
    ) -> (DesiredState, Vec<ModelError>) {
        let services = &snapshot.services;
        let slices = &snapshot.slices;
        let key = |i: usize| {
            let m = &services[i].metadata;
            (namespace_of(m), m.name.as_deref().unwrap_or_default())
        };
        let last_key = |i: usize| {
            let m = &self.last.as_ref()?.services[i].metadata;
            Some((namespace_of(m), m.name.as_deref().unwrap_or_default()))
        };
        let same_places = self.last.as_ref().is_some_and(|last| {
            last.services.len() == services.len()
                && (0..services.len()).all(|i| {
                    Arc::ptr_eq(&last.services[i], &services[i]) || last_key(i) == Some(key(i))
                })
        });
        let order: Vec<usize> = if same_places {
            std::mem::take(&mut self.service_order)
        } else {
            let mut order: Vec<usize> = (0..services.len()).collect();
            order.sort_by_key(|&i| key(i));
            order
        };
        self.reused = 0;
        // Two Services of one name only come from hand-written manifests: build those
        // snapshots from scratch, which reports them, rather than keep entries for them.
        if order.windows(2).any(|w| key(w[0]) == key(w[1])) {
            self.last = None;
            self.entries.clear();
            return build_for_node(services, slices, ctx);
        }

        // Slices by the Service they name, in that order (stable: input order within one).
        let slice_key = |i: usize| {
            named_service(&slices[i]).map(|name| (namespace_of(&slices[i].metadata), name))
        };
        let last_slice_key = |i: usize| {
            let s = &self.last.as_ref()?.slices[i];
            Some(named_service(s).map(|name| (namespace_of(&s.metadata), name)))
        };
        let same_slice_places = self.last.as_ref().is_some_and(|last| {
            last.slices.len() == slices.len()
                && (0..slices.len()).all(|i| {
                    Arc::ptr_eq(&last.slices[i], &slices[i])
                        || last_slice_key(i) == Some(slice_key(i))
                })
        });
        let (named, mut orphans) = if same_slice_places {
            (
                std::mem::take(&mut self.slice_order),
                std::mem::take(&mut self.slice_orphans),
            )
        } else {
            let mut orphans = Vec::new();
            let mut named: Vec<usize> = Vec::with_capacity(slices.len());
            for i in 0..slices.len() {
                match slice_key(i) {
                    Some(_) => named.push(i),
                    None => orphans.push(i),
                }
            }
            named.sort_by_key(|&i| slice_key(i));
            (named, orphans)
        };
        self.slice_order.clone_from(&named);
        self.slice_orphans.clone_from(&orphans);
        let mut named = named.into_iter().peekable();

        let last = self.last.take().filter(|_| self.ctx == *ctx);
        let mut old = std::mem::take(&mut self.entries).into_iter().peekable();
        let mut errors = Vec::new();
        let mut built = Vec::new();
        for &i in &order {
            let k = key(i);
            let mut mine = Vec::new();
            while let Some(&s) = named.peek() {
                match slice_key(s).cmp(&Some(k)) {
                    std::cmp::Ordering::Less => orphans.push(s),
                    std::cmp::Ordering::Equal => mine.push(s),
                    std::cmp::Ordering::Greater => break,
                }
                named.next();
            }
            while old
                .peek()
                .is_some_and(|e| (e.namespace.as_str(), e.name.as_str()) < k)
            {
                old.next();
            }
            let candidate = old
                .next_if(|e| (e.namespace.as_str(), e.name.as_str()) == k)
                .filter(|_| last.is_some());
            let kept = candidate.filter(|e| {
                let Some(last) = &last else { return false };
                same_object(&last.services[e.service], &services[i])
                    && e.slices.len() == mine.len()
                    && e.slices
                        .iter()
                        .zip(&mine)
                        .all(|(&a, &b)| same_object(&last.slices[a], &slices[b]))
            });
            let entry = match kept {
                Some(e) => {
                    self.reused += 1;
                    Entry {
                        service: i,
                        slices: mine,
                        ..e
                    }
                }
                None => {
                    let mut errs = Vec::new();
                    let mut views = Vec::new();
                    for &s in &mine {
                        match parse_slice(&slices[s], &mut errs) {
                            Ok(Some(view)) => views.push(view),
                            Ok(None) => {}
                            Err(e) => errs.push(e),
                        }
                    }
                    let built = match parse_service(&services[i], &mut errs) {
                        Ok(Some(view)) => Some(Arc::new(BuiltService::of(&view, &views, ctx))),
                        Ok(None) => None,
                        Err(e) => {
                            errs.push(e);
                            None
                        }
                    };
                    drop(views);
                    Entry {
                        namespace: k.0.to_owned(),
                        name: k.1.to_owned(),
                        service: i,
                        slices: mine,
                        errors: errs,
                        built,
                    }
                }
            };
            errors.extend(entry.errors.iter().cloned());
            if let Some(b) = &entry.built {
                built.push(b.clone());
            }
            self.entries.push(entry);
        }
        // Slices that name no Service here count for their errors only (as in a full build).
        orphans.extend(named);
        orphans.sort_unstable();
        for s in orphans {
            if let Err(e) = parse_slice(&slices[s], &mut errors) {
                errors.push(e);
            }
        }
        self.last = Some(snapshot.clone());
        self.ctx = ctx.clone();
        self.service_order = order;
        settle(&built, ctx, &mut errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use serde_json::json;

    fn svc(name: &str, ip: &str, extra: serde_json::Value) -> Service {
        let mut spec = json!({"clusterIP": ip, "ports": [{"name": "http", "port": 80}]});
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": name}, "spec": spec}))
            .unwrap()
    }

    fn slice(name: &str, service: &str, ips: &[&str]) -> EndpointSlice {
        let endpoints: Vec<_> = ips
            .iter()
            .map(|ip| json!({"addresses": [ip], "nodeName": "n1"}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": name, "labels": {LABEL_SERVICE_NAME: service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn sorted(errors: &[ModelError]) -> Vec<String> {
        let mut v: Vec<String> = errors.iter().map(ToString::to_string).collect();
        v.sort();
        v
    }

    /// Every step's cached build equals a build from scratch: changed, added and removed
    /// Services and slices, a conflict appearing and going, a node change, bad objects,
    /// orphan slices and a duplicate name.
    #[test]
    fn a_cached_build_equals_a_fresh_one_through_changes() {
        let node = |name: &str| NodeContext {
            node_name: Some(name.into()),
            node_ips: vec!["192.168.0.1".parse().unwrap()],
            ..NodeContext::default()
        };
        let np =
            json!({"type": "NodePort", "ports": [{"name": "http", "port": 80, "nodePort": 30080}]});
        let steps: Vec<(Vec<Service>, Vec<EndpointSlice>, NodeContext)> = vec![
            (
                vec![
                    svc("a", "10.96.0.1", json!({})),
                    svc("b", "10.96.0.2", np.clone()),
                ],
                vec![
                    slice("a-1", "a", &["10.0.0.1", "10.0.0.2"]),
                    slice("b-1", "b", &["10.0.0.3"]),
                ],
                node("n1"),
            ),
            // The same objects in the other order (the cache keeps the last sort only while
            // every position holds the same name).
            (
                vec![
                    svc("b", "10.96.0.2", np.clone()),
                    svc("a", "10.96.0.1", json!({})),
                ],
                vec![
                    slice("b-1", "b", &["10.0.0.3"]),
                    slice("a-1", "a", &["10.0.0.1", "10.0.0.2"]),
                ],
                node("n1"),
            ),
            // One endpoint fewer for a.
            (
                vec![
                    svc("a", "10.96.0.1", json!({})),
                    svc("b", "10.96.0.2", np.clone()),
                ],
                vec![
                    slice("a-1", "a", &["10.0.0.1"]),
                    slice("b-1", "b", &["10.0.0.3"]),
                ],
                node("n1"),
            ),
            // c takes b's ClusterIP (c sorts after b: c is dropped), an orphan slice, a bad
            // Service.
            (
                vec![
                    svc("a", "10.96.0.1", json!({})),
                    svc("b", "10.96.0.2", np.clone()),
                    svc("c", "10.96.0.2", json!({})),
                    svc("d", "not-an-ip", json!({})),
                ],
                vec![
                    slice("a-1", "a", &["10.0.0.1"]),
                    slice("b-1", "b", &["10.0.0.3"]),
                    slice("x-1", "x", &["10.0.0.9"]),
                ],
                node("n1"),
            ),
            // b goes: c gets its ClusterIP; the node changes (locality, NodePorts).
            (
                vec![
                    svc("a", "10.96.0.1", json!({})),
                    svc("c", "10.96.0.2", np.clone()),
                ],
                vec![
                    slice("a-1", "a", &["10.0.0.1"]),
                    slice("c-1", "c", &["10.0.0.4"]),
                ],
                node("n2"),
            ),
            // A duplicate name, then back to normal.
            (
                vec![
                    svc("a", "10.96.0.1", json!({})),
                    svc("a", "10.96.0.5", json!({})),
                ],
                vec![slice("a-1", "a", &["10.0.0.1"])],
                node("n2"),
            ),
            (
                vec![svc(
                    "a",
                    "10.96.0.1",
                    json!({"sessionAffinity": "ClientIP"}),
                )],
                vec![
                    slice("a-1", "a", &["10.0.0.1"]),
                    slice("a-2", "a", &["10.0.0.7"]),
                ],
                node("n2"),
            ),
        ];
        let mut cache = ModelCache::default();
        let mut reuses = Vec::new();
        for (n, (services, slices, ctx)) in steps.into_iter().enumerate() {
            let (fresh, fresh_errors) = build_for_node(&services, &slices, &ctx);
            let snapshot = Arc::new(ClusterSnapshot {
                services: services.into_iter().map(Arc::new).collect(),
                slices: slices.into_iter().map(Arc::new).collect(),
                ..ClusterSnapshot::default()
            });
            let (cached, cached_errors) = cache.build(&snapshot, &ctx);
            let reused = cache.reused();
            assert_eq!(cached, fresh, "step {n}");
            assert_eq!(sorted(&cached_errors), sorted(&fresh_errors), "step {n}");
            // Built twice from one snapshot: everything comes from the cache.
            let (again, again_errors) = cache.build(&snapshot, &ctx);
            assert_eq!(again, fresh, "step {n}, again");
            assert_eq!(
                sorted(&again_errors),
                sorted(&fresh_errors),
                "step {n}, again"
            );
            let names: std::collections::BTreeSet<_> =
                snapshot.services.iter().map(|s| &s.metadata.name).collect();
            let want = if names.len() < snapshot.services.len() {
                0
            } else {
                names.len()
            };
            assert_eq!(
                cache.reused(),
                want,
                "step {n}: Services reused when nothing changed"
            );
            reuses.push(reused);
        }
        // What each step could keep from the one before: both Services when only their order
        // changed (step 1); a's model in step 2 changed (its slice), b's did not; the node
        // change in step 4 rebuilds all; after the duplicate, nothing is kept.
        assert_eq!(reuses, vec![0, 2, 1, 2, 0, 0, 0]);
    }
}
