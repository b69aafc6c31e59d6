//! Restarting the agent under load (issue 11, part 2): its programs stay attached through
//! pinned links while it is away, and the next agent adopts them, replacing each program
//! atomically. The upgrade goes to a build whose programs differ and whose affinity maps have
//! another layout, and back: affinity survives the conversions. Load: ClusterIP TCP connect/request/close, connected and unconnected UDP
//! request/response and ClientIP affinity from a pod, NodePort from the external client.
//!
//! Lab: node1 192.168.100.11 (be1 10.244.1.11, be2 .12, be3 .13, cl1 10.244.1.21), external
//! client 192.168.100.100.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kpr_lab::kpr::{kpr_path, kpr_variant_path, Kpr};
use kpr_lab::tool::{
    read_progress, wait_for_progress, BenchConnect, TcpSpread, UdpMode, UdpSpread,
};
use kpr_lab::{Lab, LabSpec, Pod};

const NODE1: &str = "192.168.100.11";
const WEB: &str = "10.96.0.10:80";
const DNS: &str = "10.96.0.10:53";
const STICKY: &str = "10.96.0.20:80";
const NODEPORT: &str = "192.168.100.11:30080";
const RESTARTS: usize = 20;

fn manifests() -> String {
    let endpoints: String = ["10.244.1.11", "10.244.1.12", "10.244.1.13"]
        .iter()
        .map(|ip| {
            format!("  - {{addresses: [{ip}], conditions: {{ready: true}}, nodeName: node1}}\n")
        })
        .collect();
    let slice = |svc: &str, ports: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-1\n  namespace: ns\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports: {ports}\nendpoints:\n{endpoints}---\n"
        )
    };
    let mut y = format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: node1}}\nstatus:\n  addresses: [{{type: InternalIP, address: {NODE1}}}]\n---\n"
    );
    y += "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}\n  - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}\n---\n";
    y += &slice(
        "web",
        "[{name: http, protocol: TCP, port: 8080}, {name: dns, protocol: UDP, port: 5353}]",
    );
    y += "apiVersion: v1\nkind: Service\nmetadata: {name: sticky, namespace: ns}\nspec:\n  clusterIP: 10.96.0.20\n  sessionAffinity: ClientIP\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]\n---\n";
    y += &slice("sticky", "[{name: http, protocol: TCP, port: 8080}]");
    y
}

fn start(lab: &Lab, dir: &Path, bin: &Path) -> Kpr {
    start_env(lab, dir, bin, &[])
}

fn start_env(lab: &Lab, dir: &Path, bin: &Path, env: &[(&str, &str)]) -> Kpr {
    let args = [
        "--manifests",
        dir.to_str().unwrap(),
        "--hostname-override",
        "node1",
        "--devices",
        "eth0",
        "--healthz-bind-address",
        "127.0.0.1:10256",
    ];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    Kpr::start_on_env(lab, 1, bin, "kpr", &args, env).expect("kpr start")
}

/// `(link id, program id)` of every link kpr pinned, by pin name.
fn pinned_links(lab: &Lab) -> Vec<(String, u64, u64)> {
    let pins = lab.bpffs_dir().join("kpr");
    let mut out = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(&pins)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("KPR_LINK_"))
        .collect();
    names.sort();
    for name in names {
        let path = pins.join(&name);
        let o = lab
            .exec_in_node(
                &[
                    "bpftool",
                    "-j",
                    "link",
                    "show",
                    "pinned",
                    path.to_str().unwrap(),
                ],
                None,
            )
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        out.push((
            name,
            v["id"].as_u64().unwrap(),
            v["prog_id"].as_u64().unwrap(),
        ));
    }
    out
}

/// Waits until the load writing `file` has made `more` requests beyond `from`.
fn wait_for_load(file: &Path, from: u64, more: u64) -> u64 {
    wait_for_progress(file, from + more, "the load")
}

struct Loads {
    clusterip: BenchConnect,
    nodeport: BenchConnect,
    udp_connected: UdpSpread,
    udp_unconnected: UdpSpread,
    affinity: TcpSpread,
}

/// Runs the loads while `during` runs, then stops them and returns what they saw. `progress`
/// is the connected UDP load's progress file.
fn under_load(lab: &Lab, during: impl FnOnce(&Path)) -> Loads {
    let work = lab.work_dir().to_path_buf();
    let stop = work.join("load-stop");
    let udp_progress = work.join("udp-progress");
    let _ = std::fs::remove_file(&stop);
    let _ = std::fs::remove_file(&udp_progress);
    let cl: Pod = lab.clients()[0].clone();
    let ext: Pod = lab.external_client().expect("external client").clone();
    let st = stop.to_str().unwrap().to_string();
    let limit = Duration::from_secs(300);
    std::thread::scope(|s| {
        let clusterip = s.spawn(|| lab.bench_connect_until(&cl, WEB, &stop).unwrap());
        let nodeport = s.spawn(|| lab.bench_connect_until(&ext, NODEPORT, &stop).unwrap());
        let udp_connected = s.spawn(|| {
            lab.udp_until(&cl, DNS, UdpMode::Connected, 2, &stop, Some(&udp_progress))
                .unwrap()
        });
        let udp_unconnected = s.spawn(|| {
            lab.udp_until(&cl, DNS, UdpMode::OneSocket, 2, &stop, None)
                .unwrap()
        });
        let affinity = {
            let (st, cl) = (st.clone(), cl.clone());
            s.spawn(move || {
                lab.labtool_json::<TcpSpread>(
                    &cl,
                    &[
                        "tcp-spread",
                        "--target",
                        STICKY,
                        "--count",
                        "10000000",
                        "--stop-file",
                        &st,
                    ],
                    limit,
                )
                .unwrap()
            })
        };
        wait_for_load(&udp_progress, 0, 50);
        during(&udp_progress);
        std::fs::write(&stop, "").unwrap();
        Loads {
            clusterip: clusterip.join().unwrap(),
            nodeport: nodeport.join().unwrap(),
            udp_connected: udp_connected.join().unwrap(),
            udp_unconnected: udp_unconnected.join().unwrap(),
            affinity: affinity.join().unwrap(),
        }
    })
}

fn assert_nothing_lost(loads: &Loads, log: &str) {
    for (what, b) in [
        ("ClusterIP TCP", &loads.clusterip),
        ("NodePort TCP", &loads.nodeport),
    ] {
        println!("{what}: {} connections, {} failed", b.connections, b.errors);
        assert!(b.connections > 0, "{what}: {b:?}");
        assert_eq!(b.errors, 0, "{what}: {b:?}\n{log}");
    }
    for (what, u) in [
        ("connected UDP", &loads.udp_connected),
        ("unconnected UDP", &loads.udp_unconnected),
    ] {
        let replies = u.sequence.len() as u64 - u.errors;
        println!("{what}: {replies} replies, {} lost", u.errors);
        assert!(replies > 0, "{what}: {u:?}");
        assert_eq!(u.errors, 0, "{what}: {:?}\n{log}", u.error_kinds);
        assert_eq!(u.counts.len(), 1, "{what}: the flow moved: {:?}", u.counts);
    }
    let a = &loads.affinity;
    println!(
        "affinity: {} connections, {} failed, backends {:?}",
        a.counts.values().sum::<u64>(),
        a.errors,
        a.counts
    );
    assert_eq!(a.errors, 0, "affinity: {a:?}\n{log}");
    assert_eq!(a.counts.len(), 1, "affinity broke: {:?}", a.counts);
}

fn lab(tag: &str) -> (Lab, PathBuf) {
    let lab = Lab::up(LabSpec {
        prefix: Lab::unique_prefix(tag),
        nodes: 1,
        backends_per_node: vec![3],
        clients_per_node: vec![1],
        external_client: true,
        ..LabSpec::default()
    })
    .expect("lab up");
    let dir = lab.manifest_dir().unwrap();
    std::fs::write(dir.join("all.yaml"), manifests()).unwrap();
    (lab, dir)
}

#[test]
fn kill_9_and_restart_20_times_under_load_without_a_failed_connection() {
    kpr_lab::require_lab("restart");
    let (lab, dir) = lab("rst");
    let bin = kpr_path();
    let mut kpr = Some(start(&lab, &dir, &bin));
    let before = pinned_links(&lab);
    // Nine cgroup hooks (four socket calls per family, egress), ingress and egress on eth0.
    assert_eq!(before.len(), 11, "{before:?}");
    let mut adopted_ms = Vec::new();
    let mut first_sync_ms = Vec::new();
    let loads = under_load(&lab, |udp_progress| {
        for _ in 0..RESTARTS {
            kpr.take().unwrap().kill().unwrap();
            let t0 = Instant::now();
            let mut k = start(&lab, &dir, &bin);
            adopted_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            let s = k.status().unwrap();
            first_sync_ms.extend(s.first_sync_after_start_ms);
            // Traffic flows with the new agent before it is killed again.
            let n = read_progress(udp_progress);
            wait_for_load(udp_progress, n, 20);
            let _ = k.wait_for_syncs(1, Duration::from_secs(5));
            kpr = Some(k);
        }
    });
    let log = kpr.as_ref().unwrap().log();
    println!(
        "{RESTARTS} restarts: start to first sync (links adopted) {:.0?} ms; kpr's own figure {:.0?} ms",
        adopted_ms, first_sync_ms
    );
    assert_nothing_lost(&loads, &log);
    // The same links, each running a newly loaded program.
    let after = pinned_links(&lab);
    assert_eq!(after.len(), before.len(), "{after:?}");
    for ((name, id, prog), (name2, id2, prog2)) in before.iter().zip(&after) {
        assert_eq!(
            (name, id),
            (name2, id2),
            "a link was replaced instead of adopted"
        );
        assert_ne!(prog, prog2, "{name}: its program was not replaced");
    }
}

/// The tag (a hash of the instructions) of the program each pinned link runs, by pin name.
fn program_tags(lab: &Lab) -> Vec<(String, String)> {
    pinned_links(lab)
        .into_iter()
        .map(|(name, _, prog)| {
            let o = lab
                .exec_in_node(
                    &["bpftool", "-j", "prog", "show", "id", &prog.to_string()],
                    None,
                )
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            (name, v["tag"].as_str().unwrap().to_string())
        })
        .collect()
}

#[test]
fn upgrade_to_changed_programs_and_back_under_load_without_a_failed_connection() {
    kpr_lab::require_lab("upgrade");
    let (lab, dir) = lab("upg");
    let (bin, variant) = (kpr_path(), kpr_variant_path());
    let mut kpr = Some(start(&lab, &dir, &bin));
    let links = pinned_links(&lab);
    let tags = program_tags(&lab);
    let mut seen = Vec::new();
    let loads = under_load(&lab, |udp_progress| {
        // A rolling update stops the old agent (SIGTERM) and starts the new one; twice each
        // way.
        for next in [&variant, &bin, &variant, &bin] {
            drop(kpr.take().unwrap().stop());
            let k = start(&lab, &dir, next);
            seen.push(program_tags(&lab));
            // The variant build keeps affinity in another layout (`_V2`): each start converted
            // the other build's map and removed its pin.
            let (ours, theirs) = if *next == variant {
                ("KPR_AFF4_V2", "KPR_AFF4_V1")
            } else {
                ("KPR_AFF4_V1", "KPR_AFF4_V2")
            };
            let pins = lab.bpffs_dir().join("kpr");
            assert!(
                pins.join(ours).exists() && !pins.join(theirs).exists(),
                "{}",
                k.log()
            );
            assert!(
                k.log()
                    .contains("converted another kpr version's map layout"),
                "{}",
                k.log()
            );
            let n = read_progress(udp_progress);
            wait_for_load(udp_progress, n, 20);
            kpr = Some(k);
        }
    });
    let log = kpr.as_ref().unwrap().log();
    assert_nothing_lost(&loads, &log);
    for (i, now) in seen.iter().enumerate() {
        for ((name, before), (_, after)) in tags.iter().zip(now) {
            if i % 2 == 0 {
                assert_ne!(
                    before, after,
                    "{name}: the variant's program did not replace it"
                );
            } else {
                assert_eq!(
                    before, after,
                    "{name}: not back to the first build's program"
                );
            }
        }
    }
    let ids =
        |l: Vec<(String, u64, u64)>| l.into_iter().map(|(n, id, _)| (n, id)).collect::<Vec<_>>();
    assert_eq!(
        ids(pinned_links(&lab)),
        ids(links),
        "links were replaced instead of adopted"
    );
}

/// kpr's tc filters on the node's eth0 (netlink attachments), as `tc filter show` lists them.
fn kpr_filters(lab: &Lab) -> Vec<String> {
    let mut out = Vec::new();
    for dir in ["ingress", "egress"] {
        let o = lab
            .exec_in_node(&["tc", "filter", "show", "dev", "eth0", dir], None)
            .unwrap();
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains("kpr_tc_"))
                .map(|l| format!("{dir}: {}", l.trim())),
        );
    }
    out
}

#[test]
fn restarts_with_netlink_tc_filters_kernels_without_tcx_drop_nothing() {
    kpr_lab::require_lab("restart_netlink");
    kpr_lab::preconditions::require("restart_netlink", &["tc"]);
    let (lab, dir) = lab("rstnl");
    let bin = kpr_path();
    // The path of kernels before 6.6, forced on this one.
    let env = [("KPR_TC_ATTACH", "netlink")];
    let mut kpr = Some(start_env(&lab, &dir, &bin, &env));
    let filters = kpr_filters(&lab);
    assert_eq!(filters.len(), 2, "one filter per direction: {filters:?}");
    assert!(
        filters.iter().all(|f| f.contains("pref 19280")),
        "{filters:?}"
    );
    assert!(pinned_links(&lab)
        .iter()
        .all(|(n, _, _)| !n.contains("_tc_")));
    let loads = under_load(&lab, |udp_progress| {
        for i in 0..10 {
            // A crash leaves the filters by itself; a clean exit must leave them too.
            let old = kpr.take().unwrap();
            if i % 2 == 0 {
                old.kill().unwrap();
            } else {
                drop(old.stop());
            }
            let k = start_env(&lab, &dir, &bin, &env);
            let n = read_progress(udp_progress);
            wait_for_load(udp_progress, n, 20);
            kpr = Some(k);
        }
    });
    assert_nothing_lost(&loads, &kpr.as_ref().unwrap().log());
    // Replaced in place: still one filter per direction.
    let after = kpr_filters(&lab);
    assert_eq!(after.len(), 2, "{after:?}");
}
