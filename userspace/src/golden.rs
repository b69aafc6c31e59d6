//! Golden files: expected outputs kept in the tree (`tests/golden/`), each opening with a
//! header of `#` lines that says where its content comes from.
//!
//! Tests only compare. Rewriting is a separate, deliberate step: `cargo xtask goldens` runs
//! the `#[ignore]`d `write_goldens` tests, and the diff is then reviewed like any change. A
//! test can therefore never pass by rewriting the file it checks.
use std::path::Path;

/// The header of a golden file that kpr itself produced: it pins kpr's behaviour against
/// unnoticed change, but it is no outside reference.
pub fn self_made_header(what: &str) -> String {
    format!(
        "# {what}\n# Produced by kpr itself (not an outside reference): it guards against unnoticed \
         change. Rewrite with `cargo xtask goldens` and review the diff.\n"
    )
}

/// The content of a golden file without its header.
pub fn body(text: &str) -> &str {
    let mut rest = text;
    while rest.starts_with('#') {
        rest = rest.split_once('\n').map_or("", |(_, r)| r);
    }
    rest
}

/// Compares `actual` with the golden file at `path` (header excluded).
pub fn compare(path: &Path, actual: &str) -> Result<(), String> {
    match std::fs::read_to_string(path) {
        Ok(text) if body(&text) == actual => Ok(()),
        Ok(text) => Err(format!(
            "{}: differs (if the change is intended: `cargo xtask goldens`, then review the \
             diff)\n--- want\n{}--- got\n{actual}",
            path.display(),
            body(&text)
        )),
        Err(e) => Err(format!(
            "{}: {e} (`cargo xtask goldens` writes it)\n--- got\n{actual}",
            path.display()
        )),
    }
}

/// Writes `header` and `actual` to `path`; for the `write_goldens` tests only.
pub fn write(path: &Path, header: &str, actual: &str) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    std::fs::write(path, format!("{header}{actual}"))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    eprintln!("wrote {}", path.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_not_part_of_the_body() {
        let h = self_made_header("x");
        assert_eq!(body(&format!("{h}*filter\n")), "*filter\n");
        assert_eq!(body(&h), "");
        assert_eq!(body("{\n  \"a\": 1\n}\n"), "{\n  \"a\": 1\n}\n");
    }
}
