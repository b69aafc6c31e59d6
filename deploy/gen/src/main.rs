//! `kpr-deploy --out DIR [--image IMAGE]`: writes kpr's deployment manifests into DIR
//! (`cargo xtask gen-deploy` writes them into deploy/).
use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "kpr-deploy",
    about = "Writes kpr's deployment manifests (ServiceAccount, RBAC, ConfigMap, DaemonSet, kustomization)"
)]
struct Cli {
    /// Directory to write the manifests into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// The kpr image the DaemonSet runs.
    #[arg(long, default_value = kpr_deploy::DEFAULT_IMAGE)]
    image: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let opts = kpr_deploy::Options { image: cli.image };
    for path in kpr_deploy::write(&cli.out, &opts)? {
        println!("wrote {}", path.display());
    }
    Ok(())
}
