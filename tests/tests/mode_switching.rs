//! Switching a live node between proxy modes, one restart each, as an operator migrating from
//! kube-proxy would: kube-proxy's own iptables rules → kpr ebpf → iptables → nftables → ebpf.
//! After each restart the Service is served by the new mode and nothing of the previous one is
//! left in the node's namespace (kube-proxy's `CleanupLeftovers`), and `kpr diff` finds the
//! running agent's state equal to the `iptables-save` taken from kube-proxy's rules.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use kpr_lab::kpr::{kpr_path, Kpr, ProxyMode};
use kpr_lab::{require_lab, Lab, LabSpec};

const MANIFEST: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: demo}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: demo\n  labels: {kubernetes.io/service-name: echo}\naddressType: IPv4\nports: [{name: http, protocol: TCP, port: 8080}]\nendpoints:\n  - {addresses: [10.244.1.11], conditions: {ready: true}}\n  - {addresses: [10.244.1.12], conditions: {ready: true}}\n  - {addresses: [10.244.1.13], conditions: {ready: true}}\n";

/// What each mode leaves in the node's namespace, as the tools show it.
fn state(lab: &Lab) -> (bool, bool, bool) {
    let out = |args: &[&str]| lab.exec_in_node(args, None).ok();
    let iptables = out(&["iptables-save", "-t", "nat"])
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(":KUBE-SERVICES"))
        .unwrap_or(false);
    let nft = |family: &str, table: &str| {
        lab.exec_in_node(&["nft", "list", "table", family, table], None)
            .is_ok_and(|o| o.status.success())
    };
    (iptables, nft("ip", "kube-proxy"), nft("ip", "kpr"))
}

#[test]
fn a_node_switches_from_kube_proxy_through_every_mode_one_restart_each() {
    let (lab, dir, rendered) = lab_with_service("switch");
    let client = lab.clients()[0].clone();
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();

    // kube-proxy was here: its rules for the same Service, as kube-proxy's iptables mode
    // writes them (kpr's writer is golden-tested against kube-proxy's expectations).
    let load = lab
        .exec_in_node(&["iptables-restore"], Some(&rendered))
        .unwrap();
    assert!(load.status.success(), "{load:?}");
    assert_eq!(state(&lab), (true, false, false));
    // What an operator saves on the node before switching it.
    let saved = lab.exec_in_node(&["iptables-save"], None).unwrap();
    assert!(saved.status.success(), "{saved:?}");
    let dump = lab.work_dir().join("kube-proxy-iptables-save.txt");
    std::fs::write(&dump, &saved.stdout).unwrap();

    // (mode, what must be left afterwards: kube-proxy iptables, kube-proxy nft, kpr's table)
    let steps = [
        (ProxyMode::Ebpf, (false, false, true)),
        (ProxyMode::Iptables, (true, false, false)),
        (ProxyMode::Nftables, (false, true, false)),
        (ProxyMode::Ebpf, (false, false, true)),
    ];
    for (mode, left) in steps {
        let kpr = Kpr::start(&lab, &kpr_path(), &dir, "kpr", &mode.args()).expect("kpr start");
        let r = lab.tcp_spread(&client, vip, 60).unwrap();
        assert_eq!(r.errors, 0, "{mode:?}: {r:?}\n{}", kpr.log());
        assert_eq!(r.counts.len(), 3, "{mode:?}: {r:?}");
        assert_eq!(
            state(&lab),
            left,
            "{mode:?}: (kube-proxy iptables, kube-proxy nftables, kpr's table)\n{}",
            kpr.log()
        );
        let (code, stdout, stderr) = diff(&dump, &kpr);
        assert_eq!(
            (code, stdout.as_str()),
            (0, ""),
            "{mode:?}: kpr diff: {stderr}"
        );
        // The netfilter modes' rules stay after the agent stops (as kube-proxy's do, so that
        // a restart drops no traffic) until the next mode removes them.
        let log = kpr.stop();
        assert!(!log.contains("panicked"), "{log}");
    }
}

/// A lab with [`MANIFEST`] in its manifest directory, and kube-proxy's iptables rules for it.
fn lab_with_service(tag: &str) -> (Lab, PathBuf, Vec<u8>) {
    require_lab("mode_switching");
    let lab = Lab::up(LabSpec {
        prefix: Lab::unique_prefix(tag),
        ..LabSpec::default()
    })
    .expect("lab up");
    let dir = lab.manifest_dir().unwrap();
    std::fs::write(dir.join("svc.yaml"), MANIFEST).unwrap();
    let rendered = std::process::Command::new(kpr_path())
        .args(["render-iptables", "--manifests"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(rendered.status.success(), "{rendered:?}");
    (lab, dir, rendered.stdout)
}

/// `kpr diff iptables-save DUMP` against the running agent: (exit status, stdout, stderr).
fn diff(dump: &Path, kpr: &Kpr) -> (i32, String, String) {
    diff_with(dump, kpr.admin_socket())
}

/// `kpr diff iptables-save DUMP` against the agent at `socket`.
fn diff_with(dump: &Path, socket: &Path) -> (i32, String, String) {
    let out = std::process::Command::new(kpr_path())
        .args(["diff", "iptables-save"])
        .arg(dump)
        .arg("--admin-socket")
        .arg(socket)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn diff_against_the_running_agent_names_each_difference() {
    let (lab, dir, rendered) = lab_with_service("ldiff");
    // The dump: kube-proxy's rules for the Service as it is now.
    let dump = lab.work_dir().join("rules.txt");
    std::fs::write(&dump, &rendered).unwrap();

    // No agent: the reason, exit 2.
    let (code, _, stderr) = diff_with(&dump, &lab.work_dir().join("nobody.sock"));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("is the agent running?"), "{stderr}");

    for mode in [ProxyMode::Ebpf, ProxyMode::Nftables] {
        std::fs::write(dir.join("svc.yaml"), MANIFEST).unwrap();
        let mut kpr = Kpr::start(&lab, &kpr_path(), &dir, "kpr", &mode.args()).expect("kpr start");
        let (code, stdout, stderr) = diff(&dump, &kpr);
        assert_eq!((code, stdout.as_str()), (0, ""), "{mode:?}: {stderr}");
        // One endpoint moves and the Service gains affinity: one line each, exit 1.
        let changed = MANIFEST.replace("10.244.1.13", "10.244.1.14").replace(
            "  clusterIP: 10.96.0.10\n",
            "  clusterIP: 10.96.0.10\n  sessionAffinity: ClientIP\n",
        );
        std::fs::write(dir.join("svc.yaml"), changed).unwrap();
        kpr.wait_for_backends(
            "10.96.0.10:80/tcp",
            &["10.244.1.11:8080", "10.244.1.12:8080", "10.244.1.14:8080"],
        )
        .unwrap();
        let (code, stdout, stderr) = diff(&dump, &kpr);
        assert_eq!(code, 1, "{mode:?}: {stderr}");
        assert_eq!(
            stdout,
            "10.96.0.10:80/tcp (demo/echo:http): endpoints differ: only in the dump 10.244.1.13:8080; only in the agent 10.244.1.14:8080\n\
             10.96.0.10:80/tcp (demo/echo:http): session affinity: dump None, agent ClientIP 10800s\n",
            "{mode:?}"
        );
        let log = kpr.stop();
        assert!(!log.contains("panicked"), "{log}");
    }
}
