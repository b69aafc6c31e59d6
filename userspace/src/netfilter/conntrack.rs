//! Stale UDP flows: netfilter conntrack entries of a UDP service that point to an endpoint no
//! longer serving. With the iptables and nftables modes a UDP "connection" is a conntrack entry,
//! DNATed once; while the entry lives, its packets keep going to the endpoint it chose, even
//! after that endpoint is gone. kube-proxy deletes such entries after each sync
//! (pkg/proxy/conntrack, `CleanStaleEntries`), so the flow's next packet is balanced afresh;
//! kpr does the same, through conntrack netlink (ctnetlink), in the calling thread's network
//! namespace.
//!
//! An entry is stale when its original destination is a UDP service address and port (a
//! ClusterIP, externalIP or load-balancer IP) or its original destination port is a UDP
//! NodePort, and its reply source is not one of that service port's endpoints. That includes
//! entries made while the service had no endpoint (their reply source is the service address),
//! which would otherwise black-hole the flow.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::{DesiredState, Family, Protocol};
use crate::netlink::{NetlinkError, NetlinkSocket, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};

/// Errors of the conntrack cleanup.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("conntrack: {0}")]
    Netlink(#[from] NetlinkError),
}

/// UDP service addresses and NodePorts with their endpoint IPs, as last cleaned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UdpEndpoints {
    /// (service IP, port) → endpoint IPs.
    pub by_address: BTreeMap<(IpAddr, u16), BTreeSet<IpAddr>>,
    /// NodePort → endpoint IPs.
    pub by_node_port: BTreeMap<u16, BTreeSet<IpAddr>>,
}

impl UdpEndpoints {
    /// The UDP service ports of `state` in `family`.
    pub fn of(state: &DesiredState, family: Family) -> UdpEndpoints {
        let mut out = UdpEndpoints::default();
        for p in state
            .service_ports
            .iter()
            .filter(|p| p.protocol == Protocol::Udp && p.family == family)
        {
            let ips: BTreeSet<IpAddr> = p
                .cluster_endpoints
                .iter()
                .chain(&p.local_endpoints)
                .map(|b| b.ip)
                .collect();
            for ip in std::iter::once(&p.cluster_ip)
                .chain(&p.external_ips)
                .chain(&p.load_balancer_ips)
            {
                out.by_address.insert((*ip, p.port), ips.clone());
            }
            if let Some(np) = p.node_port {
                out.by_node_port.insert(np, ips.clone());
            }
        }
        out
    }

    /// Whether the flow `orig_dst:orig_dport` answered by `reply_src` is stale.
    pub fn is_stale(&self, orig_dst: IpAddr, orig_dport: u16, reply_src: IpAddr) -> bool {
        let stale = |eps: &BTreeSet<IpAddr>| !eps.contains(&reply_src);
        self.by_address
            .get(&(orig_dst, orig_dport))
            .is_some_and(stale)
            || self.by_node_port.get(&orig_dport).is_some_and(stale)
    }
}

/// Runs the cleanup after a sync whenever the UDP endpoints changed (kube-proxy's
/// `ConntrackCleanupRequired`), and after the first sync.
#[derive(Debug)]
pub struct StaleFlows {
    /// The mode's family: each family's proxier cleans its own entries (a dual-stack Service's
    /// NodePort has endpoints of both families under one port number).
    family: Family,
    last: Option<UdpEndpoints>,
    /// Entries deleted so far.
    pub deleted: u64,
}

impl StaleFlows {
    pub fn new(family: Family) -> Self {
        StaleFlows {
            family,
            last: None,
            deleted: 0,
        }
    }

    pub fn cleanup(&mut self, state: &DesiredState) {
        let now = UdpEndpoints::of(state, self.family);
        if self.last.as_ref() == Some(&now) {
            return;
        }
        if now.by_address.is_empty() && now.by_node_port.is_empty() {
            self.last = Some(now);
            return;
        }
        match delete_stale(self.family, &now) {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(entries = n, "deleted stale UDP conntrack entries");
                }
                self.deleted += n as u64;
                self.last = Some(now);
            }
            // Tried again after the next sync: `last` is left as it was.
            Err(e) => tracing::warn!("cleaning stale UDP conntrack entries: {e}"),
        }
    }
}

// linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h
const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const IPPROTO_UDP: u8 = 17;

/// One conntrack entry's two tuples (UDP only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub orig: Tuple,
    pub reply: Tuple,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

/// Deletes every stale UDP entry of `family`; returns how many.
pub fn delete_stale(family: Family, endpoints: &UdpEndpoints) -> Result<usize, ConntrackError> {
    let mut n = 0;
    let family = match family {
        Family::V4 => libc::AF_INET as u8,
        Family::V6 => libc::AF_INET6 as u8,
    };
    {
        let sock = Socket::open()?;
        let flows = sock.dump(family)?;
        for f in flows.iter().filter(|f| {
            f.orig.proto == IPPROTO_UDP && endpoints.is_stale(f.orig.dst, f.orig.dport, f.reply.src)
        }) {
            match sock.delete(family, &f.orig) {
                Ok(()) => n += 1,
                // Gone meanwhile (expired, or deleted with another entry).
                Err(ConntrackError::Netlink(NetlinkError::Kernel(libc::ENOENT))) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(n)
}

struct Socket(NetlinkSocket);

fn push_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn nested(ty: u16, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut inner = Vec::new();
    f(&mut inner);
    let mut out = Vec::new();
    push_attr(&mut out, ty | NLA_F_NESTED, &inner);
    out
}

/// Iterates the attributes in `buf`: (type without flags, payload).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        let aligned = (len + 3) & !3;
        buf = &buf[aligned.min(buf.len())..];
        Some((ty, payload))
    })
}

fn parse_tuple(buf: &[u8]) -> Option<Tuple> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, 0, 0, 0);
    for (ty, p) in attrs(buf) {
        match ty {
            CTA_TUPLE_IP => {
                for (ty, a) in attrs(p) {
                    let ip = match (ty, a.len()) {
                        (CTA_IP_V4_SRC | CTA_IP_V4_DST, 4) => {
                            IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
                        }
                        (CTA_IP_V6_SRC | CTA_IP_V6_DST, 16) => {
                            let b: [u8; 16] = a.try_into().ok()?;
                            IpAddr::V6(Ipv6Addr::from(b))
                        }
                        _ => continue,
                    };
                    if ty == CTA_IP_V4_SRC || ty == CTA_IP_V6_SRC {
                        src = Some(ip);
                    } else {
                        dst = Some(ip);
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (ty, a) in attrs(p) {
                    match (ty, a.len()) {
                        (CTA_PROTO_NUM, 1) => proto = a[0],
                        (CTA_PROTO_SRC_PORT, 2) => sport = u16::from_be_bytes([a[0], a[1]]),
                        (CTA_PROTO_DST_PORT, 2) => dport = u16::from_be_bytes([a[0], a[1]]),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(Tuple {
        src: src?,
        dst: dst?,
        proto,
        sport,
        dport,
    })
}

fn tuple_attr(ty: u16, t: &Tuple) -> Vec<u8> {
    nested(ty, |b| {
        b.extend(nested(CTA_TUPLE_IP, |ip| match (t.src, t.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                push_attr(ip, CTA_IP_V4_SRC, &s.octets());
                push_attr(ip, CTA_IP_V4_DST, &d.octets());
            }
            (s, d) => {
                let v6 = |a: IpAddr| match a {
                    IpAddr::V6(a) => a.octets(),
                    IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                };
                push_attr(ip, CTA_IP_V6_SRC, &v6(s));
                push_attr(ip, CTA_IP_V6_DST, &v6(d));
            }
        }));
        b.extend(nested(CTA_TUPLE_PROTO, |p| {
            push_attr(p, CTA_PROTO_NUM, &[t.proto]);
            push_attr(p, CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes());
            push_attr(p, CTA_PROTO_DST_PORT, &t.dport.to_be_bytes());
        }));
    })
}

impl Socket {
    fn open() -> Result<Socket, ConntrackError> {
        Ok(Socket(NetlinkSocket::open(NETLINK_NETFILTER)?))
    }

    /// One ctnetlink request (nfgenmsg for `family`, then `attrs`); `each` gets every reply's
    /// attributes (after the nfgenmsg header).
    fn request(
        &self,
        msg_type: u16,
        flags: u16,
        family: u8,
        attrs: &[u8],
        mut each: impl FnMut(&[u8]),
    ) -> Result<(), ConntrackError> {
        let mut payload = Vec::with_capacity(4 + attrs.len());
        // struct nfgenmsg
        payload.extend_from_slice(&[family, 0, 0, 0]);
        payload.extend_from_slice(attrs);
        let kind = (NFNL_SUBSYS_CTNETLINK << 8) | msg_type;
        self.0.request(kind, flags, &payload, |_, body| {
            if let Some(attrs) = body.get(4..) {
                each(attrs)
            }
        })?;
        Ok(())
    }

    fn dump(&self, family: u8) -> Result<Vec<Flow>, ConntrackError> {
        let mut flows = Vec::new();
        self.request(
            IPCTNL_MSG_CT_GET,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            &[],
            |payload| {
                let (mut orig, mut reply) = (None, None);
                for (ty, p) in attrs(payload) {
                    match ty {
                        CTA_TUPLE_ORIG => orig = parse_tuple(p),
                        CTA_TUPLE_REPLY => reply = parse_tuple(p),
                        _ => {}
                    }
                }
                if let (Some(orig), Some(reply)) = (orig, reply) {
                    flows.push(Flow { orig, reply });
                }
            },
        )?;
        Ok(flows)
    }

    fn delete(&self, family: u8, orig: &Tuple) -> Result<(), ConntrackError> {
        let attrs = tuple_attr(CTA_TUPLE_ORIG, orig);
        self.request(
            IPCTNL_MSG_CT_DELETE,
            NLM_F_REQUEST | NLM_F_ACK,
            family,
            &attrs,
            |_| {},
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tuple_survives_its_netlink_encoding() {
        let t = Tuple {
            src: "10.244.1.21".parse().unwrap(),
            dst: "10.96.0.10".parse().unwrap(),
            proto: IPPROTO_UDP,
            sport: 40000,
            dport: 53,
        };
        let a = tuple_attr(CTA_TUPLE_ORIG, &t);
        let (ty, payload) = attrs(&a).next().unwrap();
        assert_eq!(ty, CTA_TUPLE_ORIG);
        assert_eq!(parse_tuple(payload), Some(t));
    }

    #[test]
    fn stale_means_a_reply_source_that_is_no_endpoint() {
        let mut e = UdpEndpoints::default();
        let vip: IpAddr = "10.96.0.10".parse().unwrap();
        let be1: IpAddr = "10.244.1.11".parse().unwrap();
        let be2: IpAddr = "10.244.1.12".parse().unwrap();
        e.by_address.insert((vip, 53), [be1].into());
        e.by_node_port.insert(30053, [be1].into());
        assert!(!e.is_stale(vip, 53, be1));
        assert!(e.is_stale(vip, 53, be2));
        // An entry made while there was no endpoint answers from the VIP itself.
        assert!(e.is_stale(vip, 53, vip));
        assert!(e.is_stale("192.168.100.11".parse().unwrap(), 30053, be2));
        assert!(!e.is_stale("10.96.0.99".parse().unwrap(), 53, be2));
    }
}
