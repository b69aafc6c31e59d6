//! `cargo xtask setup`: makes a fresh Debian 12 machine (as root) able to build and test kpr.
//!
//! Every step checks first and does nothing when its work is already done, so a second run
//! takes a few tens of milliseconds. One line is printed per step:
//! `setup: <step> ... ok (already installed)`. A failing step names itself and says what to do.
//!
//! The bpf-linker recipe is the one in `docs/TOOLCHAIN.md`: bpf-linker
//! 0.13.0 (feature `llvm-22`) linked dynamically against the nightly sysroot's
//! `lib/libLLVM.so.22.1-rust-*`, through symlinks under `$HOME/.cache/kpr/llvm/lib` (the
//! binary's RUNPATH).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{anyhow, bail, Context, Result};

/// Options of `cargo xtask setup`.
#[derive(Clone, Debug, Default)]
pub struct SetupOptions {
    /// Print only what changes and warnings, not the "ok (already …)" lines; the output of
    /// installing commands is captured and shown only when they fail.
    pub quiet: bool,
}

/// Debian packages the build and the tests need.
pub const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "iptables",
    "nftables",
    "bpftool",
    "iputils-ping",
    // The IPVS mode's sets (kube-proxy runs the same tool).
    "ipset",
    "libnftnl-dev",
    "libmnl-dev",
    "pkg-config",
    // The container image: building it (umoci, skopeo, strip) and running it (crun).
    "umoci",
    "skopeo",
    "crun",
    "binutils",
];

/// The bpf-linker release that works with the pinned aya crates.
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// bpf-linker's feature for the LLVM major version of the nightly's libLLVM.
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";
/// File-name prefix of the nightly sysroot's LLVM 22 library (`libLLVM.so.22.1-rust-1.97.0-nightly`).
const NIGHTLY_LIBLLVM_PREFIX: &str = "libLLVM.so.22.";

/// Runs every setup step in order; stops at the first failing one.
pub fn run(opts: &SetupOptions) -> Result<()> {
    let steps: [(&str, Step); 5] = [
        ("apt packages", apt_packages),
        ("VM kernels, qemu, virtme-ng", vm_tools),
        ("nightly toolchain with rust-src", nightly_toolchain),
        ("bpf-linker", bpf_linker),
        ("kernel (bpffs, BTF)", kernel),
    ];
    for (name, step) in steps {
        match step(opts) {
            Ok(Outcome::Unchanged(msg)) => {
                if !opts.quiet {
                    println!("setup: {name} ... ok ({msg})");
                }
            }
            Ok(Outcome::Changed(msg)) => println!("setup: {name} ... ok ({msg})"),
            Ok(Outcome::Warning(msg)) => eprintln!("setup: {name} ... WARNING: {msg}"),
            Err(e) => return Err(e.context(format!("setup step `{name}` failed"))),
        }
    }
    Ok(())
}

type Step = fn(&SetupOptions) -> Result<Outcome>;

enum Outcome {
    /// Already done; nothing changed.
    Unchanged(String),
    /// Something was installed or fixed.
    Changed(String),
    /// Not fatal, but the user should know.
    Warning(String),
}

// ---------------------------------------------------------------------------------------------
// 1. apt packages

fn apt_packages(opts: &SetupOptions) -> Result<Outcome> {
    let missing = missing_apt_packages(APT_PACKAGES)?;
    if missing.is_empty() {
        return Ok(Outcome::Unchanged("already installed".into()));
    }
    if !is_root() {
        bail!(
            "packages {} are missing and installing them needs root: run this as root \
             (e.g. `sudo -E cargo xtask setup`) or install them yourself with \
             `apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    announce(
        opts,
        "apt packages",
        &format!("installing {}", missing.join(" ")),
    );
    run_cmd(
        opts,
        Command::new("apt-get").arg("update"),
        "check the network and /etc/apt/sources.list, then re-run",
    )?;
    apt_install(opts, &missing)?;
    let still = missing_apt_packages(APT_PACKAGES)?;
    if !still.is_empty() {
        bail!(
            "apt-get install succeeded but {} still not installed; install them by hand",
            still.join(" ")
        );
    }
    Ok(Outcome::Changed(format!("installed {}", missing.join(" "))))
}

/// `apt-get install` of `packages`, without recommends, non-interactively.
fn apt_install(opts: &SetupOptions, packages: &[String]) -> Result<()> {
    run_cmd(
        opts,
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages),
        "see apt-get's output above; fix the package state (e.g. `apt-get -f install`) and re-run",
    )
}

/// The packages of `pkgs` whose dpkg status is not "install ok installed".
fn missing_apt_packages(pkgs: &[&str]) -> Result<Vec<String>> {
    // One dpkg-query for all packages; unknown packages are reported on stderr (exit status 1)
    // and simply do not appear in stdout.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(pkgs)
        .stdin(Stdio::null())
        .output()
        .context("cannot run dpkg-query: is this a Debian machine?")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, status)| status.trim() == "install ok installed")
        .map(|(pkg, _)| pkg.split(':').next().unwrap_or(pkg))
        .collect();
    Ok(pkgs
        .iter()
        .filter(|p| !installed.contains(p))
        .map(|p| p.to_string())
        .collect())
}

fn is_root() -> bool {
    // Effective uid, the second field of "Uid:" in /proc/self/status.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// 1b. the VM stage's tools: qemu, Debian's kernels of the matrix, virtme-ng

fn vm_tools(opts: &SetupOptions) -> Result<Outcome> {
    let mut packages: Vec<&str> = crate::vm::APT_PACKAGES.to_vec();
    packages.extend(crate::vm::KERNELS.iter().map(|k| k.package));
    let missing = missing_apt_packages(&packages)?;
    let mut changed = Vec::new();
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "packages {} (the VM stage's) are missing and installing them needs root",
                missing.join(" ")
            );
        }
        announce(
            opts,
            "VM kernels, qemu, virtme-ng",
            &format!("installing {}", missing.join(" ")),
        );
        // The package lists may predate a kernel's security update: refresh once and retry.
        if apt_install(opts, &missing).is_err() {
            run_cmd(
                opts,
                Command::new("apt-get").arg("update"),
                "check the network and /etc/apt/sources.list, then re-run",
            )?;
            apt_install(opts, &missing)?;
        }
        changed.push(format!("installed {}", missing.join(" ")));
    }
    if crate::vm::vng().is_err() {
        announce(
            opts,
            "VM kernels, qemu, virtme-ng",
            &format!("pip install {}", crate::vm::VIRTME_NG),
        );
        run_cmd(
            opts,
            Command::new("python3").args(["-m", "pip", "install", "--quiet", crate::vm::VIRTME_NG]),
            "check that PyPI is reachable, then re-run",
        )?;
        crate::vm::vng().context("virtme-ng was installed but `vng` is not found")?;
        changed.push(format!("installed {}", crate::vm::VIRTME_NG));
    }
    for k in &crate::vm::KERNELS {
        crate::vm::image(k)?;
    }
    Ok(if changed.is_empty() {
        Outcome::Unchanged("already installed".into())
    } else {
        Outcome::Changed(changed.join(", "))
    })
}

// ---------------------------------------------------------------------------------------------
// 2. nightly toolchain with rust-src

fn nightly_toolchain(opts: &SetupOptions) -> Result<Outcome> {
    let mut changed = Vec::new();
    let toolchains = capture(
        Command::new("rustup").args(["toolchain", "list"]),
        "install rustup (https://rustup.rs) and make sure it is in PATH",
    )?;
    if !toolchains
        .lines()
        .any(|l| l.trim_start().starts_with("nightly"))
    {
        announce(
            opts,
            "nightly toolchain with rust-src",
            "installing nightly",
        );
        run_cmd(
            opts,
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]),
            "check the network and run `rustup toolchain install nightly --profile minimal`",
        )?;
        changed.push("installed nightly");
    }
    let components = capture(
        Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]),
        "run `rustup toolchain install nightly --profile minimal`",
    )?;
    if !components.lines().any(|l| l.trim().starts_with("rust-src")) {
        announce(opts, "nightly toolchain with rust-src", "adding rust-src");
        run_cmd(
            opts,
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
            "check the network and run `rustup component add rust-src --toolchain nightly`",
        )?;
        changed.push("added rust-src");
    }
    Ok(if changed.is_empty() {
        Outcome::Unchanged("already installed".into())
    } else {
        Outcome::Changed(changed.join(", "))
    })
}

// ---------------------------------------------------------------------------------------------
// 3. bpf-linker against the nightly's libLLVM

fn bpf_linker(opts: &SetupOptions) -> Result<Outcome> {
    let home = home_dir()?;
    let prefix = llvm_prefix(&home);
    let sysroot = PathBuf::from(
        capture(
            Command::new("rustc").args(["+nightly", "--print", "sysroot"]),
            "the nightly toolchain is needed: re-run setup (step `nightly toolchain with rust-src`)",
        )?
        .trim(),
    );
    let libllvm = nightly_libllvm(&sysroot)?;
    let mut changed = Vec::new();
    if ensure_llvm_links(&prefix, &libllvm)? {
        changed.push(format!(
            "updated {}/{{libLLVM.so,{}}} -> {}",
            prefix.join("lib").display(),
            libllvm.file_name().unwrap_or_default().to_string_lossy(),
            libllvm.display()
        ));
    }

    let cargo_bin = cargo_home(&home).join("bin");
    let in_path = find_in_path("bpf-linker");
    let installed = in_path
        .clone()
        .unwrap_or_else(|| cargo_bin.join("bpf-linker"));
    match bpf_linker_version(&installed) {
        Ok(v) if v == BPF_LINKER_VERSION => {}
        found => {
            let why = match found {
                Ok(v) => format!("found version {v} at {}", installed.display()),
                Err(e) => format!("{e:#}"),
            };
            announce(
                opts,
                "bpf-linker",
                &format!("installing {BPF_LINKER_VERSION} ({why}); this takes about a minute"),
            );
            install_bpf_linker(opts, &prefix, None)?;
            changed.push(format!("installed {BPF_LINKER_VERSION} ({why})"));
            // What the build will use is what PATH finds.
            let now = find_in_path("bpf-linker").unwrap_or_else(|| cargo_bin.join("bpf-linker"));
            match bpf_linker_version(&now) {
                Ok(v) if v == BPF_LINKER_VERSION => {}
                Ok(v) => bail!(
                    "installed bpf-linker {BPF_LINKER_VERSION} into {}, but {} (version {v}) comes \
                     first in PATH: remove it or put {} first in PATH",
                    cargo_bin.display(),
                    now.display(),
                    cargo_bin.display()
                ),
                Err(e) => bail!(
                    "installed bpf-linker {BPF_LINKER_VERSION}, but it does not run: {e:#}; \
                     remove {} and re-run setup",
                    prefix.display()
                ),
            }
        }
    }

    if find_in_path("bpf-linker").is_none() {
        changed.push(format!(
            "{} is not in PATH, so the eBPF build will not find bpf-linker: add it",
            cargo_bin.display()
        ));
        return Ok(Outcome::Warning(changed.join("; ")));
    }
    Ok(if changed.is_empty() {
        Outcome::Unchanged("already installed".into())
    } else {
        Outcome::Changed(changed.join("; "))
    })
}

/// `$HOME/.cache/kpr/llvm`: the LLVM_PREFIX bpf-linker is built with (its RUNPATH is
/// `$PREFIX/lib`).
fn llvm_prefix(home: &Path) -> PathBuf {
    home.join(".cache/kpr/llvm")
}

fn home_dir() -> Result<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("HOME is not set: set it and re-run"))
}

fn cargo_home(home: &Path) -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".cargo"))
}

/// The nightly sysroot's `lib/libLLVM.so.22.*-rust-*` (a regular file; the newest name if
/// there are several).
fn nightly_libllvm(sysroot: &Path) -> Result<PathBuf> {
    let lib = sysroot.join("lib");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&lib)
        .with_context(|| format!("cannot read {}", lib.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(NIGHTLY_LIBLLVM_PREFIX) && name.contains("-rust-")
        })
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop().ok_or_else(|| {
        anyhow!(
            "{} has no {NIGHTLY_LIBLLVM_PREFIX}*-rust-* library: the nightly no longer ships \
             LLVM 22, which bpf-linker {BPF_LINKER_VERSION} (feature {BPF_LINKER_LLVM_FEATURE}) \
             needs; install a nightly with LLVM 22 (e.g. `rustup toolchain install \
             nightly-2026-05-15`) or update the pinned bpf-linker and aya versions",
            lib.display()
        )
    })
}

/// Makes `$PREFIX/lib/libLLVM.so` (used when building bpf-linker) and
/// `$PREFIX/lib/<file name of libllvm>` (its soname, found at run time through the binary's
/// RUNPATH without rustup's LD_LIBRARY_PATH) point to `libllvm`, and removes dangling
/// `libLLVM*` links left by an older nightly. Returns whether anything changed.
fn ensure_llvm_links(prefix: &Path, libllvm: &Path) -> Result<bool> {
    let lib = prefix.join("lib");
    let mut changed = false;
    if !lib.is_dir() {
        std::fs::create_dir_all(&lib)
            .with_context(|| format!("cannot create {}", lib.display()))?;
        changed = true;
    }
    let soname = libllvm
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name", libllvm.display()))?;
    for name in [OsStr::new("libLLVM.so"), soname] {
        changed |= ensure_symlink(&lib.join(name), libllvm)?;
    }
    // Dangling links from a previous nightly.
    for entry in
        std::fs::read_dir(&lib).with_context(|| format!("cannot read {}", lib.display()))?
    {
        let path = entry?.path();
        let is_llvm = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM"));
        if is_llvm && path.symlink_metadata().is_ok_and(|m| m.is_symlink()) && !path.exists() {
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove stale link {}", path.display()))?;
            changed = true;
        }
    }
    Ok(changed)
}

/// Makes `link` a symlink to `target` unless it already is one. Returns whether it changed.
fn ensure_symlink(link: &Path, target: &Path) -> Result<bool> {
    if std::fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(false);
    }
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(link).with_context(|| format!("cannot remove {}", link.display()))?;
    }
    std::os::unix::fs::symlink(target, link).with_context(|| {
        format!(
            "cannot create symlink {} -> {}",
            link.display(),
            target.display()
        )
    })?;
    Ok(true)
}

/// Runs `bin --version` and returns the version it prints ("bpf-linker 0.13.0" → "0.13.0").
fn bpf_linker_version(bin: &Path) -> Result<String> {
    let out = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{} not found or not executable", bin.display()))?;
    if !out.status.success() {
        bail!(
            "`{} --version` failed ({}): {}",
            bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .split_whitespace()
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| {
            anyhow!(
                "unexpected `{} --version` output: {stdout:?}",
                bin.display()
            )
        })
}

/// `LLVM_PREFIX=$PREFIX cargo install bpf-linker --version 0.13.0 --no-default-features
/// --features llvm-22 --locked --force [--root ROOT]`. `--force` replaces a binary that cargo
/// thinks is installed but no longer runs (its libLLVM moved with a nightly update).
fn install_bpf_linker(opts: &SetupOptions, prefix: &Path, root: Option<&Path>) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.env("LLVM_PREFIX", prefix).args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        BPF_LINKER_LLVM_FEATURE,
        "--locked",
        "--force",
    ]);
    if let Some(root) = root {
        cmd.arg("--root").arg(root);
    }
    run_cmd(
        opts,
        &mut cmd,
        &format!(
            "see cargo's output; the recipe is in docs/TOOLCHAIN.md (LLVM_PREFIX={} \
             must contain lib/libLLVM.so pointing to the nightly's libLLVM.so.22.1-rust-*)",
            prefix.display()
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// 4. kernel: bpffs and BTF (warnings only)

fn kernel(_opts: &SetupOptions) -> Result<Outcome> {
    let mut notes = Vec::new();
    let mut warnings = Vec::new();

    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let bpffs_mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next(), f.next(), f.next());
        dir == Some("/sys/fs/bpf") && fstype == Some("bpf")
    });
    let bpffs_known = std::fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().last() == Some("bpf"));
    if bpffs_mounted {
        notes.push("bpffs at /sys/fs/bpf");
    } else if bpffs_known {
        notes.push("bpffs not mounted at /sys/fs/bpf but mountable");
    } else {
        warnings.push(
            "the kernel has no bpf filesystem (CONFIG_BPF_SYSCALL?): pinning eBPF objects will fail",
        );
    }

    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        notes.push("BTF at /sys/kernel/btf/vmlinux");
    } else {
        warnings.push(
            "no /sys/kernel/btf/vmlinux (kernel built without CONFIG_DEBUG_INFO_BTF): \
             CO-RE eBPF programs may not load",
        );
    }

    Ok(if warnings.is_empty() {
        Outcome::Unchanged(notes.join(", "))
    } else {
        Outcome::Warning(warnings.join("; "))
    })
}

// ---------------------------------------------------------------------------------------------
// helpers

fn announce(opts: &SetupOptions, step: &str, what: &str) {
    if !opts.quiet {
        println!("setup: {step} ... {what}");
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command that changes the machine. Its output goes to the terminal, or, when quiet,
/// is captured and included in the error if it fails.
fn run_cmd(opts: &SetupOptions, cmd: &mut Command, what_to_do: &str) -> Result<()> {
    let line = describe(cmd);
    cmd.stdin(Stdio::null());
    let (status, captured) = if opts.quiet {
        let Output {
            status,
            stdout,
            stderr,
        } = cmd
            .output()
            .with_context(|| format!("cannot run `{line}`: {what_to_do}"))?;
        let mut text = String::from_utf8_lossy(&stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&stderr));
        (status, tail(&text, 40))
    } else {
        let status = cmd
            .status()
            .with_context(|| format!("cannot run `{line}`: {what_to_do}"))?;
        (status, String::new())
    };
    if !status.success() {
        bail!("`{line}` failed ({status}): {what_to_do}{captured}");
    }
    Ok(())
}

/// Runs a read-only command and returns its stdout.
fn capture(cmd: &mut Command, what_to_do: &str) -> Result<String> {
    let line = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{line}`: {what_to_do}"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {what_to_do}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    if lines.is_empty() {
        String::new()
    } else {
        format!("\n--- last output ---\n{}", lines[start..].join("\n"))
    }
}

/// The first executable `name` in PATH.
fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_are_idempotent_and_stale_links_go() {
        let dir = std::env::temp_dir().join(format!("kpr-setup-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sysroot = dir.join("sysroot/lib");
        std::fs::create_dir_all(&sysroot).unwrap();
        let old = sysroot.join("libLLVM.so.22.1-rust-1.97.0-nightly");
        std::fs::write(&old, b"").unwrap();
        let prefix = dir.join("prefix");

        assert_eq!(nightly_libllvm(&dir.join("sysroot")).unwrap(), old);
        assert!(ensure_llvm_links(&prefix, &old).unwrap());
        assert!(!ensure_llvm_links(&prefix, &old).unwrap());
        assert_eq!(
            std::fs::read_link(prefix.join("lib/libLLVM.so")).unwrap(),
            old
        );

        // A nightly update moves the library: the links follow, the old soname link goes.
        std::fs::remove_file(&old).unwrap();
        let new = sysroot.join("libLLVM.so.22.1-rust-1.98.0-nightly");
        std::fs::write(&new, b"").unwrap();
        assert_eq!(nightly_libllvm(&dir.join("sysroot")).unwrap(), new);
        assert!(ensure_llvm_links(&prefix, &new).unwrap());
        assert_eq!(
            std::fs::read_link(prefix.join("lib/libLLVM.so")).unwrap(),
            new
        );
        assert!(prefix
            .join("lib/libLLVM.so.22.1-rust-1.98.0-nightly")
            .exists());
        assert!(prefix
            .join("lib/libLLVM.so.22.1-rust-1.97.0-nightly")
            .symlink_metadata()
            .is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The install path, into a throw-away `--root` (about a minute of compiling):
    /// `cargo test -p xtask -- --ignored install_bpf_linker_into_temp_root`.
    #[test]
    #[ignore]
    fn install_bpf_linker_into_temp_root() {
        let home = home_dir().unwrap();
        let prefix = llvm_prefix(&home);
        let root = std::env::temp_dir().join(format!("kpr-bpf-linker-{}", std::process::id()));
        install_bpf_linker(&SetupOptions { quiet: true }, &prefix, Some(&root)).unwrap();
        let version = bpf_linker_version(&root.join("bin/bpf-linker")).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(version, BPF_LINKER_VERSION);
    }

    #[test]
    fn missing_packages_are_reported() {
        if find_in_path("dpkg-query").is_none() {
            return;
        }
        let missing = missing_apt_packages(&["kpr-no-such-package-xyz"]).unwrap();
        assert_eq!(missing, vec!["kpr-no-such-package-xyz".to_string()]);
    }
}
