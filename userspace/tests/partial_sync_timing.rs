//! Where a one-endpoint change's sync spends its time at 10,000 Services, without the kernel:
//! the model built from every object, then each netfilter writer's partial sync. A
//! measurement, not a test (ignored); run it in release:
//!
//!     cargo test --release -p kpr --test partial_sync_timing -- --ignored --nocapture
//!
//! `KPR_TIMING_SERVICES=N` measures at N Services instead; the process's resident memory is
//! printed after each step, to show what holds it.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use std::sync::Arc;

use kpr::model::{build_for_node, ModelCache, NodeContext};
use kpr::netfilter::iptables::{IptablesConfig, RuleSyncer};
use kpr::netfilter::nftables::sync::NftSyncer;
use kpr::netfilter::plan::PlanConfig;

fn services(n: usize, target_endpoints: usize) -> String {
    let mut y = String::new();
    for i in 0..n {
        // 250 per /24 from 10.100.0.1 (Services) and 10.245.0.1 (endpoints) on.
        let (hi, lo) = (i / 250, i % 250 + 1);
        let (b, c, eb) = (100 + hi / 256, hi % 256, 245 + hi / 256);
        let endpoints = if i == 0 { target_endpoints } else { 1 };
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n\
             spec:\n  clusterIP: 10.{b}.{c}.{lo}\n  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-x\n  namespace: bench\n  labels: {{kubernetes.io/service-name: svc-{i}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n"
        );
        for e in 0..endpoints {
            let _ = writeln!(y, "  - addresses: [10.{eb}.{c}.{}]", lo + e);
        }
        y.push_str("---\n");
    }
    y
}

#[test]
#[ignore]
fn partial_sync_timing() {
    let n: usize = std::env::var("KPR_TIMING_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    println!("resident at start: {}", rss());
    let (before, _) = kpr::source::manifest::load_text(Path::new("m.yaml"), &services(n, 3), None);
    let (after, _) = kpr::source::manifest::load_text(Path::new("m.yaml"), &services(n, 2), None);
    println!("resident with both snapshots' objects: {}", rss());
    let ctx = NodeContext::default();
    let t = Instant::now();
    let (d0, _) = build_for_node(&before.services, &before.slices, &ctx);
    println!("model, {n} services: {:?}", t.elapsed());
    let t = Instant::now();
    let (d1, _) = build_for_node(&after.services, &after.slices, &ctx);
    println!("model again: {:?}", t.elapsed());
    println!("resident with two desired states too: {}", rss());
    // A source keeps the objects that did not change (the same allocations): `shared` is
    // `after` as the API or manifest source would publish it after `before`.
    let mut shared = before.clone();
    for (old, new) in shared.slices.iter_mut().zip(&after.slices) {
        if old != new {
            *old = new.clone();
        }
    }
    let (before, after, shared) = (Arc::new(before), Arc::new(after), Arc::new(shared));
    for (what, next) in [("objects equal", &after), ("objects shared", &shared)] {
        let mut cache = ModelCache::default();
        cache.build(&before, &ctx);
        let t = Instant::now();
        let (cached, _) = cache.build(next, &ctx);
        println!(
            "model from the cache, {what}: {:?} ({} Services reused)",
            t.elapsed(),
            cache.reused()
        );
        assert_eq!(cached, d1);
    }
    let t = Instant::now();
    let changes = kpr::changes::between(Some(&before), &shared);
    println!("changes counted: {:?}", t.elapsed());
    assert_eq!(changes.endpoint_slices, 1);
    let mut cache = ModelCache::default();
    cache.build(&before, &ctx);
    cache.build(&shared, &ctx);
    // KPR_MODEL_LOOPS=N: build N more times, for a profiler.
    let loops: usize = std::env::var("KPR_MODEL_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    for _ in 0..loops {
        std::hint::black_box(cache.build(&shared, &ctx));
    }

    let mut ipt = RuleSyncer::new(
        PlanConfig::default(),
        false,
        IptablesConfig::for_mark_bit(14),
    );
    let p = ipt.prepare(&d0, true, None);
    ipt.commit(p);
    println!("resident with the iptables writer's state: {}", rss());
    let t = Instant::now();
    let p = ipt.prepare(&d1, false, None);
    println!(
        "iptables partial prepare: {:?} ({} bytes, {} rewritten)",
        t.elapsed(),
        p.rules.text.len(),
        p.rewritten
    );

    let mut nft = NftSyncer::new(PlanConfig::default(), false, Default::default());
    let p = nft.prepare(&d0, true, Instant::now());
    nft.commit(p);
    println!("resident with the nftables writer's state: {}", rss());
    let t = Instant::now();
    let p = nft.prepare(&d1, false, Instant::now());
    println!("nftables partial prepare: {:?}", t.elapsed());
    drop(p);
}

/// VmRSS of this process, as /proc reports it.
fn rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l["VmRSS:".len()..].trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}
