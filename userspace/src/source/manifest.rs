//! The embedded source for a single machine: `kpr --manifests DIR`.
//!
//! DIR holds Service and EndpointSlice manifests (YAML, possibly multi-document, or JSON), the
//! way `kubectl apply -f DIR` would read them. A bad document is reported and skipped; it never
//! hides the good ones next to it, so a typo in one file cannot take every Service down.

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::ClusterSnapshot;
use crate::model::{self, ModelError};

/// Why a manifest, or the directory, could not be used.
///
/// The document index is 0-based and counts every document of the file's YAML stream, empty
/// ones included, so it matches what a YAML tool would number.
#[derive(thiserror::Error, Debug)]
pub enum ManifestError {
    // The only fatal variant: it travels up through `anyhow`, which prints the source itself.
    #[error("cannot read manifest directory {}", dir.display())]
    ReadDir { dir: PathBuf, source: io::Error },
    // The others are logged one line each, so they carry their cause in the message.
    #[error("{}: cannot read: {source}", path.display())]
    ReadFile { path: PathBuf, source: io::Error },
    #[error("{}: document {index}: {message}", path.display())]
    Parse {
        path: PathBuf,
        index: usize,
        message: String,
    },
    #[error(
        "{}: document {index}: unsupported kind {kind:?} (kpr reads v1/Service and discovery.k8s.io/v1/EndpointSlice)",
        path.display()
    )]
    UnknownKind {
        path: PathBuf,
        index: usize,
        kind: String,
    },
    #[error("{}: document {index}: {source}", path.display())]
    Invalid {
        path: PathBuf,
        index: usize,
        source: ModelError,
    },
    /// Well-formed, but nothing kpr (or kube-proxy) serves; reported so that an operator who
    /// expected it to matter learns why it does not.
    #[error("{}: document {index}: ignored: {reason}", path.display())]
    Ignored {
        path: PathBuf,
        index: usize,
        reason: &'static str,
    },
}

/// Reads every manifest in `dir` (not recursive, in file-name order).
///
/// Bad files and documents come back in the `Vec` and are left out of the snapshot; only an
/// unreadable directory is an `Err`.
pub fn load_dir(dir: &Path) -> Result<(ClusterSnapshot, Vec<ManifestError>), ManifestError> {
    load_dir_for(dir, None)
}

/// Like [`load_dir`], and takes this node's `v1/Node` object (by name) from the directory too:
/// on a single machine it is what tells kpr the node's addresses (for NodePorts). Other
/// Nodes are ignored.
pub fn load_dir_for(
    dir: &Path,
    node_name: Option<&str>,
) -> Result<(ClusterSnapshot, Vec<ManifestError>), ManifestError> {
    load_dir_cached(dir, node_name, &mut LoadedFiles::default())
}

/// What each file of a directory held when it was last read without errors: a file whose
/// inode, mtime and size are the same again gives the same objects (the same allocations),
/// without reading it. One endpoint changed in a 10,000-Service directory then costs the parse
/// of its own file, and the model's cache sees the other objects unchanged at a glance. The
/// directory poll notices changes by the same three ([`fingerprint`]): a rewrite that keeps
/// all three (same size, within one tick of the file system's clock, in place) goes unseen
/// either way; replacing a file (a new inode), as editors and ConfigMap volumes do, never does.
#[derive(Default)]
pub struct LoadedFiles {
    files: std::collections::HashMap<PathBuf, (FileStat, ClusterSnapshot)>,
}

/// [`load_dir_for`], reusing what `cache` holds for files whose inode, mtime and size are
/// unchanged.
pub fn load_dir_cached(
    dir: &Path,
    node_name: Option<&str>,
    cache: &mut LoadedFiles,
) -> Result<(ClusterSnapshot, Vec<ManifestError>), ManifestError> {
    let files = manifest_files(dir).map_err(|source| ManifestError::ReadDir {
        dir: dir.to_owned(),
        source,
    })?;
    let mut snapshot = ClusterSnapshot::default();
    let mut errors = Vec::new();
    let mut loaded = LoadedFiles::default();
    for path in files {
        // Taken before the read: a write after it shows as a change next time.
        let stat = match std::fs::metadata(&path) {
            // A directory that happens to be called `x.yaml`.
            Ok(meta) if !meta.is_file() => continue,
            Ok(meta) => FileStat::of(&meta),
            Err(source) => {
                errors.push(ManifestError::ReadFile { path, source });
                continue;
            }
        };
        let part = match cache.files.remove(&path) {
            Some((old, part)) if old == stat => part,
            _ => {
                let text = match std::fs::read_to_string(&path) {
                    Ok(text) => text,
                    Err(source) => {
                        errors.push(ManifestError::ReadFile { path, source });
                        continue;
                    }
                };
                let (part, file_errors) = load_text(&path, &text, node_name);
                if !file_errors.is_empty() {
                    // Read again next time, so that its errors are reported again.
                    errors.extend(file_errors);
                    snapshot.extend(&part);
                    continue;
                }
                part
            }
        };
        snapshot.extend(&part);
        loaded.files.insert(path, (stat, part));
    }
    *cache = loaded;
    Ok((snapshot, errors))
}

/// Reads one manifest file's `text` (named `path` in errors), as [`load_dir_for`] reads each file.
pub fn load_text(
    path: &Path,
    text: &str,
    node_name: Option<&str>,
) -> (ClusterSnapshot, Vec<ManifestError>) {
    let mut snapshot = ClusterSnapshot::default();
    let mut errors = Vec::new();
    load_file(path, text, node_name, &mut snapshot, &mut errors);
    (snapshot, errors)
}

/// Candidate manifest paths in `dir`, sorted by file name. Files are not opened.
fn manifest_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut names: Vec<OsString> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        if is_manifest_name(&name.to_string_lossy()) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// Hidden files are skipped so that editor swap files (`.x.yaml.swp`), Emacs locks (`.#x.yaml`)
/// and a ConfigMap volume's `..data` machinery are never read half-way.
fn is_manifest_name(name: &str) -> bool {
    !name.starts_with('.')
        && !name.ends_with('~')
        && [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.ends_with(ext))
}

#[derive(Clone, Copy)]
enum Format {
    Yaml,
    Json,
}

impl Format {
    fn of(path: &Path) -> Self {
        if path.extension().is_some_and(|e| e == "json") {
            Format::Json
        } else {
            Format::Yaml
        }
    }

    fn parse<T: DeserializeOwned>(self, doc: &Doc<'_>) -> Result<T, String> {
        match self {
            Format::Yaml => yaml_serde::from_str(doc.text).map_err(|e| yaml_message(&e, doc.line)),
            Format::Json => serde_json::from_str(doc.text).map_err(|e| e.to_string()),
        }
    }
}

fn load_file(
    path: &Path,
    text: &str,
    node_name: Option<&str>,
    snapshot: &mut ClusterSnapshot,
    errors: &mut Vec<ManifestError>,
) {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let format = Format::of(path);
    let docs = match format {
        Format::Yaml => split_yaml(text),
        // JSON goes through serde_json: libyaml rejects some valid JSON (tab indentation).
        Format::Json if text.trim().is_empty() => Vec::new(),
        Format::Json => vec![Doc { text, line: 1 }],
    };
    for (index, doc) in docs.iter().enumerate() {
        if let Err(e) = load_document(path, index, format, doc, node_name, snapshot) {
            errors.push(e);
        }
    }
}

fn load_document(
    path: &Path,
    index: usize,
    format: Format,
    doc: &Doc<'_>,
    node_name: Option<&str>,
    snapshot: &mut ClusterSnapshot,
) -> Result<(), ManifestError> {
    let parse_error = |message: String| ManifestError::Parse {
        path: path.to_owned(),
        index,
        message,
    };
    let invalid = |source: ModelError| ManifestError::Invalid {
        path: path.to_owned(),
        index,
        source,
    };
    // The header is read on its own first so that a wrong kind is reported as such rather
    // than as a confusing type error.
    let Some(header) = format.parse::<Option<Header>>(doc).map_err(parse_error)? else {
        return Ok(());
    };
    let api_version = header.api_version.as_deref().unwrap_or_default();
    let kind = header.kind.as_deref().unwrap_or_default();
    match (api_version, kind) {
        ("v1", "Service") => {
            let svc: Service = format.parse(doc).map_err(parse_error)?;
            model::validate_service(&svc).map_err(invalid)?;
            snapshot.services.push(Arc::new(svc));
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let slice: EndpointSlice = format.parse(doc).map_err(parse_error)?;
            model::validate_slice(&slice).map_err(invalid)?;
            if slice.address_type == "FQDN" {
                return Err(ManifestError::Ignored {
                    path: path.to_owned(),
                    index,
                    reason: "EndpointSlice with addressType FQDN (kube-proxy does not proxy these)",
                });
            }
            snapshot.slices.push(Arc::new(slice));
        }
        ("v1", "Node") => {
            let node: Node = format.parse(doc).map_err(parse_error)?;
            if node_name.is_some() && node.metadata.name.as_deref() == node_name {
                snapshot.node = Some(node);
            }
        }
        _ => {
            return Err(ManifestError::UnknownKind {
                path: path.to_owned(),
                index,
                kind: format!("{api_version}/{kind}"),
            })
        }
    }
    Ok(())
}

/// The part of any Kubernetes object that says what it is; every other field is ignored.
#[derive(serde::Deserialize)]
struct Header {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
}

/// One document of a YAML stream.
struct Doc<'a> {
    text: &'a str,
    /// 1-based line of the file on which `text` starts.
    line: usize,
}

/// Splits a YAML stream into documents without parsing it.
///
/// libyaml stops at the first syntax error and drops the rest of the stream; splitting first
/// keeps one broken document from hiding the ones after it. This is exact because YAML forbids
/// a line starting with `---` or `...` plus a blank inside any scalar.
fn split_yaml<'a>(text: &'a str) -> Vec<Doc<'a>> {
    let mut docs = Vec::new();
    // A document opened by `---` counts even when empty (the parser yields it as null); the
    // implicit one at the start or after `...` only if it holds something.
    let mut push = |text: &'a str, line: usize, explicit: bool| {
        if explicit || has_content(text) {
            docs.push(Doc { text, line });
        }
    };
    let (mut start, mut start_line, mut explicit) = (0, 1, false);
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        if is_marker(bare, "---") {
            push(&text[start..offset], start_line, explicit);
            // Content may follow the marker on the same line (`--- {a: 1}`).
            (start, start_line, explicit) = (offset + 3, i + 1, true);
        } else if is_marker(bare, "...") {
            push(&text[start..offset], start_line, explicit);
            (start, start_line, explicit) = (offset + line.len(), i + 2, false);
        }
        offset += line.len();
    }
    push(&text[start..], start_line, explicit);
    docs
}

fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
}

/// Anything but blank lines, comments and directives.
fn has_content(text: &str) -> bool {
    text.lines().any(|l| {
        let l = l.trim_start();
        !l.is_empty() && !l.starts_with('#') && !l.starts_with('%')
    })
}

/// The parser reports positions within the document; make them positions within the file.
fn yaml_message(e: &yaml_serde::Error, first_line: usize) -> String {
    const AT: &str = "at line ";
    let message = e.to_string();
    if !message.contains(AT) {
        return format!("{message} (document starts at line {first_line})");
    }
    let mut out = String::with_capacity(message.len());
    let mut rest = message.as_str();
    while let Some(i) = rest.find(AT) {
        let (head, tail) = rest.split_at(i + AT.len());
        out.push_str(head);
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        match tail[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&n.saturating_add(first_line - 1).to_string()),
            Err(_) => out.push_str(&tail[..digits]),
        }
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

/// Cheap change detection: name, inode, mtime and size of every candidate file. The inode
/// catches atomic replaces (rename over, ConfigMap symlink swaps) that keep mtime and size.
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint(Vec<(PathBuf, Option<FileStat>)>);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStat {
    inode: u64,
    mtime: (i64, i64),
    size: u64,
}

impl FileStat {
    fn of(m: &std::fs::Metadata) -> Self {
        FileStat {
            inode: m.ino(),
            mtime: (m.mtime(), m.mtime_nsec()),
            size: m.size(),
        }
    }
}

fn fingerprint(dir: &Path) -> io::Result<Fingerprint> {
    let files = manifest_files(dir)?;
    Ok(Fingerprint(
        files
            .into_iter()
            .map(|path| {
                // A dangling link or a file deleted since the listing still counts as present,
                // so that its appearing or disappearing is a change.
                let stat = std::fs::metadata(&path).ok().map(|m| FileStat::of(&m));
                (path, stat)
            })
            .collect(),
    ))
}

// Guards tokio's interval, which panics on a zero period.
const MIN_POLL: Duration = Duration::from_millis(10);

/// Watches a manifest directory and publishes a snapshot whenever it changes.
pub struct ManifestSource {
    dir: PathBuf,
    poll: Duration,
    node_name: Option<String>,
}

impl ManifestSource {
    pub fn new(dir: impl Into<PathBuf>, poll: Duration) -> Self {
        Self {
            dir: dir.into(),
            poll,
            node_name: None,
        }
    }

    /// Also deliver this node's `v1/Node` object from the directory, if there is one.
    pub fn with_node_name(mut self, name: Option<String>) -> Self {
        self.node_name = name;
        self
    }

    /// Loads the directory, publishes it, then polls for changes until every receiver is gone.
    ///
    /// While the directory is unreadable the last snapshot stays published: losing the
    /// directory (an unmounted volume, say) must not look like "every Service was deleted".
    pub async fn run(self, tx: watch::Sender<Option<Arc<ClusterSnapshot>>>) {
        let mut ticker = tokio::time::interval(self.poll.max(MIN_POLL));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<Fingerprint> = None;
        let mut files = LoadedFiles::default();
        let mut unreadable = false;
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = ticker.tick() => {}
            }
            // Directory reads block; keep them off the runtime the dataplane sync shares.
            let dir = self.dir.clone();
            let fp = match tokio::task::spawn_blocking(move || fingerprint(&dir)).await {
                Ok(fp) => fp,
                Err(e) => {
                    tracing::error!("manifest poll failed: {e}");
                    continue;
                }
            };
            let fp = match fp {
                Ok(fp) => fp,
                Err(e) => {
                    if !unreadable {
                        tracing::error!(
                            "cannot read manifest directory {}: {e}; keeping the last snapshot",
                            self.dir.display()
                        );
                        unreadable = true;
                    }
                    continue;
                }
            };
            if unreadable {
                tracing::info!(
                    "manifest directory {} is readable again",
                    self.dir.display()
                );
                unreadable = false;
            }
            if last.as_ref() == Some(&fp) {
                continue;
            }
            // The fingerprint is taken before loading, so a write racing the load shows up as
            // a change on the next poll instead of being missed.
            let dir = self.dir.clone();
            let node_name = self.node_name.clone();
            let mut cache = std::mem::take(&mut files);
            let loaded = match tokio::task::spawn_blocking(move || {
                let loaded = load_dir_cached(&dir, node_name.as_deref(), &mut cache);
                (loaded, cache)
            })
            .await
            {
                Ok((loaded, cache)) => {
                    files = cache;
                    loaded
                }
                Err(e) => {
                    tracing::error!("manifest load failed: {e}");
                    continue;
                }
            };
            let loaded = match loaded {
                Ok(loaded) => loaded,
                Err(e) => {
                    if !unreadable {
                        tracing::error!("{}; keeping the last snapshot", error_chain(&e));
                        unreadable = true;
                    }
                    continue;
                }
            };
            last = Some(fp);
            if !publish(&tx, &self.dir, loaded) {
                return;
            }
        }
    }
}

/// Logs the outcome of a reload and sends the snapshot if its content changed. Returns false
/// once nobody listens any more.
fn publish(
    tx: &watch::Sender<Option<Arc<ClusterSnapshot>>>,
    dir: &Path,
    (snapshot, errors): (ClusterSnapshot, Vec<ManifestError>),
) -> bool {
    for e in &errors {
        tracing::warn!("skipped: {e}");
    }
    tracing::info!(
        services = snapshot.services.len(),
        slices = snapshot.slices.len(),
        problems = errors.len(),
        "loaded manifests from {}",
        dir.display()
    );
    // A touched but unchanged file should not cost the dataplane a sync.
    // (A manifest snapshot rejects nothing: what does not parse is in `errors`.)
    let unchanged = tx
        .borrow()
        .as_deref()
        .is_some_and(|old| old.same_as(&snapshot));
    if unchanged {
        return !tx.is_closed();
    }
    tx.send(Some(Arc::new(snapshot))).is_ok()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const SVC: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: web}]
";

    const SLICE: &str = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: demo
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - addresses: [10.244.0.1]
";

    fn svc_named(name: &str, ip: &str) -> String {
        SVC.replace("name: web,", &format!("name: {name},"))
            .replace("10.96.0.10", ip)
    }

    fn names(s: &ClusterSnapshot) -> (Vec<String>, Vec<String>) {
        let n = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            m.name.clone().unwrap_or_default()
        };
        (
            s.services.iter().map(|x| n(&x.metadata)).collect(),
            s.slices.iter().map(|x| n(&x.metadata)).collect(),
        )
    }

    /// (file name, index, variant) of every error, for compact assertions.
    fn summary(errors: &[ManifestError]) -> Vec<(String, usize, &'static str)> {
        let file = |p: &Path| {
            p.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        errors
            .iter()
            .map(|e| match e {
                ManifestError::ReadDir { dir, .. } => (file(dir), 0, "ReadDir"),
                ManifestError::ReadFile { path, .. } => (file(path), 0, "ReadFile"),
                ManifestError::Parse { path, index, .. } => (file(path), *index, "Parse"),
                ManifestError::UnknownKind { path, index, .. } => {
                    (file(path), *index, "UnknownKind")
                }
                ManifestError::Invalid { path, index, .. } => (file(path), *index, "Invalid"),
                ManifestError::Ignored { path, index, .. } => (file(path), *index, "Ignored"),
            })
            .collect()
    }

    fn load(files: &[(&str, &str)]) -> (ClusterSnapshot, Vec<ManifestError>) {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            fs::write(dir.path().join(name), text).expect("write");
        }
        load_dir(dir.path()).expect("readable dir")
    }

    #[test]
    fn unchanged_files_give_the_same_objects_and_changed_ones_are_read_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str| fs::write(dir.path().join(name), text).expect("write");
        write("a.yaml", &svc_named("a", "10.96.0.1"));
        write(
            "b.yaml",
            &format!("{}---\n{SLICE}", svc_named("web", "10.96.0.2")),
        );
        write("c.yaml", "apiVersion: v1\nkind: Secret\n");
        let mut cache = LoadedFiles::default();
        let (first, errors) = load_dir_cached(dir.path(), None, &mut cache).expect("dir");
        assert_eq!(summary(&errors), [("c.yaml".into(), 0, "UnknownKind")]);

        // Rewritten in place with the same size, in the same clock tick as the first write,
        // a file can keep its mtime: replace it as editors and ConfigMaps do (a new inode).
        write(
            ".b.tmp",
            &format!("{}---\n{SLICE}", svc_named("web", "10.96.0.3")),
        );
        fs::rename(dir.path().join(".b.tmp"), dir.path().join("b.yaml")).expect("rename");
        let (second, errors) = load_dir_cached(dir.path(), None, &mut cache).expect("dir");
        // A file with errors is read again each time, so they are reported each time.
        assert_eq!(summary(&errors), [("c.yaml".into(), 0, "UnknownKind")]);
        assert_eq!(names(&second), names(&first));
        assert!(
            Arc::ptr_eq(&first.services[0], &second.services[0]),
            "a.yaml unchanged"
        );
        assert!(
            !Arc::ptr_eq(&first.services[1], &second.services[1]),
            "b.yaml changed"
        );
        assert!(
            !Arc::ptr_eq(&first.slices[0], &second.slices[0]),
            "read with b.yaml"
        );
        assert_eq!(first.slices[0], second.slices[0]);
        // The result is what a fresh read gives.
        let (fresh, _) = load_dir(dir.path()).expect("dir");
        assert!(fresh.same_as(&second));

        fs::remove_file(dir.path().join("a.yaml")).expect("rm");
        let (third, _) = load_dir_cached(dir.path(), None, &mut cache).expect("dir");
        assert_eq!(names(&third).0, ["web"]);
        assert_eq!(cache.files.len(), 1, "removed files leave the cache");
    }

    #[test]
    fn bad_documents_are_reported_and_good_ones_kept() {
        let broken = "apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n";
        let bad_ip = svc_named("bad", "10.96.0.999");
        let fqdn = SLICE
            .replace("IPv4", "FQDN")
            .replace("web-1", "web-fqdn")
            .replace("10.244.0.1", "example.com");
        let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n";
        let multi = [
            SVC,
            broken,
            &bad_ip,
            SLICE,
            &fqdn,
            deployment,
            &svc_named("api", "10.96.0.11"),
        ]
        .join("---\n");
        let (snap, errors) = load(&[
            ("b.yaml", &multi),
            ("a.yaml", &svc_named("first", "10.96.0.1")),
        ]);
        assert_eq!(
            summary(&errors),
            vec![
                ("b.yaml".into(), 1, "Parse"),
                ("b.yaml".into(), 2, "Invalid"),
                ("b.yaml".into(), 4, "Ignored"),
                ("b.yaml".into(), 5, "UnknownKind"),
            ]
        );
        // a.yaml first: files are read in name order.
        assert_eq!(
            names(&snap),
            (
                vec!["first".into(), "web".into(), "api".into()],
                vec!["web-1".into()]
            )
        );
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            text[1].contains("document 2") && text[1].contains("invalid ClusterIP"),
            "{}",
            text[1]
        );
        assert!(text[2].contains("FQDN"), "{}", text[2]);
        assert!(text[3].contains("apps/v1/Deployment"), "{}", text[3]);
        let (state, model_errors) = model::build(&snap.services, &snap.slices);
        assert_eq!(model_errors, vec![]);
        assert_eq!(state.services.len(), 3);
    }

    #[test]
    fn parse_errors_name_the_line_in_the_file() {
        let text =
            format!("{SVC}---\napiVersion: v1\nkind: Service\nmetadata: {{name: [unclosed\n");
        let (_, errors) = load(&[("x.yaml", &text)]);
        let [ManifestError::Parse {
            index: 1, message, ..
        }] = &errors[..]
        else {
            panic!("{errors:?}");
        };
        // The broken flow sequence starts on line 10 of the file (line 3 of its document).
        let line = SVC.lines().count() + 1 + 3;
        assert!(
            message.contains(&format!("flow sequence at line {line} column")),
            "{message}"
        );
    }

    #[test]
    fn type_errors_are_parse_errors() {
        let text = SVC.replace("port: 80", "port: eighty");
        let (snap, errors) = load(&[("t.yaml", &text)]);
        assert_eq!(summary(&errors), vec![("t.yaml".into(), 0, "Parse")]);
        assert!(snap.services.is_empty());
        let (_, errors) = load(&[("s.yaml", "just a string\n")]);
        assert_eq!(summary(&errors), vec![("s.yaml".into(), 0, "Parse")]);
    }

    #[test]
    fn empty_documents_are_not_errors_but_keep_their_index() {
        let text = format!("# leading comment\n---\n---\n\n---\n{SVC}---\n# only a comment\n---\nkind: Nope\n...\n");
        let (snap, errors) = load(&[("e.yaml", &text)]);
        assert_eq!(summary(&errors), vec![("e.yaml".into(), 4, "UnknownKind")]);
        assert_eq!(snap.services.len(), 1);
        let (snap, errors) = load(&[("empty.yaml", ""), ("blank.json", " \n")]);
        assert_eq!(summary(&errors), vec![]);
        assert!(snap.services.is_empty());
    }

    #[test]
    fn hidden_temporary_and_foreign_files_are_skipped() {
        let (snap, errors) = load(&[
            (".web.yaml", SVC),
            (".web.yaml.swp", SVC),
            ("web.yaml~", SVC),
            ("web.txt", SVC),
            ("README", "not yaml: ["),
            ("real.yml", SLICE),
        ]);
        assert_eq!(summary(&errors), vec![]);
        assert_eq!(names(&snap), (vec![], vec!["web-1".into()]));
    }

    #[test]
    fn json_and_crlf_files_are_read() {
        let json = r#"{
	"apiVersion": "v1", "kind": "Service",
	"metadata": {"name": "j", "namespace": "demo"},
	"spec": {"clusterIP": "10.96.0.20", "ports": [{"port": 53, "protocol": "UDP"}]}
}"#;
        let crlf = format!("---\r\n{}", SLICE.replace('\n', "\r\n"));
        let (snap, errors) = load(&[("j.json", json), ("w.yaml", &crlf)]);
        assert_eq!(summary(&errors), vec![]);
        assert_eq!(names(&snap), (vec!["j".into()], vec!["web-1".into()]));
    }

    #[test]
    fn subdirectories_are_not_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("sub.yaml")).expect("mkdir");
        fs::write(dir.path().join("sub.yaml").join("x.yaml"), SVC).expect("write");
        let (snap, errors) = load_dir(dir.path()).expect("readable");
        assert_eq!(summary(&errors), vec![]);
        assert!(snap.services.is_empty());
    }

    #[test]
    fn a_missing_directory_is_the_only_fatal_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope");
        let err = load_dir(&missing).expect_err("missing dir");
        assert!(
            matches!(&err, ManifestError::ReadDir { dir, .. } if *dir == missing),
            "{err:?}"
        );
    }

    #[test]
    fn split_yaml_counts_documents_like_a_yaml_parser() {
        let docs = split_yaml("a: 1\n--- {b: 2}\n---\n...\n# c\n---\nc: 3\n");
        let got: Vec<(&str, usize)> = docs.iter().map(|d| (d.text, d.line)).collect();
        assert_eq!(
            got,
            vec![("a: 1\n", 1), (" {b: 2}\n", 2), ("\n", 3), ("\nc: 3\n", 6)]
        );
        // Lines that merely start with dashes are content.
        assert_eq!(split_yaml("a: |\n  ---\n----\n").len(), 1);
        assert_eq!(split_yaml("# nothing\n").len(), 0);
    }

    #[test]
    fn fingerprint_sees_same_size_rewrites_and_renames() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.yaml");
        fs::write(&path, "x: 1\n").expect("write");
        let before = fingerprint(dir.path()).expect("fp");
        assert_eq!(fingerprint(dir.path()).expect("fp"), before);
        // Replace atomically with same-size content, as editors and ConfigMaps do.
        let tmp = dir.path().join(".a.yaml.tmp");
        fs::write(&tmp, "x: 2\n").expect("write");
        fs::rename(&tmp, &path).expect("rename");
        assert_ne!(fingerprint(dir.path()).expect("fp"), before);
    }

    type Rx = watch::Receiver<Option<Arc<ClusterSnapshot>>>;

    async fn next_snapshot(rx: &mut Rx) -> Arc<ClusterSnapshot> {
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("a snapshot within 5 s")
            .expect("source alive");
        rx.borrow_and_update().clone().expect("Some snapshot")
    }

    fn cluster_ips(s: &ClusterSnapshot) -> Vec<String> {
        s.services
            .iter()
            .filter_map(|x| x.spec.as_ref()?.cluster_ip.clone())
            .collect()
    }

    #[tokio::test]
    async fn run_publishes_rewrites_and_survives_a_vanished_directory() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("m");
        fs::create_dir(&dir).expect("mkdir");
        let file = dir.join("svc.yaml");
        fs::write(&file, svc_named("web", "10.96.0.10")).expect("write");

        let (tx, mut rx) = watch::channel(None);
        let task = tokio::spawn(ManifestSource::new(&dir, Duration::from_millis(20)).run(tx));
        assert_eq!(
            cluster_ips(&*next_snapshot(&mut rx).await),
            vec!["10.96.0.10"]
        );

        // In-place rewrite of the same length: caught by mtime.
        tokio::time::sleep(Duration::from_millis(20)).await;
        fs::write(&file, svc_named("web", "10.96.0.11")).expect("rewrite");
        assert_eq!(
            cluster_ips(&*next_snapshot(&mut rx).await),
            vec!["10.96.0.11"]
        );

        // A new file joins the snapshot.
        fs::write(dir.join("api.yaml"), svc_named("api", "10.96.0.12")).expect("write");
        assert_eq!(
            cluster_ips(&*next_snapshot(&mut rx).await),
            vec!["10.96.0.12", "10.96.0.11"]
        );

        // The directory disappears: nothing is published, the last snapshot stands.
        fs::rename(&dir, root.path().join("gone")).expect("rename");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!rx.has_changed().expect("source alive"));
        assert_eq!(
            cluster_ips(rx.borrow().as_deref().expect("still Some")).len(),
            2
        );

        // It comes back with different content and is picked up again.
        fs::create_dir(&dir).expect("mkdir");
        fs::write(&file, svc_named("web", "10.96.0.13")).expect("write");
        assert_eq!(
            cluster_ips(&*next_snapshot(&mut rx).await),
            vec!["10.96.0.13"]
        );

        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("run exits once the receiver is gone")
            .expect("no panic");
    }

    #[tokio::test]
    async fn run_waits_for_a_directory_that_does_not_exist_yet() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("later");
        let (tx, mut rx) = watch::channel(None);
        let _task = tokio::spawn(ManifestSource::new(&dir, Duration::from_millis(20)).run(tx));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            rx.borrow().is_none(),
            "no empty snapshot for an unreadable directory"
        );
        fs::create_dir(&dir).expect("mkdir");
        fs::write(dir.join("s.yaml"), SVC).expect("write");
        assert_eq!(
            cluster_ips(&*next_snapshot(&mut rx).await),
            vec!["10.96.0.10"]
        );
    }

    #[test]
    fn this_nodes_node_object_is_read_and_others_ignored() {
        let node = |name: &str, ip: &str| {
            format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nstatus:\n  addresses: [{{type: InternalIP, address: {ip}}}]\n")
        };
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("nodes.yaml"),
            [
                node("node1", "192.168.100.11"),
                node("node2", "192.168.100.12"),
            ]
            .join("---\n"),
        )
        .unwrap();
        let (snap, errors) = load_dir_for(dir.path(), Some("node2")).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        let n = snap.node.expect("node2");
        assert_eq!(n.metadata.name.as_deref(), Some("node2"));
        let (snap, errors) = load_dir(dir.path()).unwrap();
        assert!(errors.is_empty() && snap.node.is_none());
    }
}
