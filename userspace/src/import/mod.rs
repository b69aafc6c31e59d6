//! `kpr import iptables-save` and `kpr diff iptables-save`: the Services and EndpointSlices a
//! node's kube-proxy (iptables mode) implements, read back from `iptables-save`.
//!
//! Three steps, one module each: [`parse`] (text → tables, chains, rules), [`interpret`]
//! (kube-proxy's chain structure → the model's [`ServicePortInfo`]s), [`write`] (→ manifests
//! `kpr --manifests DIR` serves); [`diff`] compares the service ports of a dump with a desired
//! state's. The dump shows the result of kube-proxy's decisions (which endpoints each policy
//! uses on that node), not all of their inputs: what it cannot say is reported as notes.

pub mod diff;
pub mod interpret;
pub mod parse;
pub mod write;

use crate::model::ServicePortInfo;
pub use interpret::{Imported, InterpretError, Note};
pub use parse::ParseError;

/// The namespace of Services whose name the dump does not carry (no comment names their chain).
pub const DERIVED_NAMESPACE: &str = "kpr-imported";

/// The `nodeName` written on the endpoints of `KUBE-SVL-` chains (the dump's node's own), when
/// no `--node` names that node.
pub const DEFAULT_NODE: &str = "imported-node";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error(transparent)]
    Interpret(#[from] InterpretError),
}

/// Parses and interprets a dump; `node` is the name local endpoints are written with (it only
/// appears in the notes here).
pub fn import(text: &str, node: &str) -> Result<Imported, ImportError> {
    let dump = parse::parse(text)?;
    let mut imported = interpret::interpret(&dump)?;
    if !imported.ports.is_empty() {
        let general = [
            "endpoints: written ready, except this node's endpoints missing from a non-empty cluster chain (those can only be serving-terminating); the dump shows the endpoints kube-proxy used, not their conditions, so a cluster chain of serving-terminating endpoints (used when none is ready) is written ready".to_string(),
            "zones: topology hints are not in the dump and none are written; the endpoints are those this node used after any zone filtering".to_string(),
            format!("node names: endpoints of KUBE-SVL- chains (Local policies) are this node's and are written with nodeName {node:?}; the other endpoints' nodes are unknown and none is written"),
            "EndpointSlices: one per service port and target port, named <service>-imported-N; the slices' names and the pods behind the endpoints are not in the dump".to_string(),
        ];
        let large = dump.tables.get("nat").is_some_and(|nat| {
            nat.chains.iter().any(|(n, c)| {
                n.starts_with("KUBE-SEP-") && c.rules.iter().all(|r| r.comment.is_none())
            })
        });
        let mut notes: Vec<Note> = general
            .into_iter()
            .map(|text| Note { line: None, text })
            .collect();
        if large {
            notes.push(Note {
                line: None,
                text: "large-cluster shape: the endpoint rules carry no comments; endpoints are tied to their service ports by chain".into(),
            });
        }
        notes.append(&mut imported.notes);
        imported.notes = notes;
    }
    Ok(imported)
}

/// The service ports of `desired` in the dump's address family (all when the dump has none).
pub fn same_family(imported: &Imported, desired: &[ServicePortInfo]) -> Vec<ServicePortInfo> {
    desired
        .iter()
        .filter(|p| imported.family.is_none_or(|f| f == p.family))
        .cloned()
        .collect()
}
