//! The seam between the sync logic and the kernel's load-balancing maps.
//!
//! [`LbMaps`] is what [`super::sync::LbSyncer`] talks to. [`AyaLbMaps`] drives the real
//! pinned maps; tests drive a fake that checks the datapath's invariant after every single
//! write and can inject failures (see `sync.rs`). The same syncer code runs against both.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::collections::BTreeSet;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap, MapData, MapError};
use kpr_common::{
    src_range_prefixlen, Backend4Value, Backend6Value, Service4Key, Service4Value, Service6Key,
    SrcRange4Key, SrcRange6Key, SRC_RANGE6_MAP, SRC_RANGE_MAP,
};

/// A services-map key of either family: the IPv4 map's or the IPv6 map's. The value
/// ([`Service4Value`]) is the same in both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceKey {
    V4(Service4Key),
    V6(Service6Key),
}

impl ServiceKey {
    pub fn backend_slot(&self) -> u16 {
        match self {
            ServiceKey::V4(k) => k.backend_slot,
            ServiceKey::V6(k) => k.backend_slot,
        }
    }
}

/// A backends-map value of either family. Backend ids are one space over both maps: an id is
/// in exactly one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendValue {
    V4(Backend4Value),
    V6(Backend6Value),
}

/// The map pinned at `pin`, opened as the typed handle `T` (`HashMap`, `LpmTrie`,
/// `PerCpuArray`, ...); the error is the reason, for the caller to name the map in.
pub fn open_pinned<T>(pin: &std::path::Path) -> Result<T, String>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let data = MapData::from_pin(pin).map_err(|e| e.to_string())?;
    let map = aya::maps::Map::from_map_data(data).map_err(|e| e.to_string())?;
    T::try_from(map).map_err(|e| e.to_string())
}

/// The datapath counters ([`kpr_common::Counter`]) summed over CPUs, by name.
pub fn datapath_counters(map: &aya::maps::PerCpuArray<MapData, u64>) -> Vec<(&'static str, u64)> {
    kpr_common::Counter::ALL
        .iter()
        .map(|c| {
            let total = map
                .get(&(*c as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0);
            (c.name(), total)
        })
        .collect()
}

/// A failed map operation, naming what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{op} on map {map}: {detail}")]
pub struct MapOpError {
    pub op: &'static str,
    pub map: &'static str,
    pub detail: String,
}

/// Operations the syncer needs on the services and backends maps.
pub trait LbMaps {
    /// Every backend entry (id → value), for restoring state after a restart.
    fn dump_backends(&self) -> Result<Vec<(u32, BackendValue)>, MapOpError>;
    /// Every services entry, for restoring state after a restart.
    fn dump_services(&self) -> Result<Vec<(ServiceKey, Service4Value)>, MapOpError>;
    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapOpError>;
    /// Deletes backend `id` of either family. Deleting an absent entry is not an error.
    fn delete_backend(&mut self, id: u32) -> Result<(), MapOpError>;
    fn put_service(&mut self, key: &ServiceKey, value: &Service4Value) -> Result<(), MapOpError>;
    /// Deleting an absent entry is not an error.
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapOpError>;

    /// Replaces the loadBalancerSourceRanges of the external frontend `rev_nat_id` (empty: none
    /// left). The tc program only consults them for a frontend whose slot 0 has
    /// `SVC_FLAG_SOURCE_RANGES`, so write them before setting that flag and delete them after
    /// clearing it (or after deleting slot 0); otherwise allowed clients are dropped meanwhile.
    /// The default does nothing (maps without the LPM trie, test fakes).
    fn put_source_ranges(&mut self, rev_nat_id: u32, ranges: &[IpNet]) -> Result<(), MapOpError> {
        let _ = (rev_nat_id, ranges);
        Ok(())
    }

    /// Every source-range entry: (rev_nat_id, network), for restoring state.
    fn dump_source_ranges(&self) -> Result<Vec<(u32, IpNet)>, MapOpError> {
        Ok(Vec::new())
    }

    /// Puts frontend `rev_nat_id` in session-affinity group `group` (`AFFINITY_GROUP_MAP`).
    /// The default does nothing (test fakes without groups).
    fn put_affinity_group(&mut self, rev_nat_id: u32, group: u32) -> Result<(), MapOpError> {
        let _ = (rev_nat_id, group);
        Ok(())
    }

    /// Deleting an absent entry is not an error.
    fn delete_affinity_group(&mut self, rev_nat_id: u32) -> Result<(), MapOpError> {
        let _ = rev_nat_id;
        Ok(())
    }

    /// Every affinity-group entry: (rev_nat_id, group), for restoring state.
    fn dump_affinity_groups(&self) -> Result<Vec<(u32, u32)>, MapOpError> {
        Ok(Vec::new())
    }
}

/// The real maps, as loaded (and pinned) by [`super::EbpfDataplane`].
pub struct AyaLbMaps {
    pub(super) services: HashMap<MapData, Service4Key, Service4Value>,
    pub(super) backends: HashMap<MapData, u32, Backend4Value>,
    pub(super) services6: HashMap<MapData, Service6Key, Service4Value>,
    pub(super) backends6: HashMap<MapData, u32, Backend6Value>,
    pub(super) src_ranges: SrcRangeMap,
    pub(super) affinity_groups: HashMap<MapData, u32, u32>,
}

/// The loadBalancerSourceRanges LPM tries, one per family (`KPR_LBSRC4_V1`, `KPR_LBSRC6_V1`).
pub struct SrcRangeMap {
    pub(super) map: LpmTrie<MapData, SrcRange4Key, u8>,
    pub(super) map6: LpmTrie<MapData, SrcRange6Key, u8>,
}

impl SrcRangeMap {
    /// (rev_nat_id, network) of every entry, IPv4 first.
    pub fn dump(&self) -> Result<Vec<(u32, IpNet)>, MapOpError> {
        let mut out = Vec::new();
        for key in self.map.keys() {
            let (id, net) = key
                .map(|k| src_range_of(&k))
                .map_err(|e| op_error("dump", SRC_RANGE_MAP, e))?;
            out.push((id, IpNet::V4(net)));
        }
        for key in self.map6.keys() {
            let (id, net) = key
                .map(|k| src_range6_of(&k))
                .map_err(|e| op_error("dump", SRC_RANGE6_MAP, e))?;
            out.push((id, IpNet::V6(net)));
        }
        Ok(out)
    }

    /// Makes the entries of `rev_nat_id` exactly `ranges` (host bits are cleared: a range is
    /// a network). Adds before it deletes, so a client allowed before and after never sees a
    /// gap.
    pub fn set(&mut self, rev_nat_id: u32, ranges: &[IpNet]) -> Result<(), MapOpError> {
        let want: BTreeSet<IpNet> = ranges.iter().map(IpNet::trunc).collect();
        let have: BTreeSet<IpNet> = self
            .dump()?
            .into_iter()
            .filter(|(id, _)| *id == rev_nat_id)
            .map(|(_, net)| net)
            .collect();
        for net in want.difference(&have) {
            match *net {
                IpNet::V4(n) => self
                    .map
                    .insert(&src_range_key(rev_nat_id, n), 1, 0)
                    .map_err(|e| op_error("update", SRC_RANGE_MAP, e))?,
                IpNet::V6(n) => self
                    .map6
                    .insert(&src_range6_key(rev_nat_id, n), 1, 0)
                    .map_err(|e| op_error("update", SRC_RANGE6_MAP, e))?,
            }
        }
        for net in have.difference(&want) {
            match *net {
                IpNet::V4(n) => absent_ok(self.map.remove(&src_range_key(rev_nat_id, n)))
                    .map_err(|e| op_error("delete", SRC_RANGE_MAP, e))?,
                IpNet::V6(n) => absent_ok(self.map6.remove(&src_range6_key(rev_nat_id, n)))
                    .map_err(|e| op_error("delete", SRC_RANGE6_MAP, e))?,
            }
        }
        Ok(())
    }
}

/// [`src_range_key`] for IPv6: the address as `[u32; 4]` in network byte order.
fn src_range6_key(rev_nat_id: u32, net: Ipv6Net) -> LpmKey<SrcRange6Key> {
    let o = net.network().octets();
    let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    LpmKey::new(
        src_range_prefixlen(net.prefix_len()),
        SrcRange6Key {
            rev_nat_id,
            address_be: [word(0), word(4), word(8), word(12)],
        },
    )
}

/// (rev_nat_id, network) of a key [`src_range6_key`] wrote.
pub(crate) fn src_range6_of(key: &LpmKey<SrcRange6Key>) -> (u32, Ipv6Net) {
    let data = key.data();
    let prefix = key.prefix_len().saturating_sub(32).min(128) as u8;
    let mut o = [0u8; 16];
    for (i, w) in data.address_be.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let addr = Ipv6Addr::from(o);
    let net = Ipv6Net::new(addr, prefix).unwrap_or_else(|_| Ipv6Net::from(addr));
    (data.rev_nat_id, net)
}

/// The trie key of `net` among frontend `rev_nat_id`'s ranges: the id is matched in full
/// before the prefix, so one trie serves every frontend.
fn src_range_key(rev_nat_id: u32, net: Ipv4Net) -> LpmKey<SrcRange4Key> {
    LpmKey::new(
        src_range_prefixlen(net.prefix_len()),
        SrcRange4Key {
            rev_nat_id,
            address_be: u32::from_ne_bytes(net.network().octets()),
        },
    )
}

/// (rev_nat_id, network) of a key [`src_range_key`] wrote.
pub(crate) fn src_range_of(key: &LpmKey<SrcRange4Key>) -> (u32, Ipv4Net) {
    let data = key.data();
    let prefix = key.prefix_len().saturating_sub(32).min(32) as u8;
    let addr = Ipv4Addr::from(u32::from_be(data.address_be));
    let net = Ipv4Net::new(addr, prefix).unwrap_or_else(|_| Ipv4Net::from(addr));
    (data.rev_nat_id, net)
}

fn op_error(op: &'static str, map: &'static str, e: MapError) -> MapOpError {
    MapOpError {
        op,
        map,
        detail: e.to_string(),
    }
}

/// Deleting a key that is already gone is what we wanted anyway.
fn absent_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

impl LbMaps for AyaLbMaps {
    fn dump_backends(&self) -> Result<Vec<(u32, BackendValue)>, MapOpError> {
        let mut out: Vec<(u32, BackendValue)> = self
            .backends
            .iter()
            .map(|r| r.map(|(id, v)| (id, BackendValue::V4(v))))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| op_error("dump", kpr_common::BACKENDS_MAP, e))?;
        for r in self.backends6.iter() {
            let (id, v) = r.map_err(|e| op_error("dump", kpr_common::BACKENDS6_MAP, e))?;
            out.push((id, BackendValue::V6(v)));
        }
        Ok(out)
    }

    fn dump_services(&self) -> Result<Vec<(ServiceKey, Service4Value)>, MapOpError> {
        let mut out: Vec<(ServiceKey, Service4Value)> = self
            .services
            .iter()
            .map(|r| r.map(|(k, v)| (ServiceKey::V4(k), v)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| op_error("dump", kpr_common::SERVICES_MAP, e))?;
        for r in self.services6.iter() {
            let (k, v) = r.map_err(|e| op_error("dump", kpr_common::SERVICES6_MAP, e))?;
            out.push((ServiceKey::V6(k), v));
        }
        Ok(out)
    }

    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapOpError> {
        match value {
            BackendValue::V4(v) => self
                .backends
                .insert(id, v, 0)
                .map_err(|e| op_error("update", kpr_common::BACKENDS_MAP, e)),
            BackendValue::V6(v) => self
                .backends6
                .insert(id, v, 0)
                .map_err(|e| op_error("update", kpr_common::BACKENDS6_MAP, e)),
        }
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), MapOpError> {
        absent_ok(self.backends.remove(&id))
            .map_err(|e| op_error("delete", kpr_common::BACKENDS_MAP, e))?;
        absent_ok(self.backends6.remove(&id))
            .map_err(|e| op_error("delete", kpr_common::BACKENDS6_MAP, e))
    }

    fn put_service(&mut self, key: &ServiceKey, value: &Service4Value) -> Result<(), MapOpError> {
        match key {
            ServiceKey::V4(k) => self
                .services
                .insert(k, value, 0)
                .map_err(|e| op_error("update", kpr_common::SERVICES_MAP, e)),
            ServiceKey::V6(k) => self
                .services6
                .insert(k, value, 0)
                .map_err(|e| op_error("update", kpr_common::SERVICES6_MAP, e)),
        }
    }

    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapOpError> {
        match key {
            ServiceKey::V4(k) => absent_ok(self.services.remove(k))
                .map_err(|e| op_error("delete", kpr_common::SERVICES_MAP, e)),
            ServiceKey::V6(k) => absent_ok(self.services6.remove(k))
                .map_err(|e| op_error("delete", kpr_common::SERVICES6_MAP, e)),
        }
    }

    fn put_source_ranges(&mut self, rev_nat_id: u32, ranges: &[IpNet]) -> Result<(), MapOpError> {
        self.src_ranges.set(rev_nat_id, ranges)
    }

    fn dump_source_ranges(&self) -> Result<Vec<(u32, IpNet)>, MapOpError> {
        self.src_ranges.dump()
    }

    fn put_affinity_group(&mut self, rev_nat_id: u32, group: u32) -> Result<(), MapOpError> {
        self.affinity_groups
            .insert(rev_nat_id, group, 0)
            .map_err(|e| op_error("update", kpr_common::AFFINITY_GROUP_MAP, e))
    }

    fn delete_affinity_group(&mut self, rev_nat_id: u32) -> Result<(), MapOpError> {
        absent_ok(self.affinity_groups.remove(&rev_nat_id))
            .map_err(|e| op_error("delete", kpr_common::AFFINITY_GROUP_MAP, e))
    }

    fn dump_affinity_groups(&self) -> Result<Vec<(u32, u32)>, MapOpError> {
        self.affinity_groups
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| op_error("dump", kpr_common::AFFINITY_GROUP_MAP, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_range_keys_are_networks_matched_after_the_frontend() {
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        let k = src_range_key(7, net("203.0.113.77/24"));
        assert_eq!(k.prefix_len(), 56);
        // The address is in network byte order: its first octet is the first byte matched.
        assert_eq!(k.data().address_be.to_ne_bytes(), [203, 0, 113, 0]);
        assert_eq!(k.data().rev_nat_id, 7);
        assert_eq!(src_range_of(&k), (7, net("203.0.113.0/24")));
        for s in ["0.0.0.0/0", "203.0.113.77/32", "10.0.0.0/8"] {
            assert_eq!(src_range_of(&src_range_key(1, net(s))), (1, net(s)));
        }
        let net6 = |s: &str| s.parse::<Ipv6Net>().unwrap();
        let k = src_range6_key(9, net6("2001:db8:1::77/48"));
        assert_eq!(k.prefix_len(), 80);
        assert_eq!(
            k.data().address_be[0].to_ne_bytes(),
            [0x20, 0x01, 0x0d, 0xb8]
        );
        assert_eq!(src_range6_of(&k), (9, net6("2001:db8:1::/48")));
        for s in ["::/0", "fd00::1/128"] {
            assert_eq!(src_range6_of(&src_range6_key(1, net6(s))), (1, net6(s)));
        }
    }
}
