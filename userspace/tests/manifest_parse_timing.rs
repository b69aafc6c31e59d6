//! How long the manifest source takes to read 10,000 and 100,000 Services with their
//! EndpointSlices (one file, two endpoints each). A measurement, not a test: ignored, and it
//! asserts nothing but that everything parsed. Run it in release:
//!
//!     cargo test --release -p kpr --test manifest_parse_timing -- --ignored --nocapture
//!
//! Measured on the 2-core machine when the YAML library changed (serde_yaml 0.9, which is
//! unmaintained, to yaml_serde, the YAML organization's maintained fork): 10,000 Services
//! (5 MB) 0.49 s → 0.51 s, 100,000 (51 MB) 4.8 s → 4.9 s; serde-saphyr, also tried, took
//! 1.3 s and 12.6 s.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

fn services(n: usize) -> String {
    let mut y = String::new();
    for i in 0..n {
        let (a, b, c) = (i / 65536, (i / 256) % 256, i % 256);
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: big}}\n\
             spec:\n  clusterIP: 10.{}.{b}.{c}\n  ports: [{{name: p, port: 80, protocol: TCP, targetPort: 8080}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s{i}-x\n  namespace: big\n  labels: {{kubernetes.io/service-name: s{i}}}\n\
             addressType: IPv4\nports: [{{name: p, port: 8080, protocol: TCP}}]\nendpoints:\n  - addresses: [10.{}.{b}.{c}]\n    conditions: {{ready: true}}\n  - addresses: [10.{}.{b}.{c}]\n    conditions: {{ready: true}}\n---\n",
            100 + a, 200 + a, 220 + a
        );
    }
    y
}

#[test]
#[ignore]
fn parse_timing() {
    for n in [10_000usize, 100_000] {
        let y = services(n);
        let t = Instant::now();
        let (snapshot, errors) = kpr::source::manifest::load_text(Path::new("m.yaml"), &y, None);
        println!(
            "parse {n} services ({} MB): {:?} ({} services, {} slices, {} errors)",
            y.len() / 1_000_000,
            t.elapsed(),
            snapshot.services.len(),
            snapshot.slices.len(),
            errors.len()
        );
    }
}
