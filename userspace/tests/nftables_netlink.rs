//! kpr's nftables netlink encoding against the real `nft`: for each of kube-proxy's nftables
//! test cases, kube-proxy's expected ruleset is loaded with `nft -f` into one fresh network
//! namespace, kpr's ruleset for the same objects is sent through kpr's own netlink
//! transaction into another, and `nft list table` must print both the same. Then an
//! incremental transaction (a Service added, one removed) must also arrive as the real nft
//! sees it. Root only (fails otherwise); never touches the host's namespace.

mod kube_proxy_cases;

use std::time::Instant;

use kpr::netfilter::nftables::netlink::Encoder;
use kpr::netfilter::nftables::sync::NftSyncer;
use kpr::netfilter::nftables::write::NftablesConfig;
use kpr_lab::TestNetns;

fn require() {
    kpr_lab::preconditions::require("the nftables netlink tests", &["ip", "nft"]);
}

/// `nft list table <family> kube-proxy` in `ns`, its top-level blocks (sets, maps, chains) in
/// name order: nft lists them in the order they were created, which is not what is compared.
fn listing(ns: &TestNetns, family: &str) -> String {
    let out = ns.exec(&["nft", "list", "table", family, "kube-proxy"], None);
    assert!(
        out.status.success(),
        "nft list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut blocks: Vec<String> = Vec::new();
    let mut head = String::new();
    for line in text.lines().filter(|l| *l != "}") {
        let top = ["\tchain ", "\tset ", "\tmap "]
            .iter()
            .any(|p| line.starts_with(p));
        if top {
            blocks.push(String::new());
        }
        match blocks.last_mut() {
            Some(b) if !line.is_empty() => {
                b.push_str(line);
                b.push('\n');
            }
            Some(_) => {}
            None => {
                head.push_str(line);
                head.push('\n');
            }
        }
    }
    blocks.sort();
    head + &blocks.concat() + "}\n"
}

/// kube-proxy's expected text in an order `nft -f` accepts (its test compares it sorted, so
/// its own order may name a chain before declaring it): table, chains, sets and maps, rules in
/// their order, elements.
fn loadable(expected: &str) -> String {
    let rank = |l: &str| match l.split_whitespace().nth(1) {
        Some("table") => 0,
        Some("chain") => 1,
        Some("set") | Some("map") => 2,
        Some("rule") => 3,
        _ => 4,
    };
    let mut lines: Vec<&str> = expected
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    lines.sort_by_key(|l| rank(l));
    lines.join("\n") + "\n"
}

#[test]
fn kprs_transactions_load_what_nft_loads_from_kube_proxys_rulesets() {
    require();
    let cases = kube_proxy_cases::cases("nftables", "expected.nft");
    let mut compared = 0;
    for case in cases.iter().filter(|c| c.expected.is_some()) {
        // One step per multi-step test is enough here: the first (a full sync).
        if case.name.contains("/step") && !case.name.ends_with("/step1") {
            continue;
        }
        let Ok((mut state, cfg)) = case.desired_state_and_config() else {
            continue;
        };
        state.node_ips = cfg.nodeport_ips.clone().unwrap_or_default();
        let service_cidrs = case.service_cidrs(cfg.family);
        let mut syncer = NftSyncer::new(cfg.clone(), true, NftablesConfig { service_cidrs });
        let prepared = syncer.prepare(&state, true, Instant::now());
        let family = prepared.target.family_name();

        let reference = TestNetns::new("kpr-nftref");
        let load = reference.exec(
            &["nft", "-f", "-"],
            Some(loadable(case.expected.as_deref().unwrap()).as_bytes()),
        );
        assert!(
            load.status.success(),
            "{}: nft -f kube-proxy's ruleset: {}",
            case.name,
            String::from_utf8_lossy(&load.stderr)
        );

        let ours = TestNetns::new("kpr-nftkpr");
        let txn = Encoder::new(&prepared.target).encode(&prepared.ops);
        ours.run(|| txn.commit())
            .unwrap_or_else(|e| panic!("{}: kpr's transaction: {e}", case.name));
        assert_eq!(
            listing(&ours, family),
            listing(&reference, family),
            "{}: the kernel holds something else than nft loads from kube-proxy's ruleset",
            case.name
        );
        compared += 1;
    }
    assert!(compared >= 3, "only {compared} cases compared");
    eprintln!("{compared} kube-proxy rulesets: kpr's netlink encoding lists as nft -f's");
}

#[test]
fn incremental_transactions_reach_the_same_state_as_full_ones() {
    require();
    // kube-proxy's TestSyncProxyRulesRepeated: every step incrementally in one namespace, and
    // each step's full ruleset from scratch in another; the listings must agree at every step.
    let cases = kube_proxy_cases::cases("nftables", "expected.nft");
    let steps: Vec<&kube_proxy_cases::Case> = {
        let mut s: Vec<(usize, &kube_proxy_cases::Case)> = cases
            .iter()
            .filter_map(|c| {
                let n = c.name.strip_prefix("TestSyncProxyRulesRepeated/step")?;
                Some((n.parse().ok()?, c))
            })
            .collect();
        s.sort_by_key(|(n, _)| *n);
        s.into_iter().map(|(_, c)| c).collect()
    };
    assert!(steps.len() >= 10, "{} steps", steps.len());
    let incremental = TestNetns::new("kpr-nftinc");
    let mut syncer: Option<NftSyncer> = None;
    let mut now = Instant::now();
    for (i, case) in steps.iter().enumerate() {
        let (mut state, cfg) = case.desired_state_and_config().unwrap();
        state.node_ips = cfg.nodeport_ips.clone().unwrap_or_default();
        let s = syncer
            .get_or_insert_with(|| NftSyncer::new(cfg.clone(), true, NftablesConfig::default()));
        // Let stale chains go at every other step.
        if i % 2 == 1 {
            now += std::time::Duration::from_secs(2);
        }
        let prepared = s.prepare(&state, s.needs_full(), now);
        let family = prepared.target.family_name();
        let txn = Encoder::new(&prepared.target).encode(&prepared.ops);
        incremental
            .run(|| txn.commit())
            .unwrap_or_else(|e| panic!("{}: incremental transaction: {e}", case.name));
        let target = s.commit(prepared).clone();

        let scratch = TestNetns::new("kpr-nftfull");
        let mut full = NftSyncer::new(cfg.clone(), true, NftablesConfig::default());
        let mut p = full.prepare(&state, true, now);
        // The same table as the incremental one, stale chains included.
        p.target = target.clone();
        p.ops = kpr::netfilter::nftables::sync::full_ops(&target);
        let txn = Encoder::new(&p.target).encode(&p.ops);
        scratch.run(|| txn.commit()).unwrap();
        assert_eq!(
            listing(&incremental, family),
            listing(&scratch, family),
            "{}: incremental and full disagree",
            case.name
        );
    }
}

#[test]
fn thousands_of_services_commit_in_one_transaction() {
    require();
    // Tens of thousands of messages in one batch. The kernel delivers a batch's answers only
    // once all of it is processed; with one acknowledgement per message (libnftnl's default)
    // they overflowed the socket's receive queue (ENOBUFS) from about 1,000 Services on.
    const SERVICES: usize = 5_000;
    let state = kube_proxy_cases::state_of(&kube_proxy_cases::many_services(SERVICES, 2));
    let cfg = kpr::netfilter::plan::PlanConfig::default();
    let mut syncer = NftSyncer::new(cfg, false, NftablesConfig::default());
    let ns = TestNetns::new("kpr-nftbig");
    let prepared = syncer.prepare(&state, true, Instant::now());
    assert!(
        prepared.ops.len() > 4 * SERVICES,
        "{} operations",
        prepared.ops.len()
    );
    let txn = Encoder::new(&prepared.target).encode(&prepared.ops);
    ns.run(|| txn.commit())
        .unwrap_or_else(|e| panic!("{SERVICES} Services in one transaction: {e}"));
    syncer.commit(prepared);
    let out = ns.exec(
        &["nft", "list", "map", "ip", "kube-proxy", "service-ips"],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    let elements = String::from_utf8_lossy(&out.stdout)
        .matches(" : goto ")
        .count();
    assert_eq!(elements, SERVICES, "service-ips elements");

    // A refused message deep in a large batch is still reported, naming it, and nothing of the
    // batch is applied: half the Services, with the deletion of a chain that does not exist
    // in the middle.
    let half = kube_proxy_cases::state_of(&kube_proxy_cases::many_services(SERVICES / 2, 2));
    let mut p = syncer.prepare(&half, true, Instant::now());
    let middle = p.ops.len() / 2;
    p.ops.insert(
        middle,
        kpr::netfilter::nftables::sync::Op::DeleteChain("no-such-chain".into()),
    );
    let txn = Encoder::new(&p.target).encode(&p.ops);
    match ns.run(|| txn.commit()) {
        Err(kpr::netfilter::nfnetlink::NetlinkError::Kernel { op, errno }) => {
            assert_eq!(errno, libc::ENOENT, "{op}");
            assert!(op.contains("no-such-chain"), "the error names {op:?}");
        }
        other => panic!("a batch with a bad message: {other:?}"),
    }
    let out = ns.exec(
        &["nft", "list", "map", "ip", "kube-proxy", "service-ips"],
        None,
    );
    let elements = String::from_utf8_lossy(&out.stdout)
        .matches(" : goto ")
        .count();
    assert_eq!(elements, SERVICES, "the refused batch changed the table");
}

/// A ClientIP Service with `timeout` seconds of affinity and two endpoints.
fn affinity_service(timeout: u32) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: aff, namespace: ns}}\n\
         spec:\n  clusterIP: 10.96.0.30\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout}}}}}\n  ports: [{{name: p, port: 80, protocol: TCP}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: aff-1\n  namespace: ns\n  labels: {{kubernetes.io/service-name: aff}}\n\
         addressType: IPv4\nports: [{{name: p, port: 80, protocol: TCP}}]\n\
         endpoints:\n  - addresses: [10.244.1.11]\n  - addresses: [10.244.1.12]\n"
    )
}

#[test]
fn an_affinity_timeout_change_applies_incrementally() {
    require();
    // The affinity sets keep their names when the timeout changes, and rules in the endpoint
    // chains refer to them: replacing them must not be refused as "in use".
    let state = |timeout| kube_proxy_cases::state_of(&affinity_service(timeout));
    let ns = TestNetns::new("kpr-nftaff");
    let mut syncer = NftSyncer::new(
        kpr::netfilter::plan::PlanConfig::default(),
        false,
        NftablesConfig::default(),
    );
    for (i, timeout) in [10, 20, 10].into_iter().enumerate() {
        let full = syncer.needs_full();
        let p = syncer.prepare(&state(timeout), full, Instant::now());
        assert_eq!(p.full, i == 0);
        let txn = Encoder::new(&p.target).encode(&p.ops);
        ns.run(|| txn.commit())
            .unwrap_or_else(|e| panic!("timeout {timeout} s: {e}"));
        syncer.commit(p);
        let out = ns.exec(&["nft", "list", "table", "ip", "kube-proxy"], None);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.matches(&format!("timeout {timeout}s")).count(),
            2,
            "two affinity sets with {timeout} s:\n{text}"
        );
    }
}
