//! kube-proxy's conntrack set-up (cmd/kube-proxy/app/conntrack.go, `setupConntrack`): the
//! netfilter conntrack sysctls of the network namespace the agent runs in, from
//! `--conntrack-*` / the file's `conntrack`. Every mode needs them: the eBPF mode's
//! masqueraded flows and the netfilter modes' NAT live in netfilter's conntrack.
//!
//! As kube-proxy: a value already set is not written again; a zero timeout leaves its
//! sysctl alone; the table size is `maxPerCore × CPUs`, at least `min` (0: left alone), and
//! the hash table is grown to a quarter of it. The hash size is a module parameter of the
//! whole machine, which Linux lets only the initial network namespace write: kpr writes it
//! only from there (an agent in a test's namespace leaves the host alone). Unlike kube-proxy,
//! which exits when a write fails, kpr logs the failure and goes on (a read-only /proc/sys in
//! a container, `nf_conntrack_max` in a namespace that may not write it).
use std::path::{Path, PathBuf};

use crate::config::ConntrackSettings;

/// One write kube-proxy would make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlWrite {
    /// Under `/proc/sys/net/netfilter`, e.g. `nf_conntrack_max`.
    pub name: &'static str,
    pub value: u64,
}

/// The hash-size module parameter (machine-wide).
const HASHSIZE: &str = "/sys/module/nf_conntrack/parameters/hashsize";

/// What `settings` asks for on a machine with `cpus` CPUs, in kube-proxy's order.
pub fn planned(settings: &ConntrackSettings, cpus: u32) -> Vec<SysctlWrite> {
    // A zero duration leaves its sysctl alone.
    let secs = |d: std::time::Duration| (d.as_secs() > 0).then_some(d.as_secs());
    [
        ("nf_conntrack_max", table_size(settings, cpus)),
        (
            "nf_conntrack_tcp_timeout_established",
            secs(settings.tcp_established_timeout),
        ),
        (
            "nf_conntrack_tcp_timeout_close_wait",
            secs(settings.tcp_close_wait_timeout),
        ),
        (
            "nf_conntrack_tcp_be_liberal",
            settings.tcp_be_liberal.then_some(1),
        ),
        ("nf_conntrack_udp_timeout", secs(settings.udp_timeout)),
        (
            "nf_conntrack_udp_timeout_stream",
            secs(settings.udp_stream_timeout),
        ),
    ]
    .into_iter()
    .filter_map(|(name, value)| {
        Some(SysctlWrite {
            name,
            value: value?,
        })
    })
    .collect()
}

/// kube-proxy's `getConntrackMax`.
fn table_size(settings: &ConntrackSettings, cpus: u32) -> Option<u64> {
    if settings.max_per_core == 0 {
        return None;
    }
    let scaled = u64::from(settings.max_per_core) * u64::from(cpus.max(1));
    Some(scaled.max(u64::from(settings.min)))
}

/// Where the sysctls are: `/proc/sys`, or a directory standing in for it.
pub struct Sysctls {
    root: PathBuf,
    /// Whether the machine-wide hash size may be written (the initial network namespace).
    hashsize: Option<PathBuf>,
}

impl Sysctls {
    /// This process's network namespace's sysctls.
    pub fn of_this_namespace() -> Sysctls {
        Sysctls {
            root: PathBuf::from("/proc/sys"),
            hashsize: in_initial_netns().then(|| PathBuf::from(HASHSIZE)),
        }
    }

    /// Sysctls under `root` (tests), with the hash-size parameter at `hashsize` if given.
    pub fn at(root: &Path, hashsize: Option<&Path>) -> Sysctls {
        Sysctls {
            root: root.to_path_buf(),
            hashsize: hashsize.map(Path::to_path_buf),
        }
    }

    /// Applies `writes`, skipping values already set. Returns what was written and, one line
    /// each, what could not be.
    pub fn apply(&self, writes: &[SysctlWrite]) -> (Vec<SysctlWrite>, Vec<String>) {
        let (mut done, mut failed) = (Vec::new(), Vec::new());
        for w in writes {
            let path = self.root.join("net/netfilter").join(w.name);
            if read_number(&path) == Some(w.value) {
                continue;
            }
            match std::fs::write(&path, w.value.to_string()) {
                Ok(()) => done.push(w.clone()),
                Err(e) => failed.push(format!("setting {} to {}: {e}", w.name, w.value)),
            }
            if w.name == "nf_conntrack_max" {
                self.grow_hashsize(w.value / 4, &mut failed);
            }
        }
        (done, failed)
    }

    fn grow_hashsize(&self, want: u64, failed: &mut Vec<String>) {
        let Some(path) = &self.hashsize else { return };
        if read_number(path).is_some_and(|have| have >= want) {
            return;
        }
        if let Err(e) = std::fs::write(path, want.to_string()) {
            failed.push(format!("setting {} to {want}: {e}", path.display()));
        }
    }
}

fn read_number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether this process shares PID 1's network namespace (the host's, on a node).
fn in_initial_netns() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/net"),
        std::fs::read_link("/proc/1/ns/net"),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn names(w: &[SysctlWrite]) -> Vec<(&str, u64)> {
        w.iter().map(|w| (w.name, w.value)).collect()
    }

    #[test]
    fn kube_proxys_defaults_set_the_table_size_and_the_tcp_timeouts() {
        let d = ConntrackSettings::default();
        assert_eq!(
            names(&planned(&d, 2)),
            vec![
                // 32768 × 2 is below the minimum.
                ("nf_conntrack_max", 131_072),
                ("nf_conntrack_tcp_timeout_established", 86_400),
                ("nf_conntrack_tcp_timeout_close_wait", 3_600),
            ]
        );
        assert_eq!(planned(&d, 8)[0].value, 262_144);
    }

    #[test]
    fn zeros_leave_sysctls_alone_and_the_rest_are_written() {
        let s = ConntrackSettings {
            max_per_core: 0,
            min: 10,
            tcp_established_timeout: Duration::ZERO,
            tcp_close_wait_timeout: Duration::ZERO,
            tcp_be_liberal: true,
            udp_timeout: Duration::from_secs(30),
            udp_stream_timeout: Duration::from_secs(180),
        };
        assert_eq!(
            names(&planned(&s, 4)),
            vec![
                ("nf_conntrack_tcp_be_liberal", 1),
                ("nf_conntrack_udp_timeout", 30),
                ("nf_conntrack_udp_timeout_stream", 180),
            ]
        );
    }

    #[test]
    fn values_already_set_are_not_written_and_failures_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let nf = dir.path().join("net/netfilter");
        std::fs::create_dir_all(&nf).unwrap();
        std::fs::write(nf.join("nf_conntrack_max"), "65536\n").unwrap();
        std::fs::write(nf.join("nf_conntrack_tcp_timeout_established"), "86400\n").unwrap();
        // A directory where a sysctl file should be: its write fails.
        std::fs::create_dir(nf.join("nf_conntrack_tcp_timeout_close_wait")).unwrap();
        let hashsize = dir.path().join("hashsize");
        std::fs::write(&hashsize, "16384\n").unwrap();
        let writes = planned(&ConntrackSettings::default(), 2);
        let (done, failed) = Sysctls::at(dir.path(), Some(&hashsize)).apply(&writes);
        // established is set already; close_wait fails, named.
        assert_eq!(names(&done), vec![("nf_conntrack_max", 131_072)]);
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(failed[0].contains("nf_conntrack_tcp_timeout_close_wait"));
        assert_eq!(read_number(&nf.join("nf_conntrack_max")), Some(131_072));
        assert_eq!(read_number(&hashsize), Some(32_768));
        // Without the hash size (outside the initial namespace) it is left alone.
        std::fs::write(nf.join("nf_conntrack_max"), "1").unwrap();
        std::fs::write(&hashsize, "16").unwrap();
        Sysctls::at(dir.path(), None).apply(&writes);
        assert_eq!(read_number(&hashsize), Some(16));
    }
}
