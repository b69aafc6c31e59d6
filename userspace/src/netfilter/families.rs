//! A netfilter mode for both address families: one instance per family behind one
//! [`Dataplane`], as kube-proxy's meta-proxier runs one proxier per family. Each instance
//! programs only its family's service ports (its `PlanConfig::family`): `iptables` and
//! `ip6tables`, or the tables `ip kube-proxy` and `ip6 kube-proxy`.
//!
//! A sync succeeds only if every family's does: a failure in one fails the sync, and the
//! runner's full resync rewrites both (kube-proxy's families fail and resync separately; the
//! seam has one health, so kpr keeps them together).

use crate::dataplane::{Dataplane, DataplaneError, MapOccupancy, ModeMetrics, SyncReport};
use crate::model::{DesiredState, Family};

/// One mode per family, IPv4 first.
pub struct PerFamily {
    modes: Vec<(Family, Box<dyn Dataplane>)>,
}

impl PerFamily {
    pub fn new(modes: Vec<(Family, Box<dyn Dataplane>)>) -> Self {
        PerFamily { modes }
    }

    pub fn families(&self) -> Vec<Family> {
        self.modes.iter().map(|(f, _)| *f).collect()
    }
}

impl Dataplane for PerFamily {
    fn sync(&mut self, desired: &DesiredState, full: bool) -> Result<SyncReport, DataplaneError> {
        let mut total = SyncReport::default();
        // Every family is synced even when an earlier one failed, so that one broken family
        // does not freeze the other; the first error is the sync's.
        let mut first_error = None;
        for (_, mode) in &mut self.modes {
            match mode.sync(desired, full) {
                Ok(r) => {
                    total.frontends += r.frontends;
                    total.backends += r.backends;
                    total.writes += r.writes;
                    total.deletes += r.deletes;
                    total.refused += r.refused;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    /// Counters of the same name (the refusal reasons) summed over the families.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let mut out: Vec<(&'static str, u64)> = Vec::new();
        for (_, mode) in &self.modes {
            for (name, n) in mode.counters() {
                match out.iter_mut().find(|(k, _)| *k == name) {
                    Some((_, total)) => *total += n,
                    None => out.push((name, n)),
                }
            }
        }
        out
    }

    fn refused(&self) -> Vec<String> {
        self.modes.iter().flat_map(|(_, m)| m.refused()).collect()
    }

    fn occupancy(&self) -> Vec<MapOccupancy> {
        self.modes.iter().flat_map(|(_, m)| m.occupancy()).collect()
    }

    /// Rules and objects summed per table over the families (kube-proxy's gauges are set by
    /// each family's proxier in turn; kpr reports the node's totals).
    fn mode_metrics(&self) -> ModeMetrics {
        let mut out = ModeMetrics::default();
        for (_, mode) in &self.modes {
            let m = mode.mode_metrics();
            out.mode = m.mode;
            add(&mut out.iptables_rules, &m.iptables_rules);
            out.iptables_rules_by_family
                .extend(m.iptables_rules_by_family.iter().copied());
            out.nftables_objects_by_family
                .extend(m.nftables_objects_by_family.iter().copied());
            add(&mut out.nftables_objects, &m.nftables_objects);
            out.restore_failures += m.restore_failures;
            out.partial_restore_failures += m.partial_restore_failures;
        }
        out
    }
}

fn add(into: &mut Vec<(&'static str, u64)>, from: &[(&'static str, u64)]) {
    for &(name, n) in from {
        match into.iter_mut().find(|(k, _)| *k == name) {
            Some((_, total)) => *total += n,
            None => into.push((name, n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A family's mode that reports fixed figures, or fails.
    struct Fixed {
        fail: bool,
        synced: std::rc::Rc<std::cell::Cell<u32>>,
    }

    impl Dataplane for Fixed {
        fn sync(&mut self, _: &DesiredState, _: bool) -> Result<SyncReport, DataplaneError> {
            self.synced.set(self.synced.get() + 1);
            if self.fail {
                return Err(DataplaneError::EbpfDevices("broken".into()));
            }
            Ok(SyncReport {
                frontends: 2,
                backends: 3,
                writes: 1,
                deletes: 0,
                refused: 0,
            })
        }
        fn counters(&self) -> Vec<(&'static str, u64)> {
            vec![("reject_no_endpoints", 5)]
        }
        fn mode_metrics(&self) -> ModeMetrics {
            ModeMetrics {
                mode: "iptables",
                iptables_rules: vec![("nat", 10), ("filter", 1)],
                iptables_rules_by_family: vec![("nat", "IPv4", 10)],
                ..Default::default()
            }
        }
    }

    fn two(fail_v4: bool) -> (PerFamily, std::rc::Rc<std::cell::Cell<u32>>) {
        let synced = std::rc::Rc::new(std::cell::Cell::new(0));
        let mode = |fail| -> Box<dyn Dataplane> {
            Box::new(Fixed {
                fail,
                synced: synced.clone(),
            })
        };
        let modes = vec![(Family::V4, mode(fail_v4)), (Family::V6, mode(false))];
        (PerFamily::new(modes), synced)
    }

    #[test]
    fn reports_and_metrics_are_the_sum_of_the_families() {
        let (mut both, _) = two(false);
        let r = both.sync(&DesiredState::default(), false).unwrap();
        assert_eq!((r.frontends, r.backends, r.writes), (4, 6, 2));
        assert_eq!(both.counters(), vec![("reject_no_endpoints", 10)]);
        let m = both.mode_metrics();
        assert_eq!(m.mode, "iptables");
        assert_eq!(m.iptables_rules, vec![("nat", 20), ("filter", 2)]);
        assert_eq!(m.iptables_rules_by_family.len(), 2, "one series per family");
        assert_eq!(both.families(), vec![Family::V4, Family::V6]);
    }

    #[test]
    fn a_failing_family_fails_the_sync_and_the_other_is_still_synced() {
        let (mut both, synced) = two(true);
        assert!(both.sync(&DesiredState::default(), true).is_err());
        assert_eq!(synced.get(), 2);
    }
}
