//! What `kpr status` and `kpr trace` need of an address family: its maps' names and key
//! types, and how an address is held in them. Both families go through the same code, as in
//! the datapath (dataplane-ebpf's `family.rs`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kpr_common::{
    AffinityExtKey, Backend4Value, Backend6Value, CtKey, CtValue, Service4Key, Service6Key,
    SrcRangeKey,
};

use crate::ebpf::conntrack::CtFamily;
use crate::ebpf::sync::MapAddr;

/// The fields of a services-map key, whichever family's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceKeyParts<A> {
    pub scope: u8,
    pub address_be: A,
    pub port_be: u16,
    pub proto: u8,
    pub backend_slot: u16,
}

pub trait Family: Sized + 'static {
    type Ip: Copy + Eq + Into<IpAddr> + std::fmt::Display;
    /// The address as the maps hold it (network byte order).
    type Addr: CtFamily + aya::Pod;
    type ServiceKey: aya::Pod + Copy;
    type Backend: aya::Pod + Copy;
    const SERVICES_MAP: &'static str;
    const BACKENDS_MAP: &'static str;
    const SRC_RANGE_MAP: &'static str;
    const AFFINITY_EXT_MAP: &'static str;
    const CT_MAP: &'static str;
    const CT_NEW_MAP: &'static str;
    const BITS: u32;

    fn addr(ip: Self::Ip) -> Self::Addr;
    fn ip(addr: Self::Addr) -> Self::Ip;
    fn service_key(parts: ServiceKeyParts<Self::Addr>) -> Self::ServiceKey;
    fn service_key_parts(k: &Self::ServiceKey) -> ServiceKeyParts<Self::Addr>;
    /// A backend's address and port (network byte order).
    fn backend(v: &Self::Backend) -> (Self::Addr, u16);
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    type Ip = Ipv4Addr;
    type Addr = u32;
    type ServiceKey = Service4Key;
    type Backend = Backend4Value;
    const SERVICES_MAP: &'static str = kpr_common::SERVICES_MAP;
    const BACKENDS_MAP: &'static str = kpr_common::BACKENDS_MAP;
    const SRC_RANGE_MAP: &'static str = kpr_common::SRC_RANGE_MAP;
    const AFFINITY_EXT_MAP: &'static str = kpr_common::AFFINITY_EXT_MAP;
    const CT_MAP: &'static str = kpr_common::CT_MAP;
    const CT_NEW_MAP: &'static str = kpr_common::CT_NEW_MAP;
    const BITS: u32 = 32;

    fn addr(ip: Ipv4Addr) -> u32 {
        u32::from_ne_bytes(ip.octets())
    }
    fn ip(addr: u32) -> Ipv4Addr {
        Ipv4Addr::from(addr.to_ne_bytes())
    }
    fn service_key(p: ServiceKeyParts<u32>) -> Service4Key {
        Service4Key::scoped(p.address_be, p.port_be, p.proto, p.scope, p.backend_slot)
    }
    fn service_key_parts(k: &Service4Key) -> ServiceKeyParts<u32> {
        ServiceKeyParts {
            scope: k.scope,
            address_be: k.address_be,
            port_be: k.port_be,
            proto: k.proto,
            backend_slot: k.backend_slot,
        }
    }
    fn backend(v: &Backend4Value) -> (u32, u16) {
        (v.address_be, v.port_be)
    }
}

impl Family for V6 {
    type Ip = Ipv6Addr;
    type Addr = [u32; 4];
    type ServiceKey = Service6Key;
    type Backend = Backend6Value;
    const SERVICES_MAP: &'static str = kpr_common::SERVICES6_MAP;
    const BACKENDS_MAP: &'static str = kpr_common::BACKENDS6_MAP;
    const SRC_RANGE_MAP: &'static str = kpr_common::SRC_RANGE6_MAP;
    const AFFINITY_EXT_MAP: &'static str = kpr_common::AFFINITY_EXT6_MAP;
    const CT_MAP: &'static str = kpr_common::CT6_MAP;
    const CT_NEW_MAP: &'static str = kpr_common::CT6_NEW_MAP;
    const BITS: u32 = 128;

    fn addr(ip: Ipv6Addr) -> [u32; 4] {
        match MapAddr::of(IpAddr::V6(ip)) {
            MapAddr::V6(a) => a,
            MapAddr::V4(_) => unreachable!("an IPv6 address is held as four words"),
        }
    }
    fn ip(addr: [u32; 4]) -> Ipv6Addr {
        let mut o = [0u8; 16];
        for (chunk, word) in o.chunks_exact_mut(4).zip(addr) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        Ipv6Addr::from(o)
    }
    fn service_key(p: ServiceKeyParts<[u32; 4]>) -> Service6Key {
        Service6Key::scoped(p.address_be, p.port_be, p.proto, p.scope, p.backend_slot)
    }
    fn service_key_parts(k: &Service6Key) -> ServiceKeyParts<[u32; 4]> {
        ServiceKeyParts {
            scope: k.scope,
            address_be: k.address_be,
            port_be: k.port_be,
            proto: k.proto,
            backend_slot: k.backend_slot,
        }
    }
    fn backend(v: &Backend6Value) -> ([u32; 4], u16) {
        (v.address_be, v.port_be)
    }
}

/// The family's conntrack key and value, and its other generic keys.
pub type Ct<F> = CtKey<<F as Family>::Addr>;
pub type CtVal<F> = CtValue<<F as Family>::Addr, <<F as Family>::Addr as CtFamily>::Pad>;
pub type AffinityExt<F> = AffinityExtKey<<F as Family>::Addr>;
pub type SrcRange<F> = SrcRangeKey<<F as Family>::Addr>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_the_maps_byte_order() {
        let v4: Ipv4Addr = "10.96.0.10".parse().unwrap();
        assert_eq!(V4::ip(V4::addr(v4)), v4);
        assert_eq!(V4::addr(v4).to_ne_bytes(), [10, 96, 0, 10]);
        let v6: Ipv6Addr = "fd00:10:96::a".parse().unwrap();
        assert_eq!(V6::ip(V6::addr(v6)), v6);
        assert_eq!(V6::addr(v6)[0].to_ne_bytes(), [0xfd, 0, 0, 0x10]);
    }
}
