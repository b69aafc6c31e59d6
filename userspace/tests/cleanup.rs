//! `kpr cleanup`, the real binary, run inside a test network namespace (`ip netns exec`) with
//! a pin directory on a bpffs mounted in a temporary directory. Root only (fails otherwise).
//!
//! Safety: kpr's table is created and removed only in the test namespace (`kpr-nft-cleanup-…`,
//! deleted on drop); the root namespace's netfilter tables are never touched. The bpffs lives
//! outside /sys, which `ip netns exec` remounts.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use kpr::nft::{NftTable, DEFAULT_MASQ_MARK};

/// Loading programs, nftables and bpftool need root; fails (never passes untested) when
/// not root or a tool is missing.
#[track_caller]
fn require() {
    kpr_lab::preconditions::require("the cleanup tests", &["ip", "nft", "bpftool", "mount"]);
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace of this test process, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "kpr-nft-cleanup-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        Netns { name }
    }

    fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    /// Creates kpr's table with kpr's own code, on a thread inside the namespace.
    fn create_kpr_table(&self) {
        let path = format!("/var/run/netns/{}", self.name);
        let file = File::open(&path).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                let before = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
                // SAFETY: a valid namespace fd; only this thread changes namespace.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                let after = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
                assert_ne!(before, after, "setns did not switch namespace");
                NftTable::new(DEFAULT_MASQ_MARK)
                    .apply(&[("10.96.0.1".parse().unwrap(), 6, 80)])
                    .unwrap();
            })
            .join()
            .unwrap()
        });
    }

    fn has_table(&self, name: &str) -> bool {
        self.exec(&["nft", "list", "table", "ip", name])
            .status
            .success()
    }

    /// `kpr cleanup --bpf-pin-dir DIR` in this namespace.
    fn cleanup(&self, pin_dir: &Path) -> Run {
        let out = self.exec(&[
            env!("CARGO_BIN_EXE_kpr"),
            "cleanup",
            "--bpf-pin-dir",
            pin_dir.to_str().unwrap(),
        ]);
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// A bpffs mounted in a temporary directory, unmounted on drop.
struct Bpffs {
    _dir: tempfile::TempDir,
    mount: PathBuf,
}

impl Bpffs {
    fn new() -> Bpffs {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("bpffs");
        std::fs::create_dir(&mount).unwrap();
        run("mount", &["-t", "bpf", "bpf", mount.to_str().unwrap()]);
        Bpffs { _dir: dir, mount }
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).output();
    }
}

/// Pins a tiny real map at `path`.
fn pin_map(path: &Path) {
    run(
        "bpftool",
        &[
            "map",
            "create",
            path.to_str().unwrap(),
            "type",
            "hash",
            "key",
            "4",
            "value",
            "4",
            "entries",
            "1",
            "name",
            "kpr_test",
        ],
    );
}

#[test]
fn cleanup_removes_kprs_table_and_pins_only() {
    require();
    let ns = Netns::new();
    ns.create_kpr_table();
    let out = ns.exec(&["nft", "add table ip other; add chain ip other c"]);
    assert!(out.status.success());
    assert!(ns.has_table("kpr"));

    let fs = Bpffs::new();
    let pins = fs.mount.join("kpr");
    std::fs::create_dir(&pins).unwrap();
    pin_map(&pins.join("KPR_TEST"));
    pin_map(&pins.join("KPR_SVC4_V1"));
    pin_map(&pins.join("not_kprs"));

    let r = ns.cleanup(&pins);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("removed nftables table ip kpr"), "{r:?}");
    assert!(r.stdout.contains("KPR_TEST"), "{r:?}");
    assert!(r.stdout.contains("KPR_SVC4_V1"), "{r:?}");
    assert!(r.stdout.contains("kept"), "{r:?}");
    assert!(!ns.has_table("kpr"));
    assert!(ns.has_table("other"), "another program's table was touched");
    assert!(!pins.join("KPR_TEST").exists());
    assert!(!pins.join("KPR_SVC4_V1").exists());
    assert!(
        pins.join("not_kprs").exists(),
        "a pin that is not kpr's was removed"
    );
    assert!(pins.is_dir());

    // Once the foreign pin is gone, the directory goes too.
    std::fs::remove_file(pins.join("not_kprs")).unwrap();
    pin_map(&pins.join("KPR_BE4_V1"));
    let r = ns.cleanup(&pins);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("KPR_BE4_V1"), "{r:?}");
    assert!(r.stdout.contains("removed directory"), "{r:?}");
    assert!(!r.stdout.contains("nftables"), "{r:?}");
    assert!(!pins.exists());

    // Nothing left: still success.
    let r = ns.cleanup(&pins);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("nothing to clean up"), "{r:?}");
    assert!(ns.has_table("other"));
}

/// A pin directory that is the bpffs mount itself: the pins go, the mount point stays.
#[test]
fn cleanup_keeps_a_mount_point() {
    require();
    let ns = Netns::new();
    let fs = Bpffs::new();
    pin_map(&fs.mount.join("KPR_TEST"));
    let r = ns.cleanup(&fs.mount);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(!fs.mount.join("KPR_TEST").exists());
    assert!(fs.mount.is_dir());
    assert!(!r.stdout.contains("removed directory"), "{r:?}");
}

#[test]
fn cleanup_refuses_a_directory_not_on_a_bpffs() {
    require();
    let ns = Netns::new();
    ns.create_kpr_table();
    let dir = tempfile::tempdir().unwrap();
    let decoy = dir.path().join("KPR_SVC4_V1");
    std::fs::write(&decoy, b"not a pin").unwrap();
    let r = ns.cleanup(dir.path());
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("not on a bpffs"), "{r:?}");
    assert!(decoy.exists(), "a file outside a bpffs was removed");
    // The table part was still done.
    assert!(r.stdout.contains("removed nftables table ip kpr"), "{r:?}");
    assert!(!ns.has_table("kpr"));
}

/// The netfilter modes' state is kube-proxy's: its iptables chains with the jumps into them,
/// and its `kube-proxy` nftables table. `kpr cleanup` removes those and nothing else (another
/// program's chain, kubelet's KUBE-FIREWALL and its jump stay).
#[test]
fn cleanup_removes_kube_proxys_iptables_chains_and_nftables_table() {
    require();
    let ns = Netns::new();
    let rules = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n\
        :KUBE-SVC-XYZ - [0:0]\n:KUBE-SEP-ABC - [0:0]\n:OTHER - [0:0]\n\
        -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
        -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
        -A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j KUBE-SVC-XYZ\n\
        -A KUBE-SVC-XYZ -j KUBE-SEP-ABC\n\
        -A KUBE-SEP-ABC -p tcp -m tcp -j DNAT --to-destination 10.244.0.5:443\n\
        -A OTHER -j RETURN\nCOMMIT\n\
        *filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n:KUBE-NODEPORTS - [0:0]\n\
        -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
        -A INPUT -j KUBE-FIREWALL\nCOMMIT\n";
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "iptables-restore"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert!(ns
        .exec(&[
            "nft",
            "add table ip kube-proxy; add chain ip kube-proxy services"
        ])
        .status
        .success());
    assert!(ns.has_table("kube-proxy"));

    let fs = Bpffs::new();
    let r = ns.cleanup(&fs.mount.join("kpr"));
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(
        r.stdout.contains("kube-proxy chains in iptables table nat"),
        "{r:?}"
    );
    assert!(
        r.stdout
            .contains("kube-proxy chains in iptables table filter"),
        "{r:?}"
    );
    assert!(r.stdout.contains("nftables table ip kube-proxy"), "{r:?}");
    assert!(!ns.has_table("kube-proxy"));
    let saved = String::from_utf8_lossy(&ns.exec(&["iptables-save"]).stdout).into_owned();
    for gone in [
        "KUBE-SERVICES",
        "KUBE-SVC-XYZ",
        "KUBE-SEP-ABC",
        "KUBE-NODEPORTS",
    ] {
        assert!(!saved.contains(gone), "{gone} left:\n{saved}");
    }
    for kept in [
        ":OTHER",
        "-A OTHER -j RETURN",
        ":KUBE-FIREWALL",
        "-A INPUT -j KUBE-FIREWALL",
    ] {
        assert!(saved.contains(kept), "{kept} removed:\n{saved}");
    }
}
