//! The agent's side of the tc programs' connection tracking (see dataplane-ebpf's conntrack
//! module): the maps' sizes and lifetimes from kube-proxy's conntrack settings, the garbage
//! collector, and moving the flows of an older agent's map.

use std::collections::HashSet;
use std::path::Path;

use aya::maps::{HashMap, Map, MapData};
use kpr_common::{
    Ct4Key, Ct4Value, CtKey, CtTimeouts, CtValue, CT_FLAG_SEEN_REPLY, CT_MAP, CT_MAP_MAX, CT_MAP_V1,
};

/// An address of a family's conntrack maps (`u32`, `[u32; 4]`) with the padding of its value:
/// what [`ConntrackMaps`] needs of a family.
pub trait CtFamily: Copy + Ord + std::hash::Hash + std::fmt::Debug + 'static {
    type Pad: Copy + PartialEq + std::fmt::Debug + 'static;
}

impl CtFamily for u32 {
    type Pad = [u8; 7];
}

impl CtFamily for [u32; 4] {
    type Pad = [u8; 11];
}

/// The IPv4 and IPv6 conntrack maps.
pub type Conntrack4 = ConntrackMaps<u32>;
pub type Conntrack6 = ConntrackMaps<[u32; 4]>;
type Key<A> = CtKey<A>;
type Value<A> = CtValue<A, <A as CtFamily>::Pad>;

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("conntrack map {0}: {1}")]
    Map(&'static str, String),
}

/// Sizes and lifetimes of the conntrack maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackConfig {
    /// Connections the established map holds (two entries each): kube-proxy's conntrack max,
    /// `max(--conntrack-max-per-core × CPUs, --conntrack-min)`.
    pub max_connections: u32,
    pub timeouts: CtTimeouts,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        Self {
            max_connections: CT_MAP_MAX / 2,
            timeouts: CtTimeouts::DEFAULT,
        }
    }
}

impl ConntrackConfig {
    /// kube-proxy's rule (getConntrackMax): `max_per_core × cpus`, at least `min`; a
    /// `max_per_core` of 0 leaves the limit alone, which here means kpr's default.
    pub fn from_kube_proxy(max_per_core: u32, min: u32, cpus: u32, timeouts: CtTimeouts) -> Self {
        let max_connections = if max_per_core == 0 {
            CT_MAP_MAX / 2
        } else {
            max_per_core.saturating_mul(cpus).max(min)
        };
        Self {
            // The kernel refuses a map with no entries; a map of a handful would make every
            // connection past it fail, so keep a floor.
            max_connections: max_connections.clamp(512, u32::MAX / 2),
            timeouts,
        }
    }

    /// From kube-proxy's settings on a node with `cpus` CPUs. A zero timeout means
    /// netfilter's default, as for kube-proxy (which then leaves the sysctl alone).
    pub fn from_settings(c: &crate::config::ConntrackSettings, cpus: u32) -> Self {
        let secs = |d: std::time::Duration, netfilter_default: u32| {
            if d.is_zero() {
                netfilter_default
            } else {
                // At least a second: the datapath counts whole seconds.
                u32::try_from(d.as_secs()).unwrap_or(u32::MAX).max(1)
            }
        };
        let timeouts = CtTimeouts {
            tcp_established_s: secs(c.tcp_established_timeout, 5 * 24 * 3600),
            tcp_half_closed_s: secs(c.tcp_close_wait_timeout, 60),
            udp_s: secs(c.udp_timeout, 30),
            udp_stream_s: secs(c.udp_stream_timeout, 120),
            ..CtTimeouts::DEFAULT
        };
        Self::from_kube_proxy(c.max_per_core, c.min, cpus, timeouts)
    }

    /// Entries of the established map (two per connection).
    pub fn established_entries(&self) -> u32 {
        self.max_connections * 2
    }

    /// Entries of the new-flows map: room for half as many connections as the established map
    /// (the proportion of kpr's defaults, `CT_NEW_MAP_MAX`). Preallocated, as an LRU is.
    pub fn new_entries(&self) -> u32 {
        self.max_connections
    }
}

/// What a garbage collection pass found and removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SweepStats {
    /// Entries left in the established map and in the new-flows map.
    pub established: u64,
    pub new: u64,
    /// Entries removed because their lifetime had passed.
    pub expired: u64,
    /// Entries removed because their backend left every service.
    pub stale: u64,
}

impl std::ops::Add for SweepStats {
    type Output = SweepStats;

    /// Both families' passes together.
    fn add(self, o: SweepStats) -> SweepStats {
        SweepStats {
            established: self.established + o.established,
            new: self.new + o.new,
            expired: self.expired + o.expired,
            stale: self.stale + o.stale,
        }
    }
}

/// Handles on the two conntrack maps of one family.
pub struct ConntrackMaps<A: CtFamily> {
    established: HashMap<MapData, Key<A>, Value<A>>,
    new: HashMap<MapData, Key<A>, Value<A>>,
    established_max: u32,
    new_max: u32,
    timeouts: CtTimeouts,
}

impl<A: CtFamily> ConntrackMaps<A>
where
    Key<A>: aya::Pod,
    Value<A>: aya::Pod + PartialEq,
{
    /// The family's two maps, by name (`names`: established, new) for errors.
    pub fn new(
        (established, new): (Map, Map),
        names: (&'static str, &'static str),
        established_max: u32,
        new_max: u32,
        timeouts: CtTimeouts,
    ) -> Result<Self, ConntrackError> {
        Ok(Self {
            established: HashMap::try_from(established)
                .map_err(|e| ConntrackError::Map(names.0, e.to_string()))?,
            new: HashMap::try_from(new).map_err(|e| ConntrackError::Map(names.1, e.to_string()))?,
            established_max,
            new_max,
            timeouts,
        })
    }

    pub fn capacities(&self) -> (u32, u32) {
        (self.established_max, self.new_max)
    }

    /// Every entry of both maps (established first), for tests and diagnostics.
    pub fn entries(&self) -> Vec<(Key<A>, Value<A>)> {
        let mut out = walk(&self.established, self.established_max);
        out.extend(walk(&self.new, self.new_max));
        out
    }

    /// Removes the entries whose lifetime passed by `now_ns` (CLOCK_MONOTONIC, the clock of
    /// `bpf_ktime_get_ns`) and, with `live_backends`, those of backends not in it. The kernel
    /// programs ignore an expired entry anyway; this frees it. A whole walk of both maps: the
    /// agent runs it on full syncs and after syncs that removed backends.
    pub fn sweep(&mut self, live_backends: Option<&HashSet<u32>>, now_ns: u64) -> SweepStats {
        let plan = self.plan_sweep(live_backends, now_ns);
        self.apply_sweep(plan)
    }

    /// The first half of [`Self::sweep`]: the walk, and what it would remove. Deleting while
    /// walking would restart the walk (the kernel's next-key of a deleted key starts over):
    /// collect, then delete.
    pub fn plan_sweep(&self, live_backends: Option<&HashSet<u32>>, now_ns: u64) -> SweepPlan<A> {
        let mut plan = SweepPlan::default();
        for (established, map, max) in [
            (true, &self.established, self.established_max),
            (false, &self.new, self.new_max),
        ] {
            let mut kept = 0u64;
            for (k, v) in walk(map, max) {
                let doomed = if expired(&self.timeouts, &k, &v, now_ns) {
                    Some(true)
                } else if live_backends.is_some_and(|live| !live.contains(&v.backend_id)) {
                    Some(false)
                } else {
                    None
                };
                match doomed {
                    Some(was_expired) => plan.doomed.push(Doomed {
                        established,
                        key: k,
                        seen: v,
                        expired: was_expired,
                    }),
                    None => kept += 1,
                }
            }
            if established {
                plan.kept.0 = kept;
            } else {
                plan.kept.1 = kept;
            }
        }
        plan
    }

    /// The second half of [`Self::sweep`]: removes the planned entries that are still as the
    /// walk saw them. Between the walk and the delete the datapath may have revived one (a
    /// client reusing a port starts its new flow in the entry of the old one); deleting that
    /// would leave the new connection's next packet without its flow, and the node's stack
    /// would answer it with a reset. Each entry is re-read just before its delete, which
    /// shrinks the window from the walk's length to one lookup.
    pub fn apply_sweep(&mut self, plan: SweepPlan<A>) -> SweepStats {
        let mut stats = SweepStats {
            established: plan.kept.0,
            new: plan.kept.1,
            ..Default::default()
        };
        for d in plan.doomed {
            let map = if d.established {
                &mut self.established
            } else {
                &mut self.new
            };
            if map.get(&d.key, 0).ok() != Some(d.seen) {
                // Revived, replaced or gone meanwhile: kept (or nothing to do).
                if d.established {
                    stats.established += 1;
                } else {
                    stats.new += 1;
                }
                continue;
            }
            match map.remove(&d.key) {
                Ok(()) if d.expired => stats.expired += 1,
                Ok(()) => stats.stale += 1,
                // Gone meanwhile (the datapath replaced it, or the LRU evicted it).
                Err(_) => {}
            }
        }
        stats
    }
}

/// What a garbage-collection walk found ([`ConntrackMaps::plan_sweep`]).
#[derive(Debug)]
pub struct SweepPlan<A: CtFamily> {
    doomed: Vec<Doomed<A>>,
    /// Entries kept in the established and the new-flows map.
    kept: (u64, u64),
}

impl<A: CtFamily> Default for SweepPlan<A> {
    fn default() -> Self {
        SweepPlan {
            doomed: Vec::new(),
            kept: (0, 0),
        }
    }
}

impl<A: CtFamily> SweepPlan<A> {
    /// How many entries the walk found to remove.
    pub fn len(&self) -> usize {
        self.doomed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.doomed.is_empty()
    }
}

#[derive(Debug)]
struct Doomed<A: CtFamily> {
    established: bool,
    key: Key<A>,
    /// The value the walk saw: the entry goes only if it still holds it.
    seen: Value<A>,
    expired: bool,
}

/// Whether the entry outlived its lifetime at `now_ns` (the datapath's rule: `last_seen_ns`
/// ahead of `now_ns` counts as just seen).
pub fn expired<A, P>(
    timeouts: &CtTimeouts,
    key: &CtKey<A>,
    v: &CtValue<A, P>,
    now_ns: u64,
) -> bool {
    let lifetime_ns = u64::from(timeouts.lifetime_s(key.proto, v.flags)) * 1_000_000_000;
    now_ns.saturating_sub(v.last_seen_ns) > lifetime_ns
}

/// CLOCK_MONOTONIC in nanoseconds: what `bpf_ktime_get_ns` returns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we pass; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn walk<A: CtFamily>(map: &HashMap<MapData, Key<A>, Value<A>>, max: u32) -> Vec<(Key<A>, Value<A>)>
where
    Key<A>: aya::Pod,
    Value<A>: aya::Pod,
{
    let mut out = Vec::new();
    // An LRU map may evict the key an iteration stands on, which restarts the walk from the
    // first key: bound it.
    for entry in map.iter().take(2 * max as usize + 16) {
        match entry {
            Ok(kv) => out.push(kv),
            Err(e) => {
                tracing::warn!(error = %e, "walking a conntrack map");
                break;
            }
        }
    }
    out.sort_by_key(|(k, _)| {
        (
            k.saddr_be, k.daddr_be, k.sport_be, k.dport_be, k.proto, k.dir,
        )
    });
    out.dedup_by_key(|(k, _)| *k);
    out
}

/// Moves the flows of an older agent's conntrack map (`KPR_CT4_V1`: one LRU map, no states,
/// the same key and value layout) into the established map, so that north-south connections
/// survive the upgrade, then removes the old pin. Its flows' states are unknown: they count
/// as established, with the lifetime that gives. Returns how many entries moved.
pub fn adopt_v1(pin_dir: &Path, established: &Path) -> Result<usize, ConntrackError> {
    let old_pin = pin_dir.join(CT_MAP_V1);
    if !old_pin.exists() {
        return Ok(0);
    }
    let open = |path: &Path, name: &'static str| {
        super::maps::open_pinned::<HashMap<MapData, Ct4Key, Ct4Value>>(path)
            .map_err(|e| ConntrackError::Map(name, e))
    };
    let old = open(&old_pin, CT_MAP_V1)?;
    let mut new = open(established, CT_MAP)?;
    let mut moved = 0;
    for (k, mut v) in walk(&old, CT_MAP_MAX) {
        v.flags |= CT_FLAG_SEEN_REPLY;
        match new.insert(k, v, 0) {
            Ok(()) => moved += 1,
            Err(e) => {
                tracing::warn!(error = %e, "conntrack map full while moving an older agent's flows");
                break;
            }
        }
    }
    std::fs::remove_file(&old_pin).map_err(|e| ConntrackError::Map(CT_MAP_V1, e.to_string()))?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kpr_common::{CT_FLAG_FIN_CLIENT, CT_FLAG_RST, IPPROTO_TCP, IPPROTO_UDP};

    fn key(proto: u8) -> Ct4Key {
        Ct4Key {
            saddr_be: 1,
            daddr_be: 2,
            sport_be: 3,
            dport_be: 4,
            proto,
            dir: 0,
            pad: [0; 2],
        }
    }

    #[test]
    fn kube_proxy_conntrack_max() {
        let t = CtTimeouts::DEFAULT;
        // kube-proxy's defaults on 2 CPUs: 32768 × 2 < 131072.
        assert_eq!(
            ConntrackConfig::from_kube_proxy(32768, 131072, 2, t).max_connections,
            131072
        );
        assert_eq!(
            ConntrackConfig::from_kube_proxy(32768, 131072, 8, t).max_connections,
            262144
        );
        // 0 per core: leave it (kpr's default).
        assert_eq!(
            ConntrackConfig::from_kube_proxy(0, 5, 8, t).max_connections,
            CT_MAP_MAX / 2
        );
        let small = ConntrackConfig::from_kube_proxy(100, 0, 2, t);
        assert_eq!(small.max_connections, 512, "floor");
        assert_eq!(small.established_entries(), 1024);
    }

    #[test]
    fn kube_proxy_settings_map_to_sizes_and_lifetimes() {
        use crate::config::ConntrackSettings;
        use std::time::Duration;
        let c = ConntrackConfig::from_settings(&ConntrackSettings::default(), 2);
        assert_eq!(
            c,
            ConntrackConfig::default(),
            "kube-proxy's defaults are kpr's"
        );
        let c = ConntrackConfig::from_settings(
            &ConntrackSettings {
                max_per_core: 1024,
                min: 2048,
                tcp_established_timeout: Duration::ZERO,
                tcp_close_wait_timeout: Duration::from_secs(30),
                tcp_be_liberal: false,
                udp_timeout: Duration::from_millis(1500),
                udp_stream_timeout: Duration::from_millis(100),
            },
            4,
        );
        assert_eq!(c.max_connections, 4096);
        assert_eq!(
            c.timeouts,
            CtTimeouts {
                tcp_established_s: 432_000,
                tcp_half_closed_s: 30,
                udp_s: 1,
                udp_stream_s: 1,
                ..CtTimeouts::DEFAULT
            }
        );
    }

    #[test]
    fn lifetimes_follow_the_state() {
        let t = CtTimeouts::DEFAULT;
        let v = |flags, last_seen_ns| Ct4Value {
            flags,
            last_seen_ns,
            ..Default::default()
        };
        let s = 1_000_000_000u64;
        let now = 100_000 * s;
        // A TCP SYN without reply: 60 s.
        assert!(!expired(&t, &key(IPPROTO_TCP), &v(0, now - 60 * s), now));
        assert!(expired(&t, &key(IPPROTO_TCP), &v(0, now - 61 * s), now));
        // Established: a day.
        assert!(!expired(
            &t,
            &key(IPPROTO_TCP),
            &v(CT_FLAG_SEEN_REPLY, now - 3600 * s),
            now
        ));
        // Reset: 10 s.
        assert!(expired(
            &t,
            &key(IPPROTO_TCP),
            &v(CT_FLAG_SEEN_REPLY | CT_FLAG_RST, now - 11 * s),
            now
        ));
        // Half closed: an hour.
        assert!(!expired(
            &t,
            &key(IPPROTO_TCP),
            &v(CT_FLAG_SEEN_REPLY | CT_FLAG_FIN_CLIENT, now - 3000 * s),
            now
        ));
        // UDP: 30 s unanswered, 120 s with replies.
        assert!(expired(&t, &key(IPPROTO_UDP), &v(0, now - 31 * s), now));
        assert!(!expired(
            &t,
            &key(IPPROTO_UDP),
            &v(CT_FLAG_SEEN_REPLY, now - 100 * s),
            now
        ));
        // Written by another CPU after `now` was read.
        assert!(!expired(&t, &key(IPPROTO_UDP), &v(0, now + s), now));
    }
}
