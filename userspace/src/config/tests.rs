//! Flag parsing, the flags/--config precedence and the proxy-mode rules.
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use super::*;

fn args(extra: &[&str]) -> Vec<String> {
    std::iter::once("kpr")
        .chain(extra.iter().copied())
        .map(String::from)
        .collect()
}

fn run(extra: &[&str]) -> (Settings, Vec<String>) {
    let r = from_args(args(extra)).unwrap_or_else(|e| panic!("{extra:?}: {e}"));
    match r.action {
        Action::Run(s) => (*s, r.warnings),
        other => panic!("{extra:?}: {other:?}"),
    }
}

fn err(extra: &[&str]) -> ConfigError {
    match from_args(args(extra)) {
        Ok(r) => panic!("{extra:?}: expected an error, got {r:?}"),
        Err(e) => e,
    }
}

fn config_file(yaml: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    write!(
        f,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{yaml}"
    )
    .unwrap();
    f
}

fn addr(s: &str) -> Option<SocketAddr> {
    Some(s.parse().unwrap())
}

#[test]
fn defaults() {
    let (s, w) = run(&[]);
    assert_eq!(s, Settings::default());
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(s.proxy_mode, ProxyMode::Ebpf);
    assert_eq!(s.healthz_bind_address, addr("0.0.0.0:10256"));
    assert_eq!(s.metrics_bind_address, addr("127.0.0.1:10249"));
    assert_eq!(s.sync_period, Duration::from_secs(30));
    assert_eq!(s.min_sync_period, Duration::from_secs(1));
    assert_eq!(s.manifest_poll, Duration::from_millis(200));
    assert_eq!(s.bpf_pin_dir, PathBuf::from("/sys/fs/bpf/kpr"));
    assert_eq!(s.cgroup_path, PathBuf::from(DEFAULT_CGROUP));
}

#[test]
fn kube_proxy_flags_in_both_syntaxes() {
    let (s, w) = run(&[
        "--proxy-mode=ebpf",
        "--hostname-override",
        " Node-A ",
        "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56",
        "--nodeport-addresses",
        "10.0.0.0/8,primary",
        "--nodeport-addresses=192.168.1.0/24",
        "--masquerade-all",
        "--kubeconfig=/var/lib/kube-proxy/kubeconfig.conf",
        "--master",
        "https://10.0.0.1:6443",
        "--bind-address=10.0.0.5",
        "--healthz-bind-address=10.0.0.5",
        "--metrics-bind-address=0.0.0.0:9999",
        "--sync-period=1m30s",
        "--min-sync-period",
        "500ms",
        "--v=4",
        "--manifests=/tmp/m",
        "--bpf-pin-dir",
        "/tmp/pins",
        "--cgroup-path=/tmp/cg",
        "--allow-cgroup-root=true",
        "--manifest-poll=1s",
        "--status-file=/tmp/status.json",
    ]);
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(s.hostname_override.as_deref(), Some("node-a"));
    let cidrs: Vec<String> = s.cluster_cidrs.iter().map(ToString::to_string).collect();
    assert_eq!(cidrs, ["10.244.0.0/16", "fd00:10:244::/56"]);
    let nodeports: Vec<String> = s
        .nodeport_addresses
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(nodeports, ["10.0.0.0/8", "primary", "192.168.1.0/24"]);
    assert!(s.masquerade_all);
    assert_eq!(
        s.kubeconfig,
        Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf"))
    );
    assert_eq!(s.master.as_deref(), Some("https://10.0.0.1:6443"));
    assert_eq!(s.bind_address, "10.0.0.5".parse::<IpAddr>().unwrap());
    assert_eq!(s.healthz_bind_address, addr("10.0.0.5:10256"));
    assert_eq!(s.metrics_bind_address, addr("0.0.0.0:9999"));
    assert_eq!(s.sync_period, Duration::from_secs(90));
    assert_eq!(s.min_sync_period, Duration::from_millis(500));
    assert_eq!(s.verbosity, 4);
    assert_eq!(s.manifests, Some(PathBuf::from("/tmp/m")));
    assert_eq!(s.bpf_pin_dir, PathBuf::from("/tmp/pins"));
    assert_eq!(s.cgroup_path, PathBuf::from("/tmp/cg"));
    assert!(s.allow_cgroup_root);
    assert_eq!(s.manifest_poll, Duration::from_secs(1));
    assert_eq!(s.status_file, Some(PathBuf::from("/tmp/status.json")));
}

#[test]
fn verbosity_forms_and_log_filter() {
    for form in [
        &["-v=3"][..],
        &["-v", "3"],
        &["-v3"],
        &["--v", "3"],
        &["--v=3"],
    ] {
        assert_eq!(run(form).0.verbosity, 3, "{form:?}");
    }
    assert_eq!(log_filter(0), "info");
    assert_eq!(log_filter(2), "info");
    assert_eq!(log_filter(4), "info,kpr=debug");
    assert_eq!(log_filter(6), "info,kpr=trace");
    assert_eq!(log_filter(10), "trace");
}

#[test]
fn go_booleans_and_last_value_wins() {
    assert!(!run(&["--masquerade-all=false"]).0.masquerade_all);
    assert!(
        run(&["--masquerade-all=false", "--masquerade-all"])
            .0
            .masquerade_all
    );
    assert!(run(&["--masquerade-all=T"]).0.masquerade_all);
    assert!(!run(&["--masquerade-all=0"]).0.masquerade_all);
    // pflag: a boolean's value needs '=': "--masquerade-all false" has a stray argument.
    assert!(matches!(
        err(&["--masquerade-all", "false"]),
        ConfigError::Cli(_)
    ));
    assert!(matches!(
        err(&["--masquerade-all=maybe"]),
        ConfigError::Cli(_)
    ));
    let (s, _) = run(&["--sync-period=10s", "--sync-period=20s"]);
    assert_eq!(s.sync_period, Duration::from_secs(20));
}

#[test]
fn bad_flag_values_are_usage_errors() {
    for bad in [
        &["--sync-period=5"][..],
        &["--sync-period=5d"],
        &["--min-sync-period", "-1s"],
        &["--proxy-mode=userspace"],
        &["--proxy-mode=kernelspace"],
        &["--no-such-flag"],
    ] {
        let e = err(bad);
        assert!(matches!(e, ConfigError::Cli(_)), "{bad:?}: {e}");
        assert_eq!(
            match e {
                ConfigError::Cli(c) => c.exit_code(),
                _ => 0,
            },
            2
        );
    }
    for (bad, want) in [
        (&["--cluster-cidr=10.0.0.0"][..], "not a CIDR"),
        (
            &["--cluster-cidr=10.0.0.0/8,fd00::/8,10.1.0.0/16"],
            "dual-stack",
        ),
        (&["--nodeport-addresses=10.0.0.0/33"], "neither a CIDR"),
        (&["--bind-address=node1"], "not an IP"),
        (&["--healthz-bind-address=:10256x"], "not IP:PORT"),
        (&["--hostname-override=   "], "empty hostname-override"),
        (&["--sync-period=0s"], "greater than 0"),
        (
            &["--sync-period=1s", "--min-sync-period=2s"],
            "minimum sync period (2s)",
        ),
    ] {
        let e = err(bad).to_string();
        assert!(e.contains(want), "{bad:?}: {e}");
    }
}

#[test]
fn empty_server_address_disables_and_deprecated_ports() {
    let (s, _) = run(&["--metrics-bind-address=", "--healthz-bind-address="]);
    assert_eq!(s.metrics_bind_address, None);
    assert_eq!(s.healthz_bind_address, None);
    let (s, _) = run(&["--healthz-port=0", "--metrics-port=9000"]);
    assert_eq!(s.healthz_bind_address, None);
    assert_eq!(s.metrics_bind_address, addr("127.0.0.1:9000"));
    let (s, _) = run(&["--bind-address=::1"]);
    assert_eq!(s.healthz_bind_address, addr("[::]:10256"));
    assert_eq!(s.metrics_bind_address, addr("[::1]:10249"));
}

#[test]
fn iptables_sync_period_flags_are_kube_proxys_names() {
    let (s, _) = run(&[
        "--iptables-sync-period=45s",
        "--iptables-min-sync-period=2s",
    ]);
    assert_eq!(s.sync_period, Duration::from_secs(45));
    assert_eq!(s.min_sync_period, Duration::from_secs(2));
    // kpr's own flags win.
    let (s, _) = run(&["--iptables-sync-period=45s", "--sync-period=50s"]);
    assert_eq!(s.sync_period, Duration::from_secs(50));
}

#[test]
fn unused_kube_proxy_flags_are_accepted_with_one_warning_each() {
    let (s, w) = run(&[
        "--oom-score-adj=-999",
        "--feature-gates=A=true",
        "--feature-gates=B=false",
        "--profiling",
        "--logtostderr=false",
        "--vmodule=proxier=4",
    ]);
    assert_eq!(s, Settings::default());
    assert_eq!(
        w,
        [
            "ignored: kpr does not use --oom-score-adj",
            "ignored: kpr does not use --feature-gates",
            "ignored: kpr does not use --profiling",
            "ignored: kpr does not use --logtostderr",
            "ignored: kpr does not use --vmodule",
        ]
    );
}

#[test]
fn action_flags() {
    let e = err(&["--cleanup"]);
    assert!(
        matches!(
            e,
            ConfigError::Unsupported {
                flag: "cleanup",
                ..
            }
        ),
        "{e}"
    );
    let e = err(&["--write-config-to=/tmp/x"]);
    assert!(
        e.to_string().contains("--write-config-to is not supported"),
        "{e}"
    );
    // --cleanup=false is no request to clean up.
    let (_, w) = run(&["--cleanup=false"]);
    assert_eq!(w, ["ignored: kpr does not use --cleanup"]);
    let r = from_args(args(&["--init-only"])).unwrap();
    assert!(matches!(r.action, Action::InitOnly(_)), "{r:?}");
}

#[test]
fn render_subcommands() {
    for (cmd, want) in [
        ("render-iptables", super::RenderWriter::Iptables),
        ("render-nftables", super::RenderWriter::Nftables),
    ] {
        let r = from_args(args(&[
            cmd,
            "--manifests",
            "/m",
            "--cluster-cidr",
            "10.0.0.0/8",
            "--last",
            "default/x",
        ]))
        .unwrap();
        match r.action {
            Action::Render { writer, args } => {
                assert_eq!(writer, want, "{cmd}");
                assert_eq!(
                    args,
                    flags::RenderArgs {
                        manifests: PathBuf::from("/m"),
                        cluster_cidr: Some("10.0.0.0/8".into()),
                        last: Some("default/x".into()),
                        node: None,
                    },
                    "{cmd}"
                );
            }
            other => panic!("{cmd}: {other:?}"),
        }
    }
}

#[test]
fn cleanup_subcommand() {
    let pin_dir = |a: &[&str]| match from_args(args(a)).unwrap().action {
        Action::Cleanup { bpf_pin_dir } => bpf_pin_dir,
        other => panic!("{a:?}: {other:?}"),
    };
    assert_eq!(
        pin_dir(&["cleanup"]),
        PathBuf::from(super::DEFAULT_BPF_PIN_DIR)
    );
    assert_eq!(
        pin_dir(&["cleanup", "--bpf-pin-dir", "/x/kpr"]),
        PathBuf::from("/x/kpr")
    );
    // The agent's flag before the subcommand works too.
    assert_eq!(
        pin_dir(&["--bpf-pin-dir=/y/kpr", "cleanup"]),
        PathBuf::from("/y/kpr")
    );
    assert!(matches!(
        from_args(args(&["cleanup", "--manifests", "/m"])),
        Err(ConfigError::Cli(_))
    ));
    // kube-proxy's --cleanup is still refused, pointing at `kpr cleanup`.
    let e = err(&["--cleanup"]);
    assert!(e.to_string().contains("kpr cleanup"), "{e}");
}

#[test]
fn mode_rules_for_the_flag() {
    assert_eq!(run(&["--proxy-mode="]).0.proxy_mode, ProxyMode::Ebpf);
    assert_eq!(run(&["--proxy-mode", "ebpf"]).0.proxy_mode, ProxyMode::Ebpf);
    assert_eq!(
        run(&["--proxy-mode", "nftables"]).0.proxy_mode,
        ProxyMode::Nftables
    );
    assert_eq!(
        run(&["--proxy-mode", "iptables"]).0.proxy_mode,
        ProxyMode::Iptables
    );
    // Whether the kernel has IPVS is the agent's question at start, not the configuration's.
    assert_eq!(run(&["--proxy-mode=ipvs"]).0.proxy_mode, ProxyMode::Ipvs);
}

#[test]
fn mode_rules_for_the_file() {
    for mode in ["\"\"", "ebpf", "null"] {
        let f = config_file(&format!("mode: {mode}\n"));
        let (s, w) = run(&["--config", f.path().to_str().unwrap()]);
        assert_eq!(s.proxy_mode, ProxyMode::Ebpf, "{mode}");
        assert!(w.is_empty(), "{mode}: {w:?}");
    }
    // kube-proxy's modes in the file are honoured, as the flag is.
    for (mode, want) in [
        ("iptables", ProxyMode::Iptables),
        ("nftables", ProxyMode::Nftables),
    ] {
        let f = config_file(&format!("mode: {mode}\n"));
        let (s, w) = run(&["--config", f.path().to_str().unwrap()]);
        assert_eq!(s.proxy_mode, want, "{mode}");
        assert!(w.is_empty(), "{mode}: {w:?}");
    }
    let f = config_file(
        "mode: ipvs\nipvs: {scheduler: mh, strictARP: true, excludeCIDRs: [10.1.0.0/16], tcpTimeout: 900s}\n",
    );
    let (s, _) = run(&["--config", f.path().to_str().unwrap()]);
    assert_eq!(s.proxy_mode, ProxyMode::Ipvs);
    assert_eq!(s.ipvs.scheduler, "mh");
    assert!(s.ipvs.strict_arp);
    assert_eq!(
        s.ipvs.exclude_cidrs,
        vec!["10.1.0.0/16".parse::<IpNet>().unwrap()]
    );
    assert_eq!(s.ipvs.tcp_timeout, Duration::from_secs(900));
    let (s, _) = run(&[
        "--proxy-mode",
        "ipvs",
        "--ipvs-scheduler",
        "sh",
        "--ipvs-udp-timeout",
        "30s",
    ]);
    assert_eq!(s.ipvs.scheduler, "sh");
    assert_eq!(s.ipvs.udp_timeout, Duration::from_secs(30));
    let e = err(&["--ipvs-scheduler", "no such"]).to_string();
    assert!(e.contains("not an IPVS scheduler name"), "{e}");
    let f = config_file("mode: kernelspace\n");
    let e = err(&["--config", f.path().to_str().unwrap()]).to_string();
    assert!(
        e.contains(": mode: \"kernelspace\" is kube-proxy's Windows mode"),
        "{e}"
    );
}

#[test]
fn with_config_the_file_replaces_kube_proxy_flags() {
    let f = config_file(
        "clusterCIDR: 10.244.0.0/16\n\
         hostnameOverride: from-file\n\
         metricsBindAddress: 0.0.0.0:10249\n\
         clientConnection:\n  kubeconfig: /from/file\n\
         iptables:\n  syncPeriod: 10s\n  minSyncPeriod: 2s\n  masqueradeAll: true\n\
         logging:\n  verbosity: 2\n",
    );
    let path = f.path().to_str().unwrap();
    // The file alone.
    let (s, w) = run(&["--config", path]);
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(s.cluster_cidrs, vec!["10.244.0.0/16".parse().unwrap()]);
    assert_eq!(s.hostname_override.as_deref(), Some("from-file"));
    assert_eq!(s.metrics_bind_address, addr("0.0.0.0:10249"));
    assert_eq!(s.kubeconfig, Some(PathBuf::from("/from/file")));
    assert_eq!(s.sync_period, Duration::from_secs(10));
    assert_eq!(s.min_sync_period, Duration::from_secs(2));
    assert!(s.masquerade_all);
    assert_eq!(s.verbosity, 2);
    assert_eq!(s.config_file, Some(PathBuf::from(path)));

    // kube-proxy's configuration flags lose to the file (with a warning each); the
    // exceptions --hostname-override, -v and --master win; kpr's own flags apply.
    let (s, w) = run(&[
        "--config",
        path,
        "--proxy-mode=ipvs",
        "--cluster-cidr=10.0.0.0/8",
        "--masquerade-all=false",
        "--kubeconfig=/from/flag",
        "--metrics-bind-address=127.0.0.1:1",
        "--iptables-sync-period=99s",
        "--hostname-override=From-Flag",
        "-v=5",
        "--master=https://api:6443",
        "--sync-period=40s",
        "--min-sync-period=3s",
        "--manifests=/m",
        "--cgroup-path=/tmp/cg",
    ]);
    assert_eq!(s.proxy_mode, ProxyMode::Ebpf);
    assert_eq!(s.cluster_cidrs, vec!["10.244.0.0/16".parse().unwrap()]);
    assert!(s.masquerade_all);
    assert_eq!(s.kubeconfig, Some(PathBuf::from("/from/file")));
    assert_eq!(s.metrics_bind_address, addr("0.0.0.0:10249"));
    assert_eq!(s.hostname_override.as_deref(), Some("from-flag"));
    assert_eq!(s.verbosity, 5);
    assert_eq!(s.master.as_deref(), Some("https://api:6443"));
    assert_eq!(s.sync_period, Duration::from_secs(40));
    assert_eq!(s.min_sync_period, Duration::from_secs(3));
    assert_eq!(s.manifests, Some(PathBuf::from("/m")));
    assert_eq!(s.cgroup_path, PathBuf::from("/tmp/cg"));
    let ignored: Vec<&str> = w
        .iter()
        .map(|w| {
            w.strip_prefix("ignored: --")
                .and_then(|w| w.split(',').next())
                .unwrap_or(w)
        })
        .collect();
    assert_eq!(
        ignored,
        [
            "proxy-mode",
            "cluster-cidr",
            "masquerade-all",
            "kubeconfig",
            "metrics-bind-address",
            "iptables-sync-period"
        ]
    );
    assert!(w[0].contains("because --config is given"), "{w:?}");
}

#[test]
fn sync_periods_come_from_the_modes_section() {
    let sections =
        "iptables:\n  syncPeriod: 11s\n  minSyncPeriod: 1100ms\n  masqueradeAll: false\n\
                    ipvs:\n  syncPeriod: 12s\n  minSyncPeriod: 1200ms\n\
                    nftables:\n  syncPeriod: 13s\n  minSyncPeriod: 1300ms\n  masqueradeAll: true\n";
    // (ipvs is refused until kpr has that mode; its section is the ipvs one all the same.)
    for (mode, sync, masq) in [
        ("\"\"", 11, false),
        ("iptables", 11, false),
        ("nftables", 13, true),
    ] {
        let f = config_file(&format!("mode: {mode}\n{sections}"));
        let (s, _) = run(&["--config", f.path().to_str().unwrap()]);
        assert_eq!(s.sync_period, Duration::from_secs(sync), "{mode}");
        assert_eq!(
            s.min_sync_period,
            Duration::from_millis(sync * 100),
            "{mode}"
        );
        assert_eq!(s.masquerade_all, masq, "{mode}");
    }
    // Top-level periods win; 0s means unset (kube-proxy's defaulting).
    let f = config_file(&format!("syncPeriod: 1m\nminSyncPeriod: 0s\n{sections}"));
    let (s, _) = run(&["--config", f.path().to_str().unwrap()]);
    assert_eq!(s.sync_period, Duration::from_secs(60));
    assert_eq!(s.min_sync_period, Duration::from_millis(1100));
}

#[test]
fn config_errors_name_the_field() {
    for (yaml, want) in [
        (
            "iptables:\n  syncPeriod: 5\n",
            ": iptables.syncPeriod: invalid type: integer `5`",
        ),
        ("mode: [x]\n", ": mode: invalid type: sequence"),
        (
            "conntrack:\n  min: lots\n",
            ": conntrack.min: invalid type: string",
        ),
        (
            "nodePortAddresses: [10.0.0.0/99]\n",
            ": nodePortAddresses: ",
        ),
        (
            "bindAddress: here\n",
            ": bindAddress: \"here\" is not an IP address",
        ),
    ] {
        let f = config_file(yaml);
        let e = err(&["--config", f.path().to_str().unwrap()]);
        assert!(matches!(e, ConfigError::Field { .. }), "{yaml}: {e}");
        assert!(e.to_string().contains(want), "{yaml}: {e}");
    }
    let e = err(&["--config", "/nonexistent/kube-proxy.yaml"]);
    assert!(matches!(e, ConfigError::ReadFile { .. }), "{e}");
}

#[test]
fn help_lists_kube_proxys_flags() {
    let help = flags::command().render_long_help().to_string();
    for flag in [
        "--config",
        "--proxy-mode",
        "--hostname-override",
        "--cluster-cidr",
        "--nodeport-addresses",
        "--masquerade-all",
        "--kubeconfig",
        "--master",
        "--bind-address",
        "--healthz-bind-address",
        "--metrics-bind-address",
        "--v ",
        "--conntrack-max-per-core",
        "--iptables-masquerade-bit",
        "--ipvs-scheduler",
        "--feature-gates",
        "--oom-score-adj",
        "--manifests",
        "--bpf-pin-dir",
        "--cgroup-path",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}

#[test]
fn clap_definition_is_consistent() {
    flags::command().debug_assert();
}

#[test]
fn devices_flag_takes_comma_lists_and_repeats() {
    let (s, _) = run(&[]);
    assert!(s.devices.is_empty(), "empty means the default devices");
    assert!(
        !s.to_json().contains("devices"),
        "the default is not serialized"
    );
    let (s, w) = run(&[
        "--devices=eth0,eth1",
        "--devices",
        "bond0",
        "--devices=eth0, ",
    ]);
    assert_eq!(s.devices, ["eth0", "eth1", "bond0"]);
    assert!(w.is_empty(), "{w:?}");
    assert!(s.to_json().contains("\"devices\""));
    // kpr's own flag: it applies with --config too.
    let f = config_file("mode: \"\"\n");
    let (s, _) = run(&["--config", f.path().to_str().unwrap(), "--devices=eth2"]);
    assert_eq!(s.devices, ["eth2"]);
    assert!(matches!(
        err(&["--devices=this-name-is-too-long"]),
        ConfigError::Flag {
            flag: "devices",
            ..
        }
    ));
    assert!(matches!(
        err(&["--devices=a/b"]),
        ConfigError::Flag {
            flag: "devices",
            ..
        }
    ));
    // iptables' wildcard: a prefix, kept as given (resolved against the node's devices).
    let (s, _) = run(&["--devices=eth0,tap+"]);
    assert_eq!(s.devices, ["eth0", "tap+"]);
    for bad in ["--devices=+", "--devices=ta+p"] {
        assert!(
            matches!(
                err(&[bad]),
                ConfigError::Flag {
                    flag: "devices",
                    ..
                }
            ),
            "{bad}"
        );
    }
}

#[test]
fn masquerade_bit_and_localhost_nodeports_from_flags_and_file() {
    let (s, w) = run(&[
        "--iptables-masquerade-bit",
        "15",
        "--iptables-localhost-nodeports=false",
    ]);
    assert!(w.is_empty(), "{w:?}");
    assert_eq!((s.masquerade_bit, s.localhost_nodeports), (15, false));
    assert_eq!(
        (
            Settings::default().masquerade_bit,
            Settings::default().localhost_nodeports
        ),
        (14, true)
    );
    let e = err(&["--iptables-masquerade-bit", "32"]).to_string();
    assert!(e.contains("not a bit of the 32-bit mark"), "{e}");
    let f = config_file("mode: nftables\nnftables:\n  masqueradeBit: 12\niptables:\n  masqueradeBit: 13\n  localhostNodePorts: false\n");
    let (s, _) = run(&["--config", f.path().to_str().unwrap()]);
    assert_eq!((s.masquerade_bit, s.localhost_nodeports), (12, false));
}

#[test]
fn conntrack_settings_from_flags_and_file() {
    let (s, w) = run(&[
        "--conntrack-max-per-core=1024",
        "--conntrack-min",
        "2048",
        "--conntrack-tcp-timeout-established=2h",
        "--conntrack-tcp-timeout-close-wait=30s",
        "--conntrack-udp-timeout=5s",
        "--conntrack-udp-timeout-stream=1m",
        "--conntrack-tcp-be-liberal",
    ]);
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(
        s.conntrack,
        ConntrackSettings {
            max_per_core: 1024,
            min: 2048,
            tcp_established_timeout: Duration::from_secs(7200),
            tcp_close_wait_timeout: Duration::from_secs(30),
            tcp_be_liberal: true,
            udp_timeout: Duration::from_secs(5),
            udp_stream_timeout: Duration::from_secs(60),
        }
    );
    assert!(matches!(
        err(&["--conntrack-min=-1"]),
        ConfigError::Flag {
            flag: "conntrack-min",
            ..
        }
    ));

    let f = config_file("conntrack:\n  maxPerCore: 0\n  min: 4096\n  udpTimeout: 10s\n");
    let (s, w) = run(&["--config", f.path().to_str().unwrap()]);
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(
        s.conntrack,
        ConntrackSettings {
            max_per_core: 0,
            min: 4096,
            udp_timeout: Duration::from_secs(10),
            ..ConntrackSettings::default()
        }
    );
    let f = config_file("conntrack:\n  maxPerCore: -5\n");
    let e = err(&["--config", f.path().to_str().unwrap()]);
    assert!(e.to_string().contains("conntrack.maxPerCore"), "{e}");
}

#[test]
fn detect_local_mode_is_read_from_flags_and_file_as_kube_proxy_validates_it() {
    let (s, w) = run(&["--detect-local-mode=ClusterCIDR"]);
    assert_eq!((s, w), (Settings::default(), vec![]));
    let (s, _) = run(&["--detect-local-mode=NodeCIDR"]);
    assert_eq!(s.detect_local, DetectLocal::NodeCidr);
    let (s, _) = run(&[
        "--detect-local-mode=InterfaceNamePrefix",
        "--pod-interface-name-prefix=veth",
    ]);
    assert_eq!(
        s.detect_local,
        DetectLocal::InterfaceNamePrefix("veth".into())
    );
    let (s, _) = run(&[
        "--detect-local-mode=BridgeInterface",
        "--pod-bridge-interface=cni0",
    ]);
    assert_eq!(s.detect_local, DetectLocal::BridgeInterface("cni0".into()));
    assert!(s.to_json().contains("BridgeInterface"), "{}", s.to_json());
    for bad in [
        &["--detect-local-mode=BridgeInterface"][..],
        &[
            "--detect-local-mode=InterfaceNamePrefix",
            "--pod-interface-name-prefix=",
        ],
        &["--detect-local-mode=Nope"],
    ] {
        assert!(
            matches!(
                err(bad),
                ConfigError::Flag {
                    flag: "detect-local-mode",
                    ..
                }
            ),
            "{bad:?}"
        );
    }
    // The file's detectLocalMode and detectLocal.
    let f = config_file(
        "detectLocalMode: InterfaceNamePrefix\ndetectLocal: {interfaceNamePrefix: cali}\n",
    );
    let (s, w) = run(&["--config", f.path().to_str().unwrap()]);
    assert_eq!(
        s.detect_local,
        DetectLocal::InterfaceNamePrefix("cali".into())
    );
    assert!(w.is_empty(), "{w:?}");
}
