//! Golden tests: each `tests/golden/config/NAME.yaml` is resolved as `kpr --config NAME.yaml`;
//! the Settings (JSON) and the warnings are compared with `NAME.settings.golden` and
//! `NAME.warnings.golden`, or, for `bad-*.yaml`, the error with `NAME.error.golden`.
//! `cargo xtask goldens` rewrites them (the ignored `write_goldens` test); the test never does.
//!
//! These goldens are kpr's own output. The outside reference for what a kube-proxy
//! configuration means is kube-proxy's defaulting and validation (pkg/proxy/apis/config); the
//! inputs include an unchanged kubeadm ConfigMap for that reason.
use std::path::{Path, PathBuf};

use super::{from_args, Action};
use crate::golden;

/// Relative to the package, so that paths in messages are the same on every machine (cargo
/// runs unit tests in the package's directory).
const DIR: &str = "tests/golden/config";

/// Every golden file with the content kpr produces for it now, or a failure that is not a
/// difference (an input that should fail and does not, or the other way round).
fn expected() -> (Vec<(PathBuf, String)>, Vec<String>) {
    assert!(
        Path::new(DIR).is_dir(),
        "run from the kpr package directory"
    );
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(DIR)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    inputs.sort();
    assert!(inputs.len() >= 5, "golden inputs missing: {inputs:?}");
    let mut files = Vec::new();
    let mut failures = Vec::new();
    for input in &inputs {
        let stem = input.file_stem().unwrap().to_str().unwrap();
        let golden = |kind: &str| input.with_file_name(format!("{stem}.{kind}.golden"));
        let result = from_args(["kpr", "--config", input.to_str().unwrap()]);
        match (stem.starts_with("bad-"), result) {
            (false, Ok(r)) => {
                let Action::Run(settings) = r.action else {
                    panic!("{stem}: not a run")
                };
                files.push((golden("settings"), settings.to_json() + "\n"));
                let warnings: String = r.warnings.iter().map(|w| format!("{w}\n")).collect();
                files.push((golden("warnings"), warnings));
            }
            (true, Err(e)) => files.push((golden("error"), format!("{e}\n"))),
            (false, Err(e)) => failures.push(format!("{stem}: unexpected error: {e}")),
            (true, Ok(_)) => failures.push(format!("{stem}: expected an error")),
        }
    }
    (files, failures)
}

#[test]
fn config_files_resolve_to_golden_settings_and_warnings() {
    let (files, mut failures) = expected();
    for (path, actual) in &files {
        if let Err(e) = golden::compare(path, actual) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
#[ignore = "rewrites the golden files: run by `cargo xtask goldens`"]
fn write_goldens() {
    let (files, failures) = expected();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    for (path, actual) in &files {
        let what = format!(
            "`kpr --config {}.yaml`: {}",
            path.file_name()
                .unwrap()
                .to_string_lossy()
                .split('.')
                .next()
                .unwrap_or(""),
            if path.to_string_lossy().ends_with(".error.golden") {
                "the error"
            } else if path.to_string_lossy().ends_with(".warnings.golden") {
                "the warnings"
            } else {
                "the resolved settings"
            }
        );
        golden::write(path, &golden::self_made_header(&what), actual);
    }
}
