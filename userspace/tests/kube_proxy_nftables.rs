//! kpr's nftables writer against kube-proxy's own expectations: each case under
//! `tests/golden/kube-proxy/nftables/` is a kube-proxy unit test (pkg/proxy/nftables
//! proxier_test.go) transcribed as data. kpr builds its plan from the same objects and settings,
//! writes the ruleset and prints it as knftables' fake does; the two must be equal after the
//! normalisation kube-proxy's test applies itself.

mod kube_proxy_cases;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use kpr::model::Family;
use kpr::netfilter::nftables::sync::NftSyncer;
use kpr::netfilter::nftables::write::NftablesConfig;
use kube_proxy_cases::{cases, Case, REFUSED_BY_KPR};

/// kube-proxy's test normalisation: blank and `#` lines dropped, then lines ordered by object
/// type (table, chain, rule, set, map, element), then by object name, rules of one chain in
/// their order, anything else by the whole line.
fn normalise(text: &str) -> String {
    let rank = |t: &str| match t {
        "table" => 0,
        "chain" => 1,
        "rule" => 2,
        "set" => 3,
        "map" => 4,
        "element" => 5,
        _ => 6,
    };
    let mut lines: Vec<(usize, u8, String, String)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .enumerate()
        .map(|(i, l)| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let ty = w.get(1).copied().unwrap_or_default();
            let name = w.get(4).copied().unwrap_or_default().to_string();
            (i, rank(ty), name, l.to_string())
        })
        .collect();
    lines.sort_by(|a, b| {
        (a.1, &a.2).cmp(&(b.1, &b.2)).then_with(|| {
            if a.1 == 2 {
                a.0.cmp(&b.0)
            } else {
                a.3.cmp(&b.3)
            }
        })
    });
    lines.into_iter().map(|(_, _, _, l)| l + "\n").collect()
}

/// Steps before which kube-proxy's test ages the stale-chain timestamps (by 2 s), so that the
/// chains flushed earlier are deleted in that sync: (test, step).
const AGED: &[(&str, usize)] = &[
    ("TestSyncProxyRulesRepeated", 4),
    ("TestSyncProxyRulesRepeated", 8),
];

/// The full state after each of `steps`, synced one after another by one syncer.
fn run(steps: &[(usize, &Case)]) -> Result<Vec<String>, String> {
    let start = Instant::now();
    let mut now = start;
    let mut syncer: Option<NftSyncer> = None;
    let mut out = Vec::new();
    for (n, case) in steps {
        let (mut state, cfg) = case.desired_state_and_config()?;
        let test = case.name.split('/').next().unwrap_or_default();
        if AGED.contains(&(test, *n)) {
            now += Duration::from_secs(2);
        }
        // kube-proxy's nftables proxier puts only --nodeport-addresses' matches in
        // nodeport-ips; the fake's default list has the node IP.
        state.node_ips = cfg.nodeport_ips.clone().unwrap_or_default();
        let s = syncer.get_or_insert_with(|| {
            NftSyncer::new(
                cfg.clone(),
                true,
                NftablesConfig {
                    service_cidrs: case.service_cidrs(cfg.family),
                },
            )
        });
        let prepared = s.prepare(&state, s.needs_full(), now);
        out.push(s.commit(prepared).dump());
    }
    Ok(out)
}

/// The steps of a multi-step test up to `case`, with their numbers, or `case` alone.
fn steps_until<'a>(cases: &'a [Case], case: &'a Case) -> Vec<(usize, &'a Case)> {
    let step = |c: &Case| -> Option<(String, usize)> {
        let (test, n) = c.name.rsplit_once("/step")?;
        Some((test.to_string(), n.parse().ok()?))
    };
    let Some((test, n)) = step(case) else {
        return vec![(1, case)];
    };
    let mut s: Vec<(usize, &Case)> = cases
        .iter()
        .filter_map(|c| {
            step(c)
                .filter(|(t, m)| *t == test && *m <= n)
                .map(|(_, m)| (m, c))
        })
        .collect();
    s.sort_by_key(|(m, _)| *m);
    s
}

#[test]
fn kpr_writes_kube_proxys_expected_nftables_rules() {
    let all = cases("nftables", "expected.nft");
    let cases: Vec<&Case> = all.iter().filter(|c| c.expected.is_some()).collect();
    assert!(
        cases.len() >= 4,
        "kube-proxy's cases are missing: {}",
        cases.len()
    );
    let mut failures = Vec::new();
    let (mut compared, mut refused_n) = (0, 0);
    for case in &cases {
        let refused = REFUSED_BY_KPR.iter().find(|(n, _)| case.name == *n);
        let got = match (run(&steps_until(&all, case)), refused) {
            (Ok(mut t), None) => t.pop().unwrap(),
            (Err(e), Some((_, why))) if e.contains(why) => {
                refused_n += 1;
                continue;
            }
            (Ok(_), Some((_, why))) => {
                failures.push(format!(
                    "{}: kpr accepted it; expected a refusal ({why})",
                    case.name
                ));
                continue;
            }
            (Err(e), _) => {
                failures.push(format!("{}: kpr refused an object: {e}", case.name));
                continue;
            }
        };
        compared += 1;
        let want = normalise(case.expected.as_deref().unwrap());
        let got = normalise(&got);
        if want != got {
            failures.push(format!(
                "{}:\n{}",
                case.name,
                kube_proxy_cases::diff(&want, &got)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} kube-proxy cases differ:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
    eprintln!(
        "{compared} kube-proxy nftables cases match; {refused_n} refused as the API server would"
    );
}

#[path = "kube_proxy_cases/nftables_tracer.rs"]
mod nftables_tracer;

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Flow {
    name: String,
    #[serde(rename = "sourceIP")]
    source_ip: IpAddr,
    #[serde(rename = "destIP")]
    dest_ip: IpAddr,
    dest_port: u16,
    #[serde(default)]
    protocol: Option<String>,
    output: String,
    masq: bool,
}

/// kube-proxy's packet-flow expectations for its nftables mode (the flow-only tests and every
/// case with a `flows.yaml`), traced through the ruleset kpr writes for the same objects.
#[test]
fn packets_flow_through_kprs_nftables_rules_as_kube_proxys_tests_expect() {
    let all = cases("nftables", "expected.nft");
    let (mut traced, mut failures) = (0, Vec::new());
    for case in &all {
        let Ok(text) = std::fs::read_to_string(case.dir.join("flows.yaml")) else {
            continue;
        };
        let flows: Vec<Flow> = yaml_serde::from_str(&text).unwrap();
        let (mut state, cfg) = match case.desired_state_and_config() {
            Ok(x) => x,
            Err(e) => {
                failures.push(format!("{}: {e}", case.name));
                continue;
            }
        };
        state.node_ips = cfg.nodeport_ips.clone().unwrap_or_default();
        let mut syncer = NftSyncer::new(
            cfg.clone(),
            true,
            NftablesConfig {
                service_cidrs: case.service_cidrs(cfg.family),
            },
        );
        let r = syncer.prepare(&state, true, Instant::now()).target;
        let local: Vec<IpAddr> = case
            .proxier
            .get("tracerLocalIPs")
            .and_then(|v| v.as_sequence())
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str()?.parse().ok())
            .collect();
        for f in &flows {
            let proto = match f.protocol.as_deref() {
                Some("UDP") => kpr::model::Protocol::Udp,
                Some("SCTP") => kpr::model::Protocol::Sctp,
                _ => kpr::model::Protocol::Tcp,
            };
            let got = nftables_tracer::trace(
                &r,
                &nftables_tracer::Packet {
                    src: f.source_ip,
                    dst: f.dest_ip,
                    proto,
                    dport: f.dest_port,
                    local: &local,
                },
            );
            traced += 1;
            if got != (f.output.clone(), f.masq) {
                failures.push(format!(
                    "{} / {}: kube-proxy expects {:?} masq={}, kpr's ruleset gives {:?} masq={}",
                    case.name, f.name, f.output, f.masq, got.0, got.1
                ));
            }
        }
    }
    assert!(traced >= 30, "only {traced} flows traced");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("{traced} kube-proxy packet flows hold in kpr's nftables ruleset");
}

/// The incremental sync (only the changed ports rewritten) must reach exactly the table a
/// whole rewrite reaches: one syncer walks through the objects of every kube-proxy case of a
/// family in turn (each step changing, adding and removing many ports at once), and after each
/// step its table must equal a fresh syncer's, but for the chains it keeps flushed until they
/// may go.
#[test]
fn incremental_syncs_reach_the_table_a_whole_rewrite_writes() {
    for family in [Family::V4, Family::V6] {
        let all = cases("nftables", "expected.nft");
        let mut steps = Vec::new();
        for case in &all {
            if let Ok((state, cfg)) = case.desired_state_and_config() {
                if cfg.family == family {
                    steps.push((case.name.clone(), state, cfg));
                }
            }
        }
        assert!(steps.len() >= 2, "{family:?}: {} cases", steps.len());
        let cfg = steps[0].2.clone();
        let node_ips = cfg.nodeport_ips.clone().unwrap_or_default();
        let node_ip = steps[0].1.node_ip;
        let mut syncer = NftSyncer::new(cfg.clone(), true, NftablesConfig::default());
        let mut now = Instant::now();
        let mut incremental_steps = 0;
        // Forwards, then backwards: every step's changes undone one by one.
        let order: Vec<usize> = (0..steps.len()).chain((0..steps.len()).rev()).collect();
        for i in order {
            let (name, state, _) = &steps[i];
            let mut state = state.clone();
            state.node_ips = node_ips.clone();
            state.node_ip = node_ip;
            now += Duration::from_millis(700);
            let full = syncer.needs_full();
            let prepared = syncer.prepare(&state, full, now);
            incremental_steps += usize::from(!prepared.full);
            let got = syncer.commit(prepared).clone();
            let stale = syncer.stale_chains();

            let mut fresh = NftSyncer::new(cfg.clone(), true, NftablesConfig::default());
            let want = fresh.prepare(&state, true, now).target;
            assert_eq!(got.sets, want.sets, "{name}: sets");
            for (chain, c) in &want.chains {
                assert_eq!(got.chains.get(chain), Some(c), "{name}: chain {chain}");
            }
            for (chain, c) in &got.chains {
                if !want.chains.contains_key(chain) {
                    assert!(
                        c.rules.is_empty() && stale.contains(&chain.as_str()),
                        "{name}: chain {chain} is neither written nor kept stale"
                    );
                }
            }
            let sorted = |r: &kpr::netfilter::nftables::ruleset::Ruleset| {
                r.elements
                    .iter()
                    .filter(|(_, e)| !e.is_empty())
                    .map(|(s, e)| {
                        let mut e: Vec<String> = e.iter().map(|e| format!("{e:?}")).collect();
                        e.sort();
                        e.dedup();
                        (s.clone(), e)
                    })
                    .collect::<Vec<_>>()
            };
            assert_eq!(sorted(&got), sorted(&want), "{name}: elements");
        }
        assert!(
            incremental_steps >= steps.len(),
            "{family:?}: only {incremental_steps} steps took the incremental path"
        );
    }
}

fn two_port_service(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\n\
         spec:\n  clusterIP: {ip}\n  ports: [{{name: http, port: 80, protocol: TCP}}, {{name: dns, port: 53, protocol: UDP}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: ns\n  labels: {{kubernetes.io/service-name: {name}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 80, protocol: TCP}}, {{name: dns, port: 53, protocol: UDP}}]\n\
         endpoints:\n  - addresses: [10.244.1.11]\n---\n"
    )
}

#[test]
fn elements_shared_by_the_ports_of_a_service_go_with_the_last_of_them() {
    // Both ports of `web` put 10.96.0.10 in cluster-ips. Removing the Service must remove it
    // (a ClusterIP left there is rejected instead of being unrouted); removing one port must
    // keep it.
    let web = two_port_service("web", "10.96.0.10");
    let other = two_port_service("other", "10.96.0.11");
    let one_port = web.replace(", {name: dns, port: 53, protocol: UDP}]\n---", "]\n---");
    let steps = [
        format!("{web}{other}"),
        format!("{one_port}{other}"),
        format!("{web}{other}"),
        other.clone(),
        format!("{web}{other}"),
    ];
    let cfg = kpr::netfilter::plan::PlanConfig::default();
    let mut syncer = NftSyncer::new(cfg.clone(), true, NftablesConfig::default());
    let mut now = Instant::now();
    for (i, manifests) in steps.iter().enumerate() {
        let state = kube_proxy_cases::state_of(manifests);
        now += Duration::from_secs(2);
        let full = syncer.needs_full();
        let p = syncer.prepare(&state, full, now);
        assert_eq!(p.full, i == 0, "step {i}");
        let got = syncer.commit(p).clone();
        let mut fresh = NftSyncer::new(cfg.clone(), true, NftablesConfig::default());
        let want = fresh.prepare(&state, true, now).target;
        let cluster_ips = |r: &kpr::netfilter::nftables::ruleset::Ruleset| {
            let mut v: Vec<String> = r.elements["cluster-ips"]
                .iter()
                .map(|e| format!("{:?}", e.key))
                .collect();
            v.sort();
            v.dedup();
            v
        };
        assert_eq!(cluster_ips(&got), cluster_ips(&want), "step {i}");
        assert_eq!(
            got.elements.get("service-ips").map(Vec::len),
            want.elements.get("service-ips").map(Vec::len),
            "step {i}"
        );
    }
}
