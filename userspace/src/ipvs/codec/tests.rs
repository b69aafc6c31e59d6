use super::*;
use crate::ipvs::attr::genl_reply;
use crate::ipvs::types::{SVC_F_ONEPACKET, SVC_F_SCHED_MH_FALLBACK, SVC_F_SCHED_MH_PORT};

fn v4(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn persistent_v4() -> VirtualServer {
    VirtualServer {
        persistence_timeout: Some(10_800),
        ..VirtualServer::new(Protocol::Tcp, v4("10.96.0.10"), 53, "rr")
    }
}

/// The service nest of a request, as the kernel parses it.
fn service_attrs(bytes: &[u8]) -> (u8, Vec<(u16, Vec<u8>)>) {
    let (cmd, top) = genl_reply(bytes).unwrap();
    let nest = top.require(CMD_ATTR_SERVICE, "service").unwrap();
    let mut out = Vec::new();
    let mut rest = nest;
    while let [l0, l1, t0, t1, ..] = rest {
        let len = usize::from(u16::from_ne_bytes([*l0, *l1]));
        out.push((u16::from_ne_bytes([*t0, *t1]), rest[4..len].to_vec()));
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    (cmd, out)
}

#[test]
fn a_full_ipv4_service_carries_every_field_the_kernel_requires() {
    let w = service(CMD_NEW_SERVICE, &persistent_v4(), true).unwrap();
    let (cmd, attrs) = service_attrs(&w.into_bytes());
    assert_eq!(cmd, CMD_NEW_SERVICE);
    let mut addr = vec![10, 96, 0, 10];
    addr.resize(16, 0);
    let flags = [1u32.to_ne_bytes(), u32::MAX.to_ne_bytes()].concat();
    let want: Vec<(u16, Vec<u8>)> = vec![
        (SVC_ATTR_AF, 2u16.to_ne_bytes().to_vec()),
        (SVC_ATTR_PROTOCOL, 6u16.to_ne_bytes().to_vec()),
        (SVC_ATTR_ADDR, addr),
        (SVC_ATTR_PORT, vec![0, 53]),
        (SVC_ATTR_SCHED_NAME, b"rr\0".to_vec()),
        (SVC_ATTR_FLAGS, flags),
        (SVC_ATTR_TIMEOUT, 10_800u32.to_ne_bytes().to_vec()),
        (SVC_ATTR_NETMASK, vec![0xff; 4]),
    ];
    assert_eq!(attrs, want);
}

#[test]
fn an_ipv6_netmask_is_a_host_order_prefix_length() {
    let vs = VirtualServer::new(Protocol::Udp, "fd00::1".parse().unwrap(), 53, "sh");
    let (_, attrs) = service_attrs(&service(CMD_NEW_SERVICE, &vs, true).unwrap().into_bytes());
    let find = |k| attrs.iter().find(|(t, _)| *t == k).unwrap().1.clone();
    assert_eq!(find(SVC_ATTR_AF), 10u16.to_ne_bytes());
    assert_eq!(find(SVC_ATTR_NETMASK), 128u32.to_ne_bytes());
    assert_eq!(
        find(SVC_ATTR_ADDR),
        vs.address.to_string().parse::<Ipv6Addr>().unwrap().octets()
    );
}

#[test]
fn an_ipv4_netmask_is_a_mask_in_network_order() {
    assert_eq!(netmask_bytes(Family::V4, 24), [255, 255, 255, 0]);
    assert_eq!(netmask_bytes(Family::V4, 0), [0; 4]);
    assert_eq!(prefix_of(Family::V4, [255, 255, 255, 0]), 24);
    assert_eq!(prefix_of(Family::V6, 64u32.to_ne_bytes()), 64);
}

#[test]
fn the_hashed_flag_is_never_sent_and_persistence_follows_the_timeout() {
    let vs = VirtualServer {
        flags: SVC_F_HASHED | SVC_F_PERSISTENT | SVC_F_SCHED_MH_PORT,
        ..VirtualServer::new(Protocol::Tcp, v4("10.0.0.1"), 80, "mh")
    };
    let (_, attrs) = service_attrs(&service(CMD_SET_SERVICE, &vs, true).unwrap().into_bytes());
    let flags = &attrs.iter().find(|(t, _)| *t == SVC_ATTR_FLAGS).unwrap().1;
    assert_eq!(flags[..4], SVC_F_SCHED_MH_PORT.to_ne_bytes());
}

#[test]
fn an_identity_names_the_service_only() {
    let (_, attrs) = service_attrs(
        &service(CMD_DEL_SERVICE, &persistent_v4(), false)
            .unwrap()
            .into_bytes(),
    );
    let kinds: Vec<u16> = attrs.iter().map(|(t, _)| *t).collect();
    assert_eq!(
        kinds,
        [SVC_ATTR_AF, SVC_ATTR_PROTOCOL, SVC_ATTR_ADDR, SVC_ATTR_PORT]
    );
}

#[test]
fn bad_scheduler_names_and_netmasks_are_refused_before_sending() {
    for name in ["", "a-very-long-scheduler", "r\0r"] {
        let vs = VirtualServer::new(Protocol::Tcp, v4("10.0.0.1"), 80, name);
        assert!(matches!(
            service(CMD_NEW_SERVICE, &vs, true),
            Err(IpvsError::Invalid(_))
        ));
    }
    let vs = VirtualServer {
        netmask: 33,
        ..VirtualServer::new(Protocol::Tcp, v4("10.0.0.1"), 80, "rr")
    };
    assert!(service(CMD_NEW_SERVICE, &vs, true).is_err());
    // Deleting does not look at the scheduler.
    let vs = VirtualServer::new(Protocol::Tcp, v4("10.0.0.1"), 80, "");
    assert!(service(CMD_DEL_SERVICE, &vs, false).is_ok());
}

#[test]
fn a_destination_request_names_its_service_and_itself() {
    let rs = RealServer::new("fd00::2".parse().unwrap(), 8443, 0);
    let vs = VirtualServer::new(Protocol::Sctp, "fd00::1".parse().unwrap(), 443, "rr");
    let b = destination(CMD_SET_DEST, &vs, &rs, true)
        .unwrap()
        .into_bytes();
    let (_, top) = genl_reply(&b).unwrap();
    let svc = top.nested(CMD_ATTR_SERVICE, "svc").unwrap();
    assert_eq!(svc.u16(SVC_ATTR_PROTOCOL, "p").unwrap(), 132);
    assert!(svc.get(SVC_ATTR_SCHED_NAME).is_none());
    let d = top.nested(CMD_ATTR_DEST, "dest").unwrap();
    assert_eq!(
        d.get(DEST_ATTR_ADDR).unwrap(),
        rs.address.to_string().parse::<Ipv6Addr>().unwrap().octets()
    );
    assert_eq!(d.be16(DEST_ATTR_PORT, "port").unwrap(), 8443);
    assert_eq!(d.u16(DEST_ATTR_ADDR_FAMILY, "af").unwrap(), 10);
    assert_eq!(d.u32(DEST_ATTR_FWD_METHOD, "fwd").unwrap(), 0);
    assert_eq!(d.u32(DEST_ATTR_WEIGHT, "weight").unwrap(), 0);
    assert_eq!(d.u32(DEST_ATTR_U_THRESH, "u").unwrap(), 0);
    assert_eq!(d.u32(DEST_ATTR_L_THRESH, "l").unwrap(), 0);

    let b = destination(CMD_DEL_DEST, &vs, &rs, false)
        .unwrap()
        .into_bytes();
    let (_, top) = genl_reply(&b).unwrap();
    assert!(top
        .nested(CMD_ATTR_DEST, "dest")
        .unwrap()
        .get(DEST_ATTR_WEIGHT)
        .is_none());
}

/// A `GET_SERVICE` dump message as Linux writes it (ip_vs_genl_fill_service): the
/// hashed flag set, the whole mask, a zero fwmark, statistics nests.
fn kernel_service(fwmark: u32, flags: u32, timeout: u32) -> Vec<u8> {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&[10, 0, 0, 7]);
    let mut w = Writer::new(CMD_NEW_SERVICE, 1);
    w.nest(CMD_ATTR_SERVICE, |w| {
        w.put_u16(SVC_ATTR_AF, 2)
            .put_u16(SVC_ATTR_PROTOCOL, 17)
            .put(SVC_ATTR_ADDR, &addr)
            .put_be16(SVC_ATTR_PORT, 5353)
            .put_u32(SVC_ATTR_FWMARK, fwmark)
            .put_str(SVC_ATTR_SCHED_NAME, "mh")
            .put(
                SVC_ATTR_FLAGS,
                &[flags.to_ne_bytes(), u32::MAX.to_ne_bytes()].concat(),
            )
            .put_u32(SVC_ATTR_TIMEOUT, timeout)
            .put(SVC_ATTR_NETMASK, &[255, 255, 255, 255])
            .nest(10, |w| {
                w.put_u32(1, 3).put_u32(2, 4);
            })
            .nest(12, |w| {
                w.put(1, &7u64.to_ne_bytes());
            });
    });
    w.into_bytes()
}

#[test]
fn a_dumped_service_reads_back_as_written() {
    let flags = SVC_F_HASHED | SVC_F_PERSISTENT | SVC_F_SCHED_MH_FALLBACK | SVC_F_ONEPACKET;
    let b = kernel_service(0, flags, 600);
    let (cmd, a) = genl_reply(&b).unwrap();
    assert_eq!(cmd, CMD_NEW_SERVICE);
    let vs = parse_service(&a).unwrap().unwrap();
    assert_eq!(
        vs,
        VirtualServer {
            flags: SVC_F_SCHED_MH_FALLBACK | SVC_F_ONEPACKET,
            persistence_timeout: Some(600),
            ..VirtualServer::new(Protocol::Udp, v4("10.0.0.7"), 5353, "mh")
        }
    );
    // Without the persistent flag the timeout is not persistence.
    let b = kernel_service(0, SVC_F_HASHED, 0);
    let vs = parse_service(&genl_reply(&b).unwrap().1).unwrap().unwrap();
    assert_eq!(vs.persistence_timeout, None);
    assert_eq!(vs.flags, 0);
}

#[test]
fn a_written_service_parses_back_to_itself() {
    for vs in [
        persistent_v4(),
        VirtualServer {
            flags: SVC_F_SCHED_MH_PORT,
            netmask: 64,
            ..VirtualServer::new(Protocol::Sctp, "2001:db8::5".parse().unwrap(), 9, "mh")
        },
    ] {
        let b = service(CMD_NEW_SERVICE, &vs, true).unwrap().into_bytes();
        let back = parse_service(&genl_reply(&b).unwrap().1).unwrap().unwrap();
        assert_eq!(back, vs);
    }
}

#[test]
fn firewall_mark_services_are_left_out() {
    let b = kernel_service(42, SVC_F_HASHED, 0);
    assert_eq!(parse_service(&genl_reply(&b).unwrap().1).unwrap(), None);
}

#[test]
fn every_truncation_of_a_reply_is_an_error_never_a_panic() {
    let b = kernel_service(0, SVC_F_HASHED, 0);
    for n in 0..b.len() {
        let r = genl_reply(&b[..n]).and_then(|(_, a)| parse_service(&a));
        assert!(r.is_err(), "{n} of {} bytes parsed: {r:?}", b.len());
    }
}

#[test]
fn corrupted_replies_never_panic() {
    // A small deterministic generator: every byte position of each reply gets several wrong
    // values, and every reader is tried on each result.
    let mut state = 0x2545_f491_u32;
    for good in [
        kernel_service(0, SVC_F_HASHED | SVC_F_PERSISTENT, 5),
        kernel_dest(true),
    ] {
        for pos in 0..good.len() {
            for _ in 0..8 {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let mut b = good.clone();
                b[pos] = state as u8;
                let _ = genl_reply(&b).and_then(|(_, a)| parse_service(&a));
                let _ = genl_reply(&b).and_then(|(_, a)| parse_destination(&a, Family::V4));
                let _ = genl_reply(&b).and_then(|(_, a)| parse_timeouts(&a));
                let _ = genl_reply(&b).and_then(|(_, a)| parse_version(&a));
            }
        }
    }
}

#[test]
fn unknown_protocols_and_families_are_errors() {
    let mut w = Writer::new(CMD_NEW_SERVICE, 1);
    w.nest(CMD_ATTR_SERVICE, |w| {
        w.put_u16(SVC_ATTR_AF, 2).put_u16(SVC_ATTR_PROTOCOL, 1);
    });
    let b = w.into_bytes();
    assert!(parse_service(&genl_reply(&b).unwrap().1).is_err());
    let mut w = Writer::new(CMD_NEW_SERVICE, 1);
    w.nest(CMD_ATTR_SERVICE, |w| {
        w.put_u16(SVC_ATTR_AF, 7).put_u16(SVC_ATTR_PROTOCOL, 6);
    });
    let b = w.into_bytes();
    assert!(parse_service(&genl_reply(&b).unwrap().1).is_err());
}

/// A `GET_DEST` dump message as Linux writes it (ip_vs_genl_fill_dest).
fn kernel_dest(with_family: bool) -> Vec<u8> {
    let mut w = Writer::new(CMD_NEW_DEST, 1);
    w.nest(CMD_ATTR_DEST, |w| {
        w.put(
            DEST_ATTR_ADDR,
            &"fd00::9".parse::<Ipv6Addr>().unwrap().octets(),
        )
        .put_be16(DEST_ATTR_PORT, 8080)
        .put_u32(DEST_ATTR_FWD_METHOD, 0)
        .put_u32(DEST_ATTR_WEIGHT, 0)
        .put(13, &[0])
        .put_be16(14, 0)
        .put_u16(15, 0)
        .put_u32(DEST_ATTR_U_THRESH, 100)
        .put_u32(DEST_ATTR_L_THRESH, 10)
        .put_u32(DEST_ATTR_ACTIVE_CONNS, 3)
        .put_u32(DEST_ATTR_INACT_CONNS, 2)
        .put_u32(DEST_ATTR_PERSIST_CONNS, 1);
        if with_family {
            w.put_u16(DEST_ATTR_ADDR_FAMILY, 10);
        }
        w.nest(10, |w| {
            w.put_u32(1, 3);
        });
    });
    w.into_bytes()
}

#[test]
fn a_dumped_destination_reads_back_with_its_counts() {
    for with_family in [true, false] {
        let b = kernel_dest(with_family);
        let rs = parse_destination(&genl_reply(&b).unwrap().1, Family::V6).unwrap();
        assert_eq!(
            rs,
            RealServer {
                upper_threshold: 100,
                lower_threshold: 10,
                connections: Connections {
                    active: 3,
                    inactive: 2,
                    persistent: 1
                },
                ..RealServer::new("fd00::9".parse().unwrap(), 8080, 0)
            }
        );
    }
    let b = kernel_dest(true);
    for n in 0..b.len() {
        assert!(genl_reply(&b[..n])
            .and_then(|(_, a)| parse_destination(&a, Family::V6))
            .is_err());
    }
}

#[test]
fn an_unknown_forwarding_method_is_an_error() {
    let mut w = Writer::new(CMD_NEW_DEST, 1);
    w.nest(CMD_ATTR_DEST, |w| {
        w.put(DEST_ATTR_ADDR, &[0; 16])
            .put_u32(DEST_ATTR_FWD_METHOD, 4);
    });
    let b = w.into_bytes();
    assert!(parse_destination(&genl_reply(&b).unwrap().1, Family::V4).is_err());
}

#[test]
fn timeouts_and_version_read_from_their_replies() {
    let t = Timeouts {
        tcp: 900,
        tcp_fin: 120,
        udp: 300,
    };
    let b = set_timeouts(&t).into_bytes();
    let (cmd, a) = genl_reply(&b).unwrap();
    assert_eq!(cmd, CMD_SET_CONFIG);
    assert_eq!(parse_timeouts(&a).unwrap(), t);

    let mut w = Writer::new(CMD_GET_INFO, 1);
    w.put_u32(INFO_ATTR_VERSION, 0x010201).put_u32(2, 4096);
    let b = w.into_bytes();
    let v = parse_version(&genl_reply(&b).unwrap().1).unwrap();
    assert_eq!(v.to_string(), "1.2.1");
}
