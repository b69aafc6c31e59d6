//! `kpr import iptables-save` / `kpr diff iptables-save` without root: kube-proxy's own
//! expected dumps (tests/golden/kube-proxy/iptables) imported and checked against the objects
//! of their cases, round trips through kpr's iptables writer (which writes exactly kube-proxy's
//! rules), the large-cluster shape, and the errors of malformed input.

mod kube_proxy_cases;

use std::path::Path;
use std::process::Command;

use kube_proxy_cases::{cases, many_services, Case, REFUSED_BY_KPR};

use kpr::import::{self, diff, write, Imported};
use kpr::model::{DesiredState, NodeContext, ServicePortInfo};
use kpr::netfilter::iptables::render::{self, IptablesConfig, WriteScope};
use kpr::netfilter::plan::{self, PlanConfig};

const KPR: &str = env!("CARGO_BIN_EXE_kpr");

/// kube-proxy cases of a feature gate kpr does not have (the kube-proxy_iptables golden test's
/// list): the model follows the gate's default, the dump the disabled gate.
const GATED: &[&str] = &[
    "TestEndpointSliceWithTerminatingEndpointsTrafficPolicyCluster/04-feature-gate-disabled",
    "TestEndpointSliceWithTerminatingEndpointsTrafficPolicyLocal/04-feature-gate-disabled",
];

/// The cases whose dump is a full sync (later steps of multi-step tests are partial restores,
/// which iptables-save never prints).
fn full_sync_cases() -> Vec<Case> {
    cases("iptables", "expected.txt")
        .into_iter()
        .filter(|c| c.expected.is_some())
        .filter(|c| !REFUSED_BY_KPR.iter().any(|(n, _)| c.name == *n))
        .filter(|c| !c.name.contains("/step") || c.name.ends_with("/step1"))
        .filter(|c| !GATED.iter().any(|g| c.name.starts_with(g)))
        .collect()
}

/// The desired state's service ports of the dump's family.
fn desired_ports(imported: &Imported, state: &DesiredState) -> Vec<ServicePortInfo> {
    import::same_family(imported, &state.service_ports)
}

#[test]
fn kube_proxy_expected_dumps_import_to_their_cases_objects() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for case in full_sync_cases() {
        let dump = case.expected.as_deref().unwrap_or_default();
        let imported = match import::import(dump, "test-hostname") {
            Ok(i) => i,
            Err(e) => {
                failures.push(format!("{}: {e}", case.name));
                continue;
            }
        };
        let Ok((state, _)) = case.desired_state_and_config() else {
            continue;
        };
        let lines = diff::diff(&imported.ports, &desired_ports(&imported, &state));
        if !lines.is_empty() {
            failures.push(format!("{}:\n  {}", case.name, lines.join("\n  ")));
        }
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} cases checked");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// kpr's iptables writer's restore text for a desired state (what `kpr render-iptables`
/// prints, with the fake proxier's settings of a case).
fn render_rules(state: &DesiredState, cfg: &PlanConfig) -> String {
    let plan = plan::plan(state, cfg);
    let ipt = IptablesConfig {
        mark: "0x4000".into(),
        random_fully: false,
        conntrack_tcp_liberal: false,
        nfacct: false,
    };
    let rules = render::write(&plan, cfg, &ipt, WriteScope::default());
    render::standalone(&rules.text)
}

/// Imported ports → manifests → the model again: the written files mean what the dump meant.
fn reload(imported: &Imported, node: &str) -> Vec<ServicePortInfo> {
    let mut notes = Vec::new();
    let files = write::manifests(&imported.ports, node, &mut notes).unwrap();
    let text: String = files.iter().map(|f| format!("{}---\n", f.text)).collect();
    let (snapshot, errors) =
        kpr::source::manifest::load_text(Path::new("imported.yaml"), &text, None);
    assert!(errors.is_empty(), "{errors:?}\n{text}");
    let ctx = NodeContext {
        node_name: Some(node.to_string()),
        ..NodeContext::default()
    };
    let (state, errors) = kpr::model::build_for_node(&snapshot.services, &snapshot.slices, &ctx);
    assert!(errors.is_empty(), "{errors:?}");
    desired_ports(imported, &state)
}

/// Ports whose endpoints are all on other nodes: the dump shows that they exist (kube-proxy
/// drops instead of rejecting) but not where, so the written manifests cannot carry them.
fn without_unknowable_endpoints(ports: &[ServicePortInfo]) -> Vec<ServicePortInfo> {
    ports
        .iter()
        .cloned()
        .map(|mut p| {
            if p.cluster_endpoints.is_empty() && p.local_endpoints.is_empty() {
                p.has_endpoints = false;
            }
            p
        })
        .collect()
}

#[test]
fn round_trip_manifests_rules_import_manifests() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for case in full_sync_cases() {
        let Ok((state, cfg)) = case.desired_state_and_config() else {
            continue;
        };
        let rules = render_rules(&state, &cfg);
        let imported = match import::import(&rules, "test-hostname") {
            Ok(i) => i,
            Err(e) => {
                failures.push(format!("{}: {e}\n{rules}", case.name));
                continue;
            }
        };
        // Rules → import: the original model's frontends.
        let lines = diff::diff(&imported.ports, &desired_ports(&imported, &state));
        if !lines.is_empty() {
            failures.push(format!("{} (import):\n  {}", case.name, lines.join("\n  ")));
        }
        // Import → manifests → model: the same again, but for what the dump cannot carry.
        let reloaded = reload(&imported, "test-hostname");
        let lines = diff::diff(&without_unknowable_endpoints(&imported.ports), &reloaded);
        if !lines.is_empty() {
            failures.push(format!(
                "{} (manifests):\n  {}",
                case.name,
                lines.join("\n  ")
            ));
        }
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} cases checked");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The state and plan settings of a manifest text on a node called `node`.
fn state_and_cfg(manifests: &str) -> (DesiredState, PlanConfig) {
    let state = kube_proxy_cases::state_of(manifests);
    let cfg = PlanConfig {
        local: plan::LocalDetector::Cidr("10.0.0.0/8".parse().unwrap()),
        masquerade_mark: 0x4000,
        ..PlanConfig::default()
    };
    (state, cfg)
}

#[test]
fn large_cluster_shape_without_endpoint_comments() {
    // 600 Services × 2 endpoints: above kube-proxy's 1000-endpoint threshold.
    let (state, cfg) = state_and_cfg(&many_services(600, 2));
    let rules = render_rules(&state, &cfg);
    assert!(
        rules.contains("-A KUBE-SEP-") && !rules.contains("-> 10.244."),
        "not the large-cluster shape"
    );
    let imported = import::import(&rules, "n").unwrap();
    assert_eq!(imported.ports.len(), 600);
    assert!(imported.derived_names.is_empty());
    assert!(imported
        .notes
        .iter()
        .any(|n| n.text.starts_with("large-cluster shape")));
    let lines = diff::diff(&imported.ports, &desired_ports(&imported, &state));
    assert!(lines.is_empty(), "{}", lines.join("\n"));
}

#[test]
fn no_comments_at_all_gives_derived_names_and_notes() {
    let (state, cfg) = state_and_cfg(&many_services(3, 2));
    let rules = render_rules(&state, &cfg);
    // Every comment stripped (what a tool that drops comments would leave).
    let stripped: String = rules
        .lines()
        .map(|l| match l.split_once(" -m comment --comment ") {
            Some((head, rest)) => {
                let rest = match rest.strip_prefix('"') {
                    Some(q) => q.split_once('"').map_or("", |(_, r)| r),
                    None => rest.split_once(' ').map_or("", |(_, r)| r),
                };
                format!("{head} {}\n", rest.trim_start())
            }
            None => format!("{l}\n"),
        })
        .collect();
    assert!(!stripped.contains("--comment"));
    let imported = import::import(&stripped, "n").unwrap();
    assert_eq!(imported.derived_names.len(), 3, "{:?}", imported.notes);
    for n in &imported.derived_names {
        assert_eq!(n.namespace, import::DERIVED_NAMESPACE);
        assert!(n.name.starts_with("svc-"));
        assert!(imported
            .notes
            .iter()
            .any(|note| note.text.contains(&n.name)));
    }
    // Names aside, the same frontends and endpoints.
    let lines = diff::diff(&imported.ports, &desired_ports(&imported, &state));
    assert!(lines.is_empty(), "{}", lines.join("\n"));
    // And the derived names make valid manifests.
    let reloaded = reload(&imported, "n");
    assert!(diff::diff(&imported.ports, &reloaded).is_empty());
}

fn golden_dump() -> String {
    full_sync_cases()
        .into_iter()
        .find(|c| c.name == "TestOverallIPTablesRules")
        .and_then(|c| c.expected)
        .unwrap()
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(KPR).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_import_writes_manifests_kpr_serves_and_diff_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("iptables-save.txt");
    std::fs::write(&dump, golden_dump()).unwrap();
    let out = dir.path().join("out");
    let (code, _, stderr) = run(&[
        "import",
        "iptables-save",
        dump.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("guessed or left out"), "{stderr}");
    assert!(stderr.contains("ns6/svc6:p80: no endpoints"), "{stderr}");
    assert!(out.join("ns5_svc5.yaml").is_file());
    let (snapshot, errors) = kpr::source::manifest::load_dir(&out).unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(snapshot.services.len(), 6);

    let (code, stdout, stderr) = run(&[
        "diff",
        "iptables-save",
        dump.to_str().unwrap(),
        "--manifests",
        out.to_str().unwrap(),
    ]);
    assert_eq!((code, stdout.as_str()), (0, ""), "{stderr}");

    // One endpoint removed from the manifests: one line, exit 1.
    let svc3 = out.join("ns3_svc3.yaml");
    let text = std::fs::read_to_string(&svc3).unwrap();
    std::fs::write(&svc3, text.replace("10.180.0.3", "10.180.0.33")).unwrap();
    let (code, stdout, _) = run(&[
        "diff",
        "iptables-save",
        dump.to_str().unwrap(),
        "--manifests",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert_eq!(
        stdout,
        "172.30.0.43:80/tcp (ns3/svc3:p80): endpoints differ: only in the dump 10.180.0.3:80; only in the manifests 10.180.0.33:80\n\
         nodePort 3003/tcp (ns3/svc3:p80): endpoints differ: only in the dump 10.180.0.3:80; only in the manifests 10.180.0.33:80\n"
    );
}

#[test]
fn cli_bad_dumps_name_the_line_and_write_nothing() {
    let good = golden_dump();
    let lines: Vec<&str> = good.lines().collect();
    let line_of = |needle: &str| lines.iter().position(|l| l.contains(needle)).unwrap() + 1;
    // The truncated dump ends on the line before the last COMMIT.
    let last = lines.len() - 1;
    let nat_line = line_of("*nat");
    let sep_rule = line_of("-A KUBE-SEP-SXIVWICOYRO3J4NJ");
    let cases: Vec<(&str, String, String)> = vec![
        (
            "truncated",
            good.rsplit_once("COMMIT").unwrap().0.to_string(),
            format!("line {last} (end of input): table nat (line {nat_line}) has no COMMIT"),
        ),
        (
            "undefined chain",
            good.replace(
                ":KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]\n",
                "# (declaration removed)\n",
            ),
            format!("line {sep_rule}: rule in chain KUBE-SEP-SXIVWICOYRO3J4NJ, which the table does not declare"),
        ),
        (
            "foreign",
            "table ip kube-proxy {\n\tchain services {\n\t}\n}\n".to_string(),
            "line 1: not iptables-save output".to_string(),
        ),
        (
            "bad line",
            good.replace("-d 172.30.0.41 --dport 80 -j KUBE-SVC", "-d 172.30.0.410 --dport 80 -j KUBE-SVC"),
            format!("line {}: bad address", line_of("-d 172.30.0.41 --dport 80 -j KUBE-SVC")),
        ),
        (
            "no kube-proxy",
            "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n".to_string(),
            "no nat table with a KUBE-SERVICES chain".to_string(),
        ),
    ];
    for (what, text, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let dump = dir.path().join("dump.txt");
        std::fs::write(&dump, &text).unwrap();
        let out = dir.path().join("out");
        let (code, stdout, stderr) = run(&[
            "import",
            "iptables-save",
            dump.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 1, "{what}: {stderr}");
        assert!(stderr.contains(&want), "{what}: want {want:?} in {stderr}");
        assert!(stdout.is_empty(), "{what}");
        assert!(!out.exists(), "{what}: --out was written");
        let (code, _, stderr) = run(&[
            "diff",
            "iptables-save",
            dump.to_str().unwrap(),
            "--manifests",
            dir.path().to_str().unwrap(),
        ]);
        assert_eq!(code, 2, "{what}: {stderr}");
        assert!(stderr.contains(&want), "{what}: {stderr}");
    }
}
