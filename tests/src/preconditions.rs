//! What the datapath and lab tests need from the machine, checked in one place.
//!
//! A test whose precondition is missing must not pass: these tests call [`require`] first,
//! which panics naming everything that is missing, and `cargo xtask test` calls [`missing`]
//! once up front so that a run on an unprepared machine stops before it builds anything.

use std::path::Path;

/// The command-line tools the datapath and lab tests run (Debian packages iproute2, nftables,
/// iptables, bpftool; `cargo xtask setup` installs them).
pub const TOOLS: &[&str] = &[
    "ip",
    "nft",
    "iptables-restore",
    "iptables-save",
    "bpftool",
    "mount",
];

/// Files the kernel must provide: BTF (CO-RE programs load against it).
const KERNEL_FILES: &[(&str, &str)] = &[(
    "/sys/kernel/btf/vmlinux",
    "kernel BTF (/sys/kernel/btf/vmlinux; a kernel built with CONFIG_DEBUG_INFO_BTF)",
)];

/// Whether the current process runs as root (namespaces, mounts, eBPF and netfilter need
/// CAP_SYS_ADMIN and CAP_NET_ADMIN).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether `tool` is an executable file in one of `path`'s directories.
pub fn on_path(tool: &str, path: Option<&std::ffi::OsStr>) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.is_some_and(|p| {
        std::env::split_paths(p).any(|dir| {
            std::fs::metadata(dir.join(tool))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Everything that is missing for tests that need root and `tools`, each named with what
/// provides it. Empty when all is there.
pub fn missing(tools: &[&str]) -> Vec<String> {
    missing_in(is_root(), std::env::var_os("PATH").as_deref(), tools)
}

fn missing_in(root: bool, path: Option<&std::ffi::OsStr>, tools: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    if !root {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        out.push(format!("root (running as uid {uid})"));
    }
    for tool in tools {
        if !on_path(tool, path) {
            out.push(format!("`{tool}` (not on PATH)"));
        }
    }
    for (file, what) in KERNEL_FILES {
        if !Path::new(file).exists() {
            out.push((*what).to_string());
        }
    }
    out
}

/// For a test that needs root and `tools`: panics, naming what is missing, unless all is there.
/// Never returns early: a test that cannot run fails rather than passing untested.
#[track_caller]
pub fn require(test: &str, tools: &[&str]) {
    let missing = missing(tools);
    assert!(
        missing.is_empty(),
        "{test} cannot run: missing {}. Run the suite as root through `cargo xtask test`, which \
         installs the tools and checks these first.",
        missing.join(", ")
    );
}

/// For lab tests: root and every tool in [`TOOLS`].
#[track_caller]
pub fn require_lab(test: &str) {
    require(test, TOOLS);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_root_and_each_missing_tool() {
        let dir = std::env::temp_dir().join(format!("kpr-precond-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ip = dir.join("ip");
        std::fs::write(&ip, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ip, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Not executable: does not count.
        std::fs::write(dir.join("nft"), "").unwrap();

        let path = dir.as_os_str();
        let m = missing_in(false, Some(path), &["ip", "nft", "bpftool"]);
        assert!(m[0].starts_with("root (running as uid"), "{m:?}");
        assert!(m.contains(&"`nft` (not on PATH)".to_string()), "{m:?}");
        assert!(m.contains(&"`bpftool` (not on PATH)".to_string()), "{m:?}");
        assert!(!m.iter().any(|s| s.contains("`ip`")), "{m:?}");
        let m = missing_in(true, Some(path), &["ip"]);
        assert!(!m.iter().any(|s| s.starts_with("root")), "{m:?}");
        assert!(
            missing_in(true, None, &["ip"]).contains(&"`ip` (not on PATH)".to_string()),
            "no PATH at all"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
