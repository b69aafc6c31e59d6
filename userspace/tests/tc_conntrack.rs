//! The tc programs' connection tracking, packet by packet (BPF_PROG_TEST_RUN on crafted
//! frames, see tc_harness): state transitions, lifetimes, the new/established split, flows kpr
//! did not translate, the garbage collector, and adopting an older agent's entries.
//!
//! Lifetimes are tested by moving entries' last packet into the past through the pinned maps
//! (`Env::age_conntrack`), not by waiting.
//!
//! Root only: fails, naming what is missing, otherwise.

use std::net::Ipv4Addr;
use std::process::Command;

use kpr::ebpf::conntrack::{monotonic_ns, ConntrackConfig};
use kpr_common::{
    Ct4Key, Ct4Value, CT_DIR_FORWARD, CT_DIR_REVERSE, CT_FLAG_FIN_BACKEND, CT_FLAG_FIN_CLIENT,
    CT_FLAG_MASQ, CT_FLAG_RST, CT_FLAG_SEEN_REPLY, CT_MAP, CT_MAP_V1, CT_NEW_MAP, IPPROTO_TCP,
    IPPROTO_UDP,
};

mod tc_harness;
use tc_harness::*;

const PORT: u16 = 40100;

/// A NodePort with one backend (B1), so every flow's backend is known.
fn one_backend(proto: u8) -> Env {
    require();
    let env = Env::new();
    env.program(&nodeport(proto, 0, &[B1]));
    env
}

fn in_ns(env: &mut Env, frame: &[u8]) -> (i32, View) {
    let (rc, out, _) = env.run(INGRESS, frame, 0);
    (rc, view(&out))
}

fn out_ns(env: &mut Env, frame: &[u8]) -> (i32, View) {
    let (rc, out, _) = env.run(EGRESS, frame, 0);
    (rc, view(&out))
}

/// Flags of the flow's two entries in `map` (forward, reverse); None for a missing one.
fn flow_flags(env: &Env, map: &str) -> (Option<u8>, Option<u8>) {
    let entries = env.ct_entries(map);
    let of = |dir| {
        entries
            .iter()
            .find(|(k, _)| k.dir == dir)
            .map(|(_, v)| v.flags)
    };
    (of(CT_DIR_FORWARD), of(CT_DIR_REVERSE))
}

fn syn(sport: u16) -> Vec<u8> {
    build(&tcp(CLIENT, sport, NODE, NODE_PORT, TCP_SYN))
}

fn client(sport: u16, flags: u8) -> Vec<u8> {
    build(&tcp(CLIENT, sport, NODE, NODE_PORT, flags))
}

fn backend(sport: u16, flags: u8) -> Vec<u8> {
    let (ip, port) = addr(B1);
    build(&tcp(ip, port, CLIENT, sport, flags))
}

/// The reply of a backend, translated back: is it shown as the frontend?
fn shown_as_frontend(v: &View) -> bool {
    (v.src, v.sport) == (NODE, NODE_PORT)
}

/// SYN, SYN-ACK, ACK: an established flow.
fn handshake(env: &mut Env, sport: u16) {
    assert_eq!(in_ns(env, &syn(sport)).0, PASS);
    assert!(shown_as_frontend(
        &out_ns(env, &backend(sport, TCP_SYN | TCP_ACK)).1
    ));
    assert_eq!(backend_of(&in_ns(env, &client(sport, TCP_ACK)).1), addr(B1));
}

#[test]
fn a_tcp_flow_is_new_until_the_handshake_completes_then_established_until_both_sides_close() {
    let mut env = one_backend(IPPROTO_TCP);
    in_ns(&mut env, &syn(PORT));
    assert_eq!(
        flow_flags(&env, CT_NEW_MAP),
        (Some(CT_FLAG_MASQ), Some(CT_FLAG_MASQ))
    );
    assert!(env.ct_entries(CT_MAP).is_empty());

    // The backend answers: seen, still new (a SYN flood's half-open flows stay evictable).
    out_ns(&mut env, &backend(PORT, TCP_SYN | TCP_ACK));
    let replied = CT_FLAG_MASQ | CT_FLAG_SEEN_REPLY;
    assert_eq!(flow_flags(&env, CT_NEW_MAP), (Some(replied), Some(replied)));

    // The client's ACK completes the handshake: both entries move.
    in_ns(&mut env, &client(PORT, TCP_ACK));
    assert!(env.ct_entries(CT_NEW_MAP).is_empty());
    assert_eq!(flow_flags(&env, CT_MAP), (Some(replied), Some(replied)));

    // FIN from the client, then from the backend: both entries follow.
    assert_eq!(
        backend_of(&in_ns(&mut env, &client(PORT, TCP_FIN | TCP_ACK)).1),
        addr(B1)
    );
    let half = replied | CT_FLAG_FIN_CLIENT;
    assert_eq!(flow_flags(&env, CT_MAP), (Some(half), Some(half)));
    assert!(shown_as_frontend(
        &out_ns(&mut env, &backend(PORT, TCP_FIN | TCP_ACK)).1
    ));
    let closed = half | CT_FLAG_FIN_BACKEND;
    assert_eq!(flow_flags(&env, CT_MAP), (Some(closed), Some(closed)));
    // The last ACK still goes to the backend.
    assert_eq!(
        backend_of(&in_ns(&mut env, &client(PORT, TCP_ACK)).1),
        addr(B1)
    );

    // A SYN from the same client port is a new connection: the closed flow goes.
    in_ns(&mut env, &syn(PORT));
    assert!(env.ct_entries(CT_MAP).is_empty(), "closed flow replaced");
    assert_eq!(
        flow_flags(&env, CT_NEW_MAP),
        (Some(CT_FLAG_MASQ), Some(CT_FLAG_MASQ))
    );
}

#[test]
fn a_reset_closes_the_flow_and_its_entries_live_only_the_close_lifetime() {
    let mut env = one_backend(IPPROTO_TCP);
    handshake(&mut env, PORT);
    in_ns(&mut env, &client(PORT, TCP_RST | TCP_ACK));
    let reset = CT_FLAG_MASQ | CT_FLAG_SEEN_REPLY | CT_FLAG_RST;
    assert_eq!(flow_flags(&env, CT_MAP), (Some(reset), Some(reset)));

    // 9 s later a late segment is still translated (the close lifetime is 10 s)...
    env.age_conntrack(9);
    assert_eq!(
        backend_of(&in_ns(&mut env, &client(PORT, TCP_ACK)).1),
        addr(B1)
    );
    // ... which refreshed it; 11 s after that it is expired: not translated, and removed.
    env.age_conntrack(11);
    let ack = client(PORT, TCP_ACK);
    let (rc, out, _) = env.run(INGRESS, &ack, 0);
    assert_eq!((rc, &out), (PASS, &ack), "untouched");
    assert_eq!(env.counter("tc_ct_expired"), 1);
    assert_eq!(env.counter("tc_ct_miss_not_syn"), 1);
    assert!(env.ct_entries(CT_MAP).is_empty());
}

#[test]
fn lifetimes_follow_the_state_for_tcp_and_udp() {
    // An established TCP flow idle for an hour is alive (a day's lifetime).
    let mut env = one_backend(IPPROTO_TCP);
    handshake(&mut env, PORT);
    env.age_conntrack(3600);
    assert_eq!(
        backend_of(&in_ns(&mut env, &client(PORT, TCP_ACK)).1),
        addr(B1)
    );
    assert_eq!(env.counter("tc_ct_expired"), 0);
    // An unanswered SYN lives 60 s: the reply to it 61 s later is not translated.
    in_ns(&mut env, &syn(PORT + 1));
    env.age_conntrack(61);
    let late = backend(PORT + 1, TCP_SYN | TCP_ACK);
    let (rc, out, _) = env.run(EGRESS, &late, 0);
    assert_eq!((rc, &out), (PASS, &late));
    assert_eq!(env.counter("tc_ct_expired"), 1);
    drop(env);

    // UDP: 30 s without a reply, 120 s with replies.
    let mut env = one_backend(IPPROTO_UDP);
    let (bip, bport) = addr(B1);
    let request = |sport| build(&udp(CLIENT, sport, NODE, NODE_PORT));
    let reply = |sport| build(&udp(bip, bport, CLIENT, sport));
    in_ns(&mut env, &request(5000));
    env.age_conntrack(31);
    let r = reply(5000);
    let (rc, out, _) = env.run(EGRESS, &r, 0);
    assert_eq!((rc, &out), (PASS, &r), "expired: not translated");

    in_ns(&mut env, &request(5001));
    assert!(shown_as_frontend(&out_ns(&mut env, &reply(5001)).1));
    // The first reply made it a stream: established.
    let stream = CT_FLAG_MASQ | CT_FLAG_SEEN_REPLY;
    assert_eq!(flow_flags(&env, CT_MAP), (Some(stream), Some(stream)));
    env.age_conntrack(100);
    assert!(shown_as_frontend(&out_ns(&mut env, &reply(5001)).1));
    env.age_conntrack(121);
    // Expired: the next datagram is a new flow, which chooses its backend anew.
    let expired_before = env.counter("tc_ct_expired");
    assert_eq!(backend_of(&in_ns(&mut env, &request(5001)).1), (bip, bport));
    assert_eq!(env.counter("tc_ct_expired"), expired_before + 1);
    assert!(env.ct_entries(CT_MAP).is_empty());
    assert_eq!(env.ct_entries(CT_NEW_MAP).len(), 2);
}

#[test]
fn a_packet_in_either_direction_keeps_both_entries_of_a_flow_alive() {
    // A UDP flow where only the client talks (syslog-like) keeps its reverse entry too, so a
    // late reply is still shown as the frontend.
    let mut env = one_backend(IPPROTO_UDP);
    let (bip, bport) = addr(B1);
    in_ns(&mut env, &build(&udp(CLIENT, 5100, NODE, NODE_PORT)));
    out_ns(&mut env, &build(&udp(bip, bport, CLIENT, 5100)));
    for _ in 0..3 {
        env.age_conntrack(100);
        in_ns(&mut env, &build(&udp(CLIENT, 5100, NODE, NODE_PORT)));
    }
    // 300 s since the last reply, 100 s since the last request.
    env.age_conntrack(100);
    assert!(shown_as_frontend(
        &out_ns(&mut env, &build(&udp(bip, bport, CLIENT, 5100))).1
    ));
    assert_eq!(env.counter("tc_ct_expired"), 0);
}

#[test]
fn a_direct_connection_from_a_client_port_of_a_nodeport_flow_is_left_alone() {
    // The case that stalled direct connections: a NodePort flow from client port P to backend
    // B, then a connection from P to B's own address.
    let mut env = one_backend(IPPROTO_TCP);
    handshake(&mut env, PORT);
    in_ns(&mut env, &client(PORT, TCP_RST | TCP_ACK));
    let (bip, bport) = addr(B1);

    let direct = build(&tcp(CLIENT, PORT, bip, bport, TCP_SYN));
    let (rc, out, _) = env.run(INGRESS, &direct, 0);
    assert_eq!((rc, &out), (PASS, &direct), "not a frontend: untouched");
    assert_eq!(env.counter("tc_ct_replaced"), 1);
    assert!(
        env.ct_entries(CT_MAP).is_empty(),
        "the NodePort flow is gone"
    );
    // Its replies keep the backend's address.
    let synack = backend(PORT, TCP_SYN | TCP_ACK);
    let (rc, out, _) = env.run(EGRESS, &synack, 0);
    assert_eq!((rc, &out), (PASS, &synack));
    // Mid-connection segments cost nothing and change nothing.
    in_ns(&mut env, &build(&tcp(CLIENT, PORT, bip, bport, TCP_ACK)));
    assert_eq!(env.counter("tc_ct_replaced"), 1);

    // A direct connection from another port leaves a live NodePort flow alone.
    handshake(&mut env, PORT + 1);
    in_ns(
        &mut env,
        &build(&tcp(CLIENT, PORT + 2, bip, bport, TCP_SYN)),
    );
    assert_eq!(env.ct_entries(CT_MAP).len(), 2);
    assert!(shown_as_frontend(
        &out_ns(&mut env, &backend(PORT + 1, TCP_ACK)).1
    ));

    // UDP: any datagram of a direct flow replaces a NodePort flow with its reply tuple.
    let mut env = one_backend(IPPROTO_UDP);
    in_ns(&mut env, &build(&udp(CLIENT, 5200, NODE, NODE_PORT)));
    out_ns(&mut env, &build(&udp(bip, bport, CLIENT, 5200)));
    let direct = build(&udp(CLIENT, 5200, bip, bport));
    let (rc, out, _) = env.run(INGRESS, &direct, 0);
    assert_eq!((rc, &out), (PASS, &direct));
    let reply = build(&udp(bip, bport, CLIENT, 5200));
    let (rc, out, _) = env.run(EGRESS, &reply, 0);
    assert_eq!(
        (rc, &out),
        (PASS, &reply),
        "the direct flow's reply keeps its source"
    );
    assert_eq!(env.counter("tc_ct_replaced"), 1);
}

#[test]
fn a_flood_of_new_flows_does_not_evict_an_established_one() {
    require();
    // Room for 512 connections; the flood is 20 times that.
    let mut env = Env::with(
        Vec::new(),
        ConntrackConfig {
            max_connections: 512,
            ..ConntrackConfig::default()
        },
        |_| {},
    );
    env.program(&nodeport(IPPROTO_TCP, 0, &[B1, B2, B3]));
    assert_eq!(in_ns(&mut env, &syn(PORT)).0, PASS);
    let (_, first) = in_ns(&mut env, &client(PORT, TCP_ACK));
    let chosen = backend_of(&first);
    let reply = build(&tcp(chosen.0, chosen.1, CLIENT, PORT, TCP_SYN | TCP_ACK));
    out_ns(&mut env, &reply);
    in_ns(&mut env, &client(PORT, TCP_ACK));
    assert_eq!(env.ct_entries(CT_MAP).len(), 2, "established");

    // 10,240 half-open connections from other clients (SYNs that are never answered).
    for i in 0..10_240u32 {
        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i / 1024);
        let sport = 1024 + (i % 1024) as u16;
        let (rc, _, _) = env.run(
            INGRESS,
            &build(&tcp(src, sport, NODE, NODE_PORT, TCP_SYN)),
            0,
        );
        assert_eq!(rc, PASS, "SYN {i} dropped");
    }
    // The same again, answered by the backend and reset by the client (what a flood from
    // addresses that do not exist, or from a client kernel without the sockets, looks like):
    // the resets end them among the new flows.
    for i in 0..2048u32 {
        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 65, 0, 0)) + i / 1024);
        let sport = 1024 + (i % 1024) as u16;
        let (rc, out, _) = env.run(
            INGRESS,
            &build(&tcp(src, sport, NODE, NODE_PORT, TCP_SYN)),
            0,
        );
        assert_eq!(rc, PASS);
        let b = backend_of(&view(&out));
        env.run(
            EGRESS,
            &build(&tcp(b.0, b.1, src, sport, TCP_SYN | TCP_ACK)),
            0,
        );
        env.run(
            INGRESS,
            &build(&tcp(src, sport, NODE, NODE_PORT, TCP_RST)),
            0,
        );
    }
    assert_eq!(env.counter("ct_established_full"), 0);
    assert_eq!(
        env.ct_entries(CT_MAP).len(),
        2,
        "no reset flow was established"
    );
    let new = env.ct_entries(CT_NEW_MAP).len();
    assert!(
        new <= 512,
        "the new-flows map holds at most its size: {new}"
    );
    assert_eq!(env.counter("ct_create_failed"), 0);

    // The established connection still goes to its backend, both ways.
    for _ in 0..3 {
        assert_eq!(
            backend_of(&in_ns(&mut env, &client(PORT, TCP_ACK)).1),
            chosen
        );
        let data = build(&tcp(chosen.0, chosen.1, CLIENT, PORT, TCP_ACK));
        assert!(shown_as_frontend(&out_ns(&mut env, &data).1));
    }
    assert_eq!(env.ct_entries(CT_MAP).len(), 2);
}

#[test]
fn the_garbage_collector_removes_expired_entries_only() {
    let mut env = one_backend(IPPROTO_TCP);
    handshake(&mut env, PORT);
    in_ns(&mut env, &syn(PORT + 1));
    in_ns(&mut env, &syn(PORT + 2));
    in_ns(&mut env, &client(PORT + 2, TCP_RST));
    assert_eq!(env.dp().conntrack_entries(), 6);
    // 70 s later: the unanswered SYN (60 s) and the reset flow (10 s) are over.
    let s = env.dp().expire_conntrack(monotonic_ns() + 70_000_000_000);
    assert_eq!((s.expired, s.established, s.new), (4, 2, 0));
    assert_eq!(env.dp().conntrack_entries(), 2);
    // The established one goes a day later.
    let s = env
        .dp()
        .expire_conntrack(monotonic_ns() + 86_401_000_000_000);
    assert_eq!((s.expired, s.established), (2, 0));
    // Counted for the metrics (kpr_datapath_events_total{event="ct_gc_expired"}).
    assert_eq!(env.counter("ct_gc_expired"), 6);
    assert_eq!(env.counter("ct_gc_stale"), 0);
}

/// The race behind a reset under load: the collector walks, a client reuses the port of an
/// expired flow (its SYN revives the entry), then the collector deletes. The revived entry must
/// stay, or the new connection's next packet finds no flow and the node answers with a RST.
#[test]
fn the_garbage_collector_keeps_an_entry_revived_after_its_walk() {
    let mut env = one_backend(IPPROTO_TCP);
    handshake(&mut env, PORT);
    in_ns(&mut env, &syn(PORT + 2));
    in_ns(&mut env, &client(PORT + 2, TCP_RST));
    // 70 s later the reset flow (10 s) is over; the walk plans its removal.
    let plan = env
        .dp()
        .plan_conntrack_expiry(monotonic_ns() + 70_000_000_000);
    assert_eq!(plan.len(), 2, "{plan:?}");
    // Meanwhile the client opens a new connection from the same port.
    let (_, out) = in_ns(&mut env, &syn(PORT + 2));
    let chosen = backend_of(&out);
    let s = env.dp().apply_conntrack_sweep(plan);
    assert_eq!(s.expired, 0, "the revived flow was deleted: {s:?}");
    // The new connection's handshake completes through its entry.
    let (_, ack) = in_ns(&mut env, &client(PORT + 2, TCP_ACK));
    assert_eq!(backend_of(&ack), chosen);
    assert_eq!(env.counter("tc_ct_miss_not_syn"), 0);
}

fn bpftool(args: &[&str]) {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes a `KPR_CT4_V1` map (an older agent's: LRU, same key and value) with one flow.
fn pin_v1_map(pin_dir: &std::path::Path, key: &Ct4Key, value: &Ct4Value) {
    let path = pin_dir.join(CT_MAP_V1);
    let p = path.to_str().unwrap();
    bpftool(&[
        "map", "create", p, "type", "lru_hash", "key", "16", "value", "32", "entries", "1024",
        "name", CT_MAP_V1,
    ]);
    // SAFETY: both are repr(C) plain data of the asserted sizes.
    let bytes = |p: *const u8, n| unsafe { std::slice::from_raw_parts(p, n) }.to_vec();
    let k = bytes((key as *const Ct4Key).cast(), 16);
    let v = bytes((value as *const Ct4Value).cast(), 32);
    let hex = |b: &[u8]| b.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut args = vec!["map", "update", "pinned", p, "key"];
    let (k, v) = (hex(&k), hex(&v));
    args.extend(k.iter().map(String::as_str));
    args.push("value");
    args.extend(v.iter().map(String::as_str));
    bpftool(&args);
}

#[test]
fn an_older_agents_flows_are_adopted_as_established() {
    require();
    kpr_lab::preconditions::require("adopting V1 conntrack pins", &["bpftool"]);
    let (bip, bport) = addr(B1);
    let be = |ip: Ipv4Addr| u32::from_ne_bytes(ip.octets());
    // The reverse entry of a flow CLIENT:PORT → NODE:NODE_PORT on B1, as V1 wrote it.
    let key = Ct4Key {
        saddr_be: be(bip),
        daddr_be: be(CLIENT),
        sport_be: bport.to_be(),
        dport_be: PORT.to_be(),
        proto: IPPROTO_TCP,
        dir: CT_DIR_REVERSE,
        pad: [0; 2],
    };
    let value = Ct4Value {
        last_seen_ns: monotonic_ns(),
        backend_id: B1.0,
        rev_nat_id: 1000,
        address_be: be(NODE),
        port_be: NODE_PORT.to_be(),
        slot: 1,
        flags: CT_FLAG_MASQ,
        pad: [0; 7],
    };
    let mut env = Env::with(Vec::new(), ConntrackConfig::default(), |pins| {
        pin_v1_map(pins, &key, &value)
    });
    assert!(!env.bpf.join(CT_MAP_V1).exists(), "the old pin is removed");
    let adopted = env.ct_entries(CT_MAP);
    assert_eq!(adopted.len(), 1);
    assert_eq!(adopted[0].1.flags, CT_FLAG_MASQ | CT_FLAG_SEEN_REPLY);
    // The live flow's replies are still shown as the frontend.
    env.program(&nodeport(IPPROTO_TCP, 0, &[B1]));
    assert!(shown_as_frontend(
        &out_ns(&mut env, &backend(PORT, TCP_ACK)).1
    ));
}

#[test]
fn a_map_of_another_layout_version_is_refused_with_a_message_naming_it() {
    require();
    kpr_lab::preconditions::require("foreign map pins", &["bpftool"]);
    // A future (or past) layout of the affinity map, pinned by another kpr version.
    let r = Env::try_with(Vec::new(), ConntrackConfig::default(), |pins| {
        let p = pins.join("KPR_AFF4_V7");
        bpftool(&[
            "map",
            "create",
            p.to_str().unwrap(),
            "type",
            "hash",
            "key",
            "16",
            "value",
            "16",
            "entries",
            "16",
            "name",
            "KPR_AFF4_V7",
        ]);
    });
    let Err(failed) = r else {
        panic!("loaded beside a map of another layout version");
    };
    let e = &failed.1;
    assert!(
        e.contains("KPR_AFF4_V7") && e.contains("kpr cleanup"),
        "{e}"
    );
}
