//! kube-proxy's rules as kpr writes them, loaded by the real `iptables-restore` into a fresh
//! network namespace (never the host's) and read back with `iptables-save`: the kernel's own
//! reading of kpr's writer, for kube-proxy's test cases (whose expected texts, checked against
//! kpr's in `kube_proxy_iptables`, are the outside reference). Root only (fails otherwise).

mod kube_proxy_cases;

use std::collections::BTreeMap;

use kpr::model::Family;
use kpr::netfilter::iptables::render::{self, IptablesConfig, WriteScope};
use kpr::netfilter::plan::plan;
use kpr_lab::TestNetns;

fn require() {
    kpr_lab::preconditions::require(
        "the iptables-restore tests",
        &["ip", "iptables-restore", "iptables-save"],
    );
}

/// `-A` rules per (table, chain) in iptables-save / iptables-restore text.
fn rules_per_chain(text: &str) -> BTreeMap<(String, String), usize> {
    let mut table = String::new();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split(' ').next().unwrap_or_default().to_string();
            *out.entry((table.clone(), chain)).or_insert(0) += 1;
        }
    }
    out
}

/// Loads `rules` (standalone restore input) into a fresh namespace and returns what
/// iptables-save prints, after checking that every rule arrived in its chain and that the saved
/// text loads back to itself.
fn load_and_save(what: &str, rules: &str) -> String {
    let ns = TestNetns::new("kpr-iptest");
    let test = ns.exec(&["iptables-restore", "--test"], Some(rules.as_bytes()));
    assert!(
        test.status.success(),
        "{what}: iptables-restore --test: {}\n{rules}",
        String::from_utf8_lossy(&test.stderr)
    );
    let load = ns.exec(&["iptables-restore"], Some(rules.as_bytes()));
    assert!(
        load.status.success(),
        "{what}: iptables-restore: {}\n{rules}",
        String::from_utf8_lossy(&load.stderr)
    );
    let save = ns.exec(&["iptables-save"], None);
    assert!(save.status.success());
    let saved = String::from_utf8_lossy(&save.stdout).into_owned();
    assert_eq!(
        rules_per_chain(&saved),
        rules_per_chain(rules),
        "{what}: saved:\n{saved}\nrendered:\n{rules}"
    );
    let again = TestNetns::new("kpr-iptest");
    let reload = again.exec(&["iptables-restore"], Some(saved.as_bytes()));
    assert!(reload.status.success(), "{what}: reloading the saved rules");
    let resaved = again.exec(&["iptables-save"], None);
    let strip = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        strip(&String::from_utf8_lossy(&resaved.stdout)),
        strip(&saved),
        "{what}"
    );
    saved
}

#[test]
fn real_iptables_restore_loads_kprs_rules_for_kube_proxys_cases() {
    require();
    let ipt = IptablesConfig::for_mark_bit(14);
    let mut loaded = 0;
    for case in kube_proxy_cases::cases("iptables", "expected.txt") {
        // One state per case is enough here (no partial syncs), IPv4 (iptables, not
        // ip6tables), and only what kpr accepts.
        if case.expected.is_none() || case.name.contains("/step") && !case.name.ends_with("/step1")
        {
            continue;
        }
        let Ok((state, cfg)) = case.desired_state_and_config() else {
            continue;
        };
        if cfg.family != Family::V4 {
            continue;
        }
        let rules = render::write(&plan(&state, &cfg), &cfg, &ipt, WriteScope::default());
        let saved = load_and_save(&case.name, &render::standalone(&rules.text));
        loaded += 1;
        if case.name == "TestLoadBalancer" {
            // Spot checks of how iptables reads kube-proxy's idioms.
            for needle in [
                "--reject-with icmp-port-unreachable",
                "-j MASQUERADE --random-fully",
                "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
                "-j MARK --set-xmark 0x4000/0x4000",
            ] {
                assert!(
                    saved.contains(needle)
                        || !rules.text.contains("REJECT") && needle.contains("reject"),
                    "{needle:?} not in:\n{saved}"
                );
            }
        }
    }
    assert!(loaded >= 20, "only {loaded} cases loaded");
    eprintln!("{loaded} kube-proxy cases' rules, as kpr writes them, load unchanged");
}
