use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::*;
use serde_json::{json, Value};

/// No EndpointSlices (the builder takes owned or shared objects, so `&[]` needs a type).
const NO_SLICES: &[EndpointSlice] = &[];

fn svc(ns: &str, name: &str, spec: Value) -> Service {
    svc_obj(json!({"metadata": {"namespace": ns, "name": name}, "spec": spec}))
}

fn svc_obj(v: Value) -> Service {
    serde_json::from_value(v).expect("test Service")
}

/// A ClusterIP Service with the given IPs and `[name, port, protocol]` ports.
fn cluster_ip(ns: &str, name: &str, ips: &[&str], ports: Value) -> Service {
    svc(
        ns,
        name,
        json!({"clusterIP": ips[0], "clusterIPs": ips, "ports": ports}),
    )
}

fn slice(
    ns: &str,
    name: &str,
    service: &str,
    family: &str,
    ports: Value,
    endpoints: Value,
) -> EndpointSlice {
    slice_obj(json!({
        "metadata": {"namespace": ns, "name": name, "labels": {LABEL_SERVICE_NAME: service}},
        "addressType": family,
        "ports": ports,
        "endpoints": endpoints,
    }))
}

fn slice_obj(v: Value) -> EndpointSlice {
    serde_json::from_value(v).expect("test EndpointSlice")
}

fn ready(ip: &str) -> Value {
    json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false}})
}

fn fe(ip: &str, port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        ip: ip.parse().expect("test IP"),
        port,
        protocol,
    }
}

fn be(ip: &str, port: u16) -> Backend {
    Backend {
        ip: ip.parse().expect("test IP"),
        port,
    }
}

fn backends(state: &DesiredState, f: Frontend) -> Vec<Backend> {
    state
        .services
        .get(&f)
        .unwrap_or_else(|| {
            panic!(
                "no frontend {f} in {:?}",
                state.services.keys().collect::<Vec<_>>()
            )
        })
        .backends
        .clone()
}

fn web() -> (Service, EndpointSlice) {
    (
        cluster_ip(
            "demo",
            "web",
            &["10.96.0.10"],
            json!([{"name": "http", "port": 80}]),
        ),
        slice(
            "demo",
            "web-1",
            "web",
            "IPv4",
            json!([{"name": "http", "port": 8080}]),
            json!([ready("10.244.0.3"), ready("10.244.0.1")]),
        ),
    )
}

#[test]
fn basic_service_gets_sorted_backends_and_port_name() {
    let (s, sl) = web();
    let (state, errors) = build(&[s], &[sl]);
    assert_eq!(errors, vec![]);
    assert_eq!(state.services.len(), 1);
    let f = fe("10.96.0.10", 80, Protocol::Tcp);
    assert_eq!(
        backends(&state, f),
        vec![be("10.244.0.1", 8080), be("10.244.0.3", 8080)]
    );
    let name = &state.services[&f].name;
    assert_eq!(name.to_string(), "demo/web:http");
}

#[test]
fn headless_and_unset_cluster_ip_are_skipped_silently() {
    let ports = json!([{"port": 80}]);
    let services = [
        svc("a", "none", json!({"clusterIP": "None", "ports": ports})),
        svc("a", "empty", json!({"clusterIP": "", "ports": ports})),
        svc("a", "absent", json!({"ports": ports})),
        svc_obj(json!({"metadata": {"name": "nospec"}})),
    ];
    for s in &services {
        assert_eq!(validate_service(s), Ok(()));
    }
    let (state, errors) = build(&services, NO_SLICES);
    assert_eq!(errors, vec![]);
    assert!(state.services.is_empty(), "{:?}", state.services);
}

#[test]
fn external_name_is_skipped_silently() {
    let s = svc(
        "a",
        "ext",
        json!({"type": "ExternalName", "externalName": "example.com", "clusterIP": "10.96.0.1", "ports": [{"port": 80}]}),
    );
    let (state, errors) = build(&[s], NO_SLICES);
    assert_eq!(errors, vec![]);
    assert!(state.services.is_empty());
}

#[test]
fn services_labelled_for_other_proxies_are_skipped() {
    for label in [LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME] {
        let s = svc_obj(json!({
            "metadata": {"namespace": "a", "name": "x", "labels": {label: ""}},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]},
        }));
        let (state, errors) = build(&[s], NO_SLICES);
        assert_eq!(errors, vec![], "{label}");
        assert!(state.services.is_empty(), "{label}");
    }
}

#[test]
fn protocol_defaults_to_tcp_and_udp_sctp_are_kept_apart() {
    let s = cluster_ip(
        "a",
        "p",
        &["10.96.0.1"],
        json!([{"name": "a", "port": 53}, {"name": "b", "port": 53, "protocol": "UDP"}, {"name": "c", "port": 53, "protocol": "SCTP"}]),
    );
    let (state, errors) = build(&[s], NO_SLICES);
    assert_eq!(errors, vec![]);
    let keys: Vec<Frontend> = state.services.keys().copied().collect();
    assert_eq!(
        keys,
        vec![
            fe("10.96.0.1", 53, Protocol::Tcp),
            fe("10.96.0.1", 53, Protocol::Udp),
            fe("10.96.0.1", 53, Protocol::Sctp),
        ]
    );
}

#[test]
fn frontend_without_endpoints_exists_with_no_backends() {
    let (s, _) = web();
    let (state, errors) = build(&[s], NO_SLICES);
    assert_eq!(errors, vec![]);
    assert_eq!(
        backends(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
        vec![]
    );
}

/// `s` is served without the one entry `needle` names, which is reported as skipped.
fn assert_part_skipped_service(s: Service, needle: &str) -> DesiredState {
    assert_eq!(validate_service(&s), Ok(()), "{needle}");
    let (state, errors) = build(&[s], NO_SLICES);
    assert_eq!(errors.len(), 1, "{needle}: {errors:?}");
    let e = errors[0].to_string();
    assert!(
        e.contains(needle) && e.contains("skipped"),
        "{e:?} should mention {needle:?}"
    );
    assert!(
        !state.services.is_empty(),
        "{needle}: the Service is still served"
    );
    state
}

fn assert_invalid_service(s: Service, needle: &str) {
    let err = validate_service(&s).expect_err(needle);
    match &err {
        ModelError::InvalidService { reason, .. } => {
            assert!(
                reason.contains(needle),
                "{reason:?} should mention {needle:?}"
            )
        }
        other => panic!("unexpected {other:?}"),
    }
    let (good, _) = web();
    let (state, errors) = build(&[s, good], NO_SLICES);
    assert_eq!(errors, vec![err]);
    assert_eq!(state.services.len(), 1, "the valid Service is kept");
}

#[test]
fn ip_families_that_disagree_with_cluster_ips_are_reported_and_each_ip_keeps_its_family() {
    let s = svc(
        "a",
        "mixed",
        json!({"clusterIP": "10.96.0.5", "clusterIPs": ["10.96.0.5", "fd00:10:96::5"],
               "ipFamilies": ["IPv6", "IPv4"], "ports": [{"port": 80}]}),
    );
    let state = assert_part_skipped_service(s, "ipFamilies");
    let families: Vec<Family> = state.service_ports.iter().map(|p| p.family).collect();
    assert_eq!(families, vec![Family::V4, Family::V6]);
    assert!(state
        .services
        .contains_key(&fe("10.96.0.5", 80, Protocol::Tcp)));
    assert!(state
        .services
        .contains_key(&fe("fd00:10:96::5", 80, Protocol::Tcp)));
    // Agreeing families are silent.
    let ok = svc(
        "a",
        "dual",
        json!({"clusterIP": "10.96.0.6", "clusterIPs": ["10.96.0.6", "fd00:10:96::6"],
               "ipFamilies": ["IPv4", "IPv6"], "ports": [{"port": 80}]}),
    );
    let (_, errors) = build(&[ok], NO_SLICES);
    assert!(errors.is_empty(), "{errors:?}");
}

#[test]
fn invalid_services_are_reported_and_skipped_without_affecting_others() {
    assert_invalid_service(
        cluster_ip("a", "bad-ip", &["10.96.0.300"], json!([{"port": 80}])),
        "invalid ClusterIP",
    );
    // A bad secondary IP spoils the Service as a whole, not just one family.
    assert_invalid_service(
        cluster_ip(
            "a",
            "bad-ip6",
            &["10.96.0.3", "fd00::zz"],
            json!([{"port": 80}]),
        ),
        "invalid ClusterIP \"fd00::zz\"",
    );
    assert_invalid_service(
        cluster_ip("a", "p0", &["10.96.0.3"], json!([{"port": 0}])),
        "out of range",
    );
    assert_invalid_service(
        cluster_ip("a", "pbig", &["10.96.0.3"], json!([{"port": 65536}])),
        "out of range",
    );
    assert_invalid_service(
        cluster_ip(
            "a",
            "proto",
            &["10.96.0.3"],
            json!([{"port": 80, "protocol": "tcp"}]),
        ),
        "unknown protocol",
    );
    assert_invalid_service(
        svc_obj(json!({"metadata": {"namespace": "a"}, "spec": {"clusterIP": "10.96.0.3"}})),
        "metadata.name",
    );
    assert_invalid_service(
        cluster_ip(
            "a",
            "dup",
            &["10.96.0.3"],
            json!([{"name": "x", "port": 80}, {"name": "y", "port": 80}]),
        ),
        "listed twice",
    );
}

#[test]
fn cluster_ip_is_used_when_cluster_ips_is_absent() {
    let s = svc(
        "a",
        "old",
        json!({"clusterIP": "10.96.0.7", "ports": [{"port": 80}]}),
    );
    let (state, errors) = build(&[s], NO_SLICES);
    assert_eq!(errors, vec![]);
    assert!(state
        .services
        .contains_key(&fe("10.96.0.7", 80, Protocol::Tcp)));
}

#[test]
fn dual_stack_frontends_get_backends_of_their_own_family() {
    let s = cluster_ip(
        "a",
        "ds",
        &["10.96.0.5", "fd00:96::5"],
        json!([{"port": 80}]),
    );
    let v4 = slice(
        "a",
        "ds-4",
        "ds",
        "IPv4",
        json!([{"port": 8080}]),
        json!([ready("10.244.0.5")]),
    );
    let v6 = slice(
        "a",
        "ds-6",
        "ds",
        "IPv6",
        json!([{"port": 8080}]),
        json!([ready("fd00:244::5")]),
    );
    let (state, errors) = build(&[s], &[v6, v4]);
    assert_eq!(errors, vec![]);
    assert_eq!(state.services.len(), 2);
    assert_eq!(
        backends(&state, fe("10.96.0.5", 80, Protocol::Tcp)),
        vec![be("10.244.0.5", 8080)]
    );
    assert_eq!(
        backends(&state, fe("fd00:96::5", 80, Protocol::Tcp)),
        vec![be("fd00:244::5", 8080)]
    );
}

#[test]
fn named_target_ports_resolve_by_name_and_protocol() {
    let s = cluster_ip(
        "a",
        "multi",
        &["10.96.0.9"],
        json!([
            {"name": "http", "port": 80, "targetPort": "web"},
            {"name": "metrics", "port": 9090, "targetPort": "prom"},
            {"name": "dns", "port": 53, "protocol": "UDP"},
        ]),
    );
    // Port order in the slice differs from the Service, and "dns" exists only for TCP.
    let sl = slice(
        "a",
        "multi-x",
        "multi",
        "IPv4",
        json!([
            {"name": "metrics", "port": 9100},
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "dns", "port": 5353, "protocol": "TCP"},
        ]),
        json!([ready("10.244.1.1")]),
    );
    let (state, errors) = build(&[s], &[sl]);
    assert_eq!(errors, vec![]);
    assert_eq!(
        backends(&state, fe("10.96.0.9", 80, Protocol::Tcp)),
        vec![be("10.244.1.1", 8080)]
    );
    assert_eq!(
        backends(&state, fe("10.96.0.9", 9090, Protocol::Tcp)),
        vec![be("10.244.1.1", 9100)]
    );
    assert_eq!(backends(&state, fe("10.96.0.9", 53, Protocol::Udp)), vec![]);
}

#[test]
fn unnamed_ports_match_empty_and_missing_names() {
    let s = cluster_ip("a", "u", &["10.96.0.2"], json!([{"port": 80}]));
    let missing = slice(
        "a",
        "u-1",
        "u",
        "IPv4",
        json!([{"port": 8080}]),
        json!([ready("10.244.0.1")]),
    );
    let empty = slice(
        "a",
        "u-2",
        "u",
        "IPv4",
        json!([{"name": "", "port": 8080}]),
        json!([ready("10.244.0.2")]),
    );
    let named = slice(
        "a",
        "u-3",
        "u",
        "IPv4",
        json!([{"name": "x", "port": 8080}]),
        json!([ready("10.244.0.3")]),
    );
    let (state, errors) = build(&[s], &[missing, empty, named]);
    assert_eq!(errors, vec![]);
    assert_eq!(
        backends(&state, fe("10.96.0.2", 80, Protocol::Tcp)),
        vec![be("10.244.0.1", 8080), be("10.244.0.2", 8080)]
    );
    assert_eq!(
        state.services[&fe("10.96.0.2", 80, Protocol::Tcp)]
            .name
            .to_string(),
        "a/u"
    );
}

fn endpoint(
    ip: &str,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
) -> Value {
    json!({"addresses": [ip], "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
}

fn backends_of(endpoints: Value) -> Vec<Backend> {
    let (s, _) = web();
    let sl = slice(
        "demo",
        "web-1",
        "web",
        "IPv4",
        json!([{"name": "http", "port": 8080}]),
        endpoints,
    );
    let (state, errors) = build(&[s], &[sl]);
    assert_eq!(errors, vec![]);
    backends(&state, fe("10.96.0.10", 80, Protocol::Tcp))
}

#[test]
fn ready_endpoints_win_over_terminating_ones() {
    let got = backends_of(json!([
        endpoint("10.0.0.1", Some(true), Some(true), Some(false)),
        endpoint("10.0.0.2", Some(false), Some(true), Some(true)),
        endpoint("10.0.0.3", Some(false), Some(false), Some(false)),
    ]));
    assert_eq!(got, vec![be("10.0.0.1", 8080)]);
}

#[test]
fn without_ready_endpoints_serving_terminating_ones_are_used() {
    let got = backends_of(json!([
        endpoint("10.0.0.2", Some(false), Some(true), Some(true)),
        endpoint("10.0.0.3", Some(false), Some(false), Some(true)),
        endpoint("10.0.0.4", Some(false), Some(true), Some(false)),
        endpoint("10.0.0.5", Some(false), None, Some(true)),
    ]));
    assert_eq!(got, vec![be("10.0.0.2", 8080), be("10.0.0.5", 8080)]);
}

#[test]
fn missing_conditions_mean_ready() {
    let got = backends_of(json!([
        {"addresses": ["10.0.0.1"]},
        endpoint("10.0.0.2", None, None, None),
        endpoint("10.0.0.3", Some(false), None, None),
    ]));
    assert_eq!(got, vec![be("10.0.0.1", 8080), be("10.0.0.2", 8080)]);
}

#[test]
fn not_ready_and_not_terminating_means_reject() {
    let got = backends_of(json!([endpoint(
        "10.0.0.1",
        Some(false),
        Some(false),
        Some(false)
    )]));
    assert_eq!(got, vec![]);
}

#[test]
fn only_the_first_address_is_used_and_empty_endpoints_are_ignored() {
    let got = backends_of(json!([
        {"addresses": ["10.0.0.9", "10.0.0.1"]},
        {"addresses": []},
    ]));
    assert_eq!(got, vec![be("10.0.0.9", 8080)]);
}

#[test]
fn duplicate_endpoints_count_once() {
    let (s, a) = web();
    let b = slice(
        "demo",
        "web-2",
        "web",
        "IPv4",
        json!([{"name": "http", "port": 8080}]),
        json!([
            ready("10.244.0.3"),
            ready("10.244.0.3"),
            ready("10.244.0.2")
        ]),
    );
    let (state, errors) = build(&[s], &[a, b]);
    assert_eq!(errors, vec![]);
    assert_eq!(
        backends(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
        vec![
            be("10.244.0.1", 8080),
            be("10.244.0.2", 8080),
            be("10.244.0.3", 8080)
        ]
    );
}

#[test]
fn fqdn_slices_are_ignored_silently() {
    let (s, _) = web();
    let fqdn = slice(
        "demo",
        "web-f",
        "web",
        "FQDN",
        json!([{"name": "http", "port": 8080}]),
        json!([{"addresses": ["example.com"]}]),
    );
    assert_eq!(validate_slice(&fqdn), Ok(()));
    let (state, errors) = build(&[s], &[fqdn]);
    assert_eq!(errors, vec![]);
    assert_eq!(
        backends(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
        vec![]
    );
}

/// `bad` is used without the port or endpoint `needle` names, which is reported as skipped:
/// `web`'s backends are the good slice's and `extra`.
fn assert_part_skipped_slice(bad: EndpointSlice, needle: &str, extra: &[Backend]) {
    assert_eq!(validate_slice(&bad), Ok(()), "{needle}");
    let (s, good) = web();
    let (state, errors) = build(&[s], &[bad, good]);
    assert_eq!(errors.len(), 1, "{needle}: {errors:?}");
    let e = errors[0].to_string();
    assert!(
        e.contains(needle) && e.contains("skipped"),
        "{e:?} should mention {needle:?}"
    );
    let mut want = vec![be("10.244.0.1", 8080), be("10.244.0.3", 8080)];
    want.extend_from_slice(extra);
    want.sort();
    assert_eq!(backends(&state, fe("10.96.0.10", 80, Protocol::Tcp)), want);
}

fn assert_invalid_slice(bad: EndpointSlice, needle: &str) {
    let err = validate_slice(&bad).expect_err(needle);
    match &err {
        ModelError::InvalidSlice { reason, .. } => {
            assert!(
                reason.contains(needle),
                "{reason:?} should mention {needle:?}"
            )
        }
        other => panic!("unexpected {other:?}"),
    }
    let (s, good) = web();
    let (state, errors) = build(&[s], &[bad, good]);
    assert_eq!(errors, vec![err]);
    assert_eq!(
        backends(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
        vec![be("10.244.0.1", 8080), be("10.244.0.3", 8080)],
        "only the good slice contributes"
    );
}

#[test]
fn invalid_slices_are_reported_and_skipped_alone() {
    let http = json!([{"name": "http", "port": 8080}]);
    assert_invalid_slice(
        slice_obj(json!({
            "metadata": {"namespace": "demo", "name": "nolabel"},
            "addressType": "IPv4", "ports": http, "endpoints": [ready("10.9.9.9")],
        })),
        LABEL_SERVICE_NAME,
    );
    // One bad endpoint or port is skipped alone (kube-proxy's endpointslicecache).
    assert_part_skipped_slice(
        slice(
            "demo",
            "bad-addr",
            "web",
            "IPv4",
            http.clone(),
            json!([ready("10.9.9.9"), ready("10.9.9")]),
        ),
        "endpoints[1]: \"10.9.9\" is not an IPv4 address",
        &[be("10.9.9.9", 8080)],
    );
    assert_part_skipped_slice(
        slice(
            "demo",
            "v4-in-v6",
            "web",
            "IPv6",
            http.clone(),
            json!([ready("10.9.9.9")]),
        ),
        "not an IPv6 address",
        &[],
    );
    assert_part_skipped_slice(
        slice(
            "demo",
            "port",
            "web",
            "IPv4",
            json!([{"name": "http", "port": 70000}]),
            json!([ready("10.9.9.9")]),
        ),
        "ports[0]: port 70000 is out of range",
        &[],
    );
    assert_part_skipped_slice(
        slice(
            "demo",
            "port0",
            "web",
            "IPv4",
            json!([{"name": "other", "port": 0}, {"name": "http", "port": 8080}]),
            json!([ready("10.9.9.9")]),
        ),
        "ports[0]: port 0 is out of range",
        &[be("10.9.9.9", 8080)],
    );
    assert_part_skipped_slice(
        slice(
            "demo",
            "proto",
            "web",
            "IPv4",
            json!([{"name": "http", "port": 1, "protocol": "ICMP"}]),
            json!([]),
        ),
        "unknown protocol",
        &[],
    );
    // Only the first address is an endpoint's (kube-proxy ignores the others).
    let (s, good) = web();
    let mixed = slice(
        "demo",
        "mixed",
        "web",
        "IPv4",
        http.clone(),
        json!([{"addresses": ["10.9.9.9", "fd00::1"]}]),
    );
    let (state, errors) = build(&[s], &[mixed, good]);
    assert_eq!(errors, vec![]);
    assert!(backends(&state, fe("10.96.0.10", 80, Protocol::Tcp)).contains(&be("10.9.9.9", 8080)));
    assert_invalid_slice(
        slice("demo", "family", "web", "IPv5", http.clone(), json!([])),
        "addressType",
    );
    assert_invalid_slice(
        slice_obj(json!({
            "metadata": {"namespace": "demo", "labels": {LABEL_SERVICE_NAME: "web"}},
            "addressType": "IPv4", "ports": http, "endpoints": [ready("10.9.9.9")],
        })),
        "metadata.name",
    );
}

#[test]
fn slice_ports_without_a_number_are_ignored() {
    let (s, _) = web();
    let sl = slice(
        "demo",
        "web-1",
        "web",
        "IPv4",
        json!([{"name": "http"}, {"name": "http", "port": 8081}]),
        json!([ready("10.244.0.1")]),
    );
    let (state, errors) = build(&[s], &[sl]);
    assert_eq!(errors, vec![]);
    assert_eq!(
        backends(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
        vec![be("10.244.0.1", 8081)]
    );
}

#[test]
fn slices_match_by_label_within_the_namespace_only() {
    let (s, _) = web();
    let other_ns = slice(
        "prod",
        "web-1",
        "web",
        "IPv4",
        json!([{"name": "http", "port": 8080}]),
        json!([ready("10.1.1.1")]),
    );
    // The slice name alone means nothing; only the label ties it to a Service.
    let other_svc = slice(
        "demo",
        "web",
        "api",
        "IPv4",
        json!([{"name": "http", "port": 8080}]),
        json!([ready("10.1.1.2")]),
    );
    let (state, errors) = build(&[s], &[other_ns, other_svc]);
    assert_eq!(errors, vec![]);
    assert_eq!(
        backends(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
        vec![]
    );
}

#[test]
fn missing_namespace_means_default_on_both_sides() {
    let s = svc_obj(
        json!({"metadata": {"name": "n"}, "spec": {"clusterIP": "10.96.0.4", "ports": [{"port": 80}]}}),
    );
    let sl = slice_obj(json!({
        "metadata": {"name": "n-1", "labels": {LABEL_SERVICE_NAME: "n"}},
        "addressType": "IPv4", "ports": [{"port": 8080}], "endpoints": [ready("10.0.0.1")],
    }));
    let (state, errors) = build(&[s], &[sl]);
    assert_eq!(errors, vec![]);
    let f = fe("10.96.0.4", 80, Protocol::Tcp);
    assert_eq!(backends(&state, f), vec![be("10.0.0.1", 8080)]);
    assert_eq!(state.services[&f].name.namespace, "default");
}

#[test]
fn conflicting_frontends_keep_the_first_service_by_name() {
    let a = cluster_ip("x", "a", &["10.96.0.1"], json!([{"port": 80}]));
    let b = cluster_ip(
        "x",
        "b",
        &["10.96.0.1"],
        json!([{"port": 80}, {"name": "other", "port": 81}]),
    );
    for input in [vec![a.clone(), b.clone()], vec![b.clone(), a.clone()]] {
        let (state, errors) = build(&input, NO_SLICES);
        assert_eq!(state.services.len(), 1, "all of b is dropped");
        assert_eq!(
            state.services[&fe("10.96.0.1", 80, Protocol::Tcp)]
                .name
                .name,
            "a"
        );
        assert!(
            matches!(&errors[..], [ModelError::InvalidService { name, .. }] if name == "b"),
            "{errors:?}"
        );
    }
}

#[test]
fn build_does_not_depend_on_input_order() {
    let (s1, sl1) = web();
    let s2 = cluster_ip(
        "demo",
        "api",
        &["10.96.0.11", "fd00::11"],
        json!([{"name": "grpc", "port": 9000}]),
    );
    let sl2 = slice(
        "demo",
        "api-1",
        "api",
        "IPv4",
        json!([{"name": "grpc", "port": 9000}]),
        json!([ready("10.0.0.9"), ready("10.0.0.8")]),
    );
    // Same backend, ready in one slice and terminating in the other: usable whatever the order.
    let sl3 = slice(
        "demo",
        "api-2",
        "api",
        "IPv4",
        json!([{"name": "grpc", "port": 9000}]),
        json!([
            endpoint("10.0.0.8", Some(false), Some(true), Some(true)),
            ready("10.0.0.7")
        ]),
    );
    let (a, ea) = build(
        &[s1.clone(), s2.clone()],
        &[sl1.clone(), sl2.clone(), sl3.clone()],
    );
    let (b, eb) = build(&[s2, s1], &[sl3, sl2, sl1]);
    assert_eq!(a, b);
    assert_eq!(ea, eb);
    assert_eq!(
        backends(&a, fe("10.96.0.11", 9000, Protocol::Tcp)),
        vec![
            be("10.0.0.7", 9000),
            be("10.0.0.8", 9000),
            be("10.0.0.9", 9000)
        ]
    );
    assert_eq!(backends(&a, fe("fd00::11", 9000, Protocol::Tcp)), vec![]);
}

#[test]
fn a_service_defined_twice_is_reported_once_and_kept_once() {
    let (s, _) = web();
    let (state, errors) = build(&[s.clone(), s], NO_SLICES);
    assert_eq!(state.services.len(), 1);
    assert_eq!(errors.len(), 1, "{errors:?}");
}

// ---- NodePort, externalIPs, load balancers, traffic policies, affinity ----

const NODE: &str = "node-a";

fn ctx() -> NodeContext {
    NodeContext {
        node_name: Some(NODE.into()),
        node_ips: vec![
            "192.168.1.10".parse().unwrap(),
            "192.168.2.10".parse().unwrap(),
            "fd00:1::10".parse().unwrap(),
        ],
        node_ip: Some("192.168.1.10".parse().unwrap()),
        zone: None,
        pod_cidrs: Vec::new(),
    }
}

/// An endpoint on `node` with the given conditions.
fn on(ip: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({"addresses": [ip], "nodeName": node,
           "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
}

fn ready_on(ip: &str, node: &str) -> Value {
    on(ip, node, true, true, false)
}

/// `demo/web` (ClusterIP 10.96.0.10, port http 80 → 8080, nodePort 30080 for types that
/// have one) with `extra` merged into its spec.
fn web_with(extra: Value) -> Service {
    let mut spec = json!({
        "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
        "ports": [{"name": "http", "port": 80, "nodePort": 30080}],
    });
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    svc("demo", "web", spec)
}

fn web_slice(endpoints: Value) -> EndpointSlice {
    slice(
        "demo",
        "web-1",
        "web",
        "IPv4",
        json!([{"name": "http", "port": 8080}]),
        endpoints,
    )
}

/// One local ready endpoint (10.0.0.1) and one remote ready endpoint (10.0.0.2).
fn local_and_remote() -> EndpointSlice {
    web_slice(json!([
        ready_on("10.0.0.1", NODE),
        ready_on("10.0.0.2", "node-b")
    ]))
}

fn port_state(state: &DesiredState, f: Frontend) -> &ServicePortState {
    state.services.get(&f).unwrap_or_else(|| {
        panic!(
            "no frontend {f} in {:?}",
            state.services.keys().collect::<Vec<_>>()
        )
    })
}

fn build_ok(services: &[Service], slices: &[EndpointSlice]) -> DesiredState {
    let (state, errors) = build_for_node(services, slices, &ctx());
    assert_eq!(errors, vec![]);
    state
}

fn tcp(ip: &str, port: u16) -> Frontend {
    fe(ip, port, Protocol::Tcp)
}

fn kinds(state: &DesiredState) -> Vec<(Frontend, FrontendKind)> {
    state.services.iter().map(|(f, s)| (*f, s.kind)).collect()
}

#[test]
fn cluster_ip_only_services_are_unchanged_by_the_node_context() {
    let (s, sl) = web();
    let (plain, e1) = build(std::slice::from_ref(&s), std::slice::from_ref(&sl));
    let (with_node, e2) = build_for_node(&[s], &[sl], &ctx());
    assert_eq!((e1, e2), (vec![], vec![]));
    assert_eq!(plain.services, with_node.services);
    assert_eq!(plain.service_ports, with_node.service_ports);
    let st = port_state(&plain, tcp("10.96.0.10", 80));
    assert_eq!(st.kind, FrontendKind::ClusterIp);
    assert_eq!(st.external_backends, st.backends);
    assert_eq!(st.session_affinity, None);
    assert_eq!(st.health_check_node_port, None);
    assert!(st.load_balancer_source_ranges.is_empty());
}

#[test]
fn internal_policy_local_gives_cluster_ips_this_nodes_endpoints() {
    let s = web_with(json!({"internalTrafficPolicy": "Local"}));
    let state = build_ok(std::slice::from_ref(&s), &[local_and_remote()]);
    let st = port_state(&state, tcp("10.96.0.10", 80));
    assert_eq!(st.backends, vec![be("10.0.0.1", 8080)]);
    assert_eq!(st.external_backends, st.backends);
    assert_eq!(st.local_endpoints, 1);

    // Without a node name nothing is local: the ClusterIP rejects.
    let (state, errors) = build(std::slice::from_ref(&s), &[local_and_remote()]);
    assert_eq!(errors, vec![]);
    assert_eq!(backends(&state, tcp("10.96.0.10", 80)), vec![]);
    assert_eq!(state.services[&tcp("10.96.0.10", 80)].local_endpoints, 0);

    // Only remote endpoints: nothing for this node either.
    let remote = web_slice(json!([ready_on("10.0.0.2", "node-b")]));
    let state = build_ok(&[s], &[remote]);
    assert_eq!(backends(&state, tcp("10.96.0.10", 80)), vec![]);
}

#[test]
fn local_policy_falls_back_to_this_nodes_serving_terminating_endpoints() {
    let s = web_with(json!({
        "type": "NodePort",
        "internalTrafficPolicy": "Local",
        "externalTrafficPolicy": "Local",
    }));
    let sl = web_slice(json!([
        on("10.0.0.1", NODE, false, true, true),
        on("10.0.0.3", NODE, false, false, true),
        on("10.0.0.4", NODE, false, true, false),
        ready_on("10.0.0.2", "node-b"),
        on("10.0.0.5", "node-b", false, true, true),
    ]));
    let state = build_ok(&[s], &[sl]);
    let cip = port_state(&state, tcp("10.96.0.10", 80));
    assert_eq!(cip.backends, vec![be("10.0.0.1", 8080)]);
    assert_eq!(cip.local_endpoints, 0, "only ready endpoints count");
    let np = port_state(&state, tcp("192.168.1.10", 30080));
    assert_eq!(np.external_backends, vec![be("10.0.0.1", 8080)]);
    assert!(np.external_policy_local);
    assert!(
        !np.external_snat,
        "externalTrafficPolicy: Local never source-NATs"
    );
    assert!(
        !cip.external_policy_local,
        "only external frontends carry the policy"
    );
    // The cluster-wide fallback is independent: a ready endpoint exists elsewhere.
    assert_eq!(np.backends, vec![be("10.0.0.2", 8080)]);
}

#[test]
fn local_ready_endpoints_win_over_local_terminating_ones() {
    let s = web_with(json!({"internalTrafficPolicy": "Local"}));
    let sl = web_slice(json!([
        on("10.0.0.1", NODE, false, true, true),
        ready_on("10.0.0.3", NODE),
    ]));
    let state = build_ok(&[s], &[sl]);
    assert_eq!(
        backends(&state, tcp("10.96.0.10", 80)),
        vec![be("10.0.0.3", 8080)]
    );
}

#[test]
fn external_policy_local_keeps_outside_traffic_local_and_short_circuits_node_clients() {
    let s = web_with(json!({"type": "NodePort", "externalTrafficPolicy": "Local"}));
    let state = build_ok(&[s], &[local_and_remote()]);
    let all = vec![be("10.0.0.1", 8080), be("10.0.0.2", 8080)];
    let np = port_state(&state, tcp("192.168.1.10", 30080));
    assert_eq!(np.kind, FrontendKind::NodePort);
    assert_eq!(np.external_backends, vec![be("10.0.0.1", 8080)]);
    assert_eq!(
        np.backends, all,
        "clients on the node use the cluster endpoints"
    );
    let cip = port_state(&state, tcp("10.96.0.10", 80));
    assert_eq!((&cip.backends, &cip.external_backends), (&all, &all));
}

#[test]
fn external_policy_local_without_local_endpoints_has_no_external_backends() {
    let s = web_with(json!({"type": "NodePort", "externalTrafficPolicy": "Local"}));
    let remote = web_slice(json!([ready_on("10.0.0.2", "node-b")]));
    let state = build_ok(&[s], &[remote]);
    let np = port_state(&state, tcp("192.168.1.10", 30080));
    assert_eq!(np.external_backends, vec![]);
    assert_eq!(np.backends, vec![be("10.0.0.2", 8080)]);
    assert_eq!(np.local_endpoints, 0);
}

#[test]
fn both_policies_local() {
    // kube-proxy: a Service with any external destination always "uses cluster endpoints"
    // (serviceport.go UsesClusterEndpoints), for the short circuit; so only the ClusterIP
    // and outside traffic are local.
    let s = web_with(json!({
        "type": "NodePort",
        "internalTrafficPolicy": "Local",
        "externalTrafficPolicy": "Local",
    }));
    let state = build_ok(&[s], &[local_and_remote()]);
    let local = vec![be("10.0.0.1", 8080)];
    let all = vec![be("10.0.0.1", 8080), be("10.0.0.2", 8080)];
    let cip = port_state(&state, tcp("10.96.0.10", 80));
    assert_eq!((&cip.backends, &cip.external_backends), (&local, &local));
    let np = port_state(&state, tcp("192.168.2.10", 30080));
    assert_eq!((&np.backends, &np.external_backends), (&all, &local));
}

#[test]
fn cluster_policies_use_every_endpoint_everywhere() {
    let s = web_with(
        json!({"type": "NodePort", "externalTrafficPolicy": "Cluster",
                            "internalTrafficPolicy": "Cluster"}),
    );
    let state = build_ok(&[s], &[local_and_remote()]);
    let all = vec![be("10.0.0.1", 8080), be("10.0.0.2", 8080)];
    for st in state.services.values() {
        assert_eq!((&st.backends, &st.external_backends), (&all, &all));
        // One backend is on another node: outside traffic must be source-NATed.
        assert_eq!(st.external_snat, st.kind.is_external());
    }
}

#[test]
fn outside_traffic_to_local_backends_only_is_not_source_natted() {
    let s = web_with(json!({"type": "NodePort", "externalTrafficPolicy": "Cluster"}));
    let sl = web_slice(json!([ready_on("10.0.0.1", NODE)]));
    let state = build_ok(&[s], &[sl]);
    let np = state
        .services
        .values()
        .find(|st| st.kind == FrontendKind::NodePort)
        .expect("a NodePort frontend");
    assert_eq!(np.external_backends, vec![be("10.0.0.1", 8080)]);
    assert!(!np.external_snat);
}

#[test]
fn node_ports_are_served_on_each_node_ip_of_the_services_families() {
    let s = web_with(json!({"type": "NodePort"}));
    let state = build_ok(&[s], &[local_and_remote()]);
    assert_eq!(
        kinds(&state),
        vec![
            (tcp("10.96.0.10", 80), FrontendKind::ClusterIp),
            (tcp("192.168.1.10", 30080), FrontendKind::NodePort),
            (tcp("192.168.2.10", 30080), FrontendKind::NodePort),
        ],
        "no IPv6 node address for a single-stack IPv4 Service"
    );
    assert_eq!(
        state.services[&tcp("192.168.1.10", 30080)].name.to_string(),
        "demo/web:http"
    );

    // Dual stack, UDP: each family's node addresses, with that family's endpoints.
    let ds = svc(
        "a",
        "dns",
        json!({"type": "NodePort", "clusterIPs": ["10.96.0.53", "fd00:96::53"],
               "clusterIP": "10.96.0.53",
               "ports": [{"port": 53, "protocol": "UDP", "nodePort": 30053}]}),
    );
    let v4 = slice(
        "a",
        "dns-4",
        "dns",
        "IPv4",
        json!([{"port": 5353, "protocol": "UDP"}]),
        json!([ready("10.0.0.53")]),
    );
    let v6 = slice(
        "a",
        "dns-6",
        "dns",
        "IPv6",
        json!([{"port": 5353, "protocol": "UDP"}]),
        json!([ready("fd00:244::53")]),
    );
    let state = build_ok(&[ds], &[v4, v6]);
    let udp = |ip| fe(ip, 30053, Protocol::Udp);
    assert_eq!(state.services.len(), 5);
    assert_eq!(
        backends(&state, udp("192.168.1.10")),
        vec![be("10.0.0.53", 5353)]
    );
    assert_eq!(
        backends(&state, udp("fd00:1::10")),
        vec![be("fd00:244::53", 5353)]
    );
    assert_eq!(
        state.services[&udp("fd00:1::10")].kind,
        FrontendKind::NodePort
    );

    // Without node addresses (`build`), no NodePort frontends.
    let (state, _) = build(&[web_with(json!({"type": "NodePort"}))], NO_SLICES);
    assert_eq!(state.services.len(), 1);
}

#[test]
fn node_ports_need_a_nodeport_or_loadbalancer_type_and_an_allocated_port() {
    // A ClusterIP Service cannot have a nodePort; one in a manifest is ignored.
    let state = build_ok(&[web_with(json!({}))], NO_SLICES);
    assert_eq!(
        kinds(&state),
        vec![(tcp("10.96.0.10", 80), FrontendKind::ClusterIp)]
    );

    let lb = web_with(json!({"type": "LoadBalancer"}));
    let state = build_ok(&[lb], NO_SLICES);
    assert_eq!(state.services.len(), 3, "a LoadBalancer has NodePorts too");

    for port in [
        json!({"name": "http", "port": 80}),
        json!({"name": "http", "port": 80, "nodePort": 0}),
    ] {
        let lb = web_with(
            json!({"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false,
                                 "ports": [port]}),
        );
        let state = build_ok(&[lb], NO_SLICES);
        assert_eq!(
            kinds(&state),
            vec![(tcp("10.96.0.10", 80), FrontendKind::ClusterIp)]
        );
    }
}

#[test]
fn out_of_range_node_ports_are_rejected() {
    for n in [70000, -1] {
        assert_invalid_service(
            svc(
                "a",
                "np",
                json!({"type": "NodePort", "clusterIP": "10.96.0.3",
                                  "ports": [{"port": 80, "nodePort": n}]}),
            ),
            "nodePort",
        );
    }
}

fn lb_with_ingress(ingress: Value) -> Service {
    let mut s = web_with(json!({"type": "LoadBalancer"}));
    s.status = serde_json::from_value(json!({"loadBalancer": {"ingress": ingress}})).unwrap();
    s
}

#[test]
fn load_balancer_ingress_ips_in_vip_mode_are_frontends() {
    let s = lb_with_ingress(json!([
        {"ip": "203.0.113.1"},
        {"hostname": "lb.example.com"},
        {"ip": "203.0.113.2", "ipMode": "Proxy"},
        {"ip": "203.0.113.3", "ipMode": "VIP"},
        {"ip": "2001:db8::1"},
    ]));
    let state = build_ok(&[s], &[local_and_remote()]);
    let lbs: Vec<Frontend> = state
        .services
        .iter()
        .filter(|(_, s)| s.kind == FrontendKind::LoadBalancer)
        .map(|(f, _)| *f)
        .collect();
    assert_eq!(lbs, vec![tcp("203.0.113.1", 80), tcp("203.0.113.3", 80)]);
    assert_eq!(
        backends(&state, tcp("203.0.113.3", 80)),
        vec![be("10.0.0.1", 8080), be("10.0.0.2", 8080)]
    );

    // The status of a Service that is not a LoadBalancer is not used.
    let mut s = lb_with_ingress(json!([{"ip": "203.0.113.1"}]));
    s.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
    let state = build_ok(&[s], NO_SLICES);
    assert_eq!(state.services.len(), 1);

    let state = assert_part_skipped_service(
        lb_with_ingress(json!([{"ip": "203.0.113"}, {"ip": "203.0.113.9"}])),
        "ingress[0]: invalid ip",
    );
    assert!(state
        .services
        .keys()
        .any(|f| f.ip == "203.0.113.9".parse::<std::net::IpAddr>().unwrap()));
}

#[test]
fn load_balancer_with_local_policy() {
    let s = web_with(
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                            "healthCheckNodePort": 32000}),
    );
    let mut s2 = s.clone();
    s2.status = lb_with_ingress(json!([{"ip": "203.0.113.1"}])).status;
    let state = build_ok(&[s2], &[local_and_remote()]);
    let lb = port_state(&state, tcp("203.0.113.1", 80));
    assert_eq!(lb.external_backends, vec![be("10.0.0.1", 8080)]);
    assert_eq!(
        lb.backends,
        vec![be("10.0.0.1", 8080), be("10.0.0.2", 8080)]
    );
}

#[test]
fn external_ips_are_frontends_of_the_services_families() {
    let s = web_with(json!({"externalIPs": ["198.51.100.1", "2001:db8::2"],
                            "externalTrafficPolicy": "Local"}));
    let state = build_ok(&[s], &[local_and_remote()]);
    assert_eq!(
        kinds(&state),
        vec![
            (tcp("10.96.0.10", 80), FrontendKind::ClusterIp),
            (tcp("198.51.100.1", 80), FrontendKind::ExternalIp),
        ]
    );
    // externalIPs make even a ClusterIP Service "external" for the traffic policy.
    let ext = port_state(&state, tcp("198.51.100.1", 80));
    assert_eq!(ext.external_backends, vec![be("10.0.0.1", 8080)]);
    assert_eq!(
        ext.backends,
        vec![be("10.0.0.1", 8080), be("10.0.0.2", 8080)]
    );
    assert!(ext.load_balancer_source_ranges.is_empty());

    let state = assert_part_skipped_service(
        web_with(json!({"externalIPs": ["198.51.100.300", "198.51.100.3"]})),
        "externalIPs[0]: invalid IP",
    );
    assert!(state
        .services
        .keys()
        .any(|f| f.ip == "198.51.100.3".parse::<std::net::IpAddr>().unwrap()));
}

#[test]
fn an_address_listed_twice_in_one_service_is_served_once_as_its_first_kind() {
    let mut s = web_with(json!({"type": "LoadBalancer",
                                "externalIPs": ["10.96.0.10", "198.51.100.1", "198.51.100.1"]}));
    s.status = lb_with_ingress(json!([{"ip": "198.51.100.1"}])).status;
    let state = build_ok(&[s], NO_SLICES);
    assert_eq!(
        kinds(&state),
        vec![
            (tcp("10.96.0.10", 80), FrontendKind::ClusterIp),
            (tcp("192.168.1.10", 30080), FrontendKind::NodePort),
            (tcp("192.168.2.10", 30080), FrontendKind::NodePort),
            (tcp("198.51.100.1", 80), FrontendKind::ExternalIp),
        ]
    );
}

#[test]
fn an_external_address_never_takes_another_services_cluster_ip() {
    // "a/thief" sorts first, but its externalIP is "b/victim"'s ClusterIP:port.
    let thief = svc(
        "a",
        "thief",
        json!({"clusterIP": "10.96.0.1",
                                         "externalIPs": ["10.96.0.2"], "ports": [{"port": 80}]}),
    );
    let victim = svc(
        "b",
        "victim",
        json!({"clusterIP": "10.96.0.2", "ports": [{"port": 80}]}),
    );
    for input in [
        vec![thief.clone(), victim.clone()],
        vec![victim.clone(), thief.clone()],
    ] {
        let (state, errors) = build_for_node(&input, NO_SLICES, &ctx());
        // The thief keeps its own ClusterIP; only the stolen address is skipped, in every
        // mode (the netfilter modes' port info loses it too).
        assert_eq!(
            kinds(&state),
            vec![
                (tcp("10.96.0.1", 80), FrontendKind::ClusterIp),
                (tcp("10.96.0.2", 80), FrontendKind::ClusterIp)
            ]
        );
        assert_eq!(state.services[&tcp("10.96.0.2", 80)].name.name, "victim");
        let thief_port = state
            .service_ports
            .iter()
            .find(|p| p.name.name == "thief")
            .unwrap();
        assert!(thief_port.external_ips.is_empty());
        assert!(
            matches!(&errors[..], [ModelError::InvalidService { name, reason, .. }]
                if name == "thief" && reason.contains("b/victim")),
            "{errors:?}"
        );
    }
    // Between two external claims, the first Service by name wins; the other keeps the rest.
    let a = svc(
        "x",
        "a",
        json!({"clusterIP": "10.96.0.1", "externalIPs": ["198.51.100.1"],
                                 "ports": [{"port": 80}]}),
    );
    let b = svc(
        "x",
        "b",
        json!({"clusterIP": "10.96.0.2", "externalIPs": ["198.51.100.1"],
                                 "ports": [{"port": 80}]}),
    );
    let (state, errors) = build_for_node(&[b, a], NO_SLICES, &ctx());
    assert_eq!(
        kinds(&state),
        vec![
            (tcp("10.96.0.1", 80), FrontendKind::ClusterIp),
            (tcp("10.96.0.2", 80), FrontendKind::ClusterIp),
            (tcp("198.51.100.1", 80), FrontendKind::ExternalIp),
        ]
    );
    assert_eq!(state.services[&tcp("198.51.100.1", 80)].name.name, "a");
    assert_eq!(errors.len(), 1, "{errors:?}");
}

#[test]
fn load_balancer_source_ranges_are_parsed_per_family_onto_lb_frontends() {
    let mut s = svc(
        "a",
        "lb",
        json!({
            "type": "LoadBalancer",
            "clusterIPs": ["10.96.0.7", "fd00:96::7"], "clusterIP": "10.96.0.7",
            "ports": [{"port": 443, "nodePort": 30443}],
            // Leading zeros are decimal, as Kubernetes' sloppy parser reads them.
            "loadBalancerSourceRanges": [" 10.0.0.0/8 ", "192.168.001.077/24", "2001:db8::1/32",
                                         "", "0.0.0.0/0"],
        }),
    );
    s.status = serde_json::from_value(json!({"loadBalancer": {"ingress": [
        {"ip": "203.0.113.7"}, {"ip": "2001:db8:1::7"}]}}))
    .unwrap();
    let state = build_ok(&[s], NO_SLICES);
    let nets = |v: &[&str]| -> Vec<ipnet::IpNet> { v.iter().map(|s| s.parse().unwrap()).collect() };
    assert_eq!(
        port_state(&state, tcp("203.0.113.7", 443)).load_balancer_source_ranges,
        nets(&["10.0.0.0/8", "192.168.1.0/24", "0.0.0.0/0"])
    );
    assert_eq!(
        port_state(&state, tcp("2001:db8:1::7", 443)).load_balancer_source_ranges,
        nets(&["2001:db8::/32"])
    );
    for f in [
        tcp("10.96.0.7", 443),
        tcp("192.168.1.10", 30443),
        tcp("fd00:1::10", 30443),
    ] {
        assert!(
            port_state(&state, f).load_balancer_source_ranges.is_empty(),
            "{f}"
        );
    }

    for bad in [
        "10.0.0.0",
        "10.0.0.0/33",
        "2001:db8::/129",
        "foo/8",
        "10.0.0.0/+8",
        "10.0.0.0/",
        "10.0.0.0/8/8",
    ] {
        let state = assert_part_skipped_service(
            web_with(json!({"type": "LoadBalancer",
                            "loadBalancerSourceRanges": [bad, "192.0.2.0/24"]})),
            "is not a CIDR",
        );
        for (_, p) in state
            .services
            .iter()
            .filter(|(_, p)| p.kind == FrontendKind::LoadBalancer)
        {
            assert_eq!(
                p.load_balancer_source_ranges,
                vec!["192.0.2.0/24".parse().unwrap()]
            );
        }
    }
}

#[test]
fn session_affinity_client_ip() {
    let s = web_with(json!({"type": "NodePort", "sessionAffinity": "ClientIP"}));
    let state = build_ok(&[s], NO_SLICES);
    assert_eq!(state.services.len(), 3);
    for st in state.services.values() {
        assert_eq!(st.session_affinity, Some(Duration::from_secs(10_800)));
    }
    for secs in [1, 60, 86_400] {
        let s = web_with(json!({"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": secs}}}));
        let state = build_ok(&[s], NO_SLICES);
        assert_eq!(
            state.services[&tcp("10.96.0.10", 80)].session_affinity,
            Some(Duration::from_secs(secs))
        );
    }
    for none in [
        json!({"sessionAffinity": "None"}),
        json!({}),
        // The config means nothing without ClientIP.
        json!({"sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 5}}}),
    ] {
        let state = build_ok(&[web_with(none)], NO_SLICES);
        assert_eq!(
            state.services[&tcp("10.96.0.10", 80)].session_affinity,
            None
        );
    }
    for secs in [0, -1, 86_401] {
        assert_invalid_service(
            web_with(json!({"sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": secs}}})),
            "out of range 1-86400",
        );
    }
    assert_invalid_service(
        web_with(json!({"sessionAffinity": "Cookie"})),
        "sessionAffinity",
    );
}

#[test]
fn health_check_node_port_only_for_local_load_balancers() {
    let lb_local = web_with(
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                                   "healthCheckNodePort": 32000}),
    );
    let state = build_ok(&[lb_local], &[local_and_remote()]);
    assert_eq!(state.services.len(), 3);
    for st in state.services.values() {
        assert_eq!(st.health_check_node_port, Some(32000));
    }
    for other in [
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Cluster", "healthCheckNodePort": 32000}),
        json!({"type": "NodePort", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000}),
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local"}),
    ] {
        let state = build_ok(&[web_with(other.clone())], NO_SLICES);
        assert!(
            state
                .services
                .values()
                .all(|s| s.health_check_node_port.is_none()),
            "{other}"
        );
    }
    assert_invalid_service(
        web_with(
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                        "healthCheckNodePort": 70000}),
        ),
        "healthCheckNodePort",
    );
}

#[test]
fn local_endpoints_count_this_nodes_ready_endpoints_per_service_port() {
    let s = svc(
        "demo",
        "web",
        json!({
            "type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
            "clusterIPs": ["10.96.0.10", "fd00:96::10"], "clusterIP": "10.96.0.10",
            "ports": [{"name": "http", "port": 80, "nodePort": 30080},
                      {"name": "https", "port": 443, "nodePort": 30443}],
        }),
    );
    let sl = slice(
        "demo",
        "web-1",
        "web",
        "IPv4",
        json!([{"name": "http", "port": 8080}, {"name": "https", "port": 8443}]),
        json!([
            ready_on("10.0.0.1", NODE),
            ready_on("10.0.0.3", NODE),
            on("10.0.0.4", NODE, false, true, true),
            ready_on("10.0.0.2", "node-b"),
            ready("10.0.0.5"),
        ]),
    );
    let state = build_ok(std::slice::from_ref(&s), std::slice::from_ref(&sl));
    // Two local ready pods × two ports, as kube-proxy's LocalReadyEndpoints counts them.
    for f in [
        tcp("10.96.0.10", 80),
        tcp("10.96.0.10", 443),
        tcp("192.168.1.10", 30443),
    ] {
        assert_eq!(port_state(&state, f).local_endpoints, 4, "{f}");
    }
    assert_eq!(
        port_state(&state, tcp("fd00:96::10", 80)).local_endpoints,
        0
    );
    assert_eq!(
        port_state(&state, tcp("fd00:1::10", 30080)).local_endpoints,
        0
    );
    let (state, _) = build(&[s], &[sl]);
    assert!(state.services.values().all(|s| s.local_endpoints == 0));
}

#[test]
fn unknown_types_and_policies_are_rejected() {
    assert_invalid_service(web_with(json!({"type": "Magic"})), "unknown type");
    assert_invalid_service(
        web_with(json!({"externalTrafficPolicy": "local"})),
        "externalTrafficPolicy",
    );
    assert_invalid_service(
        web_with(json!({"internalTrafficPolicy": "Nearest"})),
        "internalTrafficPolicy",
    );
}

#[test]
fn every_kind_of_a_skipped_service_is_skipped() {
    let mut headless = web_with(json!({"type": "LoadBalancer", "clusterIP": "None",
                                       "clusterIPs": ["None"], "externalIPs": ["198.51.100.1"]}));
    headless.status = lb_with_ingress(json!([{"ip": "203.0.113.1"}])).status;
    let mut labelled = lb_with_ingress(json!([{"ip": "203.0.113.1"}]));
    labelled.metadata.labels =
        Some([(LABEL_SERVICE_PROXY_NAME.to_string(), "x".to_string())].into());
    let (state, errors) = build_for_node(&[headless, labelled], NO_SLICES, &ctx());
    assert_eq!(errors, vec![]);
    assert!(state.services.is_empty(), "{:?}", state.services);
}

// ---- topology hints (kube-proxy's topologyModeFromHints / availableForTopology) ----

/// An endpoint on `node` with zone hints `zones` and node hints `nodes` (none: no `hints`).
fn hinted(ip: &str, node: &str, zones: &[&str], nodes: &[&str], is_ready: bool) -> Value {
    let mut e = ready(ip);
    e["nodeName"] = json!(node);
    e["conditions"]["ready"] = json!(is_ready);
    if !zones.is_empty() || !nodes.is_empty() {
        e["hints"] = json!({
            "forZones": zones.iter().map(|z| json!({"name": z})).collect::<Vec<_>>(),
            "forNodes": nodes.iter().map(|n| json!({"name": n})).collect::<Vec<_>>(),
        });
    }
    e
}

/// The ClusterIP backends of a Service (`policy` internalTrafficPolicy) whose endpoints are
/// `eps`, on node-a in `zone`.
fn topology_backends(eps: Value, zone: Option<&str>, policy: &str) -> Vec<Backend> {
    let s = svc(
        "demo",
        "web",
        json!({"clusterIP": "10.96.0.10", "internalTrafficPolicy": policy,
               "ports": [{"name": "http", "port": 80}]}),
    );
    let sl = slice(
        "demo",
        "web-1",
        "web",
        "IPv4",
        json!([{"name": "http", "port": 8080}]),
        eps,
    );
    let ctx = NodeContext {
        zone: zone.map(str::to_owned),
        ..ctx()
    };
    let (state, errors) = build_for_node(&[s], &[sl], &ctx);
    assert_eq!(errors, vec![]);
    backends(&state, fe("10.96.0.10", 80, Protocol::Tcp))
}

fn bes(ips: &[&str]) -> Vec<Backend> {
    ips.iter().map(|ip| be(ip, 8080)).collect()
}

#[test]
fn zone_hints_keep_the_endpoints_of_this_nodes_zone() {
    let eps = json!([
        hinted("10.0.0.1", NODE, &["zone-a"], &[], true),
        hinted("10.0.0.2", "node-b", &["zone-b"], &[], true),
        hinted("10.0.0.3", "node-c", &["zone-a"], &[], true),
    ]);
    assert_eq!(
        topology_backends(eps.clone(), Some("zone-a"), "Cluster"),
        bes(&["10.0.0.1", "10.0.0.3"])
    );
    assert_eq!(
        topology_backends(eps.clone(), Some("zone-b"), "Cluster"),
        bes(&["10.0.0.2"])
    );
    // No endpoint for this zone, or a node without a zone label: hints are ignored.
    let all = bes(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
    assert_eq!(
        topology_backends(eps.clone(), Some("zone-c"), "Cluster"),
        all
    );
    assert_eq!(topology_backends(eps.clone(), None, "Cluster"), all);
    // internalTrafficPolicy: Local is this node's endpoints, whatever the hints.
    assert_eq!(
        topology_backends(eps, Some("zone-b"), "Local"),
        bes(&["10.0.0.1"])
    );
}

#[test]
fn one_ready_endpoint_without_hints_turns_them_off_but_unready_ones_do_not() {
    let eps = json!([
        hinted("10.0.0.1", NODE, &["zone-a"], &[], true),
        hinted("10.0.0.2", "node-b", &[], &[], true),
    ]);
    assert_eq!(
        topology_backends(eps, Some("zone-a"), "Cluster"),
        bes(&["10.0.0.1", "10.0.0.2"])
    );
    let eps = json!([
        hinted("10.0.0.1", NODE, &["zone-a"], &[], true),
        hinted("10.0.0.2", "node-b", &["zone-b"], &[], true),
        hinted("10.0.0.9", "node-b", &[], &[], false),
    ]);
    assert_eq!(
        topology_backends(eps, Some("zone-a"), "Cluster"),
        bes(&["10.0.0.1"])
    );
}

#[test]
fn node_hints_come_before_zone_hints_when_every_endpoint_has_them() {
    let eps = json!([
        hinted("10.0.0.1", NODE, &["zone-a"], &[NODE], true),
        hinted("10.0.0.2", "node-b", &["zone-a"], &["node-b"], true),
    ]);
    assert_eq!(
        topology_backends(eps, Some("zone-a"), "Cluster"),
        bes(&["10.0.0.1"])
    );
    // None of the node hints is for this node: the zone hints decide.
    let eps = json!([
        hinted("10.0.0.1", "node-c", &["zone-a"], &["node-c"], true),
        hinted("10.0.0.2", "node-b", &["zone-b"], &["node-b"], true),
    ]);
    assert_eq!(
        topology_backends(eps, Some("zone-a"), "Cluster"),
        bes(&["10.0.0.1"])
    );
    // One endpoint without node hints: zone hints again.
    let eps = json!([
        hinted("10.0.0.1", NODE, &["zone-a"], &[NODE], true),
        hinted("10.0.0.2", "node-b", &["zone-a"], &[], true),
    ]);
    assert_eq!(
        topology_backends(eps, Some("zone-a"), "Cluster"),
        bes(&["10.0.0.1", "10.0.0.2"])
    );
}

#[test]
fn the_terminating_fallback_keeps_to_the_topology() {
    // Nothing ready: kube-proxy falls back to serving-terminating endpoints, and applies the
    // topology chosen from the ready ones (none: every endpoint).
    let mut a = hinted("10.0.0.1", NODE, &["zone-a"], &[], false);
    a["conditions"]["terminating"] = json!(true);
    let mut b = hinted("10.0.0.2", "node-b", &["zone-b"], &[], false);
    b["conditions"]["terminating"] = json!(true);
    assert_eq!(
        topology_backends(json!([a, b]), Some("zone-a"), "Cluster"),
        bes(&["10.0.0.1", "10.0.0.2"])
    );
}
