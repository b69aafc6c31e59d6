//! Builds kpr's kernel programs (dataplane-ebpf) for bpfel-unknown-none with the nightly
//! toolchain and bpf-linker, so the agent can embed the object (see docs/TOOLCHAIN.md).
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "kpr-ebpf")
        .ok_or_else(|| anyhow!("kpr-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("kpr-ebpf manifest has no parent directory"))?
        .as_str()
        .to_owned();
    let variant = std::env::var_os("CARGO_FEATURE_PROGRAM_VARIANT").is_some();
    aya_build::build_ebpf(
        [Package {
            name: "kpr-ebpf",
            root_dir: &root_dir,
            features: if variant { &["variant"] } else { &[] },
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the kernel programs failed; run `cargo xtask setup` (nightly rust-src and \
         bpf-linker are needed)",
    )
}
