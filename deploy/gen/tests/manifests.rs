//! The manifests checked in under deploy/ are what the generator writes now, and they say what
//! kpr needs.
use std::collections::BTreeSet;
use std::path::PathBuf;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kpr_deploy::{KubeProxyConfiguration, Kustomization, Options};
use serde::de::DeserializeOwned;

const REGENERATE: &str =
    "deploy/ is out of date: run `cargo xtask gen-deploy` and commit the result";

fn deploy_dir() -> PathBuf {
    kpr_deploy::deploy_dir()
}

fn read(name: &str) -> String {
    let path = deploy_dir().join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; {REGENERATE}", path.display()))
}

/// The YAML files directly in deploy/ (not the generator's own directory).
fn yaml_files_present() -> BTreeSet<String> {
    std::fs::read_dir(deploy_dir())
        .expect("reading deploy/")
        .map(|e| e.expect("reading deploy/").path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// Every YAML document of a file, each parsed as T.
fn docs<T: DeserializeOwned>(name: &str) -> Vec<T> {
    let text = read(name);
    yaml_serde::Deserializer::from_str(&text)
        .enumerate()
        .map(|(i, d)| {
            T::deserialize(d).unwrap_or_else(|e| {
                panic!(
                    "deploy/{name} document {i}: not a {}: {e}",
                    std::any::type_name::<T>()
                )
            })
        })
        .collect()
}

fn one<T: DeserializeOwned>(name: &str) -> T {
    let mut all = docs::<T>(name);
    assert_eq!(all.len(), 1, "deploy/{name}: expected exactly one document");
    all.remove(0)
}

fn daemon_set() -> DaemonSet {
    one("daemonset.yaml")
}

fn pod_spec(ds: &DaemonSet) -> PodSpec {
    ds.spec
        .template
        .spec
        .clone()
        .expect("pod template has a spec")
}

fn container(ds: &DaemonSet) -> Container {
    let spec = pod_spec(ds);
    assert_eq!(spec.containers.len(), 1, "one container");
    spec.containers[0].clone()
}

fn kube_proxy_config() -> KubeProxyConfiguration {
    let cm: ConfigMap = one("configmap.yaml");
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(kpr_deploy::CONFIG_KEY))
        .unwrap_or_else(|| panic!("ConfigMap has no {}", kpr_deploy::CONFIG_KEY));
    yaml_serde::from_str(text).expect("config.conf is a KubeProxyConfiguration")
}

#[test]
fn checked_in_manifests_are_what_the_generator_writes() {
    let tmp = tempfile::tempdir().unwrap();
    kpr_deploy::write(tmp.path(), &Options::default()).unwrap();
    let mut expected = BTreeSet::new();
    for entry in std::fs::read_dir(tmp.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let want = std::fs::read_to_string(&path).unwrap();
        let have = read(&name);
        assert!(
            have == want,
            "deploy/{name} differs from the generator's output; {REGENERATE}"
        );
        expected.insert(name);
    }
    assert_eq!(
        yaml_files_present(),
        expected,
        "deploy/*.yaml are not the generated files; {REGENERATE} (and remove stale files)"
    );
}

#[test]
fn generator_is_deterministic() {
    let a = kpr_deploy::generate(&Options::default()).unwrap();
    let b = kpr_deploy::generate(&Options::default()).unwrap();
    assert_eq!(a, b);
}

#[test]
fn every_file_starts_with_the_header() {
    for name in yaml_files_present() {
        assert!(
            read(&name).starts_with(kpr_deploy::HEADER),
            "deploy/{name} lacks the generated-file header"
        );
    }
}

#[test]
fn every_manifest_parses_as_its_type() {
    let sa: ServiceAccount = one("serviceaccount.yaml");
    assert_eq!(sa.metadata.name.as_deref(), Some("kpr"));
    assert_eq!(sa.metadata.namespace.as_deref(), Some("kube-system"));

    let rbac = docs::<yaml_serde::Value>("rbac.yaml");
    assert_eq!(
        rbac.len(),
        2,
        "rbac.yaml: a ClusterRole and a ClusterRoleBinding"
    );
    let role: ClusterRole = yaml_serde::from_value(rbac[0].clone()).expect("a ClusterRole");
    assert_eq!(role.metadata.name.as_deref(), Some("system:kpr"));
    let binding: ClusterRoleBinding =
        yaml_serde::from_value(rbac[1].clone()).expect("a ClusterRoleBinding");
    assert_eq!(binding.metadata.name.as_deref(), Some("system:kpr"));
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, "system:kpr");
    let subjects = binding.subjects.expect("subjects");
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, "kpr");
    assert_eq!(subjects[0].namespace.as_deref(), Some("kube-system"));

    let cm: ConfigMap = one("configmap.yaml");
    assert_eq!(cm.metadata.name.as_deref(), Some("kpr"));

    let ds = daemon_set();
    assert_eq!(ds.metadata.name.as_deref(), Some("kpr"));
    assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"));
}

#[test]
fn kustomization_lists_exactly_the_files_present() {
    let k: Kustomization = one(kpr_deploy::KUSTOMIZATION);
    assert_eq!(k.api_version, "kustomize.config.k8s.io/v1beta1");
    assert_eq!(k.kind, "Kustomization");
    assert_eq!(k.namespace, "kube-system");
    let listed: BTreeSet<String> = k.resources.iter().cloned().collect();
    assert_eq!(listed.len(), k.resources.len(), "a file listed twice");
    let mut present = yaml_files_present();
    present.remove(kpr_deploy::KUSTOMIZATION);
    assert_eq!(listed, present);
}

#[test]
fn rbac_grants_the_generators_api_access_and_nothing_else() {
    let role: ClusterRole = docs::<yaml_serde::Value>("rbac.yaml")
        .into_iter()
        .next()
        .map(|v| yaml_serde::from_value(v).unwrap())
        .unwrap();
    assert!(role.aggregation_rule.is_none());
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        assert!(rule.non_resource_urls.is_none() && rule.resource_names.is_none());
        for g in rule.api_groups.unwrap_or_default() {
            for r in rule.resources.clone().unwrap_or_default() {
                for v in &rule.verbs {
                    assert!(![&g, &r, v].iter().any(|s| s.contains('*')), "wildcard");
                    granted.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    let wanted: BTreeSet<_> = kpr_deploy::API_ACCESS
        .iter()
        .flat_map(|a| {
            a.verbs
                .iter()
                .map(|v| (a.group.to_string(), a.resource.to_string(), v.to_string()))
        })
        .collect();
    assert_eq!(granted, wanted);
}

#[test]
fn probes_use_the_configured_health_port() {
    let cfg = kube_proxy_config();
    let port: i32 = cfg
        .healthz_bind_address
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("healthzBindAddress has a port");
    assert_eq!(port, 10256);
    let c = container(&daemon_set());
    for (probe, path) in [
        (&c.liveness_probe, "/livez"),
        (&c.readiness_probe, "/healthz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("no httpGet probe for {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::Int(port), "{path} probe port");
        // With hostNetwork the pod IP is the node's: no host override needed.
        assert_eq!(get.host, None);
    }
}

#[test]
fn daemon_set_runs_on_every_linux_node_like_kube_proxy() {
    let ds = daemon_set();
    let spec = pod_spec(&ds);
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(spec.service_account_name.as_deref(), Some("kpr"));
    assert_eq!(spec.termination_grace_period_seconds, Some(30));
    assert!(
        spec.tolerations
            .unwrap_or_default()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint"
    );
    assert_eq!(
        spec.node_selector
            .unwrap_or_default()
            .get("kubernetes.io/os")
            .map(String::as_str),
        Some("linux")
    );
    let strategy = ds.spec.update_strategy.expect("update strategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy.rolling_update.and_then(|r| r.max_unavailable),
        Some(IntOrString::Int(1))
    );
    let selector = ds.spec.selector.match_labels.expect("selector");
    let pod_labels = ds
        .spec
        .template
        .metadata
        .and_then(|m| m.labels)
        .expect("pod labels");
    assert_eq!(selector.get("k8s-app").map(String::as_str), Some("kpr"));
    assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
}

#[test]
fn container_has_the_capabilities_it_needs_and_is_not_privileged() {
    let c = container(&daemon_set());
    let sc = c.security_context.expect("securityContext");
    assert_eq!(sc.privileged, Some(false));
    let added: BTreeSet<String> = sc
        .capabilities
        .and_then(|c| c.add)
        .unwrap_or_default()
        .into_iter()
        .collect();
    let wanted: BTreeSet<String> = ["BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON", "SYS_RESOURCE"]
        .map(String::from)
        .into();
    assert_eq!(added, wanted);
}

#[test]
fn container_command_env_and_mounts() {
    let ds = daemon_set();
    let c = container(&ds);
    assert_eq!(c.image.as_deref(), Some(kpr_deploy::DEFAULT_IMAGE));
    assert_eq!(
        c.command.unwrap_or_default(),
        [
            "/usr/local/bin/kpr",
            "--config=/var/lib/kpr/config.conf",
            "--hostname-override=$(NODE_NAME)",
            "--bpf-pin-dir=/sys/fs/bpf/kpr",
            "--cgroup-path=/run/kpr/cgroupv2",
        ]
    );
    let env = c.env.unwrap_or_default();
    let node = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let field = node
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME from a fieldRef");
    assert_eq!(field.field_path, "spec.nodeName");

    let requests = c
        .resources
        .and_then(|r| r.requests)
        .expect("resource requests");
    assert_eq!(requests.get("cpu").map(|q| q.0.as_str()), Some("100m"));
    assert_eq!(requests.get("memory").map(|q| q.0.as_str()), Some("64Mi"));

    // Every mount has its volume, and the volume's source is the one intended.
    let volumes = pod_spec(&ds).volumes.unwrap_or_default();
    let mounts = c.volume_mounts.unwrap_or_default();
    assert_eq!(volumes.len(), mounts.len());
    let host_path_at = |mount_path: &str| -> (String, Option<String>, bool, Option<String>) {
        let m = mounts
            .iter()
            .find(|m| m.mount_path == mount_path)
            .unwrap_or_else(|| panic!("nothing mounted at {mount_path}"));
        let v = volumes
            .iter()
            .find(|v| v.name == m.name)
            .expect("mount's volume");
        let hp = v
            .host_path
            .as_ref()
            .unwrap_or_else(|| panic!("{} not a hostPath", v.name));
        (
            hp.path.clone(),
            hp.type_.clone(),
            m.read_only == Some(true),
            m.mount_propagation.clone(),
        )
    };
    assert_eq!(
        host_path_at("/sys/fs/bpf"),
        (
            "/sys/fs/bpf".into(),
            Some("Directory".into()),
            false,
            Some("HostToContainer".into())
        )
    );
    assert_eq!(
        host_path_at("/run/kpr/cgroupv2"),
        (
            "/sys/fs/cgroup".into(),
            Some("Directory".into()),
            true,
            None
        )
    );
    assert_eq!(
        host_path_at("/lib/modules"),
        ("/lib/modules".into(), None, true, None)
    );
    assert_eq!(
        host_path_at("/run/xtables.lock"),
        (
            "/run/xtables.lock".into(),
            Some("FileOrCreate".into()),
            false,
            None
        )
    );
    let config_mount = mounts
        .iter()
        .find(|m| m.mount_path == "/var/lib/kpr")
        .expect("config");
    let config_volume = volumes
        .iter()
        .find(|v| v.name == config_mount.name)
        .unwrap();
    assert_eq!(
        config_volume.config_map.as_ref().map(|c| c.name.as_str()),
        Some("kpr")
    );
    // The API server refuses Bidirectional propagation for a container that is not privileged.
    assert!(mounts
        .iter()
        .all(|m| m.mount_propagation.as_deref() != Some("Bidirectional")));
}

#[test]
fn config_is_a_kube_proxy_configuration() {
    let cfg = kube_proxy_config();
    assert_eq!(cfg.api_version, "kubeproxy.config.k8s.io/v1alpha1");
    assert_eq!(cfg.kind, "KubeProxyConfiguration");
    assert_eq!(cfg.mode, "ebpf");
    assert_eq!(cfg.bind_address, "0.0.0.0");
    assert_eq!(cfg.healthz_bind_address, "0.0.0.0:10256");
    assert_eq!(cfg.metrics_bind_address, "127.0.0.1:10249");
    assert_eq!(cfg.cluster_cidr, "");
    assert_eq!(cfg.client_connection.kubeconfig, "");
}

#[test]
fn image_is_a_parameter() {
    let opts = Options {
        image: "registry.example/kpr:dev".into(),
    };
    let ds = kpr_deploy::daemon_set(&opts);
    assert_eq!(
        container(&ds).image.as_deref(),
        Some("registry.example/kpr:dev")
    );
}
