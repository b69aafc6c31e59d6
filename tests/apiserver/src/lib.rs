//! A fake Kubernetes API server for kpr's tests: a real HTTP/1.1 server speaking enough of the
//! list/watch protocol for kube-rs's `watcher` (and `kubectl get --raw`) to work against it.
//!
//! Resources: Services (`/api/v1/services`, `/api/v1/namespaces/{ns}/services`),
//! EndpointSlices (`/apis/discovery.k8s.io/v1/endpointslices`, and per namespace) and Nodes
//! (`/api/v1/nodes`), each also by name. Objects are `serde_json::Value`s in an in-memory
//! store with one global, monotonically increasing resourceVersion.
//!
//! - LIST honours `labelSelector`, `fieldSelector`, `limit` and `continue` (pages are not a
//!   consistent snapshot: a page reads the store as it is, but carries the first page's
//!   resourceVersion, so a watch from it replays whatever changed in between).
//! - WATCH streams newline-delimited JSON events over a chunked response, replaying the event
//!   history after `resourceVersion`; an RV older than the last [`FakeApiServer::compact`]
//!   gets an `ERROR` event with a 410 `Expired` Status (HTTP 200, as the API server does).
//!   Objects leaving a selector are sent as `DELETED`, entering it as `ADDED`. BOOKMARK events
//!   are sent every [`FakeApiServer::set_bookmark_interval`] (1 s by default) when
//!   `allowWatchBookmarks=true`; the stream ends after `timeoutSeconds`.
//! - `GET /version`, `/api`, `/apis`, `/api/v1`, `/apis/discovery.k8s.io/v1`: minimal
//!   discovery documents.
//!
//! The server runs on its own thread with its own Tokio runtime, so it works the same from a
//! plain `#[test]`, a `#[tokio::test]` (either flavour) or with a paused test clock.

mod selector;

pub use selector::{FieldSelector, LabelSelector, Requirement};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::ops::Bound;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

/// The resources the fake server knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    /// The object's `kind`.
    pub fn kind(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    /// The resource name in URLs.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }

    /// The kind named by an object's `kind` field.
    pub fn from_kind(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.kind() == kind)
    }

    fn from_path(group_version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == group_version && k.plural() == plural)
    }
}

/// One request the server received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// The raw (percent-encoded) query string, without `?`.
    pub query: String,
    /// The decoded query parameters, in order.
    pub params: Vec<(String, String)>,
}

impl RequestRecord {
    /// The decoded value of a query parameter.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether this was a watch request (`watch=true`).
    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch"), Some("true" | "1"))
    }
}

impl fmt::Display for RequestRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.path)?;
        if !self.query.is_empty() {
            write!(f, "?{}", self.query)?;
        }
        Ok(())
    }
}

/// What a watch applies to objects: the path's namespace and the query's selectors.
#[derive(Clone, Debug, Default)]
struct Filter {
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            if obj.pointer("/metadata/namespace").and_then(Value::as_str) != Some(ns) {
                return false;
            }
        }
        self.labels.matches(obj) && self.fields.matches(obj)
    }
}

/// One change in the event history. `old` is the object before (for a deletion: the deleted
/// object, carrying the deletion's resourceVersion), `new` after.
#[derive(Clone, Debug)]
struct HistEvent {
    rv: u64,
    kind: Kind,
    old: Option<Value>,
    new: Option<Value>,
}

/// The watch event a watcher with `filter` sees for `ev`, as one JSON line.
fn event_line_for(filter: &Filter, ev: &HistEvent) -> Option<Bytes> {
    let old_matches = ev.old.as_ref().is_some_and(|o| filter.matches(o));
    let new_matches = ev.new.as_ref().is_some_and(|n| filter.matches(n));
    let (ty, obj) = match (old_matches, new_matches, &ev.new, &ev.old) {
        (false, true, Some(new), _) => ("ADDED", new),
        (true, true, Some(new), _) => ("MODIFIED", new),
        // Left the selector: the API server reports a deletion, at the change's RV.
        (true, false, Some(new), _) => ("DELETED", new),
        (true, false, None, Some(old)) => ("DELETED", old),
        _ => return None,
    };
    Some(event_line(ty, obj))
}

fn event_line(ty: &str, obj: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": ty, "object": obj}))
        .expect("a JSON value always serializes");
    line.push(b'\n');
    Bytes::from(line)
}

/// A `Status` object, as the API server returns for errors.
pub fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

enum WatchMsg {
    Line(Bytes),
    /// End the stream, after sending this line if any.
    End(Option<Bytes>),
}

struct WatchReg {
    id: u64,
    kind: Kind,
    filter: Filter,
    tx: mpsc::UnboundedSender<WatchMsg>,
}

struct State {
    rv: u64,
    /// Watches and continue tokens from an RV below this get 410 Gone.
    min_rv: u64,
    objects: HashMap<Kind, BTreeMap<(String, String), Value>>,
    history: Vec<HistEvent>,
    watchers: Vec<WatchReg>,
    next_id: u64,
    unavailable: bool,
    refusing: bool,
    unavailable_kinds: HashSet<Kind>,
    log: Vec<RequestRecord>,
    conns: HashMap<u64, tokio::task::AbortHandle>,
    bookmark_interval: Duration,
}

impl State {
    fn new() -> Self {
        Self {
            rv: 1,
            min_rv: 0,
            objects: Kind::ALL.iter().map(|&k| (k, BTreeMap::new())).collect(),
            history: Vec::new(),
            watchers: Vec::new(),
            next_id: 0,
            unavailable: false,
            refusing: false,
            unavailable_kinds: HashSet::new(),
            log: Vec::new(),
            conns: HashMap::new(),
            bookmark_interval: Duration::from_secs(1),
        }
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The RV a read (a list) observes: never below the compaction point.
    fn read_rv(&mut self) -> u64 {
        self.rv = self.rv.max(self.min_rv);
        self.rv
    }

    /// The RV of a new write.
    fn write_rv(&mut self) -> u64 {
        self.rv = (self.rv + 1).max(self.min_rv);
        self.rv
    }

    /// The RV a bookmark may carry: none while the current RV is itself "too old".
    fn bookmark_rv(&self) -> Option<u64> {
        (self.rv >= self.min_rv).then_some(self.rv)
    }

    fn store(&mut self, kind: Kind) -> &mut BTreeMap<(String, String), Value> {
        self.objects.entry(kind).or_default()
    }

    fn record(&mut self, ev: HistEvent) {
        self.watchers.retain(|w| {
            if w.kind != ev.kind {
                return true;
            }
            match event_line_for(&w.filter, &ev) {
                Some(line) => w.tx.send(WatchMsg::Line(line)).is_ok(),
                None => !w.tx.is_closed(),
            }
        });
        self.history.push(ev);
    }

    fn compact(&mut self) {
        self.min_rv = self.rv + 1;
        self.history.clear();
    }
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn object_key(kind: Kind, obj: &Value) -> Result<(String, String), String> {
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| format!("{} without metadata.name", kind.kind()))?;
    let ns = if kind.namespaced() {
        obj.pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
    } else {
        ""
    };
    Ok((ns.to_string(), name.to_string()))
}

/// A running fake API server. Dropping it stops the server and closes every connection.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeApiServer {
    /// Serves on an already bound listener (so a test can bind it inside a network namespace).
    ///
    /// Panics if the listener cannot be used (a test fixture: there is nothing to recover).
    pub fn start(listener: TcpListener) -> FakeApiServer {
        listener
            .set_nonblocking(true)
            .expect("fake apiserver: set_nonblocking on the listener");
        let addr = listener
            .local_addr()
            .expect("fake apiserver: listener address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new()),
        });
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("fake apiserver: tokio runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("fake apiserver: tokio listener");
                    tokio::select! {
                        _ = stop_rx => {}
                        _ = accept_loop(server_shared, listener) => {}
                    }
                });
                // Dropping the runtime cancels every connection and watch task.
            })
            .expect("fake apiserver: spawn thread");
        FakeApiServer {
            shared,
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Binds 127.0.0.1 on an ephemeral port and serves there.
    pub fn start_local() -> FakeApiServer {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("fake apiserver: bind 127.0.0.1:0");
        Self::start(listener)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` (an unspecified listen address is given as loopback).
    pub fn url(&self) -> String {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}")
    }

    /// Creates or replaces an object (a `serde_json::Value` or any serializable k8s-openapi
    /// object; its `kind` picks the resource, a missing namespace means `default`). Sets
    /// `metadata.resourceVersion` (and a `uid` if missing), emits ADDED or MODIFIED to
    /// watchers, and returns the new resourceVersion. Re-applying an unchanged object is a
    /// no-op (no new resourceVersion, no event), as on the API server.
    ///
    /// Panics on an object that is not a Service, EndpointSlice or Node or has no name.
    pub fn apply(&self, obj: impl serde::Serialize) -> u64 {
        let mut obj = serde_json::to_value(obj).expect("fake apiserver: object to JSON");
        let kind = obj
            .get("kind")
            .and_then(Value::as_str)
            .and_then(Kind::from_kind)
            .unwrap_or_else(|| panic!("fake apiserver: unsupported kind in {obj}"));
        let key = object_key(kind, &obj).unwrap_or_else(|e| panic!("fake apiserver: {e}"));
        let mut st = self.shared.lock();
        let old = st.store(kind).get(&key).cloned();
        obj["apiVersion"] = json!(kind.api_version());
        let meta = obj
            .as_object_mut()
            .expect("checked: has a kind")
            .entry("metadata")
            .or_insert_with(|| json!({}));
        if kind.namespaced() {
            meta["namespace"] = json!(key.0);
        } else if let Some(m) = meta.as_object_mut() {
            m.remove("namespace");
        }
        if let Some(old_meta) = old.as_ref().and_then(|o| o.get("metadata")) {
            if meta.get("uid").is_none() {
                if let Some(uid) = old_meta.get("uid") {
                    meta["uid"] = uid.clone();
                }
            }
            // Like the API server, an update that changes nothing is a no-op: no new
            // resourceVersion, no event.
            meta["resourceVersion"] = old_meta["resourceVersion"].clone();
            if old.as_ref() == Some(&obj) {
                return old_meta["resourceVersion"]
                    .as_str()
                    .and_then(|rv| rv.parse().ok())
                    .unwrap_or(st.rv);
            }
        }
        let rv = st.write_rv();
        let meta = &mut obj["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        if meta.get("uid").is_none() {
            meta["uid"] = json!(format!("fake-uid-{rv}"));
        }
        st.store(kind).insert(key, obj.clone());
        st.record(HistEvent {
            rv,
            kind,
            old,
            new: Some(obj),
        });
        rv
    }

    /// Deletes an object (namespace "" for Nodes), emitting DELETED. Returns whether it existed.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let mut st = self.shared.lock();
        let key = store_key(kind, namespace, name);
        let Some(mut old) = st.store(kind).remove(&key) else {
            return false;
        };
        let rv = st.write_rv();
        old["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.record(HistEvent {
            rv,
            kind,
            old: Some(old),
            new: None,
        });
        true
    }

    /// Removes an object without any event or history entry: a client only notices by
    /// listing again. Returns whether it existed.
    pub fn delete_silently(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let mut st = self.shared.lock();
        let key = store_key(kind, namespace, name);
        st.store(kind).remove(&key).is_some()
    }

    /// Makes every resourceVersion handed out so far too old: a later watch (or list
    /// continuation) from one of them gets 410 Gone. Open watches go on.
    pub fn compact(&self) {
        self.shared.lock().compact();
    }

    /// [`compact`](Self::compact), and ends every open watch with a 410 `Expired` ERROR event.
    pub fn expire_watches(&self) {
        let mut st = self.shared.lock();
        st.compact();
        let line = event_line(
            "ERROR",
            &status_json(410, "Expired", "too old resource version (compacted)"),
        );
        for w in st.watchers.drain(..) {
            let _ = w.tx.send(WatchMsg::End(Some(line.clone())));
        }
    }

    /// Closes every open connection (watch streams included) at once, without ending the
    /// chunked responses properly.
    pub fn drop_connections(&self) {
        let mut st = self.shared.lock();
        for (_, conn) in st.conns.drain() {
            conn.abort();
        }
        st.watchers.clear();
    }

    /// While set, every request gets 503 ServiceUnavailable (open watches go on: use
    /// [`drop_connections`](Self::drop_connections) too).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.lock().unavailable = unavailable;
    }

    /// While set, every new connection is closed at once, without a response (a client sees a
    /// connection error rather than an HTTP status). Open connections go on: use
    /// [`drop_connections`](Self::drop_connections) too.
    pub fn set_refusing(&self, refusing: bool) {
        self.shared.lock().refusing = refusing;
    }

    /// Like [`set_unavailable`](Self::set_unavailable), for one resource only.
    pub fn set_unavailable_for(&self, kind: Kind, unavailable: bool) {
        let mut st = self.shared.lock();
        if unavailable {
            st.unavailable_kinds.insert(kind);
        } else {
            st.unavailable_kinds.remove(&kind);
        }
    }

    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK (for new watches).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.shared.lock().bookmark_interval = interval.max(Duration::from_millis(1));
    }

    /// Every request received so far, in order.
    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.shared.lock().log.clone()
    }

    pub fn clear_request_log(&self) {
        self.shared.lock().log.clear();
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// The stored objects of one kind, ordered by namespace and name.
    pub fn objects(&self, kind: Kind) -> Vec<Value> {
        self.shared.lock().store(kind).values().cloned().collect()
    }

    /// How many watch streams of this kind are open.
    pub fn open_watches(&self, kind: Kind) -> usize {
        self.shared
            .lock()
            .watchers
            .iter()
            .filter(|w| w.kind == kind && !w.tx.is_closed())
            .count()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn store_key(kind: Kind, namespace: &str, name: &str) -> (String, String) {
    let ns = if kind.namespaced() { namespace } else { "" };
    (ns.to_string(), name.to_string())
}

async fn accept_loop(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // EMFILE and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let mut st = shared.lock();
        if st.refusing {
            // Closed before a single byte: the client sees a connection error.
            drop(stream);
            continue;
        }
        let id = st.next_id();
        let conn_shared = shared.clone();
        let task = tokio::spawn(async move {
            let svc_shared = conn_shared.clone();
            let svc = hyper::service::service_fn(move |req| {
                let shared = svc_shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            conn_shared.lock().conns.remove(&id);
        });
        st.conns.insert(id, task.abort_handle());
    }
}

/// A response body: a whole document, or a stream of watch events.
pub enum ResponseBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ResponseBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Stream(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ResponseBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ResponseBody::Full(None) => SizeHint::with_exact(0),
            ResponseBody::Stream(_) => SizeHint::default(),
        }
    }
}

fn json_response(code: StatusCode, body: &Value) -> Response<ResponseBody> {
    let bytes = serde_json::to_vec(body).expect("a JSON value always serializes");
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(ResponseBody::Full(Some(Bytes::from(bytes))))
        .expect("static response parts are valid")
}

fn status_response(code: StatusCode, reason: &str, message: &str) -> Response<ResponseBody> {
    json_response(code, &status_json(code.as_u16(), reason, message))
}

fn bad_request(message: &str) -> Response<ResponseBody> {
    status_response(StatusCode::BAD_REQUEST, "BadRequest", message)
}

fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response<ResponseBody> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(ResponseBody::Stream(rx))
        .expect("static response parts are valid")
}

enum Route {
    Version,
    CoreVersions,
    Groups,
    Group,
    Resources(&'static str),
    Object {
        kind: Kind,
        namespace: Option<String>,
        name: Option<String>,
    },
    NotFound,
}

fn route(path: &str) -> Route {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group_version, rest) = match segs.as_slice() {
        ["version"] => return Route::Version,
        ["api"] => return Route::CoreVersions,
        ["apis"] => return Route::Groups,
        ["apis", "discovery.k8s.io"] => return Route::Group,
        ["api", "v1"] => return Route::Resources("v1"),
        ["apis", "discovery.k8s.io", "v1"] => return Route::Resources("discovery.k8s.io/v1"),
        ["api", "v1", rest @ ..] => ("v1", rest),
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => ("discovery.k8s.io/v1", rest),
        _ => return Route::NotFound,
    };
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        _ => return Route::NotFound,
    };
    let Some(kind) = Kind::from_path(group_version, plural) else {
        return Route::NotFound;
    };
    // A Node has no namespace; a namespaced object is only addressed by name within one.
    let valid = if kind.namespaced() {
        name.is_none() || namespace.is_some()
    } else {
        namespace.is_none()
    };
    if !valid {
        return Route::NotFound;
    }
    Route::Object {
        kind,
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
    }
}

fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<ResponseBody> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let param = |key: &str| {
        params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let mut st = shared.lock();
    st.log.push(RequestRecord {
        method: req.method().to_string(),
        path: path.clone(),
        query: query.clone(),
        params: params.clone(),
    });
    if st.unavailable {
        return status_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the fake API server is unavailable",
        );
    }
    if req.method() != Method::GET {
        return status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the fake API server only serves GET",
        );
    }
    match route(&path) {
        Route::Version => json_response(
            StatusCode::OK,
            &json!({
                "major": "1", "minor": "34", "gitVersion": "v1.34.0-kpr-fake",
                "gitCommit": "", "gitTreeState": "clean", "buildDate": "",
                "goVersion": "", "compiler": "", "platform": "linux/amd64",
            }),
        ),
        Route::CoreVersions => json_response(
            StatusCode::OK,
            &json!({"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                    "serverAddress": "127.0.0.1"}]}),
        ),
        Route::Groups => json_response(
            StatusCode::OK,
            &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [discovery_group()]}),
        ),
        Route::Group => json_response(StatusCode::OK, &discovery_group()),
        Route::Resources(group_version) => {
            let resources: Vec<Value> = Kind::ALL
                .into_iter()
                .filter(|k| k.api_version() == group_version)
                .map(|k| {
                    json!({"name": k.plural(), "singularName": k.kind().to_lowercase(),
                           "namespaced": k.namespaced(), "kind": k.kind(),
                           "verbs": ["get", "list", "watch"]})
                })
                .collect();
            json_response(
                StatusCode::OK,
                &json!({"kind": "APIResourceList", "apiVersion": "v1",
                        "groupVersion": group_version, "resources": resources}),
            )
        }
        Route::NotFound => status_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        ),
        Route::Object {
            kind,
            namespace,
            name,
        } => {
            if st.unavailable_kinds.contains(&kind) {
                return status_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    &format!("{} are unavailable", kind.plural()),
                );
            }
            if let Some(name) = name {
                let key = store_key(kind, namespace.as_deref().unwrap_or(""), &name);
                return match st.store(kind).get(&key) {
                    Some(obj) => json_response(StatusCode::OK, obj),
                    None => status_response(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("{} \"{name}\" not found", kind.plural()),
                    ),
                };
            }
            let labels = match LabelSelector::parse(param("labelSelector").unwrap_or("")) {
                Ok(s) => s,
                Err(e) => return bad_request(&format!("unable to parse labelSelector: {e}")),
            };
            let fields = match FieldSelector::parse(param("fieldSelector").unwrap_or("")) {
                Ok(s) => s,
                Err(e) => return bad_request(&format!("unable to parse fieldSelector: {e}")),
            };
            let filter = Filter {
                namespace,
                labels,
                fields,
            };
            if matches!(param("watch"), Some("true" | "1")) {
                watch(shared, &mut st, kind, filter, &param)
            } else {
                list(&mut st, kind, &filter, &param)
            }
        }
    }
}

fn discovery_group() -> Value {
    json!({"name": "discovery.k8s.io",
           "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
           "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"}})
}

fn continue_token(rv: u64, key: &(String, String)) -> String {
    format!("{rv}:{}:{}", key.0, key.1)
}

fn parse_continue(token: &str) -> Option<(u64, (String, String))> {
    let mut parts = token.splitn(3, ':');
    let rv = parts.next()?.parse().ok()?;
    let ns = parts.next()?.to_string();
    let name = parts.next()?.to_string();
    Some((rv, (ns, name)))
}

fn list<'a>(
    st: &mut State,
    kind: Kind,
    filter: &Filter,
    param: &impl Fn(&str) -> Option<&'a str>,
) -> Response<ResponseBody> {
    let limit = match param("limit").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return bad_request("invalid limit"),
    };
    let (list_rv, after) = match param("continue").filter(|c| !c.is_empty()) {
        None => (st.read_rv(), None),
        Some(token) => {
            let Some((rv, key)) = parse_continue(token) else {
                return bad_request("invalid continue token");
            };
            if rv < st.min_rv {
                return status_response(
                    StatusCode::GONE,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                );
            }
            (rv, Some(key))
        }
    };
    let store = st.store(kind);
    let range = match &after {
        Some(key) => store.range::<(String, String), _>((Bound::Excluded(key), Bound::Unbounded)),
        None => store.range::<(String, String), _>(..),
    };
    let mut items = Vec::new();
    let mut last_key = None;
    let mut more = false;
    for (key, obj) in range {
        if !filter.matches(obj) {
            continue;
        }
        if limit > 0 && items.len() == limit {
            more = true;
            break;
        }
        items.push(obj.clone());
        last_key = Some(key);
    }
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if let (true, Some(key)) = (more, last_key) {
        metadata["continue"] = json!(continue_token(list_rv, key));
    }
    json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", kind.kind()),
            "apiVersion": kind.api_version(),
            "metadata": metadata,
            "items": items,
        }),
    )
}

fn watch<'a>(
    shared: &Arc<Shared>,
    st: &mut State,
    kind: Kind,
    filter: Filter,
    param: &impl Fn(&str) -> Option<&'a str>,
) -> Response<ResponseBody> {
    let bookmarks = param("allowWatchBookmarks") == Some("true");
    let timeout = match param("timeoutSeconds").map(str::parse::<u64>) {
        None => None,
        Some(Ok(secs)) => Some(Duration::from_secs(secs)),
        Some(Err(_)) => return bad_request("invalid timeoutSeconds"),
    };
    if param("sendInitialEvents") == Some("true") {
        return bad_request("the fake API server does not implement streaming lists");
    }
    let start = match param("resourceVersion") {
        None | Some("") | Some("0") => None,
        Some(rv) => match rv.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => return bad_request(&format!("invalid resourceVersion {rv:?}")),
        },
    };
    let (body_tx, body_rx) = mpsc::channel::<Bytes>(64);
    if let Some(rv) = start.filter(|&rv| rv < st.min_rv) {
        // Like the API server: 200, then one ERROR event with a 410 Status, then the end.
        let line = event_line(
            "ERROR",
            &status_json(
                410,
                "Expired",
                &format!("too old resource version: {rv} ({})", st.min_rv),
            ),
        );
        tokio::spawn(async move {
            let _ = body_tx.send(line).await;
        });
        return stream_response(body_rx);
    }
    let replay: Vec<Bytes> = match start {
        Some(rv) => st
            .history
            .iter()
            .filter(|ev| ev.kind == kind && ev.rv > rv)
            .filter_map(|ev| event_line_for(&filter, ev))
            .collect(),
        None => Vec::new(),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let id = st.next_id();
    st.watchers.push(WatchReg {
        id,
        kind,
        filter,
        tx,
    });
    let pump = Pump {
        shared: shared.clone(),
        kind,
        rx,
        body: body_tx,
        bookmarks: bookmarks.then_some(st.bookmark_interval),
        timeout,
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        pump.run(replay).await;
        shared.lock().watchers.retain(|w| w.id != id);
    });
    stream_response(body_rx)
}

/// Moves one watch's events into its response body, adding bookmarks and the timeout.
struct Pump {
    shared: Arc<Shared>,
    kind: Kind,
    rx: mpsc::UnboundedReceiver<WatchMsg>,
    body: mpsc::Sender<Bytes>,
    bookmarks: Option<Duration>,
    timeout: Option<Duration>,
}

impl Pump {
    /// Sends a message; false once the stream is to end.
    async fn forward(&self, msg: WatchMsg) -> bool {
        match msg {
            WatchMsg::Line(line) => self.body.send(line).await.is_ok(),
            WatchMsg::End(last) => {
                if let Some(line) = last {
                    let _ = self.body.send(line).await;
                }
                false
            }
        }
    }

    async fn run(mut self, replay: Vec<Bytes>) {
        for line in replay {
            if self.body.send(line).await.is_err() {
                return;
            }
        }
        let period = self.bookmarks.unwrap_or(Duration::from_secs(3600));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let deadline = tokio::time::sleep(self.timeout.unwrap_or(Duration::from_secs(86_400)));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                msg = self.rx.recv() => {
                    let Some(msg) = msg else { return };
                    if !self.forward(msg).await {
                        return;
                    }
                }
                _ = ticker.tick(), if self.bookmarks.is_some() => {
                    let rv = self.shared.lock().bookmark_rv();
                    // Every event up to `rv` is queued already: send those first, so that a
                    // bookmark never overtakes an event it covers.
                    while let Ok(msg) = self.rx.try_recv() {
                        if !self.forward(msg).await {
                            return;
                        }
                    }
                    if let Some(rv) = rv {
                        let line = event_line("BOOKMARK", &json!({
                            "kind": self.kind.kind(),
                            "apiVersion": self.kind.api_version(),
                            "metadata": {"resourceVersion": rv.to_string()},
                        }));
                        if self.body.send(line).await.is_err() {
                            return;
                        }
                    }
                }
                _ = &mut deadline => return,
                _ = self.body.closed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests;
