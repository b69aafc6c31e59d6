//! Removing what a proxy mode left on the node: kube-proxy's `CleanupLeftovers`. A node that
//! switches from kube-proxy (or from another kpr mode) must not keep the old mode's rules, which
//! would go on translating traffic beside the new mode's. Each mode cleans the others' state
//! at its first sync, and `kpr cleanup` removes every mode's.
//!
//! Only kube-proxy's own objects are touched: its chains in the iptables tables (both iptables
//! backends, both families) with the jumps into them, and its `kube-proxy` nftables tables;
//! kpr's eBPF mode table is `ip kpr` ([`crate::nft`]). kubelet's chains (KUBE-FIREWALL,
//! KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT) stay.

use std::process::{Command, Stdio};

use super::chains::IPTABLES_SERVICE_CHAIN_PREFIXES;
use super::iptables::{chains_in, Backend, JumpRule, Table, JUMP_RULES};
use super::nfnetlink::{NetlinkError, Transaction};

/// kube-proxy's fixed chains (kubelet's KUBE-FIREWALL is not among them).
const KUBE_PROXY_CHAINS: &[&str] = &[
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-PROXY-CANARY",
    // The IPVS mode's.
    "KUBE-NODE-PORT",
    "KUBE-LOAD-BALANCER",
    "KUBE-SOURCE-RANGES-FIREWALL",
];

fn is_kube_proxy_chain(chain: &str) -> bool {
    KUBE_PROXY_CHAINS.contains(&chain)
        || IPTABLES_SERVICE_CHAIN_PREFIXES
            .iter()
            .any(|p| chain.starts_with(p))
}

/// What a cleanup removed, for the log and `kpr cleanup`'s report.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed(pub Vec<String>);

/// Removes kube-proxy's iptables chains and jumps, for both backends and both families, in the
/// calling process's network namespace.
pub fn iptables() -> Removed {
    let jumps: Vec<JumpRule> = JUMP_RULES
        .iter()
        .chain(super::ipvs::write::JUMP_RULES)
        .copied()
        .collect();
    remove_chains(
        "kube-proxy",
        &["iptables", "ip6tables"],
        &[Table::Nat, Table::Filter],
        &jumps,
        is_kube_proxy_chain,
    )
}

/// Removes the eBPF mode's chain `KPR-FORWARD` and its jump from FORWARD, for both backends.
pub fn ebpf_forward_chain() -> Removed {
    use super::iptables::forward::{CHAIN, JUMP};
    remove_chains(
        "kpr eBPF-mode",
        &["iptables"],
        &[Table::Filter],
        &[JUMP],
        |c| c == CHAIN,
    )
}

/// Removes the chains `ours` selects from `tables`, for both backends and each of `families`
/// (`iptables`, `ip6tables`), with the `jumps` into them (`whose` names them in the report).
fn remove_chains(
    whose: &str,
    families: &[&str],
    tables: &[Table],
    jumps: &[JumpRule],
    ours: impl Fn(&str) -> bool,
) -> Removed {
    let mut removed = Removed::default();
    for backend in [Backend::Nft, Backend::Legacy] {
        for family in families {
            let tool = |t: &str| backend.command(t).replacen("iptables", family, 1);
            for &table in tables {
                let Some(save) =
                    super::quiet(Command::new(tool("iptables-save")).args(["-t", table.name()]))
                else {
                    continue;
                };
                let theirs: Vec<String> =
                    chains_in(&save).into_iter().filter(|c| ours(c)).collect();
                if theirs.is_empty() {
                    continue;
                }
                for j in jumps.iter().filter(|j| j.table == table && ours(j.to)) {
                    let args = j.args();
                    // A jump may have been added more than once.
                    for _ in 0..8 {
                        let mut cmd = Command::new(tool("iptables"));
                        cmd.args(["-w", "5", "-t", table.name(), "-D", j.from])
                            .args(&args);
                        if super::quiet(&mut cmd).is_none() {
                            break;
                        }
                    }
                }
                // Flush them all (a chain line flushes), then delete them all.
                let mut input = format!("*{}\n", table.name());
                for c in &theirs {
                    input.push_str(&format!(":{c} - [0:0]\n"));
                }
                for c in &theirs {
                    input.push_str(&format!("-X {c}\n"));
                }
                input.push_str("COMMIT\n");
                let ok = Command::new(tool("iptables-restore"))
                    .args(["-w", "5", "--noflush"])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .and_then(|mut child| {
                        use std::io::Write as _;
                        if let Some(mut stdin) = child.stdin.take() {
                            stdin.write_all(input.as_bytes())?;
                        }
                        child.wait_with_output()
                    });
                match ok {
                    Ok(out) if out.status.success() => removed.0.push(format!(
                        "{} {whose} chains in {} table {} ({backend:?})",
                        theirs.len(),
                        family,
                        table.name()
                    )),
                    Ok(out) => tracing::warn!(
                        "removing {whose} {family} chains in table {}: {}",
                        table.name(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                    Err(e) => tracing::warn!("running {}: {e}", tool("iptables-restore")),
                }
            }
        }
    }
    removed
}

/// Deletes kube-proxy's nftables tables (`ip kube-proxy`, `ip6 kube-proxy`) in the calling
/// thread's network namespace.
pub fn nftables() -> Result<Removed, NetlinkError> {
    delete_tables(c"kube-proxy")
}

/// Deletes the nftables tables `name` of both families (`ip`, `ip6`) in the calling thread's
/// network namespace; a table that is not there is no error.
pub fn delete_tables(name: &std::ffi::CStr) -> Result<Removed, NetlinkError> {
    let mut removed = Removed::default();
    let shown = name.to_string_lossy();
    for (family, fam) in [
        (nftnl::ProtoFamily::Ipv4, "ip"),
        (nftnl::ProtoFamily::Ipv6, "ip6"),
    ] {
        let table = nftnl::Table::new(name, family);
        let mut txn = Transaction::new();
        txn.add(&table, nftnl::MsgType::Del, || {
            format!("delete table {fam} {shown}")
        });
        match txn.commit() {
            Ok(()) => removed.0.push(format!("nftables table {fam} {shown}")),
            Err(NetlinkError::Kernel { errno, .. }) if errno == libc::ENOENT => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// A proxy mode, for what it leaves behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leftovers {
    /// kpr's eBPF mode: its tables `ip kpr` and `ip/ip6 kpr-sctp` and its iptables chain
    /// `KPR-FORWARD` (its programs leave with the process; its pinned maps are reused by the
    /// next eBPF run, and `kpr cleanup` removes them).
    Ebpf,
    Iptables,
    Nftables,
    /// The IPVS mode: kube-ipvs0, the virtual servers, kube-proxy's ipsets (its iptables
    /// chains are kube-proxy's, removed with the iptables mode's).
    Ipvs,
}

/// Removes what every mode but `keep` left, logging what went; errors are logged, not fatal
/// (kube-proxy does the same).
pub fn other_modes(keep: Leftovers) {
    let mut removed = Vec::new();
    if keep != Leftovers::Iptables {
        removed.extend(iptables().0);
    }
    // After the iptables chains: an ipset cannot go while a rule matches it.
    if keep != Leftovers::Ipvs {
        removed.extend(super::ipvs::cleanup());
    }
    if keep != Leftovers::Nftables {
        match nftables() {
            Ok(r) => removed.extend(r.0),
            Err(e) => tracing::warn!("removing kube-proxy's nftables tables: {e}"),
        }
    }
    if keep != Leftovers::Ebpf {
        match crate::nft::delete_table() {
            Ok(true) => removed.push(format!("nftables table ip {}", crate::nft::TABLE)),
            Ok(false) => {}
            Err(e) => tracing::warn!("removing kpr's eBPF-mode table: {e}"),
        }
        match delete_tables(crate::ebpf::sctp::TABLE) {
            Ok(r) => removed.extend(r.0),
            Err(e) => tracing::warn!("removing kpr's eBPF-mode SCTP tables: {e}"),
        }
        removed.extend(ebpf_forward_chain().0);
    }
    for r in removed {
        tracing::info!("removed another proxy mode's leftovers: {r}");
    }
}
