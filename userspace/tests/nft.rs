//! kpr's nftables table ([`kpr::nft`]) against the kernel. Root only (fails otherwise).
//!
//! Safety: nothing here touches the root network namespace's netfilter tables. Every test
//! creates its own network namespaces (`kpr-nft-<pid>-<n>`, deleted on drop) and runs kpr's
//! netlink code on a thread that joined one of them (`setns`): a netlink socket opened there
//! stays in that namespace. The ruleset is read back with `ip netns exec NS nft -j list`.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kpr::nft::{self, NftTable, DEFAULT_MASQ_MARK};
use serde_json::Value;

/// Network namespaces and nftables need root; fails (never passes untested) when
/// not root or a tool is missing.
#[track_caller]
fn require() {
    kpr_lab::preconditions::require("the nftables tests", &["ip", "nft"]);
}

const TCP: u8 = 6;
const UDP: u8 = 17;

/// A named network namespace of this test process, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "kpr-nft-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS <args>`, which must succeed.
    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// `ip netns exec NS <args>`, its output whatever the exit status.
    fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("running ip netns exec")
    }

    /// Runs `f` on a thread that joined this namespace (the calling thread stays where it is).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        std::thread::scope(|s| {
            s.spawn(move || {
                let before = netns_id();
                // SAFETY: a valid namespace fd; only this thread changes namespace.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
                // Never run the code under test outside the test namespace.
                assert_ne!(netns_id(), before, "setns({path}) did not switch namespace");
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// `nft -j list table ip kpr` in this namespace; None if there is no such table.
    fn kpr_table(&self) -> Option<Value> {
        self.list_table("kpr")
    }

    fn list_table(&self, name: &str) -> Option<Value> {
        let out = self.exec(&["nft", "-j", "list", "table", "ip", name]);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("No such file or directory"),
                "nft list table ip {name}: {err}"
            );
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).expect("nft -j output is JSON"))
    }

    /// `nft list table ip kpr` (text), for messages.
    fn kpr_table_text(&self) -> String {
        let out = self.exec(&["nft", "list", "table", "ip", "kpr"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Creates `table ip other` with a chain and a rule, as another program would.
    fn add_other_table(&self) {
        let out = self.exec(&[
            "nft",
            "add table ip other; add chain ip other c { type filter hook input priority 0; }; \
             add rule ip other c tcp dport 9 counter accept",
        ]);
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The calling thread's network namespace (inode of /proc/thread-self/ns/net).
fn netns_id() -> String {
    std::fs::read_link("/proc/thread-self/ns/net")
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The objects of `nft -j list` output of a given kind ("chain", "set", "rule").
fn objects<'a>(json: &'a Value, kind: &str) -> Vec<&'a Value> {
    json["nftables"]
        .as_array()
        .expect("nftables array")
        .iter()
        .filter_map(|o| o.get(kind))
        .collect()
}

fn chain<'a>(json: &'a Value, name: &str) -> &'a Value {
    objects(json, "chain")
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no chain {name} in {json}"))
}

fn rules<'a>(json: &'a Value, chain: &str) -> Vec<&'a Value> {
    objects(json, "rule")
        .into_iter()
        .filter(|r| r["chain"] == chain)
        .collect()
}

/// The no-endpoints set's elements as (address, protocol name, port).
fn elements(json: &Value) -> BTreeSet<(String, String, u64)> {
    let set = objects(json, "set")
        .into_iter()
        .find(|s| s["name"] == "no-endpoints")
        .unwrap_or_else(|| panic!("no set no-endpoints in {json}"));
    let Some(elems) = set.get("elem") else {
        return BTreeSet::new();
    };
    elems
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let c = e["concat"]
                .as_array()
                .unwrap_or_else(|| panic!("element {e} is not a concatenation"));
            (
                c[0].as_str().unwrap().to_string(),
                c[1].as_str().unwrap().to_string(),
                c[2].as_u64().unwrap(),
            )
        })
        .collect()
}

fn elem(addr: &str, proto: &str, port: u64) -> (String, String, u64) {
    (addr.to_string(), proto.to_string(), port)
}

/// The JSON of a rule's expressions, compact, for substring checks.
fn exprs(rule: &Value) -> String {
    rule["expr"].to_string()
}

/// `ip daddr . meta l4proto . th dport @no-endpoints`, as nft shows it (`tcp dport` when the
/// rule already requires TCP).
fn assert_lookup(rule: &Value, dport_proto: &str) {
    let want = serde_json::json!({"match": {
        "left": {"concat": [
            {"payload": {"field": "daddr", "protocol": "ip"}},
            {"meta": {"key": "l4proto"}},
            {"payload": {"field": "dport", "protocol": dport_proto}},
        ]},
        "op": "==",
        "right": "@no-endpoints",
    }});
    assert_eq!(rule["expr"][0], want, "{rule}");
}

fn assert_kpr_structure(json: &Value, mark: u64) {
    for (name, kind, hook, prio) in [
        ("nat-postrouting", "nat", "postrouting", 100),
        ("filter-input", "filter", "input", 0),
        ("filter-forward", "filter", "forward", 0),
    ] {
        let c = chain(json, name);
        assert_eq!(c["family"], "ip", "{c}");
        assert_eq!(c["table"], "kpr", "{c}");
        assert_eq!(c["type"], kind, "{c}");
        assert_eq!(c["hook"], hook, "{c}");
        assert_eq!(c["prio"], prio, "{c}");
        assert_eq!(c["policy"], "accept", "{c}");
    }
    assert_eq!(objects(json, "chain").len(), 3, "{json}");
    assert_eq!(objects(json, "set").len(), 1, "{json}");
    let set = objects(json, "set")[0];
    assert_eq!(
        set["type"],
        serde_json::json!(["ipv4_addr", "inet_proto", "inet_service"]),
        "{set}"
    );

    // meta mark & M == M [meta l4proto P] meta mark set meta mark ^ M masquerade [to :PORTS]
    // fully-random: TCP and UDP masquerade above the NodePort range, anything else as is.
    let nat = rules(json, "nat-postrouting");
    assert_eq!(nat.len(), 3, "{json}");
    let marked = serde_json::json!(
        {"match": {"left": {"&": [{"meta": {"key": "mark"}}, mark]}, "op": "==", "right": mark}}
    );
    let clear = serde_json::json!(
        {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"^": [{"meta": {"key": "mark"}}, mark]}}}
    );
    let (min, max) = kpr::nft::MASQUERADE_PORTS;
    for (rule, proto) in nat.iter().zip(["tcp", "udp"]) {
        let want = serde_json::json!([
            marked,
            {"match": {"left": {"meta": {"key": "l4proto"}}, "op": "==", "right": proto}},
            clear,
            {"masquerade": {"flags": "fully-random", "port": {"range": [min, max]}}},
        ]);
        assert_eq!(rule["expr"], want, "{}", exprs(rule));
    }
    let want = serde_json::json!([marked, clear, {"masquerade": {"flags": "fully-random"}}]);
    assert_eq!(nat[2]["expr"], want, "{}", exprs(nat[2]));

    for name in ["filter-input", "filter-forward"] {
        let r = rules(json, name);
        assert_eq!(r.len(), 2, "{name}: {json}");
        // TCP: a reset.
        assert_lookup(r[0], "tcp");
        assert_eq!(
            r[0]["expr"][1],
            serde_json::json!({"reject": {"type": "tcp reset"}}),
            "{}",
            exprs(r[0])
        );
        // The rest: ICMP port unreachable.
        assert_lookup(r[1], "th");
        assert_eq!(
            r[1]["expr"][1],
            serde_json::json!({"reject": {"type": "icmp", "expr": "port-unreachable"}}),
            "{}",
            exprs(r[1])
        );
    }
}

/// Handles of the table's chains and rules (they change only if they are recreated).
fn handles(json: &Value) -> Vec<(String, u64)> {
    let mut h = Vec::new();
    for kind in ["table", "chain", "set", "rule"] {
        for o in objects(json, kind) {
            h.push((kind.to_string(), o["handle"].as_u64().unwrap()));
        }
    }
    h
}

#[test]
fn apply_creates_the_table_chains_set_and_rules() {
    require();
    let ns = Netns::new();
    assert!(ns.kpr_table().is_none());
    ns.run(|| {
        NftTable::new(DEFAULT_MASQ_MARK)
            .apply(&[
                (IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)), TCP, 80),
                (IpAddr::V4(Ipv4Addr::new(10, 96, 0, 2)), UDP, 53),
                (IpAddr::V4(Ipv4Addr::new(10, 96, 0, 2)), TCP, 53),
                (IpAddr::V4(Ipv4Addr::new(192, 168, 7, 9)), 132, 3868),
                // A duplicate is one element.
                (IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)), TCP, 80),
            ])
            .unwrap()
    });
    let json = ns.kpr_table().expect("table ip kpr exists");
    assert_kpr_structure(&json, 0x4000);
    assert_eq!(
        elements(&json),
        BTreeSet::from([
            elem("10.96.0.1", "tcp", 80),
            elem("10.96.0.2", "udp", 53),
            elem("10.96.0.2", "tcp", 53),
            elem("192.168.7.9", "sctp", 3868),
        ]),
        "{}",
        ns.kpr_table_text()
    );

    // The mark is a parameter.
    let ns2 = Netns::new();
    ns2.run(|| NftTable::new(0x20_0000).apply(&[]).unwrap());
    let json = ns2.kpr_table().unwrap();
    assert_kpr_structure(&json, 0x20_0000);
    assert!(elements(&json).is_empty());
}

#[test]
fn later_applies_replace_the_elements_in_place() {
    require();
    let ns = Netns::new();
    let a = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1));
    let b = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 2));
    let mut table = NftTable::new(DEFAULT_MASQ_MARK);
    ns.run(|| table.apply(&[(a, TCP, 80), (b, TCP, 443)]).unwrap());
    let first = ns.kpr_table().unwrap();
    assert_eq!(
        elements(&first),
        BTreeSet::from([elem("10.96.0.1", "tcp", 80), elem("10.96.0.2", "tcp", 443)])
    );

    // One element kept, one removed, two added.
    ns.run(|| {
        table
            .apply(&[(b, TCP, 443), (b, UDP, 53), (a, TCP, 8080)])
            .unwrap()
    });
    let second = ns.kpr_table().unwrap();
    assert_eq!(
        elements(&second),
        BTreeSet::from([
            elem("10.96.0.2", "tcp", 443),
            elem("10.96.0.2", "udp", 53),
            elem("10.96.0.1", "tcp", 8080),
        ]),
        "{}",
        ns.kpr_table_text()
    );
    // Only the set's elements changed: table, chains, set and rules are the same objects.
    assert_eq!(handles(&first), handles(&second));
    assert_kpr_structure(&second, 0x4000);

    // Empty.
    ns.run(|| table.apply(&[]).unwrap());
    let third = ns.kpr_table().unwrap();
    assert!(elements(&third).is_empty(), "{}", ns.kpr_table_text());
    assert_eq!(handles(&first), handles(&third));

    // Deleted behind kpr's back: the next apply recreates it.
    assert!(ns.exec(&["nft", "delete table ip kpr"]).status.success());
    ns.run(|| table.apply(&[(a, UDP, 53)]).unwrap());
    let json = ns.kpr_table().unwrap();
    assert_kpr_structure(&json, 0x4000);
    assert_eq!(
        elements(&json),
        BTreeSet::from([elem("10.96.0.1", "udp", 53)])
    );
}

/// A new NftTable (a restarted agent) replaces a stale kpr table, whatever it holds.
#[test]
fn first_apply_replaces_a_stale_table() {
    require();
    let ns = Netns::new();
    let out = ns.exec(&[
        "nft",
        "add table ip kpr; add chain ip kpr junk; add rule ip kpr junk counter; \
         add set ip kpr no-endpoints { type ipv4_addr . inet_proto . inet_service; }; \
         add element ip kpr no-endpoints { 10.1.1.1 . tcp . 1 }",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ns.run(|| {
        NftTable::new(DEFAULT_MASQ_MARK)
            .apply(&[(IpAddr::V4(Ipv4Addr::new(10, 2, 2, 2)), TCP, 2)])
            .unwrap()
    });
    let json = ns.kpr_table().unwrap();
    assert_kpr_structure(&json, 0x4000);
    assert_eq!(
        elements(&json),
        BTreeSet::from([elem("10.2.2.2", "tcp", 2)])
    );
}

/// Enough elements for a batch of several pages (sent as one netlink message).
#[test]
fn many_elements_in_one_transaction() {
    require();
    let ns = Netns::new();
    let many: Vec<_> = (0..40_000u32)
        .map(|i| {
            (
                IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i)),
                TCP,
                80 + (i % 3) as u16,
            )
        })
        .collect();
    let mut table = NftTable::new(DEFAULT_MASQ_MARK);
    ns.run(|| table.apply(&many).unwrap());
    let json = ns.kpr_table().unwrap();
    assert_eq!(elements(&json).len(), many.len());
    ns.run(|| table.apply(&many[..10]).unwrap());
    assert_eq!(elements(&ns.kpr_table().unwrap()).len(), 10);
    ns.run(|| table.apply(&many[5..]).unwrap());
    assert_eq!(elements(&ns.kpr_table().unwrap()).len(), many.len() - 5);
}

#[test]
fn other_tables_are_left_alone_and_delete_removes_only_kprs() {
    require();
    let ns = Netns::new();
    ns.add_other_table();
    let other = ns.list_table("other").unwrap();

    let mut table = NftTable::new(DEFAULT_MASQ_MARK);
    ns.run(|| {
        table
            .apply(&[(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)), TCP, 80)])
            .unwrap();
        table.apply(&[]).unwrap();
    });
    assert!(ns.kpr_table().is_some());
    assert_eq!(ns.list_table("other").unwrap(), other);

    assert!(ns.run(|| table.delete()).unwrap(), "the table existed");
    assert!(ns.kpr_table().is_none());
    assert_eq!(ns.list_table("other").unwrap(), other);
    assert!(!ns.run(nft::delete_table).unwrap(), "second delete");
    assert_eq!(ns.list_table("other").unwrap(), other);

    // After delete, apply creates it again.
    ns.run(|| table.apply(&[]).unwrap());
    assert!(ns.kpr_table().is_some());
    assert!(ns.run(nft::delete_table).unwrap());
    assert!(ns.kpr_table().is_none());
    assert_eq!(ns.list_table("other").unwrap(), other);
}

#[test]
fn netlink_errors_carry_the_code() {
    let err = kpr::nft::NftError::from(kpr::netfilter::nfnetlink::NetlinkError::Kernel {
        op: "delete table ip kpr".into(),
        errno: libc::ENOENT,
    });
    assert_eq!(err.errno(), Some(libc::ENOENT));
    assert!(err.to_string().contains("netlink error 2"), "{err}");
    assert!(err.to_string().contains("delete table ip kpr"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Real traffic.

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Two namespaces joined by a veth: client 10.250.0.1/24 and fd00:250::1/64, node
/// 10.250.0.2/24 and fd00:250::2/64 (without duplicate address detection: usable at once).
struct Pair {
    client: Netns,
    node: Netns,
}

impl Pair {
    fn new() -> Pair {
        let client = Netns::new();
        let node = Netns::new();
        client.ip(&[
            "link", "add", "veth-c", "type", "veth", "peer", "name", "veth-n", "netns", &node.name,
        ]);
        client.ip(&["addr", "add", "10.250.0.1/24", "dev", "veth-c"]);
        client.ip(&["link", "set", "veth-c", "up"]);
        node.ip(&["addr", "add", "10.250.0.2/24", "dev", "veth-n"]);
        node.ip(&["link", "set", "veth-n", "up"]);
        client.ip(&["addr", "add", "fd00:250::1/64", "dev", "veth-c", "nodad"]);
        node.ip(&["addr", "add", "fd00:250::2/64", "dev", "veth-n", "nodad"]);
        Pair { client, node }
    }
}

/// Accepts one connection within IO_TIMEOUT; returns the peer address.
fn accept_one(listener: &TcpListener) -> SocketAddr {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((_, peer)) => return peer,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// A TCP connect from the client namespace: Ok, or the error and how long it took.
fn connect_from(ns: &Netns, to: SocketAddr) -> Result<TcpStream, (ErrorKind, Duration)> {
    ns.run(|| {
        let start = Instant::now();
        TcpStream::connect_timeout(&to, IO_TIMEOUT).map_err(|e| (e.kind(), start.elapsed()))
    })
}

#[test]
fn tcp_to_a_frontend_without_endpoints_is_refused_at_once() {
    require();
    let pair = Pair::new();
    let server: SocketAddr = "10.250.0.2:8080".parse().unwrap();
    let listener = pair.node.run(|| TcpListener::bind(server).unwrap());

    // Sanity: the path works before kpr's table exists.
    connect_from(&pair.client, server).expect("connect without kpr's table");
    accept_one(&listener);

    let mut table = NftTable::new(DEFAULT_MASQ_MARK);
    pair.node.run(|| {
        table
            .apply(&[(IpAddr::V4(Ipv4Addr::new(10, 250, 0, 2)), TCP, 8080)])
            .unwrap()
    });
    let Err((kind, took)) = connect_from(&pair.client, server) else {
        panic!("connected although the frontend has no endpoints");
    };
    assert_eq!(kind, ErrorKind::ConnectionRefused);
    assert!(took < Duration::from_secs(1), "refused only after {took:?}");

    // Another port of the same address is not affected.
    let other: SocketAddr = "10.250.0.2:8081".parse().unwrap();
    let listener2 = pair.node.run(|| TcpListener::bind(other).unwrap());
    connect_from(&pair.client, other).expect("connect to a port not in the set");
    accept_one(&listener2);

    // The frontend got endpoints: the element goes, the connection goes through.
    pair.node.run(|| table.apply(&[]).unwrap());
    connect_from(&pair.client, server).expect("connect after the element was removed");
    assert_eq!(accept_one(&listener).ip(), Ipv4Addr::new(10, 250, 0, 1));
}

#[test]
fn udp_to_a_frontend_without_endpoints_gets_port_unreachable() {
    require();
    let pair = Pair::new();
    let server: SocketAddr = "10.250.0.2:5353".parse().unwrap();
    let receiver = pair.node.run(|| std::net::UdpSocket::bind(server).unwrap());
    receiver.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let sender = pair.client.run(|| {
        let s = std::net::UdpSocket::bind("10.250.0.1:0").unwrap();
        s.connect(server).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s
    });

    let mut table = NftTable::new(DEFAULT_MASQ_MARK);
    pair.node.run(|| {
        table
            .apply(&[(IpAddr::V4(Ipv4Addr::new(10, 250, 0, 2)), UDP, 5353)])
            .unwrap()
    });
    sender.send(b"ping").unwrap();
    let mut buf = [0u8; 16];
    let err = sender.recv(&mut buf).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");

    pair.node.run(|| table.apply(&[]).unwrap());
    sender.send(b"ping").unwrap();
    let (n, from) = receiver.recv_from(&mut buf).expect("datagram arrives");
    assert_eq!(&buf[..n], b"ping");
    assert_eq!(from.ip(), Ipv4Addr::new(10, 250, 0, 1));
}

#[test]
fn ipv6_frontends_without_endpoints_are_refused_by_the_ip6_table() {
    require();
    let pair = Pair::new();
    let server: SocketAddr = "[fd00:250::2]:8080".parse().unwrap();
    let listener = pair.node.run(|| TcpListener::bind(server).unwrap());
    connect_from(&pair.client, server).expect("connect without kpr's table");
    accept_one(&listener);
    let dns: SocketAddr = "[fd00:250::2]:5353".parse().unwrap();
    let _receiver = pair.node.run(|| std::net::UdpSocket::bind(dns).unwrap());
    let sender = pair.client.run(|| {
        let s = std::net::UdpSocket::bind("[fd00:250::1]:0").unwrap();
        s.connect(dns).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s
    });

    let mut table = NftTable::new(DEFAULT_MASQ_MARK);
    let v4 = IpAddr::V4(Ipv4Addr::new(10, 250, 0, 2));
    pair.node.run(|| {
        table
            .apply(&[
                (server.ip(), TCP, 8080),
                (dns.ip(), UDP, 5353),
                // The IPv4 element goes to the ip table, not the ip6 one.
                (v4, TCP, 8080),
            ])
            .unwrap()
    });
    let Err((kind, took)) = connect_from(&pair.client, server) else {
        panic!("connected although the IPv6 frontend has no endpoints");
    };
    assert_eq!(kind, ErrorKind::ConnectionRefused);
    assert!(took < Duration::from_secs(1), "refused only after {took:?}");
    sender.send(b"ping").unwrap();
    let err = sender.recv(&mut [0u8; 16]).unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::ConnectionRefused,
        "ICMPv6 port unreachable: {err}"
    );
    let v6 = pair.node.exec(&["nft", "list", "table", "ip6", "kpr"]);
    let v6 = String::from_utf8_lossy(&v6.stdout);
    assert!(v6.contains("fd00:250::2 . tcp . 8080"), "{v6}");
    assert!(!v6.contains("10.250.0.2"), "{v6}");
    assert!(pair
        .node
        .kpr_table_text()
        .contains("10.250.0.2 . tcp . 8080"));

    pair.node.run(|| table.apply(&[]).unwrap());
    connect_from(&pair.client, server).expect("connect after the element was removed");
    assert_eq!(
        accept_one(&listener).ip(),
        "fd00:250::1".parse::<IpAddr>().unwrap()
    );
}

/// client (10.250.1.1) -- router (10.250.1.2 | 10.250.2.2) -- server (10.250.2.1); kpr's table
/// in the router. The router marks new connections to the server's port 8080 with 0x4000 (what
/// kpr's tc programs do for eTP=Cluster traffic) in a test table of its own.
struct Routed {
    client: Netns,
    router: Netns,
    server: Netns,
}

impl Routed {
    fn new() -> Routed {
        let client = Netns::new();
        let router = Netns::new();
        let server = Netns::new();
        client.ip(&[
            "link",
            "add",
            "veth-c",
            "type",
            "veth",
            "peer",
            "name",
            "veth-rc",
            "netns",
            &router.name,
        ]);
        server.ip(&[
            "link",
            "add",
            "veth-s",
            "type",
            "veth",
            "peer",
            "name",
            "veth-rs",
            "netns",
            &router.name,
        ]);
        client.ip(&["addr", "add", "10.250.1.1/24", "dev", "veth-c"]);
        client.ip(&["link", "set", "veth-c", "up"]);
        client.ip(&["route", "add", "default", "via", "10.250.1.2"]);
        server.ip(&["addr", "add", "10.250.2.1/24", "dev", "veth-s"]);
        server.ip(&["link", "set", "veth-s", "up"]);
        server.ip(&["route", "add", "default", "via", "10.250.2.2"]);
        router.ip(&["addr", "add", "10.250.1.2/24", "dev", "veth-rc"]);
        router.ip(&["addr", "add", "10.250.2.2/24", "dev", "veth-rs"]);
        router.ip(&["link", "set", "veth-rc", "up"]);
        router.ip(&["link", "set", "veth-rs", "up"]);
        let out = router.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Routed {
            client,
            router,
            server,
        }
    }
}

#[test]
fn marked_traffic_is_masqueraded_and_unmarked_and_forward_rejects() {
    require();
    let net = Routed::new();
    let server: SocketAddr = "10.250.2.1:8080".parse().unwrap();
    let listener = net.server.run(|| TcpListener::bind(server).unwrap());
    // The marker (priority mangle), and counters of the mark before (50) and after (200) kpr's
    // srcnat chain (100).
    let out = net.router.exec(&[
        "nft",
        "add table ip marker; \
         add chain ip marker pre { type filter hook prerouting priority -150; }; \
         add rule ip marker pre ip daddr 10.250.2.1 tcp dport 8080 ct state new meta mark set meta mark | 0x4000; \
         add chain ip marker post-early { type filter hook postrouting priority 50; }; \
         add rule ip marker post-early meta mark & 0x4000 == 0x4000 counter; \
         add chain ip marker post-late { type filter hook postrouting priority 200; }; \
         add rule ip marker post-late meta mark & 0x4000 == 0x4000 counter",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counter = |chain: &str| -> u64 {
        let json = net.router.list_table("marker").unwrap();
        let r = rules(&json, chain);
        r[0]["expr"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|e| e.get("counter"))
            .unwrap()["packets"]
            .as_u64()
            .unwrap()
    };

    // Without kpr's table: marked, but nobody masquerades.
    connect_from(&net.client, server).expect("connect through the router");
    assert_eq!(accept_one(&listener).ip(), Ipv4Addr::new(10, 250, 1, 1));
    assert_eq!(counter("post-early"), 1);
    assert_eq!(counter("post-late"), 1);

    let mut table = NftTable::new(DEFAULT_MASQ_MARK);
    net.router.run(|| table.apply(&[]).unwrap());
    connect_from(&net.client, server).expect("connect through the router");
    // SNAT to the router's address on the server side, and the mark did not leave.
    assert_eq!(accept_one(&listener).ip(), Ipv4Addr::new(10, 250, 2, 2));
    assert_eq!(counter("post-early"), 2);
    assert_eq!(counter("post-late"), 1, "the mark was not cleared");

    // Unmarked traffic (another port) is not masqueraded.
    let other: SocketAddr = "10.250.2.1:8081".parse().unwrap();
    let listener2 = net.server.run(|| TcpListener::bind(other).unwrap());
    connect_from(&net.client, other).expect("connect to the unmarked port");
    assert_eq!(accept_one(&listener2).ip(), Ipv4Addr::new(10, 250, 1, 1));

    // Forwarded traffic to a frontend without endpoints: refused (filter-forward).
    net.router.run(|| {
        table
            .apply(&[(IpAddr::V4(Ipv4Addr::new(10, 250, 2, 1)), TCP, 8080)])
            .unwrap()
    });
    let Err((kind, took)) = connect_from(&net.client, server) else {
        panic!("connected through the router although the frontend has no endpoints");
    };
    assert_eq!(kind, ErrorKind::ConnectionRefused);
    assert!(took < Duration::from_secs(1), "refused only after {took:?}");
}
