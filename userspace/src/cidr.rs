//! IP addresses and prefixes read as Kubernetes reads them. Every CIDR kpr takes — a Service's
//! `loadBalancerSourceRanges`, `--cluster-cidr`, `--nodeport-addresses`,
//! `--ipvs-exclude-cidrs` — goes through [`parse`], and flows on as an [`ipnet`] type to the
//! planner and the maps.
//!
//! Kubernetes parses with `k8s.io/utils/net`'s "sloppy" functions: Go's parser from before
//! Go 1.17, which read IPv4 octets with leading zeros as decimal. API validation accepted such
//! addresses until 1.22 (CVE-2021-29923), so objects written before then still carry them and
//! kube-proxy still serves them (its `TestBadIPs`): `010.0.0.1` is 10.0.0.1, not 8.0.0.1.
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not a CIDR (such as 10.244.0.0/16 or fd00:10:244::/56)")]
    Cidr(String),
    #[error("{0:?} is not an IP address")]
    Ip(String),
}

/// A prefix as `netutils.ParseCIDRSloppy` reads it, without trimming (callers decide, as
/// kube-proxy's callers do). The address keeps its host bits, as written: `--cluster-cidr`
/// goes into iptables rules as the operator wrote it. [`IpNet::trunc`] gives the network,
/// which is what Go's `ParseCIDR` returns as its `*IPNet` and what LPM keys need.
pub fn parse(s: &str) -> Result<IpNet, CidrError> {
    let bad = || CidrError::Cidr(s.to_owned());
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    // Go's dtoi: decimal digits only (no sign, no spaces), at most 255 before it gives up.
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let len: u8 = len.parse().map_err(|_| bad())?;
    match parse_ip(addr).map_err(|_| bad())? {
        IpAddr::V4(ip) => Ipv4Net::new(ip, len).map(IpNet::V4).map_err(|_| bad()),
        IpAddr::V6(ip) => Ipv6Net::new(ip, len).map(IpNet::V6).map_err(|_| bad()),
    }
}

/// An address as `netutils.ParseIPSloppy` reads it: std's parser, except that an IPv4 octet
/// may carry leading zeros (read as decimal).
pub fn parse_ip(s: &str) -> Result<IpAddr, CidrError> {
    if let Ok(ip) = s.parse() {
        return Ok(ip);
    }
    parse_ipv4_sloppy(s)
        .map(IpAddr::V4)
        .ok_or_else(|| CidrError::Ip(s.to_owned()))
}

fn parse_ipv4_sloppy(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for o in &mut octets {
        let part = parts.next()?;
        // Go's parseIPv4 stops after three digits; more is not an octet even if zeros.
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *o = part.parse().ok()?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn prefixes_of_both_families_keep_the_address_as_written() {
        assert_eq!(parse("10.244.0.0/16"), Ok(net("10.244.0.0/16")));
        assert_eq!(parse("10.244.1.7/16"), Ok(net("10.244.1.7/16")));
        assert_eq!(
            parse("10.244.1.7/16").unwrap().trunc(),
            net("10.244.0.0/16")
        );
        assert_eq!(parse("fd00:10::1/64"), Ok(net("fd00:10::1/64")));
        assert_eq!(parse("fd00:10::1/64").unwrap().trunc(), net("fd00:10::/64"));
        assert_eq!(parse("0.0.0.0/0"), Ok(net("0.0.0.0/0")));
        assert_eq!(parse("::/0"), Ok(net("::/0")));
        assert_eq!(parse("1.2.3.4/32"), Ok(net("1.2.3.4/32")));
        assert_eq!(parse("::1/128"), Ok(net("::1/128")));
        // A v4-mapped address is an IPv6 prefix, as in Go.
        assert!(parse("::ffff:10.0.0.0/104").unwrap().addr().is_ipv6());
    }

    #[test]
    fn leading_zeros_in_ipv4_are_decimal_as_kubernetes_reads_them() {
        assert_eq!(parse("010.000.001.0/24"), Ok(net("10.0.1.0/24")));
        assert_eq!(parse_ip("010.0.0.1"), Ok("10.0.0.1".parse().unwrap()));
        assert_eq!(
            parse_ip("192.168.000.012"),
            Ok("192.168.0.12".parse().unwrap())
        );
        // Go's dtoi reads a zero-padded prefix length too.
        assert_eq!(parse("10.0.0.0/08"), Ok(net("10.0.0.0/8")));
    }

    #[test]
    fn what_go_rejects_is_rejected() {
        for s in [
            "",
            "10.0.0.0",
            "10.0.0.0/",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/+8",
            "10.0.0.0/ 8",
            " 10.0.0.0/8",
            "10.0.0.0/8 ",
            "10.0.0/8",
            "10.0.0.0.0/8",
            "256.0.0.0/8",
            "0010.0.0.0/8",
            "10.0.0.0/0008",
            "example.com/8",
            "10.0.0.0/8/8",
            "fd00::g/64",
        ] {
            assert_eq!(parse(s), Err(CidrError::Cidr(s.into())), "{s:?}");
        }
        for s in [
            "",
            "1.2.3",
            "1.2.3.4.5",
            "1.2.3.256",
            "1..2.3",
            "::g",
            "1.2.3.4/32",
        ] {
            assert_eq!(parse_ip(s), Err(CidrError::Ip(s.into())), "{s:?}");
        }
    }

    #[test]
    fn errors_name_the_input() {
        assert_eq!(
            parse("10.0.0.0/33").unwrap_err().to_string(),
            "\"10.0.0.0/33\" is not a CIDR (such as 10.244.0.0/16 or fd00:10:244::/56)"
        );
    }
}
