//! kube-proxy's rules as kpr renders them, loaded by the real `iptables-restore` into a fresh
//! network namespace (never the host's) and read back with `iptables-save`: the outside check
//! of the golden file (`tests/golden/iptables-basic.txt`, which kpr itself produced). Root
//! only (fails otherwise).

use std::collections::BTreeMap;
use std::net::IpAddr;

use kpr::iptables::{
    render_kube_proxy_iptables, render_kube_proxy_iptables_with_last, KubeProxyIptablesConfig,
};
use kpr::model::{Backend, DesiredState, Frontend, Protocol, ServicePortName, ServicePortState};
use kpr_lab::TestNetns;

fn require() {
    kpr_lab::preconditions::require(
        "the iptables-restore tests",
        &["ip", "iptables-restore", "iptables-save"],
    );
}

fn fe(ip: &str, port: u16) -> Frontend {
    Frontend {
        ip: ip.parse().unwrap(),
        port,
        protocol: Protocol::Tcp,
    }
}

fn spn(ns: &str, name: &str, port: &str) -> ServicePortName {
    ServicePortName {
        namespace: ns.into(),
        name: name.into(),
        port: port.into(),
    }
}

fn be(ip: &str, port: u16) -> Backend {
    Backend {
        ip: ip.parse::<IpAddr>().unwrap(),
        port,
    }
}

/// Three Services: one with three endpoints, one with none, one with one.
fn state() -> DesiredState {
    let mut state = DesiredState::default();
    for (frontend, name, backends) in [
        (
            fe("10.96.0.10", 80),
            spn("default", "web", "http"),
            vec![
                be("10.244.1.2", 8080),
                be("10.244.1.3", 8080),
                be("10.244.2.4", 8080),
            ],
        ),
        (fe("10.96.0.20", 443), spn("default", "empty", ""), vec![]),
        (
            fe("10.96.0.30", 53),
            spn("kube-system", "dns", "dns-tcp"),
            vec![be("10.244.3.3", 53)],
        ),
    ] {
        state.services.insert(
            frontend,
            ServicePortState {
                name,
                backends,
                ..Default::default()
            },
        );
    }
    state
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

#[test]
fn real_iptables_restore_loads_the_rendered_rules_unchanged() {
    require();
    let golden = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/iptables-basic.txt"
    ))
    .unwrap();
    let cases = [
        ("the golden file", golden),
        (
            "cluster CIDR",
            render_kube_proxy_iptables(
                &state(),
                &KubeProxyIptablesConfig {
                    cluster_cidr: Some("10.244.0.0/16".into()),
                    masquerade_all: false,
                },
            ),
        ),
        (
            "masquerade-all",
            render_kube_proxy_iptables_with_last(
                &state(),
                &KubeProxyIptablesConfig {
                    cluster_cidr: None,
                    masquerade_all: true,
                },
                Some(&fe("10.96.0.10", 80)),
            ),
        ),
        (
            "no Services",
            render_kube_proxy_iptables(
                &DesiredState::default(),
                &KubeProxyIptablesConfig::default(),
            ),
        ),
    ];
    for (what, rules) in &cases {
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
        let saved = String::from_utf8_lossy(&save.stdout);
        // Every rule arrived in its chain: nothing merged, dropped or misplaced.
        assert_eq!(
            rules_per_chain(&saved),
            rules_per_chain(rules),
            "{what}: saved:\n{saved}\nrendered:\n{rules}"
        );
        // And the kernel's reading of the rules is stable: what iptables-save prints loads
        // back to the same text.
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
    }
    // Spot checks of how iptables read kube-proxy's idioms (no normalisation needed).
    let ns = TestNetns::new("kpr-iptest");
    let rules = &cases[1].1;
    assert!(ns
        .exec(&["iptables-restore"], Some(rules.as_bytes()))
        .status
        .success());
    let saved = String::from_utf8_lossy(&ns.exec(&["iptables-save"], None).stdout).into_owned();
    for needle in [
        "--reject-with icmp-port-unreachable",
        "-m statistic --mode random --probability 0.33333333349",
        "-m statistic --mode random --probability 0.50000000000",
        "-j DNAT --to-destination 10.244.3.3:53",
        "! -s 10.244.0.0/16 -d 10.96.0.10/32",
    ] {
        assert!(saved.contains(needle), "{needle:?} not in:\n{saved}");
    }
}
