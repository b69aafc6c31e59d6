//! Text output of `kpr status` and `kpr trace` (JSON is their structs, serialized).

use std::fmt::Write as _;

use super::trace::Trace;
use super::NodeView;

/// A table like `cilium-dbg service list`: one line per backend, the frontend's columns on its
/// first line; then the counters that are not zero and the maps' occupancy.
pub fn status(v: &NodeView) -> String {
    let mut rows: Vec<[String; 7]> = vec![[
        "FRONTEND".into(),
        "SCOPE".into(),
        "SERVICE".into(),
        "KIND".into(),
        "BACKENDS".into(),
        "AFFINITY".into(),
        "POLICY".into(),
    ]];
    for f in &v.frontends {
        let mut policy: Vec<String> = f.flags.iter().map(|s| s.to_string()).collect();
        if !f.source_ranges.is_empty() {
            policy.push(format!("sourceRanges={}", f.source_ranges.join(",")));
        }
        let first = [
            f.frontend.clone(),
            f.scope.to_string(),
            f.service.clone().unwrap_or_else(|| "-".into()),
            f.kind.clone().unwrap_or_else(|| "-".into()),
            String::new(),
            f.affinity_timeout_s
                .map(|s| format!("ClientIP {s}s"))
                .unwrap_or_else(|| "-".into()),
            if policy.is_empty() {
                "-".into()
            } else {
                policy.join(" ")
            },
        ];
        if f.backends.is_empty() {
            let mut r = first;
            r[4] = "(none: refused)".into();
            rows.push(r);
            continue;
        }
        for (i, b) in f.backends.iter().enumerate() {
            let mut r = if i == 0 {
                first.clone()
            } else {
                Default::default()
            };
            r[4] = format!("{} => {}", b.slot, b.address);
            rows.push(r);
        }
    }
    let mut widths = [0usize; 7];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    let _ = writeln!(out, "\nagent: {}", v.agent);
    let _ = writeln!(out, "\nCOUNTER  VALUE");
    for (k, n) in v.counters.iter().filter(|(_, n)| **n > 0) {
        let _ = writeln!(out, "{k}  {n}");
    }
    let _ = writeln!(out, "\nMAP  ENTRIES  CAPACITY");
    for m in &v.maps {
        let _ = writeln!(out, "{}  {}  {}", m.map, m.entries, m.capacity);
    }
    out
}

pub fn trace(t: &Trace) -> String {
    let mut out = format!("flow: {}\npath: {}\n", t.flow, t.scope);
    for s in &t.steps {
        let _ = writeln!(out, "  {}: {}", s.step, s.detail);
    }
    let _ = writeln!(out, "verdict: {}", t.verdict);
    out
}
