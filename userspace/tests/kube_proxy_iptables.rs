//! kpr's iptables writer against kube-proxy's own expectations: each case under
//! `tests/golden/kube-proxy/iptables/` is a kube-proxy unit test (pkg/proxy/iptables
//! proxier_test.go) transcribed as data: the objects it creates (`manifests.yaml`), the fake
//! proxier's settings (`proxier.yaml`) and the restore input kube-proxy's test expects
//! (`expected.txt`). kpr builds its plan from the same objects and settings, writes it, and the
//! two texts must be equal after the order-insensitive normalisation kube-proxy's test applies
//! itself (services are processed in Go-map order there).

mod kube_proxy_cases;

use kube_proxy_cases::{cases, Case, REFUSED_BY_KPR};

use std::collections::BTreeSet;

use kpr::netfilter::iptables::render::{self, IptablesConfig};
use kpr::netfilter::iptables::RuleSyncer;

/// Tables in name order; within a table, chain declarations in kube-proxy's test order
/// (KUBE-NODEPORTS, KUBE-SERVICES, other KUBE-* chains alphabetically, then the rest) and each
/// chain's rules after them; the rules of the chains every service writes into are sorted by
/// service port (the first word of their comment), keeping the relative order of one
/// service port's rules and the NodePorts tail rule last.
fn normalise(text: &str) -> String {
    #[derive(Default)]
    struct Table {
        chains: Vec<(String, String)>,
        rules: Vec<(String, String)>,
        other: Vec<String>,
    }
    let mut tables: Vec<(String, Table)> = Vec::new();
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') || line == "COMMIT" {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            tables.push((name.to_string(), Table::default()));
            continue;
        }
        let Some((_, t)) = tables.last_mut() else {
            continue;
        };
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            t.chains.push((name.to_string(), line.to_string()));
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            t.rules.push((chain.to_string(), line.to_string()));
        } else {
            t.other.push(line.to_string());
        }
    }
    tables.sort_by(|a, b| a.0.cmp(&b.0));
    let rank = |c: &str| match c {
        "KUBE-NODEPORTS" => (0, c.to_string()),
        "KUBE-SERVICES" => (1, c.to_string()),
        c if c.starts_with("KUBE-") => (2, c.to_string()),
        c => (3, c.to_string()),
    };
    let service_of = |rule: &str| -> (u8, String) {
        if rule.contains("kubernetes service nodeports") {
            return (1, String::new());
        }
        let comment = rule
            .split_once("--comment ")
            .map(|(_, c)| c.trim_start_matches('"'))
            .unwrap_or_default();
        let first = comment.split([' ', '"']).next().unwrap_or_default();
        (0, first.to_string())
    };
    let mut out = String::new();
    for (name, mut t) in tables {
        out.push_str(&format!("*{name}\n"));
        t.chains.sort_by_key(|a| rank(&a.0));
        let mut chain_names: Vec<String> = t.chains.iter().map(|(n, _)| n.clone()).collect();
        for (_, l) in &t.chains {
            out.push_str(l);
            out.push('\n');
        }
        for (c, _) in &t.rules {
            if !chain_names.contains(c) {
                chain_names.push(c.clone());
            }
        }
        for chain in &chain_names {
            let mut rules: Vec<&String> = t
                .rules
                .iter()
                .filter(|(c, _)| c == chain)
                .map(|(_, l)| l)
                .collect();
            if matches!(
                chain.as_str(),
                "KUBE-SERVICES"
                    | "KUBE-EXTERNAL-SERVICES"
                    | "KUBE-NODEPORTS"
                    | "KUBE-PROXY-FIREWALL"
            ) {
                rules.sort_by_key(|r| service_of(r));
            }
            for r in rules {
                out.push_str(r);
                out.push('\n');
            }
        }
        for l in &t.other {
            out.push_str(l);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// kube-proxy cases that test a feature gate kpr does not have (the behaviour is kube-proxy's
/// default, always on in kpr): (case prefix, gate).
const GATED: &[(&str, &str)] = &[
    (
        "TestEndpointSliceWithTerminatingEndpointsTrafficPolicyCluster/04-feature-gate-disabled",
        "ProxyTerminatingEndpoints (GA, locked on)",
    ),
    (
        "TestEndpointSliceWithTerminatingEndpointsTrafficPolicyLocal/04-feature-gate-disabled",
        "ProxyTerminatingEndpoints (GA, locked on)",
    ),
];

/// The chains the fake kernel holds after loading `text` on top of `chains`.
fn load(chains: &mut BTreeSet<String>, text: &str) {
    let mut nat = false;
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            nat = t == "nat";
        } else if nat {
            if let Some(c) = line.strip_prefix(':') {
                chains.insert(c.split_whitespace().next().unwrap().to_string());
            } else if let Some(c) = line.strip_prefix("-X ") {
                chains.remove(c.trim());
            }
        }
    }
}

/// A case and the steps before it (a multi-step test's `stepN` directories, in order), synced
/// one after another by one syncer as kube-proxy's test does; the first sync is full.
fn run(steps: &[&Case]) -> Result<Vec<String>, String> {
    let mut syncer: Option<RuleSyncer> = None;
    let mut kernel = BTreeSet::new();
    let mut out = Vec::new();
    for case in steps {
        let (state, cfg) = case.desired_state_and_config()?;
        let list = |k: &str| {
            case.proxier
                .get(k)
                .and_then(|v| v.as_sequence())
                .is_some_and(|s| !s.is_empty())
        };
        let ipt = IptablesConfig {
            random_fully: case
                .proxier
                .get("iptablesHasRandomFully")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            nfacct: list("nfacctCounters"),
            ..fake_proxier_config()
        };
        let s = syncer.get_or_insert_with(|| {
            RuleSyncer::new(cfg.clone(), cfg.nodeport_ips.is_some(), ipt.clone())
        });
        s.plan_cfg = cfg.clone();
        s.ipt = ipt;
        s.nodeport_addresses_given = cfg.nodeport_ips.is_some();
        let prepared = s.prepare(&state, s.needs_full(), Some(&kernel));
        if case.expected.is_none() {
            // The step whose restore kube-proxy's test makes fail: nothing is loaded, and the
            // next sync is full.
            s.reset();
            out.push(String::new());
            continue;
        }
        load(&mut kernel, &prepared.rules.text);
        out.push(s.commit(prepared).text);
    }
    Ok(out)
}

/// The settings of kube-proxy's fake proxier: the mark spelt short, no `--random-fully` (its
/// fake iptables lacks it unless a test says so), no nfacct counters.
fn fake_proxier_config() -> IptablesConfig {
    IptablesConfig {
        mark: "0x4000".into(),
        random_fully: false,
        conntrack_tcp_liberal: false,
        nfacct: false,
    }
}

/// The steps of a multi-step test up to `case` (its `stepN` siblings), or `case` alone.
fn steps_until<'a>(cases: &'a [Case], case: &'a Case) -> Vec<&'a Case> {
    let step = |c: &Case| -> Option<(String, usize)> {
        let (test, n) = c.name.rsplit_once("/step")?;
        Some((test.to_string(), n.parse().ok()?))
    };
    let Some((test, n)) = step(case) else {
        return vec![case];
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
    s.into_iter().map(|(_, c)| c).collect()
}

#[test]
fn kpr_writes_kube_proxys_expected_iptables_rules() {
    let cases = cases("iptables", "expected.txt");
    assert!(
        cases.len() >= 7,
        "kube-proxy's cases are missing: {}",
        cases.len()
    );
    let mut failures = Vec::new();
    let (mut compared, mut refused_n, mut gated) = (0, 0, 0);
    for case in &cases {
        let Some(expected) = &case.expected else {
            continue;
        };
        if GATED
            .iter()
            .any(|(prefix, _)| case.name.starts_with(prefix))
        {
            gated += 1;
            continue;
        }
        let refused = REFUSED_BY_KPR.iter().find(|(n, _)| case.name == *n);
        let got = match (run(&steps_until(&cases, case)), refused) {
            (Ok(mut texts), None) => texts.pop().unwrap(),
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
        let want = normalise(expected);
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
        "{compared} kube-proxy iptables cases match; {refused_n} refused as the API server would; \
         {gated} test a feature gate kpr does not have"
    );
}

#[test]
fn the_normalisation_ignores_service_order_only() {
    let a = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-B - [0:0]\n:KUBE-SVC-A - [0:0]\n\
             -A KUBE-SERVICES -m comment --comment \"ns/b:p cluster IP\" -j KUBE-SVC-B\n\
             -A KUBE-SERVICES -m comment --comment \"ns/a:p cluster IP\" -j KUBE-SVC-A\n\
             -A KUBE-SERVICES -m comment --comment \"ns/a:p external IP\" -j KUBE-EXT-A\n\
             -A KUBE-SVC-A -j X\n-A KUBE-SVC-A -j Y\nCOMMIT\n";
    let b = "*nat\n:KUBE-SVC-A - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-B - [0:0]\n\
             -A KUBE-SERVICES -m comment --comment \"ns/a:p cluster IP\" -j KUBE-SVC-A\n\
             -A KUBE-SERVICES -m comment --comment \"ns/a:p external IP\" -j KUBE-EXT-A\n\
             -A KUBE-SVC-A -j X\n-A KUBE-SVC-A -j Y\n\
             -A KUBE-SERVICES -m comment --comment \"ns/b:p cluster IP\" -j KUBE-SVC-B\nCOMMIT\n";
    assert_eq!(normalise(a), normalise(b));
    // The order of one chain's rules counts.
    let c = b.replace("-j X\n-A KUBE-SVC-A -j Y", "-j Y\n-A KUBE-SVC-A -j X");
    assert_ne!(normalise(a), normalise(&c));
}

#[path = "kube_proxy_cases/iptables_tracer.rs"]
mod iptables_tracer;

/// One `flows.yaml` entry.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Flow {
    name: String,
    #[serde(rename = "sourceIP")]
    source_ip: std::net::IpAddr,
    #[serde(rename = "destIP")]
    dest_ip: std::net::IpAddr,
    dest_port: u16,
    output: String,
    masq: bool,
}

fn flows(dir: &std::path::Path) -> Option<Vec<Flow>> {
    let text = std::fs::read_to_string(dir.join("flows.yaml")).ok()?;
    Some(yaml_serde::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", dir.display())))
}

/// The addresses kube-proxy's tracer counts as the node's.
fn local_ips(case: &Case) -> Vec<std::net::IpAddr> {
    let mut ips: Vec<std::net::IpAddr> = vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
    for s in case
        .proxier
        .get("nodeIPs")
        .and_then(|v| v.as_sequence())
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
    {
        ips.push(s.parse().unwrap());
    }
    ips
}

#[test]
fn the_tracer_agrees_with_kube_proxys_own_tracer_test() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/kube-proxy/iptables/TestTracePackets");
    let rules =
        iptables_tracer::Rules::parse(&std::fs::read_to_string(dir.join("rules.txt")).unwrap());
    let local: Vec<std::net::IpAddr> = ["127.0.0.1", "192.168.0.2"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let all = flows(&dir).expect("flows.yaml");
    for f in &all {
        let got = iptables_tracer::trace(
            &rules,
            &iptables_tracer::Packet {
                src: f.source_ip,
                dst: f.dest_ip,
                dport: f.dest_port,
                local: &local,
            },
        );
        assert_eq!(got, (f.output.clone(), f.masq), "{}", f.name);
    }
    assert!(all.len() >= 4);
}

/// kube-proxy's packet-flow expectations (`flows.yaml`), traced through the rules kpr writes for
/// the same objects: which endpoints a packet can reach, what is rejected or dropped, and what
/// is masqueraded.
#[test]
fn packets_flow_through_kprs_rules_as_kube_proxys_tests_expect() {
    let cases = cases("iptables", "expected.txt");
    let (mut traced, mut failures) = (0, Vec::new());
    for case in &cases {
        let Some(flows) = flows(&case.dir) else {
            continue;
        };
        if REFUSED_BY_KPR.iter().any(|(n, _)| case.name == *n)
            || GATED.iter().any(|(p, _)| case.name.starts_with(p))
        {
            continue;
        }
        // A full sync of this step's state: the whole ruleset, as the kernel holds it.
        let text = match case.desired_state_and_config() {
            Ok((state, cfg)) => {
                let ipt = fake_proxier_config();
                let s = RuleSyncer::new(cfg.clone(), cfg.nodeport_ips.is_some(), ipt);
                render::standalone(&s.prepare(&state, true, None).rules.text)
            }
            Err(e) => {
                failures.push(format!("{}: {e}", case.name));
                continue;
            }
        };
        let rules = iptables_tracer::Rules::parse(&text);
        let local = local_ips(case);
        for f in &flows {
            let got = iptables_tracer::trace(
                &rules,
                &iptables_tracer::Packet {
                    src: f.source_ip,
                    dst: f.dest_ip,
                    dport: f.dest_port,
                    local: &local,
                },
            );
            traced += 1;
            if got != (f.output.clone(), f.masq) {
                failures.push(format!(
                    "{} / {}: kube-proxy expects {:?} masq={}, kpr's rules give {:?} masq={}",
                    case.name, f.name, f.output, f.masq, got.0, got.1
                ));
            }
        }
    }
    assert!(traced >= 30, "only {traced} flows traced");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("{traced} kube-proxy packet flows hold in kpr's iptables rules");
}

/// The rules kept for unchanged ports between syncs must be the rules a fresh write gives: one
/// syncer walks through the objects of every kube-proxy case in turn (forwards, then back),
/// and at each step its full restore input must equal a fresh syncer's.
#[test]
fn kept_port_rules_equal_a_fresh_write() {
    let all = cases("iptables", "expected.iptables");
    let ipt = fake_proxier_config();
    let mut steps = Vec::new();
    for case in &all {
        if let Ok((state, cfg)) = case.desired_state_and_config() {
            if cfg.family == kpr::model::Family::V4 {
                steps.push((case.name.clone(), state, cfg));
            }
        }
    }
    assert!(steps.len() >= 20, "{} cases", steps.len());
    let cfg = steps[0].2.clone();
    let mut syncer = RuleSyncer::new(cfg.clone(), cfg.nodeport_ips.is_some(), ipt.clone());
    let order: Vec<usize> = (0..steps.len()).chain((0..steps.len()).rev()).collect();
    let mut kept = 0;
    for i in order {
        let (name, state, _) = &steps[i];
        let mut state = state.clone();
        state.node_ip = steps[0].1.node_ip;
        state.node_ips = steps[0].1.node_ips.clone();
        let partial = syncer.prepare(&state, false, None);
        kept += usize::from(!partial.full && partial.rewritten < state.service_ports.len());
        let got = syncer.prepare(&state, true, None).rules.text;
        let fresh = RuleSyncer::new(cfg.clone(), cfg.nodeport_ips.is_some(), ipt.clone());
        let want = fresh.prepare(&state, true, None).rules.text;
        assert_eq!(got, want, "{name}");
        syncer.commit(partial);
    }
    assert!(kept >= 10, "only {kept} steps kept any port's rules");
}

/// Crossing kube-proxy's large-cluster threshold (1,000 endpoints) changes every port's rules
/// (endpoint chains lose their comments): no kept rule survives it.
#[test]
fn kept_port_rules_follow_the_large_cluster_mode() {
    let services = |n: usize| kube_proxy_cases::state_of(&kube_proxy_cases::many_services(n, 1));
    let ipt = fake_proxier_config();
    let cfg = kpr::netfilter::plan::PlanConfig::default();
    let mut syncer = RuleSyncer::new(cfg.clone(), false, ipt.clone());
    for n in [10, 1_001, 10, 1_001] {
        let state = services(n);
        let p = syncer.prepare(&state, false, None);
        let got = p.rules.text.clone();
        syncer.commit(p);
        let fresh = RuleSyncer::new(cfg.clone(), false, ipt.clone());
        let want = fresh.prepare(&state, true, None).rules.text;
        assert_eq!(got, want, "{n} Services");
    }
}
