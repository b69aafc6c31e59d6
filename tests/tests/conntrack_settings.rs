//! kube-proxy's conntrack flags applied as kube-proxy applies them (issue 10, item 8): the
//! agent writes the netfilter conntrack sysctls of the network namespace it runs in (the lab
//! node's here), and only those: the host's stay as they were.

use std::time::Duration;

use kpr_lab::kpr::{kpr_path, Kpr};
use kpr_lab::{Lab, LabSpec};

const TIMEOUTS: [(&str, &str); 4] = [
    ("nf_conntrack_tcp_timeout_established", "7200"),
    ("nf_conntrack_tcp_timeout_close_wait", "120"),
    ("nf_conntrack_udp_timeout", "45"),
    ("nf_conntrack_tcp_be_liberal", "1"),
];

fn host_value(name: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/net/netfilter/{name}"))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .trim()
        .to_string()
}

#[test]
fn conntrack_flags_set_the_node_namespaces_sysctls_and_nothing_on_the_host() {
    kpr_lab::require_lab("conntrack settings");
    let lab = Lab::up(LabSpec {
        prefix: Lab::unique_prefix("ct"),
        ..LabSpec::default()
    })
    .expect("lab up");
    let node_value = |name: &str| {
        let path = format!("/proc/sys/net/netfilter/{name}");
        let out = lab.exec_in_node(&["cat", &path], None).unwrap();
        assert!(out.status.success(), "cat {path} in the node namespace");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let host_before: Vec<String> = TIMEOUTS.iter().map(|(n, _)| host_value(n)).collect();
    for (name, want) in TIMEOUTS {
        assert_ne!(
            node_value(name),
            want,
            "{name} already {want}: the test would prove nothing"
        );
    }

    let dir = lab.manifest_dir().unwrap();
    let args = [
        "--hostname-override",
        "node1",
        "--conntrack-tcp-timeout-established=2h",
        "--conntrack-tcp-timeout-close-wait=2m",
        "--conntrack-udp-timeout=45s",
        "--conntrack-tcp-be-liberal",
    ];
    let mut kpr = Kpr::start(&lab, &kpr_path(), &dir, "kpr", &args).expect("kpr start");
    kpr.wait_for_syncs(1, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", kpr.log()));

    for (name, want) in TIMEOUTS {
        assert_eq!(
            node_value(name),
            want,
            "{name} in the node namespace\n{}",
            kpr.log()
        );
    }
    let host_after: Vec<String> = TIMEOUTS.iter().map(|(n, _)| host_value(n)).collect();
    assert_eq!(
        host_before, host_after,
        "the host's conntrack sysctls changed"
    );
    // The UDP stream timeout was not given (0): left alone, as kube-proxy leaves it.
    assert!(
        !kpr.log().contains("nf_conntrack_udp_timeout_stream"),
        "{}",
        kpr.log()
    );
}
