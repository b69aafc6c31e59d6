//! kpr's IPVS client ([`kpr::ipvs`]) against the kernel: virtual and real servers written,
//! read back and compared, in both families, over TCP, UDP and SCTP, with the rr, sh and mh
//! schedulers. Root and a kernel with IPVS (`ip_vs`) only: the host's kernel has none, so
//! these are ignored there and run in the VM stage; run without IPVS they fail, saying so.
//!
//! Safety: IPVS state is per network namespace, and every test programs only namespaces of
//! its own (`kpr-ipvs-<pid>-<n>`, deleted on drop, which also drops their IPVS tables): the
//! client is opened on a thread inside the namespace, and its socket stays there.

use std::collections::BTreeSet;
use std::net::IpAddr;

use kpr::ipvs::{
    Ipvs, IpvsError, RealServer, Timeouts, VirtualServer, SVC_F_SCHED_MH_FALLBACK,
    SVC_F_SCHED_MH_PORT, SVC_F_SCHED_SH_FALLBACK, SVC_F_SCHED_SH_PORT,
};
use kpr::model::Protocol;
use kpr_lab::TestNetns;

/// A fresh namespace and an IPVS client inside it; fails, saying why, without root or IPVS.
#[track_caller]
fn ipvs_in_netns() -> (TestNetns, Ipvs) {
    kpr_lab::preconditions::require("the IPVS netlink tests", &["ip"]);
    let ns = TestNetns::new("kpr-ipvs");
    match ns.run(Ipvs::open) {
        Ok(ipvs) => (ns, ipvs),
        Err(e) => panic!(
            "these tests need a kernel with IPVS (they run in the VM stage, which loads ip_vs, \
             ip_vs_rr, ip_vs_sh and ip_vs_mh): {e}"
        ),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn vs(protocol: Protocol, address: &str, port: u16, scheduler: &str) -> VirtualServer {
    VirtualServer::new(protocol, ip(address), port, scheduler)
}

fn sorted<T: std::fmt::Debug>(items: Vec<T>) -> Vec<String> {
    let mut out: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
    out.sort();
    out
}

/// Adds `services`, checks the kernel lists exactly them, then updates each with `change`
/// and checks again, then deletes the first and checks the rest remain.
fn round_trip(ipvs: &Ipvs, services: Vec<VirtualServer>, change: impl Fn(&mut VirtualServer)) {
    for s in &services {
        ipvs.add_service(s).unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(sorted(ipvs.services().unwrap()), sorted(services.clone()));

    let mut changed = services.clone();
    for s in &mut changed {
        change(s);
        ipvs.update_service(s).unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(sorted(ipvs.services().unwrap()), sorted(changed.clone()));

    ipvs.delete_service(&changed[0]).unwrap();
    assert_eq!(
        sorted(ipvs.services().unwrap()),
        sorted(changed[1..].to_vec())
    );
}

#[test]
#[ignore = "needs a kernel with IPVS (ip_vs): runs in the VM stage"]
fn ipv4_virtual_servers_read_back_as_written_and_updated() {
    let (_ns, ipvs) = ipvs_in_netns();
    let services = vec![
        vs(Protocol::Tcp, "10.96.0.1", 443, "rr"),
        VirtualServer {
            flags: SVC_F_SCHED_SH_FALLBACK | SVC_F_SCHED_SH_PORT,
            ..vs(Protocol::Udp, "10.96.0.10", 53, "sh")
        },
        VirtualServer {
            flags: SVC_F_SCHED_MH_FALLBACK,
            persistence_timeout: Some(10_800),
            ..vs(Protocol::Sctp, "10.96.0.20", 9000, "mh")
        },
        // The same address and port over another protocol is another virtual server.
        vs(Protocol::Udp, "10.96.0.1", 443, "rr"),
    ];
    round_trip(&ipvs, services, |s| {
        s.scheduler = if s.scheduler == "rr" { "mh" } else { "rr" }.into();
        s.flags = if s.scheduler == "mh" {
            SVC_F_SCHED_MH_PORT
        } else {
            0
        };
        s.persistence_timeout = match s.persistence_timeout {
            Some(_) => None,
            None => Some(300),
        };
        s.netmask = 24;
    });
}

#[test]
#[ignore = "needs a kernel with IPVS (ip_vs): runs in the VM stage"]
fn ipv6_virtual_servers_read_back_as_written_and_updated() {
    let (_ns, ipvs) = ipvs_in_netns();
    let services = vec![
        vs(Protocol::Tcp, "fd00:10:96::1", 443, "rr"),
        VirtualServer {
            flags: SVC_F_SCHED_SH_FALLBACK,
            persistence_timeout: Some(60),
            ..vs(Protocol::Udp, "fd00:10:96::a", 53, "sh")
        },
        VirtualServer {
            flags: SVC_F_SCHED_MH_FALLBACK | SVC_F_SCHED_MH_PORT,
            ..vs(Protocol::Sctp, "2001:db8::20", 9000, "mh")
        },
        // An IPv4 virtual server next to the IPv6 ones.
        vs(Protocol::Tcp, "10.96.0.1", 443, "rr"),
    ];
    round_trip(&ipvs, services, |s| {
        s.scheduler = "sh".into();
        s.flags = SVC_F_SCHED_SH_PORT;
        s.persistence_timeout = Some(s.persistence_timeout.unwrap_or(0) + 120);
        if s.address.is_ipv6() {
            s.netmask = 64;
        }
    });
}

/// Adds `backends` to a fresh `service`, drains one (weight 0), changes another's limits,
/// deletes a third, comparing the kernel's list at each step.
fn real_servers_round_trip(ipvs: &Ipvs, service: VirtualServer, backends: &[&str]) {
    ipvs.add_service(&service).unwrap();
    let mut want: Vec<RealServer> = backends
        .iter()
        .enumerate()
        .map(|(i, a)| RealServer::new(ip(a), 8080 + i as u16, 1 + i as u32))
        .collect();
    for rs in &want {
        ipvs.add_destination(&service, rs)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(
        sorted(ipvs.destinations(&service).unwrap()),
        sorted(want.clone())
    );

    want[0].weight = 0;
    want[1].upper_threshold = 1000;
    want[1].lower_threshold = 100;
    want[1].weight = 7;
    for rs in &want[..2] {
        ipvs.update_destination(&service, rs)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(
        sorted(ipvs.destinations(&service).unwrap()),
        sorted(want.clone())
    );

    let gone = want.remove(2);
    ipvs.delete_destination(&service, &gone).unwrap();
    assert_eq!(
        sorted(ipvs.destinations(&service).unwrap()),
        sorted(want.clone())
    );
    // Nothing has connected, so nothing is counted.
    assert!(ipvs
        .destinations(&service)
        .unwrap()
        .iter()
        .all(|rs| rs.connections == Default::default()));
}

#[test]
#[ignore = "needs a kernel with IPVS (ip_vs): runs in the VM stage"]
fn ipv4_real_servers_read_back_as_written_drained_and_deleted() {
    let (_ns, ipvs) = ipvs_in_netns();
    let backends = ["10.244.1.2", "10.244.1.3", "10.244.2.2", "10.244.2.3"];
    real_servers_round_trip(&ipvs, vs(Protocol::Tcp, "10.96.0.1", 80, "rr"), &backends);
    real_servers_round_trip(&ipvs, vs(Protocol::Udp, "10.96.0.1", 53, "sh"), &backends);
    let persistent = VirtualServer {
        persistence_timeout: Some(10_800),
        ..vs(Protocol::Sctp, "10.96.0.2", 80, "mh")
    };
    real_servers_round_trip(&ipvs, persistent, &backends);
    assert_eq!(ipvs.services().unwrap().len(), 3);
}

#[test]
#[ignore = "needs a kernel with IPVS (ip_vs): runs in the VM stage"]
fn ipv6_real_servers_read_back_as_written_drained_and_deleted() {
    let (_ns, ipvs) = ipvs_in_netns();
    let backends = ["fd00:244::2", "fd00:244::3", "fd00:244:1::2"];
    real_servers_round_trip(&ipvs, vs(Protocol::Tcp, "fd00:96::1", 80, "rr"), &backends);
    real_servers_round_trip(&ipvs, vs(Protocol::Udp, "fd00:96::1", 53, "mh"), &backends);
    real_servers_round_trip(&ipvs, vs(Protocol::Sctp, "fd00:96::2", 80, "sh"), &backends);
}

#[test]
#[ignore = "needs a kernel with IPVS (ip_vs): runs in the VM stage"]
fn refusals_say_whether_the_object_exists() {
    let (_ns, ipvs) = ipvs_in_netns();
    let s = vs(Protocol::Tcp, "10.96.0.1", 80, "rr");
    let rs = RealServer::new(ip("10.244.0.5"), 8080, 1);

    let e = ipvs.delete_service(&s).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let e = ipvs.update_service(&s).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let e = ipvs.add_destination(&s, &rs).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(e.to_string().contains("10.96.0.1:80"), "{e}");
    assert_eq!(ipvs.destinations(&s).unwrap(), []);

    ipvs.add_service(&s).unwrap();
    let e = ipvs.add_service(&s).unwrap_err();
    assert!(e.is_exists(), "{e}");
    let e = ipvs.delete_destination(&s, &rs).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let e = ipvs.update_destination(&s, &rs).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    ipvs.add_destination(&s, &rs).unwrap();
    let e = ipvs.add_destination(&s, &rs).unwrap_err();
    assert!(e.is_exists(), "{e}");

    // A scheduler the kernel has no module for.
    let e = ipvs
        .add_service(&vs(Protocol::Tcp, "10.96.0.2", 80, "nosuch"))
        .unwrap_err();
    assert!(matches!(e, IpvsError::Kernel { .. }), "{e}");
}

#[test]
#[ignore = "needs a kernel with IPVS (ip_vs): runs in the VM stage"]
fn flush_deletes_every_virtual_server_and_its_real_servers() {
    let (_ns, ipvs) = ipvs_in_netns();
    for (i, addr) in ["10.96.0.1", "fd00::1"].iter().enumerate() {
        let s = vs(Protocol::Tcp, addr, 80 + i as u16, "rr");
        ipvs.add_service(&s).unwrap();
        let backend = if s.address.is_ipv4() {
            "10.244.0.2"
        } else {
            "fd00::2"
        };
        ipvs.add_destination(&s, &RealServer::new(ip(backend), 8080, 1))
            .unwrap();
    }
    assert_eq!(ipvs.services().unwrap().len(), 2);
    ipvs.flush().unwrap();
    assert_eq!(ipvs.services().unwrap(), []);
    // Flushing nothing is fine.
    ipvs.flush().unwrap();
}

#[test]
#[ignore = "needs a kernel with IPVS (ip_vs): runs in the VM stage"]
fn timeouts_read_back_and_zero_leaves_one_as_it_is() {
    let (_ns, ipvs) = ipvs_in_netns();
    let set = Timeouts {
        tcp: 1_000,
        tcp_fin: 130,
        udp: 310,
    };
    ipvs.set_timeouts(&set).unwrap();
    assert_eq!(ipvs.timeouts().unwrap(), set);
    ipvs.set_timeouts(&Timeouts {
        tcp: 0,
        tcp_fin: 0,
        udp: 60,
    })
    .unwrap();
    assert_eq!(ipvs.timeouts().unwrap(), Timeouts { udp: 60, ..set });
}

#[test]
#[ignore = "needs a kernel with IPVS (ip_vs): runs in the VM stage"]
fn version_is_the_kernels() {
    let (_ns, ipvs) = ipvs_in_netns();
    let v = ipvs.version().unwrap();
    assert_eq!((v.major, v.minor), (1, 2), "{v}");
}

#[test]
#[ignore = "needs a kernel with IPVS (ip_vs): runs in the VM stage"]
fn long_lists_span_several_dump_messages() {
    let (_ns, ipvs) = ipvs_in_netns();
    // Hundreds of entries do not fit one reply buffer of the kernel's dump.
    let services: Vec<VirtualServer> = (0..600u16)
        .map(|i| {
            let address = IpAddr::from([10, 96, (i >> 8) as u8, i as u8]);
            VirtualServer::new(Protocol::Tcp, address, 80, "rr")
        })
        .collect();
    for s in &services {
        ipvs.add_service(s).unwrap();
    }
    let listed: BTreeSet<String> = ipvs
        .services()
        .unwrap()
        .iter()
        .map(|s| format!("{s:?}"))
        .collect();
    assert_eq!(listed.len(), services.len());
    assert_eq!(listed, services.iter().map(|s| format!("{s:?}")).collect());

    let s = &services[0];
    let backends: Vec<RealServer> = (0..400u16)
        .map(|i| RealServer::new(IpAddr::from([10, 244, (i >> 8) as u8, i as u8]), 8080, 1))
        .collect();
    for rs in &backends {
        ipvs.add_destination(s, rs).unwrap();
    }
    assert_eq!(sorted(ipvs.destinations(s).unwrap()), sorted(backends));
}

#[test]
#[ignore = "needs a kernel with IPVS (ip_vs): runs in the VM stage"]
fn each_namespace_has_its_own_virtual_servers() {
    let (ns_a, a) = ipvs_in_netns();
    let (_ns_b, b) = ipvs_in_netns();
    let s = vs(Protocol::Tcp, "10.96.7.7", 8443, "rr");
    a.add_service(&s).unwrap();
    assert_eq!(a.services().unwrap(), std::slice::from_ref(&s));
    assert_eq!(b.services().unwrap(), []);

    // The kernel's own listing of namespace a shows it (0A600707:20FB is 10.96.7.7:8443).
    let out = ns_a.exec(&["cat", "/proc/net/ip_vs"], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("TCP  0A600707:20FB rr"), "{text}");
    // The namespace this test runs in is not touched.
    let here = std::fs::read_to_string("/proc/net/ip_vs").unwrap_or_default();
    assert!(!here.contains("0A600707:20FB"), "{here}");
}

/// An address as /proc/net/ip_vs prints it: IPv4 as 8 hex digits, IPv6 in full, bracketed.
fn proc_addr(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{:08X}:{port:04X}", u32::from(v4)),
        IpAddr::V6(v6) => {
            let groups: Vec<String> = v6.segments().iter().map(|g| format!("{g:04x}")).collect();
            format!("[{}]:{port:04X}", groups.join(":"))
        }
    }
}

#[test]
#[ignore = "needs a kernel with IPVS (ip_vs): runs in the VM stage"]
fn the_kernels_proc_listing_shows_what_netlink_wrote() {
    let (ns, ipvs) = ipvs_in_netns();
    // Persistence with a /24 netmask (the byte order of an IPv4 mask shows here), one-packet
    // scheduling, a drained real server, and IPv6.
    let persistent = VirtualServer {
        persistence_timeout: Some(600),
        netmask: 24,
        ..vs(Protocol::Tcp, "10.96.0.20", 9000, "sh")
    };
    let one_packet = VirtualServer {
        flags: kpr::ipvs::SVC_F_ONEPACKET,
        ..vs(Protocol::Udp, "10.96.0.10", 53, "rr")
    };
    let v6 = vs(Protocol::Tcp, "fd00::1", 80, "mh");
    let drained = RealServer::new(ip("10.244.1.2"), 8080, 0);
    let weighted = RealServer::new(ip("10.244.1.3"), 8081, 3);
    let v6_backend = RealServer::new(ip("fd00::2"), 8080, 1);
    for s in [&persistent, &one_packet, &v6] {
        ipvs.add_service(s).unwrap();
    }
    ipvs.add_destination(&persistent, &drained).unwrap();
    ipvs.add_destination(&persistent, &weighted).unwrap();
    ipvs.add_destination(&v6, &v6_backend).unwrap();

    let out = ns.exec(&["cat", "/proc/net/ip_vs"], None);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let text = lines.join("\n");
    let has = |want: &str| lines.iter().any(|l| l.starts_with(want));
    let pa = |s: &VirtualServer| proc_addr(s.address, s.port);
    let ra = |r: &RealServer| proc_addr(r.address, r.port);

    let head = format!("TCP {} sh persistent ", pa(&persistent));
    let line = lines.iter().find(|l| l.starts_with(&head));
    assert!(
        line.is_some_and(|l| l.ends_with(" FFFFFF00")),
        "no {head}… FFFFFF00 in\n{text}"
    );
    assert!(has(&format!("UDP {} rr ops", pa(&one_packet))), "{text}");
    assert!(has(&format!("TCP {} mh", pa(&v6))), "{text}");
    assert!(has(&format!("-> {} Masq 0 0 0", ra(&drained))), "{text}");
    assert!(has(&format!("-> {} Masq 3 0 0", ra(&weighted))), "{text}");
    assert!(has(&format!("-> {} Masq 1 0 0", ra(&v6_backend))), "{text}");
}
