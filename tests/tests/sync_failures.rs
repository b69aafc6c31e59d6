//! A sync the kernel refuses is counted and retried as a full sync, which repairs what the
//! partial one could not, in both netfilter modes, with real iptables-restore and nftables
//! transactions (kube-proxy's TestSyncProxyRulesRepeated, step 9, done for real).

use std::net::SocketAddr;
use std::time::Duration;

use kpr_lab::kpr::{kpr_path, Kpr, ProxyMode};
use kpr_lab::{require_lab, Lab, LabSpec};

fn service(name: &str, ip: &str, backend: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  clusterIP: {ip}\n  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: demo\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: http, protocol: TCP, port: 8080}}]\nendpoints:\n  - {{addresses: [{backend}], conditions: {{ready: true}}}}\n---\n"
    )
}

fn write(dir: &std::path::Path, text: &str) {
    let tmp = dir.join("svc.yaml.tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join("svc.yaml")).unwrap();
}

struct Setup {
    lab: Lab,
    kpr: Kpr,
    dir: std::path::PathBuf,
}

fn setup(tag: &str, mode: ProxyMode) -> Setup {
    require_lab(tag);
    let lab = Lab::up(LabSpec {
        prefix: Lab::unique_prefix(tag),
        ..LabSpec::default()
    })
    .expect("lab up");
    let dir = lab.manifest_dir().unwrap();
    write(
        &dir,
        &(service("keep", "10.96.0.10", "10.244.1.11")
            + &service("gone", "10.96.0.11", "10.244.1.12")),
    );
    let kpr = Kpr::start(&lab, &kpr_path(), &dir, "kpr", &mode.args()).expect("kpr start");
    Setup { lab, kpr, dir }
}

/// kpr's chain for `name`'s service port or endpoint, from the node's rules.
fn chain_of(listing: &str, prefix: &str, comment: &str) -> String {
    listing
        .lines()
        .find(|l| l.contains(comment) && l.contains(prefix))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with(prefix)))
        .unwrap_or_else(|| panic!("no {prefix} chain for {comment} in:\n{listing}"))
        .to_string()
}

fn serves(s: &Setup, vip: &str, backend: &str) {
    let vip: SocketAddr = vip.parse().unwrap();
    let r = s.lab.tcp_spread(&s.lab.clients()[0], vip, 10).unwrap();
    assert_eq!(r.errors, 0, "{r:?}\n{}", s.kpr.log());
    assert_eq!(r.counts.keys().collect::<Vec<_>>(), vec![backend], "{r:?}");
}

#[test]
fn a_refused_iptables_restore_is_counted_and_repaired_by_a_full_sync() {
    let mut s = setup("syncfail-ipt", ProxyMode::Iptables);
    serves(&s, "10.96.0.10:80", "be1");
    let save = s
        .lab
        .exec_in_node(&["iptables-save", "-t", "nat"], None)
        .unwrap();
    let save = String::from_utf8_lossy(&save.stdout).into_owned();
    let keep_svc = chain_of(&save, "KUBE-SVC-", "demo/keep:http cluster IP");
    let gone_sep = chain_of(&save, "KUBE-SEP-", "demo/gone:http");
    // Something else jumps from keep's chain into gone's endpoint chain: deleting gone's
    // chains (a partial sync leaves keep's chain alone) must fail.
    let inject = format!("*nat\n-A {keep_svc} -j {gone_sep}\nCOMMIT\n");
    let out = s
        .lab
        .exec_in_node(&["iptables-restore", "--noflush"], Some(inject.as_bytes()))
        .unwrap();
    assert!(out.status.success());

    write(&s.dir, &service("keep", "10.96.0.10", "10.244.1.11"));
    // The full resync that follows the failure rewrites keep's chain (dropping the injected
    // jump), and gone's chains can go.
    let status = s
        .kpr
        .wait_for_status("a failed sync repaired", Duration::from_secs(20), |st| {
            st.failed_syncs >= 1
                && st.mode.partial_restore_failures >= 1
                && !st.frontends.contains_key("10.96.0.11:80/tcp")
        })
        .unwrap();
    assert!(status.mode.restore_failures >= 1, "{status:?}");
    assert!(
        s.kpr.log().contains("sync failed, full resync"),
        "{}",
        s.kpr.log()
    );
    let save = s
        .lab
        .exec_in_node(&["iptables-save", "-t", "nat"], None)
        .unwrap();
    let save = String::from_utf8_lossy(&save.stdout).into_owned();
    assert!(!save.contains(&gone_sep), "{save}");
    serves(&s, "10.96.0.10:80", "be1");
}

#[test]
fn a_refused_nftables_transaction_is_counted_and_repaired_by_a_full_sync() {
    let mut s = setup("syncfail-nft", ProxyMode::Nftables);
    serves(&s, "10.96.0.10:80", "be1");
    let listing = s
        .lab
        .exec_in_node(&["nft", "list", "table", "ip", "kube-proxy"], None)
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    let gone_ep = chain_of(&listing, "endpoint-", "demo/gone/tcp/http__");
    // A rule kpr does not know jumps into gone's endpoint chain, from a chain kpr does not
    // rewrite when gone goes: deleting that chain must fail.
    let out = s
        .lab
        .exec_in_node(
            &[
                "nft",
                &format!("add chain ip kube-proxy intruder; add rule ip kube-proxy intruder jump {gone_ep}"),
            ],
            None,
        )
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    write(&s.dir, &service("keep", "10.96.0.10", "10.244.1.11"));
    s.kpr.wait_for_no_frontend("10.96.0.11:80/tcp").unwrap();
    // The flushed chains are deleted a second later, at a later sync: make one.
    std::thread::sleep(Duration::from_millis(1100));
    write(
        &s.dir,
        &(service("keep", "10.96.0.10", "10.244.1.11")
            + &service("new", "10.96.0.12", "10.244.1.13")),
    );
    let status = s
        .kpr
        .wait_for_status("a failed sync repaired", Duration::from_secs(20), |st| {
            st.failed_syncs >= 1
                && st.mode.restore_failures >= 1
                && st.frontends.contains_key("10.96.0.12:80/tcp")
        })
        .unwrap();
    assert!(status.failed_syncs >= 1, "{status:?}");
    // The full sync replaced the table: the intruder and gone's chains are gone.
    let listing = s
        .lab
        .exec_in_node(&["nft", "list", "table", "ip", "kube-proxy"], None)
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    assert!(
        !listing.contains("intruder") && !listing.contains(&gone_ep),
        "{listing}"
    );
    serves(&s, "10.96.0.10:80", "be1");
    serves(&s, "10.96.0.12:80", "be3");
}
