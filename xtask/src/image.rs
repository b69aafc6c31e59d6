//! `cargo xtask image`: kpr's container image, built from scratch.
//!
//! The image holds the release `kpr` binary (stripped) and exactly the shared libraries it
//! links (ldd's list, with the dynamic loader), and iptables (both backends, with its
//! extensions and libraries) for the iptables mode and the eBPF mode's FORWARD accept: no
//! shell, no package manager. umoci (Debian)
//! builds the OCI layout (layers, config, labels), skopeo (Debian) writes the tar archive;
//! neither needs a daemon. Outputs, under target/image/:
//! - `oci/`: an OCI image layout, tag [`tag`];
//! - `kpr-<tag>.oci.tar`: the same image as an OCI archive, named [`IMAGE`]`:<tag>`, which
//!   `skopeo copy oci-archive:… docker://…` pushes.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::{build, setup};

/// The image's name, as deploy/daemonset.yaml refers to it.
pub const IMAGE: &str = "ghcr.io/kpr-project/kpr";

/// Where the agent lives in the image.
pub const BINARY_IN_IMAGE: &str = "/usr/local/bin/kpr";

/// The image tag: `v` and the workspace version, as deploy/daemonset.yaml uses it.
pub fn tag() -> String {
    format!("v{}", env!("CARGO_PKG_VERSION"))
}

/// What [`run`] produced.
pub struct Image {
    pub layout: PathBuf,
    pub archive: PathBuf,
}

pub fn run() -> Result<()> {
    let image = build_image()?;
    println!(
        "image {IMAGE}:{}\n  OCI layout: {} (tag {})\n  archive:    {} ({:.1} MiB)",
        tag(),
        image.layout.display(),
        tag(),
        image.archive.display(),
        file_mib(&image.archive)
    );
    println!(
        "push it with: skopeo copy oci-archive:{} docker://<registry>/kpr:{}",
        image.archive.display(),
        tag()
    );
    Ok(())
}

/// Builds the release binary and the image; returns where it is.
pub fn build_image() -> Result<Image> {
    setup::run(&setup::SetupOptions { quiet: true })?;
    let bins = build::binaries(true)?;
    let out = build::root().join("target/image");
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
    }
    std::fs::create_dir_all(&out)?;
    let layout = out.join("oci");
    let bundle = out.join("bundle");
    let reference = format!("{}:{}", layout.display(), tag());

    umoci(&["init", "--layout", path(&layout)?])?;
    umoci(&["new", "--image", &reference])?;
    umoci(&["unpack", "--image", &reference, path(&bundle)?])?;
    let rootfs = bundle.join("rootfs");
    stage(&bins.kpr, &rootfs)?;
    umoci(&["repack", "--image", &reference, path(&bundle)?])?;
    let revision = git_revision();
    let version = env!("CARGO_PKG_VERSION");
    let labels = [
        "org.opencontainers.image.title=kpr".to_string(),
        "org.opencontainers.image.description=kpr, a kube-proxy replacement with an eBPF dataplane"
            .to_string(),
        format!("org.opencontainers.image.version={version}"),
        format!("org.opencontainers.image.revision={revision}"),
        format!(
            "org.opencontainers.image.licenses={}",
            env!("CARGO_PKG_LICENSE")
        ),
    ];
    let mut args = vec![
        "config".to_string(),
        "--image".into(),
        reference.clone(),
        "--config.entrypoint".into(),
        BINARY_IN_IMAGE.into(),
        "--config.user".into(),
        "0:0".into(),
        "--config.workingdir".into(),
        "/".into(),
        // Where the agent finds iptables (a scratch image has no PATH otherwise).
        "--config.env".into(),
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
    ];
    for l in &labels {
        args.push("--config.label".into());
        args.push(l.clone());
        // The manifest carries them too, where registries show them.
        args.push("--manifest.annotation".into());
        args.push(l.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    umoci(&args)?;
    umoci(&["gc", "--layout", path(&layout)?])?;
    std::fs::remove_dir_all(&bundle)?;

    let archive = out.join(format!("kpr-{}.oci.tar", tag()));
    build::run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &format!("oci:{reference}"),
        &format!("oci-archive:{}:{IMAGE}:{}", archive.display(), tag()),
    ]))?;
    Ok(Image { layout, archive })
}

/// Copies the stripped binary and the libraries it links into `rootfs`.
fn stage(kpr: &Path, rootfs: &Path) -> Result<()> {
    let dest = rootfs.join(BINARY_IN_IMAGE.trim_start_matches('/'));
    std::fs::create_dir_all(dest.parent().unwrap())?;
    build::run(Command::new("strip").arg("-o").arg(&dest).arg(kpr))?;
    for lib in linked_libraries(kpr)? {
        let to = rootfs.join(lib.strip_prefix("/").unwrap_or(&lib));
        std::fs::create_dir_all(to.parent().unwrap())?;
        // The file itself, not the symlink ldd names (there is nothing else in the image).
        std::fs::copy(&lib, &to).with_context(|| format!("copying {}", lib.display()))?;
    }
    stage_iptables(rootfs)?;
    // Directories the agent and a runtime expect. /run/kpr holds the cgroup2 mount kpr makes
    // when the host has none; /tmp for anything that wants it.
    for d in ["run", "tmp", "proc", "sys", "dev", "etc"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    Ok(())
}

/// The iptables multi-call binaries (nft and legacy backends).
const IPTABLES_MULTI: [(&str, &str); 2] = [
    ("nft", "/usr/sbin/xtables-nft-multi"),
    ("legacy", "/usr/sbin/xtables-legacy-multi"),
];
/// The extensions iptables loads at run time (`-m conntrack`, `-j MASQUERADE`, ...).
const XTABLES_MODULES: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// iptables, both backends and families, as kube-proxy's image carries it: the iptables mode
/// writes its rules with it and the eBPF mode its FORWARD accept. The multi-call binaries with
/// the libraries they link, their `iptables-nft-restore`-style names as links, and the
/// extension modules.
fn stage_iptables(rootfs: &Path) -> Result<()> {
    let sbin = rootfs.join("usr/sbin");
    std::fs::create_dir_all(&sbin)?;
    for (backend, multi) in IPTABLES_MULTI {
        let multi = Path::new(multi);
        let name = multi.file_name().context("iptables binary name")?;
        std::fs::copy(multi, sbin.join(name))
            .with_context(|| format!("copying {}", multi.display()))?;
        for lib in linked_libraries(multi)? {
            let to = rootfs.join(lib.strip_prefix("/").unwrap_or(&lib));
            std::fs::create_dir_all(to.parent().unwrap())?;
            std::fs::copy(&lib, &to).with_context(|| format!("copying {}", lib.display()))?;
        }
        for family in ["iptables", "ip6tables"] {
            for suffix in ["", "-save", "-restore"] {
                let link = sbin.join(format!("{family}-{backend}{suffix}"));
                std::os::unix::fs::symlink(name, &link)
                    .with_context(|| format!("linking {}", link.display()))?;
            }
        }
    }
    let modules = rootfs.join(XTABLES_MODULES.trim_start_matches('/'));
    std::fs::create_dir_all(&modules)?;
    for entry in
        std::fs::read_dir(XTABLES_MODULES).with_context(|| format!("reading {XTABLES_MODULES}"))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "so") {
            let to = modules.join(path.file_name().unwrap());
            // Some modules are links to others: copy what they point at.
            std::fs::copy(&path, &to).with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

/// The shared libraries `bin` links, with the dynamic loader, from `ldd`.
pub fn linked_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)", "/lib64/ld-linux-x86-64.so.2 (0x…)",
        // "linux-vdso.so.1 (0x…)" (in the kernel, not a file).
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line.trim(),
        };
        let path = path.split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if line.contains("not found") {
            bail!("ldd {}: {line}", bin.display());
        }
    }
    Ok(libs)
}

fn umoci(args: &[&str]) -> Result<()> {
    build::run(Command::new("umoci").args(args))
}

fn path(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

fn git_revision() -> String {
    Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(build::root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn file_mib(p: &Path) -> f64 {
    std::fs::metadata(p)
        .map(|m| m.len() as f64 / 1048576.0)
        .unwrap_or(0.0)
}
