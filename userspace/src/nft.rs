//! kpr's nftables table, programmed through netlink (libnftnl + libmnl, no `nft` binary).
//!
//! kpr owns exactly one table per family, `table ip kpr` and `table ip6 kpr` (the same chains
//! and rules, with `ip6 daddr` and `ipv6_addr` in the IPv6 one), and never reads or writes any
//! other. Every change to a table is one nfnetlink batch, which the kernel applies atomically
//! (all or nothing):
//!
//! ```text
//! table ip kpr {
//!     set no-endpoints {
//!         type ipv4_addr . inet_proto . inet_service
//!     }
//!     chain nat-postrouting {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         meta mark & 0x00004000 == 0x00004000 meta mark set meta mark ^ 0x00004000 masquerade fully-random
//!     }
//!     chain filter-input {
//!         type filter hook input priority filter; policy accept;
//!         meta l4proto tcp ip daddr . meta l4proto . th dport @no-endpoints reject with tcp reset
//!         ip daddr . meta l4proto . th dport @no-endpoints reject
//!     }
//!     chain filter-forward {
//!         type filter hook forward priority filter; policy accept;
//!         (the same two rules)
//!     }
//! }
//! ```
//!
//! - `nat-postrouting`: source NAT for the north-south traffic kpr's tc programs marked with
//!   kube-proxy's masquerade bit (KUBE-MARK-MASQ, `--iptables-masquerade-bit`, 0x4000 by
//!   default). As kube-proxy does (`mark set mark xor 0x4000` before `masquerade
//!   fully-random`), the bit is cleared before the packet leaves so it does not leak into
//!   other rules or the next hop; kube-proxy's return-unless-marked plus two rules are one rule
//!   here.
//! - `filter-input`/`filter-forward` (priority filter, 0, like kube-proxy's chains of the same
//!   names): traffic to a Service frontend without endpoints is refused at once rather than
//!   left to time out. kube-proxy's nftables mode keeps a verdict map `no-endpoint-services`
//!   (`ip daddr . meta l4proto . th dport vmap`) whose elements `goto reject-chain` (a plain
//!   `reject`); kpr keeps a plain set and two rules instead: TCP gets a reset, everything else
//!   ICMP port-unreachable (the default `reject` of the ip family). Both make the client's
//!   `connect()` fail with ECONNREFUSED. kube-proxy only jumps there for `ct state new`; kpr
//!   does not test conntrack state: a packet whose destination is still a frontend at these
//!   hooks was not translated, so it has nowhere to go whatever its state.
//!
//! # How the expressions are built
//!
//! Tables, chains, sets, rules and the batch are nftnl 0.9's objects. The expressions are built
//! from raw libnftnl expressions ([`RawExpr`], through `nftnl_sys`) rather than nftnl's
//! wrappers, because:
//! - the set key is a concatenation: `ip daddr`, `meta l4proto` and `th dport` are loaded into
//!   consecutive 32-bit registers (1, 9, 10: the layout nft itself generates) and the lookup
//!   reads 12 bytes from register 1; nftnl's wrappers always load into register 1;
//! - nftnl's `Verdict::Reject(Icmp(PortUnreach))` sends the ICMPX code (1) as the ICMP code in an
//!   `ip` table, which is host-unreachable (EHOSTUNREACH), not port-unreachable (3);
//! - its masquerade has no flags (`fully-random`).
//!
//! The set's key type is nft's concatenated datatype (`ipv4_addr . inet_proto . inet_service`)
//! so that `nft list` shows the elements as `10.0.0.1 . tcp . 80`. An element is 12 bytes: the
//! address, the protocol number padded to 4 bytes, the port in network order padded to 4 bytes
//! (each field of a concatenation takes whole registers).
//!
//! # Transactions
//!
//! The first [`NftTable::apply`] replaces the table: `add table` (a no-op if it exists),
//! `delete table` (drops a stale kpr table with whatever it held), then the table, chains, set,
//! elements and rules. Later calls flush the set and add the new elements in one batch (so the
//! set is never seen half-updated); if the table or set has vanished meanwhile (ENOENT), the
//! whole table is recreated. The netlink socket is opened per transaction, in the network
//! namespace of the calling thread.
use std::collections::BTreeSet;
use std::ffi::{c_void, CStr};
use std::net::IpAddr;
use std::os::raw::c_char;

use nftnl::nftnl_sys as sys;
use nftnl::set::{Set, SetKey};
use nftnl::{Chain, ChainType, Hook, MsgType, NlMsg, Policy, ProtoFamily, Rule, Table};

use crate::model::Family;
use crate::netfilter::nfnetlink::{
    NetlinkError, RawExpr, Transaction, ICMP_PORT_UNREACH, NFT_META_L4PROTO, NFT_META_MARK,
    NFT_MSG_DELSETELEM, NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER,
    NFT_REJECT_ICMP_UNREACH, NF_NAT_RANGE_PROTO_RANDOM_FULLY, TYPE_BITS, TYPE_INET_PROTOCOL,
    TYPE_INET_SERVICE, TYPE_IPADDR,
};

/// nft's `ipv6_addr` datatype.
const TYPE_IP6ADDR: u32 = 8;
/// ICMPv6 destination unreachable: port unreachable.
const ICMPV6_PORT_UNREACH: u8 = 4;

/// kpr's tables (families ip and ip6).
pub const TABLE: &str = "kpr";
pub const NAT_POSTROUTING_CHAIN: &str = "nat-postrouting";
pub const FILTER_INPUT_CHAIN: &str = "filter-input";
pub const FILTER_FORWARD_CHAIN: &str = "filter-forward";
/// The set of Service frontends (address . protocol . port) that have no endpoints.
pub const NO_ENDPOINTS_SET: &str = "no-endpoints";
/// kube-proxy's masquerade mark (`--iptables-masquerade-bit` 14).
pub const DEFAULT_MASQ_MARK: u32 = 0x4000;

const TABLE_C: &CStr = c"kpr";
const NO_ENDPOINTS_SET_C: &CStr = c"no-endpoints";
/// The set's id within a batch (rules refer to a set created in the same batch by id).
const NO_ENDPOINTS_SET_ID: u32 = 1;

/// nft's chain priorities `srcnat` and `filter`.
const PRIORITY_SRCNAT: i32 = 100;
const PRIORITY_FILTER: i32 = 0;

// linux/netfilter/nf_tables.h and friends.
const NFT_REG_1: u32 = 1;
const NFT_REG_2: u32 = 2;

/// Source ports masquerading picks for TCP and UDP: above Kubernetes' default NodePort range
/// (30000-32767). A masqueraded reply arrives at the node's address on the port masquerading
/// chose; were that a NodePort, the tc program would take a UDP reply for a new flow to that
/// NodePort (TCP is safe: only a SYN starts a flow there). A cluster with a custom
/// `--service-node-port-range` reaching above 32767 reopens that window for UDP.
pub const MASQUERADE_PORTS: (u16, u16) = (32768, 65535);
const NFT_REG32_01: u32 = 9;
const NFT_REG32_02: u32 = 10;
const NFT_REG32_04: u32 = 12;
const NFT_REG32_05: u32 = 13;
const NFT_REJECT_TCP_RST: u32 = 1;

/// The no-endpoints set's key type as nft composes it (address . protocol . port).
const NO_ENDPOINTS_KEY_TYPE: u32 =
    (((TYPE_IPADDR << TYPE_BITS) | TYPE_INET_PROTOCOL) << TYPE_BITS) | TYPE_INET_SERVICE;
const NO_ENDPOINTS_KEY_TYPE6: u32 =
    (((TYPE_IP6ADDR << TYPE_BITS) | TYPE_INET_PROTOCOL) << TYPE_BITS) | TYPE_INET_SERVICE;

/// What differs between the ip and the ip6 table.
fn proto_family(family: Family) -> ProtoFamily {
    match family {
        Family::V4 => ProtoFamily::Ipv4,
        Family::V6 => ProtoFamily::Ipv6,
    }
}

fn family_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// Errors of [`NftTable`] and [`delete_table`].
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The mark must have at least one bit set (a zero mark would masquerade everything).
    #[error("masquerade mark 0: the mark needs at least one bit set")]
    ZeroMark,
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

impl NftError {
    /// The netlink (or socket) error code, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NftError::Netlink(e) => e.errno(),
            NftError::ZeroMark => None,
        }
    }
}

/// A Service frontend without endpoints: destination address, IP protocol number (6 TCP, 17
/// UDP, 132 SCTP), destination port.
pub type Frontend = (IpAddr, u8, u16);

/// kpr's nftables tables (`table ip kpr`, `table ip6 kpr`), see the module doc.
#[derive(Debug)]
pub struct NftTable {
    mark: u32,
    /// Per family (IPv4, IPv6): whether the table was created.
    created: [bool; 2],
    /// Whether the tables as created have the masquerade (nat) chain.
    masquerade: [bool; 2],
}

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

impl NftTable {
    /// `mark`: the masquerade mark bit(s) the tc programs set ([`DEFAULT_MASQ_MARK`]). Nothing is
    /// sent to the kernel until [`NftTable::apply`].
    pub fn new(mark: u32) -> NftTable {
        NftTable {
            mark,
            created: [false; 2],
            masquerade: [true; 2],
        }
    }

    pub fn mark(&self) -> u32 {
        self.mark
    }

    /// Makes the table hold exactly `no_endpoints` (duplicates are ignored), in one transaction.
    /// The first call (re)creates the whole table; later ones replace the set's elements.
    pub fn apply(&mut self, no_endpoints: &[Frontend]) -> Result<(), NftError> {
        self.apply_with(no_endpoints, true)
    }

    /// Like [`NftTable::apply`]; with `masquerade` false the table has no nat chain at all, so
    /// netfilter conntrack stays off for the namespace's traffic (it costs every packet, and
    /// kpr needs it only to masquerade traffic to backends on other nodes). Switching it on or
    /// off recreates the table in one transaction.
    pub fn apply_with(
        &mut self,
        no_endpoints: &[Frontend],
        masquerade: bool,
    ) -> Result<(), NftError> {
        if self.mark == 0 {
            return Err(NftError::ZeroMark);
        }
        for (i, family) in FAMILIES.into_iter().enumerate() {
            let keys: BTreeSet<Key> = no_endpoints
                .iter()
                .filter(|f| Family::of(f.0) == family)
                .map(|&f| Key::from(f))
                .collect();
            if self.created[i] && self.masquerade[i] != masquerade {
                self.created[i] = false;
            }
            if self.created[i] {
                match replace_elements(family, &keys) {
                    Ok(()) => continue,
                    // The table or the set was removed behind kpr's back: recreate it all.
                    Err(e) if e.errno() == Some(libc::ENOENT) => {
                        let f = family_name(family);
                        tracing::warn!("nftables table {f} {TABLE} vanished; recreating it: {e}");
                    }
                    Err(e) => return Err(e),
                }
            }
            self.created[i] = false;
            create_table(family, self.mark, &keys, masquerade)?;
            self.created[i] = true;
            self.masquerade[i] = masquerade;
        }
        Ok(())
    }

    /// Deletes kpr's tables; true if one existed. A later [`NftTable::apply`] creates them
    /// again.
    pub fn delete(&mut self) -> Result<bool, NftError> {
        self.created = [false; 2];
        delete_table()
    }
}

/// Deletes `table ip kpr` and `table ip6 kpr` (in the calling thread's network namespace) and
/// everything in them; true if one existed, false if there was none. Other tables are not
/// touched.
pub fn delete_table() -> Result<bool, NftError> {
    let mut any = false;
    for family in FAMILIES {
        let table = Table::new(TABLE_C, proto_family(family));
        let mut txn = Transaction::new();
        let f = family_name(family);
        txn.add(&table, MsgType::Del, || format!("delete table {f} {TABLE}"));
        match txn.commit() {
            Ok(()) => any = true,
            Err(NetlinkError::Kernel { errno, .. }) if errno == libc::ENOENT => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(any)
}

/// A set element, ordered for deduplication.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    addr: IpAddr,
    proto: u8,
    port: u16,
}

impl From<Frontend> for Key {
    fn from((addr, proto, port): Frontend) -> Key {
        Key { addr, proto, port }
    }
}

impl SetKey for Key {
    const TYPE: u32 = NO_ENDPOINTS_KEY_TYPE;
    const LEN: u32 = 12;

    /// The address, then the protocol and the port each padded to a register (4 bytes): 12
    /// bytes for IPv4, 24 for IPv6 (the set's key type and length follow the family, see
    /// [`no_endpoints_set`]).
    fn data(&self) -> Box<[u8]> {
        let mut d = match self.addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        let at = d.len();
        d.resize(at + 8, 0);
        d[at] = self.proto;
        d[at + 4..at + 6].copy_from_slice(&self.port.to_be_bytes());
        d.into_boxed_slice()
    }
}

/// The set, holding `keys` (their messages come from [`add_elements`]).
fn no_endpoints_set<'a>(family: Family, table: &'a Table, keys: &BTreeSet<Key>) -> Set<'a, Key> {
    let mut set = Set::new_named(
        NO_ENDPOINTS_SET_C,
        NO_ENDPOINTS_SET_ID,
        table,
        proto_family(family),
    );
    if family == Family::V6 {
        // nftnl's Set takes the key's type and length from SetKey's constants (IPv4's).
        // SAFETY: the set object is alive; plain attribute setters.
        unsafe {
            let raw = set.as_ptr().as_ptr();
            sys::nftnl_set_set_u32(raw, sys::NFTNL_SET_KEY_TYPE as u16, NO_ENDPOINTS_KEY_TYPE6);
            sys::nftnl_set_set_u32(raw, sys::NFTNL_SET_KEY_LEN as u16, 24);
        }
    }
    for key in keys {
        set.add(key);
    }
    set
}

fn describe(key: &Key) -> String {
    format!("{} . {} . {}", key.addr, key.proto, key.port)
}

/// One batch: the whole table, replacing any stale one.
fn create_table(
    family: Family,
    mark: u32,
    keys: &BTreeSet<Key>,
    masquerade: bool,
) -> Result<(), NftError> {
    let table = Table::new(TABLE_C, proto_family(family));
    let f = family_name(family);
    let mut txn = Transaction::new();
    // `add` first so that `delete` cannot fail with ENOENT when there is no stale table.
    txn.add(&table, MsgType::Add, || format!("add table {f} {TABLE}"));
    txn.add(&table, MsgType::Del, || {
        format!("delete table {f} {TABLE} (stale)")
    });
    txn.add(&table, MsgType::Add, || format!("add table {f} {TABLE}"));

    let mut nat = Chain::new(c"nat-postrouting", &table);
    nat.set_hook(Hook::PostRouting, PRIORITY_SRCNAT);
    nat.set_type(ChainType::Nat);
    nat.set_policy(Policy::Accept);
    let mut input = Chain::new(c"filter-input", &table);
    input.set_hook(Hook::In, PRIORITY_FILTER);
    input.set_type(ChainType::Filter);
    input.set_policy(Policy::Accept);
    let mut forward = Chain::new(c"filter-forward", &table);
    forward.set_hook(Hook::Forward, PRIORITY_FILTER);
    forward.set_type(ChainType::Filter);
    forward.set_policy(Policy::Accept);
    // Without the nat chain netfilter conntrack is not engaged for the namespace's traffic.
    let chains: Vec<&Chain> = if masquerade {
        vec![&nat, &input, &forward]
    } else {
        vec![&input, &forward]
    };
    for chain in chains {
        txn.add(chain, MsgType::Add, || {
            format!(
                "add chain {f} {TABLE} {}",
                chain.get_name().to_string_lossy()
            )
        });
    }

    // The set message carries the set's definition only; the elements follow in their own.
    let set = no_endpoints_set(family, &table, keys);
    txn.add(&set, MsgType::Add, || {
        format!("add set {f} {TABLE} {NO_ENDPOINTS_SET}")
    });
    add_elements(&mut txn, &set, keys);

    let masq = [
        masquerade_rule(&nat, mark, Some(libc::IPPROTO_TCP as u8)),
        masquerade_rule(&nat, mark, Some(libc::IPPROTO_UDP as u8)),
        masquerade_rule(&nat, mark, None),
    ];
    if masquerade {
        for rule in &masq {
            txn.add(rule, MsgType::Add, || {
                format!("add rule {f} {TABLE} {NAT_POSTROUTING_CHAIN} (masquerade)")
            });
        }
    }
    let rules = [&input, &forward].map(|chain| {
        (
            chain.get_name().to_string_lossy().into_owned(),
            reject_rules(family, chain, &set),
        )
    });
    for (chain, [tcp, other]) in &rules {
        txn.add(tcp, MsgType::Add, || {
            format!("add rule {f} {TABLE} {chain} (reject with tcp reset)")
        });
        txn.add(other, MsgType::Add, || {
            format!("add rule {f} {TABLE} {chain} (reject)")
        });
    }
    Ok(txn.commit()?)
}

/// One batch: flush the set, add the elements.
fn replace_elements(family: Family, keys: &BTreeSet<Key>) -> Result<(), NftError> {
    let table = Table::new(TABLE_C, proto_family(family));
    let mut txn = Transaction::new();
    let empty = no_endpoints_set(family, &table, &BTreeSet::new());
    txn.add(&FlushSet(&empty), MsgType::Del, || {
        format!(
            "flush set {} {TABLE} {NO_ENDPOINTS_SET}",
            family_name(family)
        )
    });
    let set = no_endpoints_set(family, &table, keys);
    add_elements(&mut txn, &set, keys);
    Ok(txn.commit()?)
}

/// The messages adding `set`'s elements (`keys`, as given to [`no_endpoints_set`]).
fn add_elements(txn: &mut Transaction, set: &Set<'_, Key>, keys: &BTreeSet<Key>) {
    if keys.is_empty() {
        return;
    }
    let (first, last) = (keys.first().unwrap(), keys.last().unwrap());
    let what = format!(
        "add element kpr table {TABLE} {NO_ENDPOINTS_SET} ({} elements, {} .. {})",
        keys.len(),
        describe(first),
        describe(last)
    );
    for msg in set.elems_iter() {
        txn.add(&msg, MsgType::Add, || what.clone());
    }
}

/// `meta mark & M == M meta mark set meta mark ^ M masquerade fully-random`.
/// `meta mark & M == M [meta l4proto P] meta mark set meta mark ^ M masquerade [to :PORTS]
/// fully-random`: with `proto` (TCP or UDP) the source port comes from [`MASQUERADE_PORTS`]
/// (nft allows a port range only after a transport protocol match); without, any protocol.
fn masquerade_rule<'a>(chain: &'a Chain<'a>, mark: u32, proto: Option<u8>) -> Rule<'a> {
    let mut rule = Rule::new(chain);
    rule.add_expr(&RawExpr::meta_load(NFT_META_MARK, NFT_REG_1));
    rule.add_expr(&RawExpr::bitwise(NFT_REG_1, &mark.to_ne_bytes(), &[0; 4]));
    rule.add_expr(&RawExpr::cmp_eq(NFT_REG_1, &mark.to_ne_bytes()));
    if let Some(p) = proto {
        rule.add_expr(&RawExpr::meta_load(NFT_META_L4PROTO, NFT_REG_1));
        rule.add_expr(&RawExpr::cmp_eq(NFT_REG_1, &[p]));
    }
    rule.add_expr(&RawExpr::meta_load(NFT_META_MARK, NFT_REG_1));
    rule.add_expr(&RawExpr::bitwise(
        NFT_REG_1,
        &u32::MAX.to_ne_bytes(),
        &mark.to_ne_bytes(),
    ));
    rule.add_expr(&RawExpr::meta_store(NFT_META_MARK, NFT_REG_1));
    if proto.is_some() {
        let (min, max) = MASQUERADE_PORTS;
        rule.add_expr(&RawExpr::immediate(NFT_REG_1, &min.to_be_bytes()));
        rule.add_expr(&RawExpr::immediate(NFT_REG_2, &max.to_be_bytes()));
        rule.add_expr(&RawExpr::masquerade_ports(
            NF_NAT_RANGE_PROTO_RANDOM_FULLY,
            NFT_REG_1,
            NFT_REG_2,
        ));
    } else {
        rule.add_expr(&RawExpr::masquerade(NF_NAT_RANGE_PROTO_RANDOM_FULLY));
    }
    // A comment is at most 128 bytes; this one fits.
    let _ = rule.set_comment(c"kpr: SNAT for traffic kpr marked; the mark is cleared");
    rule
}

/// `meta l4proto tcp <lookup> reject with tcp reset` and `<lookup> reject` (ICMP
/// port-unreachable), where `<lookup>` is `ip daddr . meta l4proto . th dport @no-endpoints`.
fn reject_rules<'a>(family: Family, chain: &'a Chain<'a>, set: &Set<'_, Key>) -> [Rule<'a>; 2] {
    // ip daddr -> reg 1 (bytes 0..4), meta l4proto -> reg 9, th dport -> reg 10; ip6 daddr
    // fills reg 1 (16 bytes, 32-bit registers 8..11), so the others go to 12 and 13.
    let (daddr_off, daddr_len, proto_reg, port_reg, unreach) = match family {
        Family::V4 => (16, 4, NFT_REG32_01, NFT_REG32_02, ICMP_PORT_UNREACH),
        Family::V6 => (24, 16, NFT_REG32_04, NFT_REG32_05, ICMPV6_PORT_UNREACH),
    };
    let lookup = |rule: &mut Rule| {
        rule.add_expr(&RawExpr::payload(
            NFT_PAYLOAD_NETWORK_HEADER,
            daddr_off,
            daddr_len,
            NFT_REG_1,
        ));
        rule.add_expr(&RawExpr::meta_load(NFT_META_L4PROTO, proto_reg));
        rule.add_expr(&RawExpr::payload(
            NFT_PAYLOAD_TRANSPORT_HEADER,
            2,
            2,
            port_reg,
        ));
        rule.add_expr(&RawExpr::lookup(NFT_REG_1, set.get_name(), set.get_id()));
    };
    let mut tcp = Rule::new(chain);
    tcp.add_expr(&RawExpr::meta_load(NFT_META_L4PROTO, NFT_REG_1));
    tcp.add_expr(&RawExpr::cmp_eq(NFT_REG_1, &[libc::IPPROTO_TCP as u8]));
    lookup(&mut tcp);
    tcp.add_expr(&RawExpr::reject(NFT_REJECT_TCP_RST, 0));
    let _ = tcp.set_comment(c"kpr: TCP to a Service without endpoints");
    let mut other = Rule::new(chain);
    lookup(&mut other);
    other.add_expr(&RawExpr::reject(NFT_REJECT_ICMP_UNREACH, unreach));
    let _ = other.set_comment(c"kpr: traffic to a Service without endpoints");
    [tcp, other]
}

/// `flush set`: a DELSETELEM message without elements (what nft sends).
struct FlushSet<'a>(&'a Set<'a, Key>);

// SAFETY: the message is a header and the set's name and table: far below the maximum size.
unsafe impl NlMsg for FlushSet<'_> {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, _msg_type: MsgType) {
        unsafe {
            let header = sys::nftnl_nlmsg_build_hdr(
                buf.cast::<c_char>(),
                NFT_MSG_DELSETELEM,
                self.0.get_family() as u16,
                libc::NLM_F_ACK as u16,
                seq,
            );
            sys::nftnl_set_elems_nlmsg_build_payload(header, self.0.as_ptr().as_ptr());
        }
    }
}

/// Frontends of both families with no endpoint at all, as (address, protocol, port): the
/// `no-endpoints` sets, whose traffic kpr's tables reject (kube-proxy's "has no endpoints"
/// REJECT).
pub fn frontends_without_endpoints(state: &crate::model::DesiredState) -> Vec<Frontend> {
    state
        .services
        .iter()
        .filter(|(_, s)| s.backends.is_empty() && s.external_backends.is_empty())
        .map(|(f, _)| (f.ip, f.protocol.number(), f.port))
        .collect()
}

/// Whether the table needs its nat chain: only while some frontend sends outside traffic to
/// another node's backend, or, with `masquerade_local` (`--masquerade-local-endpoints`), to any
/// backend under externalTrafficPolicy Cluster (the chain turns on netfilter conntrack for
/// every packet).
pub fn needs_masquerade(state: &crate::model::DesiredState, masquerade_local: bool) -> bool {
    state.services.values().any(|s| {
        s.kind.is_external() && (s.external_snat || (masquerade_local && !s.external_policy_local))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_type_is_nfts_concatenation() {
        // `nft --debug=netlink add set ip t s { type ipv4_addr . inet_proto . inet_service; }`
        // shows key type 29453 (0x730d), length 12.
        assert_eq!(NO_ENDPOINTS_KEY_TYPE, 29453);
    }

    #[test]
    fn key_layout_pads_each_field_to_a_register() {
        let k = Key::from(("10.0.0.1".parse().unwrap(), 6, 8080));
        assert_eq!(&*k.data(), &[10, 0, 0, 1, 6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
        // IPv6: the 16-byte address, then the same two padded fields (24 bytes, the set's
        // key length in the ip6 table).
        let k = Key::from(("fd00::1".parse().unwrap(), 17, 53));
        let d = k.data();
        assert_eq!(d.len(), 24);
        assert_eq!(&d[..2], &[0xfd, 0x00]);
        assert_eq!(&d[16..], &[17, 0, 0, 0, 0, 53, 0, 0]);
        // `type ipv6_addr . inet_proto . inet_service`: 8 . 12 . 13.
        assert_eq!(NO_ENDPOINTS_KEY_TYPE6, ((8 << 6 | 12) << 6) | 13);
    }

    #[test]
    fn zero_mark_is_refused_before_any_netlink() {
        let err = NftTable::new(0).apply(&[]).unwrap_err();
        assert!(matches!(err, NftError::ZeroMark), "{err}");
    }
}
