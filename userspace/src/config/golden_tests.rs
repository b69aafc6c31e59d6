//! Golden tests: each `tests/golden/config/NAME.yaml` is resolved as `kpr --config NAME.yaml`;
//! the Settings (JSON) and the warnings are compared with `NAME.settings.golden` and
//! `NAME.warnings.golden`, or, for `bad-*.yaml`, the error with `NAME.error.golden`.
//! `KPR_UPDATE_GOLDEN=1 cargo test -p kpr config::golden` rewrites them.
use std::path::{Path, PathBuf};

use super::{from_args, Action};

/// Relative to the package, so that paths in messages are the same on every machine (cargo
/// runs unit tests in the package's directory).
const DIR: &str = "tests/golden/config";

fn update() -> bool {
    std::env::var_os("KPR_UPDATE_GOLDEN").is_some_and(|v| v == "1")
}

fn check(golden: &Path, actual: &str, failures: &mut Vec<String>) {
    if update() {
        std::fs::write(golden, actual).unwrap();
        return;
    }
    match std::fs::read_to_string(golden) {
        Ok(want) if want == actual => {}
        Ok(want) => failures.push(format!(
            "{}: differs (KPR_UPDATE_GOLDEN=1 rewrites)\n--- want\n{want}--- got\n{actual}",
            golden.display()
        )),
        Err(e) => failures.push(format!(
            "{}: {e} (KPR_UPDATE_GOLDEN=1 writes it)\n--- got\n{actual}",
            golden.display()
        )),
    }
}

#[test]
fn config_files_resolve_to_golden_settings_and_warnings() {
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
                check(
                    &golden("settings"),
                    &(settings.to_json() + "\n"),
                    &mut failures,
                );
                let warnings: String = r.warnings.iter().map(|w| format!("{w}\n")).collect();
                check(&golden("warnings"), &warnings, &mut failures);
            }
            (true, Err(e)) => check(&golden("error"), &format!("{e}\n"), &mut failures),
            (false, Err(e)) => failures.push(format!("{stem}: unexpected error: {e}")),
            (true, Ok(_)) => failures.push(format!("{stem}: expected an error")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
