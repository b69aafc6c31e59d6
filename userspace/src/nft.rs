//! kpr's nftables table, programmed through netlink (libnftnl + libmnl, no `nft` binary).
//!
//! kpr owns exactly one table, `table ip kpr`, and never reads or writes any other. Every change
//! is one nfnetlink batch, which the kernel applies atomically (all or nothing):
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
use std::net::Ipv4Addr;
use std::os::raw::c_char;

use nftnl::nftnl_sys as sys;
use nftnl::set::{Set, SetKey};
use nftnl::{Chain, ChainType, Hook, MsgType, NlMsg, Policy, ProtoFamily, Rule, Table};

use crate::netfilter::nfnetlink::{
    NetlinkError, RawExpr, Transaction, ICMP_PORT_UNREACH, NFT_META_L4PROTO, NFT_META_MARK,
    NFT_MSG_DELSETELEM, NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER,
    NFT_REJECT_ICMP_UNREACH, NF_NAT_RANGE_PROTO_RANDOM_FULLY, TYPE_BITS, TYPE_INET_PROTOCOL,
    TYPE_INET_SERVICE, TYPE_IPADDR,
};

/// kpr's table (family ip).
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
const NFT_REJECT_TCP_RST: u32 = 1;

/// The no-endpoints set's key type as nft composes it (address . protocol . port).
const NO_ENDPOINTS_KEY_TYPE: u32 =
    (((TYPE_IPADDR << TYPE_BITS) | TYPE_INET_PROTOCOL) << TYPE_BITS) | TYPE_INET_SERVICE;

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
pub type Frontend = (Ipv4Addr, u8, u16);

/// kpr's nftables table (`table ip kpr`), see the module doc.
#[derive(Debug)]
pub struct NftTable {
    mark: u32,
    created: bool,
    /// Whether the table as created has the masquerade (nat) chain.
    masquerade: bool,
}

impl NftTable {
    /// `mark`: the masquerade mark bit(s) the tc programs set ([`DEFAULT_MASQ_MARK`]). Nothing is
    /// sent to the kernel until [`NftTable::apply`].
    pub fn new(mark: u32) -> NftTable {
        NftTable {
            mark,
            created: false,
            masquerade: true,
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
        let keys: BTreeSet<Key> = no_endpoints.iter().map(|&f| Key::from(f)).collect();
        if self.created && self.masquerade != masquerade {
            self.created = false;
        }
        if self.created {
            match replace_elements(&keys) {
                Ok(()) => return Ok(()),
                // The table or the set was removed behind kpr's back: recreate it all.
                Err(e) if e.errno() == Some(libc::ENOENT) => {
                    tracing::warn!("nftables table ip {TABLE} vanished; recreating it: {e}");
                }
                Err(e) => return Err(e),
            }
        }
        self.created = false;
        create_table(self.mark, &keys, masquerade)?;
        self.created = true;
        self.masquerade = masquerade;
        Ok(())
    }

    /// Deletes kpr's table; true if it existed. A later [`NftTable::apply`] creates it again.
    pub fn delete(&mut self) -> Result<bool, NftError> {
        self.created = false;
        delete_table()
    }
}

/// Deletes `table ip kpr` (in the calling thread's network namespace) and everything in it;
/// true if it existed, false if there was none. Other tables are not touched.
pub fn delete_table() -> Result<bool, NftError> {
    let table = Table::new(TABLE_C, ProtoFamily::Ipv4);
    let mut txn = Transaction::new();
    txn.add(&table, MsgType::Del, || format!("delete table ip {TABLE}"));
    match txn.commit() {
        Ok(()) => Ok(true),
        Err(NetlinkError::Kernel { errno, .. }) if errno == libc::ENOENT => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// A set element, ordered for deduplication.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    addr: Ipv4Addr,
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

    fn data(&self) -> Box<[u8]> {
        let mut d = [0u8; 12];
        d[..4].copy_from_slice(&self.addr.octets());
        d[4] = self.proto;
        d[8..10].copy_from_slice(&self.port.to_be_bytes());
        Box::new(d)
    }
}

/// The set, holding `keys` (their messages come from [`add_elements`]).
fn no_endpoints_set<'a>(table: &'a Table, keys: &BTreeSet<Key>) -> Set<'a, Key> {
    let mut set = Set::new_named(
        NO_ENDPOINTS_SET_C,
        NO_ENDPOINTS_SET_ID,
        table,
        ProtoFamily::Ipv4,
    );
    for key in keys {
        set.add(key);
    }
    set
}

fn describe(key: &Key) -> String {
    format!("{} . {} . {}", key.addr, key.proto, key.port)
}

/// One batch: the whole table, replacing any stale one.
fn create_table(mark: u32, keys: &BTreeSet<Key>, masquerade: bool) -> Result<(), NftError> {
    let table = Table::new(TABLE_C, ProtoFamily::Ipv4);
    let mut txn = Transaction::new();
    // `add` first so that `delete` cannot fail with ENOENT when there is no stale table.
    txn.add(&table, MsgType::Add, || format!("add table ip {TABLE}"));
    txn.add(&table, MsgType::Del, || {
        format!("delete table ip {TABLE} (stale)")
    });
    txn.add(&table, MsgType::Add, || format!("add table ip {TABLE}"));

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
                "add chain ip {TABLE} {}",
                chain.get_name().to_string_lossy()
            )
        });
    }

    // The set message carries the set's definition only; the elements follow in their own.
    let set = no_endpoints_set(&table, keys);
    txn.add(&set, MsgType::Add, || {
        format!("add set ip {TABLE} {NO_ENDPOINTS_SET}")
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
                format!("add rule ip {TABLE} {NAT_POSTROUTING_CHAIN} (masquerade)")
            });
        }
    }
    let rules = [&input, &forward].map(|chain| {
        (
            chain.get_name().to_string_lossy().into_owned(),
            reject_rules(chain, &set),
        )
    });
    for (chain, [tcp, other]) in &rules {
        txn.add(tcp, MsgType::Add, || {
            format!("add rule ip {TABLE} {chain} (reject with tcp reset)")
        });
        txn.add(other, MsgType::Add, || {
            format!("add rule ip {TABLE} {chain} (reject)")
        });
    }
    Ok(txn.commit()?)
}

/// One batch: flush the set, add the elements.
fn replace_elements(keys: &BTreeSet<Key>) -> Result<(), NftError> {
    let table = Table::new(TABLE_C, ProtoFamily::Ipv4);
    let mut txn = Transaction::new();
    let empty = no_endpoints_set(&table, &BTreeSet::new());
    txn.add(&FlushSet(&empty), MsgType::Del, || {
        format!("flush set ip {TABLE} {NO_ENDPOINTS_SET}")
    });
    let set = no_endpoints_set(&table, keys);
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
        "add element ip {TABLE} {NO_ENDPOINTS_SET} ({} elements, {} .. {})",
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
fn reject_rules<'a>(chain: &'a Chain<'a>, set: &Set<'_, Key>) -> [Rule<'a>; 2] {
    let lookup = |rule: &mut Rule| {
        // ip daddr -> reg 1 (bytes 0..4), meta l4proto -> reg 9, th dport -> reg 10.
        rule.add_expr(&RawExpr::payload(
            NFT_PAYLOAD_NETWORK_HEADER,
            16,
            4,
            NFT_REG_1,
        ));
        rule.add_expr(&RawExpr::meta_load(NFT_META_L4PROTO, NFT_REG32_01));
        rule.add_expr(&RawExpr::payload(
            NFT_PAYLOAD_TRANSPORT_HEADER,
            2,
            2,
            NFT_REG32_02,
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
    other.add_expr(&RawExpr::reject(NFT_REJECT_ICMP_UNREACH, ICMP_PORT_UNREACH));
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

/// IPv4 frontends with no endpoint at all, as (address, protocol, port): the `no-endpoints`
/// set, whose traffic kpr's table rejects (kube-proxy's "has no endpoints" REJECT).
pub fn frontends_without_endpoints(state: &crate::model::DesiredState) -> Vec<(Ipv4Addr, u8, u16)> {
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
        let k = Key::from((Ipv4Addr::new(10, 0, 0, 1), 6, 8080));
        assert_eq!(&*k.data(), &[10, 0, 0, 1, 6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
    }

    #[test]
    fn zero_mark_is_refused_before_any_netlink() {
        let err = NftTable::new(0).apply(&[]).unwrap_err();
        assert!(matches!(err, NftError::ZeroMark), "{err}");
    }
}
