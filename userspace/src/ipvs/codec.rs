//! IPVS's generic netlink messages (linux/ip_vs.h): requests built from kpr's types, replies
//! read back into them. Pure: no socket here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::attr::{fixed, leading, malformed, Attrs, Writer};
use super::types::{
    full_prefix, Connections, Forward, RealServer, Timeouts, Version, VirtualServer,
    SCHED_NAME_MAX, SVC_F_HASHED, SVC_F_PERSISTENT,
};
use super::IpvsError;
use crate::model::{Family, Protocol};

/// `IPVS_GENL_VERSION`.
const VERSION: u8 = 1;

// IPVS_CMD_*
pub(super) const CMD_NEW_SERVICE: u8 = 1;
pub(super) const CMD_SET_SERVICE: u8 = 2;
pub(super) const CMD_DEL_SERVICE: u8 = 3;
pub(super) const CMD_GET_SERVICE: u8 = 4;
pub(super) const CMD_NEW_DEST: u8 = 5;
pub(super) const CMD_SET_DEST: u8 = 6;
pub(super) const CMD_DEL_DEST: u8 = 7;
pub(super) const CMD_GET_DEST: u8 = 8;
pub(super) const CMD_SET_CONFIG: u8 = 12;
pub(super) const CMD_GET_CONFIG: u8 = 13;
pub(super) const CMD_GET_INFO: u8 = 15;
pub(super) const CMD_FLUSH: u8 = 17;

// IPVS_CMD_ATTR_*
const CMD_ATTR_SERVICE: u16 = 1;
const CMD_ATTR_DEST: u16 = 2;
const CMD_ATTR_TIMEOUT_TCP: u16 = 4;
const CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
const CMD_ATTR_TIMEOUT_UDP: u16 = 6;

// IPVS_SVC_ATTR_*
const SVC_ATTR_AF: u16 = 1;
const SVC_ATTR_PROTOCOL: u16 = 2;
const SVC_ATTR_ADDR: u16 = 3;
const SVC_ATTR_PORT: u16 = 4;
const SVC_ATTR_FWMARK: u16 = 5;
const SVC_ATTR_SCHED_NAME: u16 = 6;
const SVC_ATTR_FLAGS: u16 = 7;
const SVC_ATTR_TIMEOUT: u16 = 8;
const SVC_ATTR_NETMASK: u16 = 9;

// IPVS_DEST_ATTR_*
const DEST_ATTR_ADDR: u16 = 1;
const DEST_ATTR_PORT: u16 = 2;
const DEST_ATTR_FWD_METHOD: u16 = 3;
const DEST_ATTR_WEIGHT: u16 = 4;
const DEST_ATTR_U_THRESH: u16 = 5;
const DEST_ATTR_L_THRESH: u16 = 6;
const DEST_ATTR_ACTIVE_CONNS: u16 = 7;
const DEST_ATTR_INACT_CONNS: u16 = 8;
const DEST_ATTR_PERSIST_CONNS: u16 = 9;
const DEST_ATTR_ADDR_FAMILY: u16 = 11;

// IPVS_INFO_ATTR_*
const INFO_ATTR_VERSION: u16 = 1;

const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;
const IPPROTO_TCP: u16 = 6;
const IPPROTO_UDP: u16 = 17;
const IPPROTO_SCTP: u16 = 132;

pub(super) fn request(cmd: u8) -> Writer {
    Writer::new(cmd, VERSION)
}

/// `cmd` for `vs`: its identity alone (delete, get, and as the parent of destinations), or
/// `full` with scheduler, flags and persistence (add, update).
pub(super) fn service(cmd: u8, vs: &VirtualServer, full: bool) -> Result<Writer, IpvsError> {
    let mut w = request(cmd);
    put_service(&mut w, vs, full)?;
    Ok(w)
}

/// `cmd` for real server `rs` of `vs`: identities alone (delete) or `full` (add, update).
pub(super) fn destination(
    cmd: u8,
    vs: &VirtualServer,
    rs: &RealServer,
    full: bool,
) -> Result<Writer, IpvsError> {
    let mut w = request(cmd);
    put_service(&mut w, vs, false)?;
    w.nest(CMD_ATTR_DEST, |w| {
        w.put(DEST_ATTR_ADDR, &address_bytes(rs.address))
            .put_be16(DEST_ATTR_PORT, rs.port)
            .put_u16(DEST_ATTR_ADDR_FAMILY, af(Family::of(rs.address)));
        if full {
            w.put_u32(DEST_ATTR_FWD_METHOD, rs.forward.code())
                .put_u32(DEST_ATTR_WEIGHT, rs.weight)
                .put_u32(DEST_ATTR_U_THRESH, rs.upper_threshold)
                .put_u32(DEST_ATTR_L_THRESH, rs.lower_threshold);
        }
    });
    Ok(w)
}

pub(super) fn set_timeouts(t: &Timeouts) -> Writer {
    let mut w = request(CMD_SET_CONFIG);
    w.put_u32(CMD_ATTR_TIMEOUT_TCP, t.tcp)
        .put_u32(CMD_ATTR_TIMEOUT_TCP_FIN, t.tcp_fin)
        .put_u32(CMD_ATTR_TIMEOUT_UDP, t.udp);
    w
}

fn put_service(w: &mut Writer, vs: &VirtualServer, full: bool) -> Result<(), IpvsError> {
    let family = vs.family();
    let max = full_prefix(family);
    if full {
        if vs.scheduler.is_empty()
            || vs.scheduler.len() > SCHED_NAME_MAX
            || vs.scheduler.contains('\0')
        {
            return Err(IpvsError::Invalid(format!(
                "{vs}: scheduler name {:?} (1 to {SCHED_NAME_MAX} bytes)",
                vs.scheduler
            )));
        }
        if vs.netmask > max {
            return Err(IpvsError::Invalid(format!(
                "{vs}: netmask /{} is longer than the address",
                vs.netmask
            )));
        }
    }
    w.nest(CMD_ATTR_SERVICE, |w| {
        w.put_u16(SVC_ATTR_AF, af(family))
            .put_u16(SVC_ATTR_PROTOCOL, protocol_number(vs.protocol))
            .put(SVC_ATTR_ADDR, &address_bytes(vs.address))
            .put_be16(SVC_ATTR_PORT, vs.port);
        if full {
            let mut flags = vs.flags & !(SVC_F_PERSISTENT | SVC_F_HASHED);
            if vs.persistence_timeout.is_some() {
                flags |= SVC_F_PERSISTENT;
            }
            // struct ip_vs_flags { flags, mask }: the mask makes these flags replace all of
            // the service's, so an update also clears what is no longer wanted.
            let pair = [flags.to_ne_bytes(), u32::MAX.to_ne_bytes()].concat();
            w.put_str(SVC_ATTR_SCHED_NAME, &vs.scheduler)
                .put(SVC_ATTR_FLAGS, &pair)
                .put_u32(SVC_ATTR_TIMEOUT, vs.persistence_timeout.unwrap_or(0))
                .put(SVC_ATTR_NETMASK, &netmask_bytes(family, vs.netmask));
        }
    });
    Ok(())
}

/// A service of a `GET_SERVICE` reply; `None` for a firewall-mark service, which has no
/// address or port (kpr creates none and leaves them alone).
pub(super) fn parse_service(reply: &Attrs<'_>) -> Result<Option<VirtualServer>, IpvsError> {
    let a = reply.nested(CMD_ATTR_SERVICE, "service")?;
    if a.opt_u32(SVC_ATTR_FWMARK, "fwmark")?.unwrap_or(0) != 0 {
        return Ok(None);
    }
    let family = family_of(a.u16(SVC_ATTR_AF, "service family")?)?;
    let protocol = match a.u16(SVC_ATTR_PROTOCOL, "protocol")? {
        IPPROTO_TCP => Protocol::Tcp,
        IPPROTO_UDP => Protocol::Udp,
        IPPROTO_SCTP => Protocol::Sctp,
        other => return Err(malformed(format!("service of protocol {other}"))),
    };
    // struct ip_vs_flags: the flags, then a mask that means nothing in a reply.
    let flags = leading::<4>(a.require(SVC_ATTR_FLAGS, "flags")?)
        .map(u32::from_ne_bytes)
        .ok_or_else(|| malformed("flags attribute is short".into()))?;
    let timeout = a.u32(SVC_ATTR_TIMEOUT, "persistence timeout")?;
    let netmask = fixed::<4>(a.require(SVC_ATTR_NETMASK, "netmask")?, "netmask")?;
    Ok(Some(VirtualServer {
        protocol,
        address: address(family, a.require(SVC_ATTR_ADDR, "service address")?)?,
        port: a.be16(SVC_ATTR_PORT, "service port")?,
        scheduler: a.string(SVC_ATTR_SCHED_NAME, "scheduler")?,
        flags: flags & !(SVC_F_PERSISTENT | SVC_F_HASHED),
        persistence_timeout: (flags & SVC_F_PERSISTENT != 0).then_some(timeout),
        netmask: prefix_of(family, netmask),
    }))
}

/// A destination of a `GET_DEST` reply for a service of `family` (the destination's own
/// family attribute is missing before Linux 3.18).
pub(super) fn parse_destination(
    reply: &Attrs<'_>,
    family: Family,
) -> Result<RealServer, IpvsError> {
    let a = reply.nested(CMD_ATTR_DEST, "destination")?;
    let family = match a.get(DEST_ATTR_ADDR_FAMILY) {
        Some(_) => family_of(a.u16(DEST_ATTR_ADDR_FAMILY, "destination family")?)?,
        None => family,
    };
    let code = a.u32(DEST_ATTR_FWD_METHOD, "forwarding method")?;
    let forward =
        Forward::from_code(code).ok_or_else(|| malformed(format!("forwarding method {code}")))?;
    let count = |kind, name| Ok::<_, IpvsError>(a.opt_u32(kind, name)?.unwrap_or(0));
    Ok(RealServer {
        address: address(family, a.require(DEST_ATTR_ADDR, "destination address")?)?,
        port: a.be16(DEST_ATTR_PORT, "destination port")?,
        weight: a.u32(DEST_ATTR_WEIGHT, "weight")?,
        forward,
        upper_threshold: a.u32(DEST_ATTR_U_THRESH, "upper threshold")?,
        lower_threshold: a.u32(DEST_ATTR_L_THRESH, "lower threshold")?,
        connections: Connections {
            active: count(DEST_ATTR_ACTIVE_CONNS, "active connections")?,
            inactive: count(DEST_ATTR_INACT_CONNS, "inactive connections")?,
            persistent: count(DEST_ATTR_PERSIST_CONNS, "persistent connections")?,
        },
    })
}

pub(super) fn parse_timeouts(reply: &Attrs<'_>) -> Result<Timeouts, IpvsError> {
    Ok(Timeouts {
        tcp: reply.u32(CMD_ATTR_TIMEOUT_TCP, "TCP timeout")?,
        tcp_fin: reply.u32(CMD_ATTR_TIMEOUT_TCP_FIN, "TCP FIN timeout")?,
        udp: reply.u32(CMD_ATTR_TIMEOUT_UDP, "UDP timeout")?,
    })
}

pub(super) fn parse_version(reply: &Attrs<'_>) -> Result<Version, IpvsError> {
    reply
        .u32(INFO_ATTR_VERSION, "version")
        .map(Version::from_code)
}

fn af(family: Family) -> u16 {
    match family {
        Family::V4 => AF_INET,
        Family::V6 => AF_INET6,
    }
}

fn family_of(af: u16) -> Result<Family, IpvsError> {
    match af {
        AF_INET => Ok(Family::V4),
        AF_INET6 => Ok(Family::V6),
        other => Err(malformed(format!("address family {other}"))),
    }
}

const fn protocol_number(p: Protocol) -> u16 {
    match p {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
        Protocol::Sctp => IPPROTO_SCTP,
    }
}

/// `union nf_inet_addr`: 16 bytes, an IPv4 address in the first 4.
fn address_bytes(ip: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

fn address(family: Family, data: &[u8]) -> Result<IpAddr, IpvsError> {
    let ip = match family {
        Family::V4 => leading::<4>(data).map(|b| IpAddr::V4(Ipv4Addr::from(b))),
        Family::V6 => leading::<16>(data).map(|b| IpAddr::V6(Ipv6Addr::from(b))),
    };
    ip.ok_or_else(|| malformed(format!("address of {} bytes", data.len())))
}

/// The kernel reads the netmask as a `__be32`: for IPv4 a mask in network order, for IPv6 a
/// prefix length it takes as a host-order number.
fn netmask_bytes(family: Family, prefix: u32) -> [u8; 4] {
    match family {
        Family::V4 => u32::MAX
            .checked_shl(32u32.saturating_sub(prefix))
            .unwrap_or(0)
            .to_be_bytes(),
        Family::V6 => prefix.to_ne_bytes(),
    }
}

/// The inverse of [`netmask_bytes`]; an IPv4 mask with holes (another tool's) reads as its
/// leading ones.
fn prefix_of(family: Family, bytes: [u8; 4]) -> u32 {
    match family {
        Family::V4 => u32::from_be_bytes(bytes).leading_ones(),
        Family::V6 => u32::from_ne_bytes(bytes),
    }
}

#[cfg(test)]
mod tests;
