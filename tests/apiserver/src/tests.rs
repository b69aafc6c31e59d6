//! Tests of the fake server over real HTTP, with a tiny blocking HTTP/1.1 client.

use super::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

const IO_TIMEOUT: Duration = Duration::from_secs(10);

struct Reply {
    status: u16,
    body: Vec<u8>,
    /// Whether a chunked body ended with its terminating chunk (false: connection cut).
    complete: bool,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    /// Watch events, one JSON document per line.
    fn events(&self) -> Vec<Value> {
        self.body
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("JSON event line"))
            .collect()
    }

    fn event_summary(&self) -> Vec<String> {
        self.events()
            .iter()
            .map(|e| {
                let ty = e["type"].as_str().unwrap_or("?");
                match ty {
                    "ERROR" => format!("ERROR {}", e["object"]["code"]),
                    "BOOKMARK" => "BOOKMARK".to_string(),
                    _ => format!(
                        "{ty} {}",
                        e["object"]["metadata"]["name"].as_str().unwrap_or("?")
                    ),
                }
            })
            .collect()
    }
}

fn get(server: &FakeApiServer, path_and_query: &str) -> Reply {
    let stream = TcpStream::connect(server.addr()).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut w = stream.try_clone().unwrap();
    write!(
        w,
        "GET {path_and_query} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    read_reply(BufReader::new(stream))
}

fn read_reply(mut r: BufReader<TcpStream>) -> Reply {
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut chunked = false;
    let mut length = None;
    loop {
        line.clear();
        r.read_line(&mut line).expect("header");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let lower = l.to_ascii_lowercase();
        if lower == "transfer-encoding: chunked" {
            chunked = true;
        }
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        }
    }
    let mut body = Vec::new();
    if !chunked {
        match length {
            Some(n) => {
                body.resize(n, 0);
                r.read_exact(&mut body).expect("body");
            }
            None => {
                r.read_to_end(&mut body).expect("body");
            }
        }
        return Reply {
            status,
            body,
            complete: true,
        };
    }
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return Reply {
                status,
                body,
                complete: false,
            };
        }
        let size = usize::from_str_radix(line.trim(), 16).expect("chunk size");
        if size == 0 {
            return Reply {
                status,
                body,
                complete: true,
            };
        }
        let mut chunk = vec![0; size + 2];
        if r.read_exact(&mut chunk).is_err() {
            return Reply {
                status,
                body,
                complete: false,
            };
        }
        body.extend_from_slice(&chunk[..size]);
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + IO_TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn svc(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]},
    })
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn list_paginates_with_continue_tokens() {
    let server = FakeApiServer::start_local();
    for n in ["e", "a", "d", "c", "b"] {
        server.apply(svc(n, json!({})));
    }
    let first = get(&server, "/api/v1/services?limit=2");
    assert_eq!(first.status, 200);
    let first = first.json();
    assert_eq!(first["kind"], "ServiceList");
    assert_eq!(first["apiVersion"], "v1");
    assert_eq!(names(&first), ["a", "b"]);
    let rv = first["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let mut token = first["metadata"]["continue"].as_str().unwrap().to_string();
    let mut all = names(&first);
    for expected in [vec!["c", "d"], vec!["e"]] {
        let q: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("limit", "2")
            .append_pair("continue", &token)
            .finish();
        let page = get(&server, &format!("/api/v1/services?{q}")).json();
        assert_eq!(names(&page), expected);
        assert_eq!(page["metadata"]["resourceVersion"], rv.as_str());
        all.extend(names(&page));
        token = page["metadata"]["continue"]
            .as_str()
            .unwrap_or_default()
            .to_string();
    }
    assert!(token.is_empty(), "the last page has no continue token");
    assert_eq!(all, ["a", "b", "c", "d", "e"]);
    // Without a limit: everything at once.
    assert_eq!(names(&get(&server, "/api/v1/services").json()).len(), 5);
}

#[test]
fn list_filters_by_label_and_field_selectors_and_namespace() {
    let server = FakeApiServer::start_local();
    server.apply(svc("plain", json!({"app": "x"})));
    server.apply(svc(
        "proxied-elsewhere",
        json!({"service.kubernetes.io/service-proxy-name": "other"}),
    ));
    server.apply(svc(
        "headless",
        json!({"service.kubernetes.io/headless": ""}),
    ));
    let mut other_ns = svc("other-ns", json!({}));
    other_ns["metadata"]["namespace"] = json!("kube-system");
    server.apply(other_ns);

    let q = "labelSelector=%21service.kubernetes.io%2Fservice-proxy-name%2C%21service.kubernetes.io%2Fheadless";
    let list = get(&server, &format!("/api/v1/services?{q}")).json();
    assert_eq!(names(&list), ["plain", "other-ns"]);
    let log = server.request_log();
    let last = log.last().unwrap();
    assert_eq!(
        last.param("labelSelector"),
        Some("!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless")
    );
    assert!(!last.is_watch());

    let list = get(&server, "/api/v1/services?labelSelector=app%3Dx").json();
    assert_eq!(names(&list), ["plain"]);
    let list = get(&server, "/api/v1/services?labelSelector=app%21%3Dx").json();
    assert_eq!(names(&list).len(), 3);
    let list = get(
        &server,
        "/api/v1/services?fieldSelector=metadata.name%3Dheadless",
    )
    .json();
    assert_eq!(names(&list), ["headless"]);
    let list = get(&server, "/api/v1/namespaces/kube-system/services").json();
    assert_eq!(names(&list), ["other-ns"]);

    let bad = get(&server, "/api/v1/services?labelSelector=a%3D%28");
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["reason"], "BadRequest");
}

#[test]
fn get_by_name_kinds_and_discovery() {
    let server = FakeApiServer::start_local();
    server.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}));
    server.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "s-abc", "namespace": "ns1",
                     "labels": {"kubernetes.io/service-name": "s"}},
        "addressType": "IPv4", "endpoints": [],
    }));
    let node = get(&server, "/api/v1/nodes/node-1");
    assert_eq!(node.status, 200);
    assert_eq!(node.json()["metadata"]["name"], "node-1");
    assert!(node.json()["metadata"].get("namespace").is_none());
    assert_eq!(get(&server, "/api/v1/nodes/node-2").status, 404);
    let slices = get(&server, "/apis/discovery.k8s.io/v1/endpointslices").json();
    assert_eq!(slices["kind"], "EndpointSliceList");
    assert_eq!(slices["apiVersion"], "discovery.k8s.io/v1");
    assert_eq!(names(&slices), ["s-abc"]);
    let one = get(
        &server,
        "/apis/discovery.k8s.io/v1/namespaces/ns1/endpointslices/s-abc",
    );
    assert_eq!(one.status, 200);
    assert_eq!(get(&server, "/version").json()["major"], "1");
    assert_eq!(get(&server, "/api").json()["versions"][0], "v1");
    assert_eq!(
        get(&server, "/apis").json()["groups"][0]["name"],
        "discovery.k8s.io"
    );
    assert_eq!(get(&server, "/api/v1/pods").status, 404);
    assert_eq!(get(&server, "/api/v1/namespaces/x/nodes").status, 404);
}

#[test]
fn watch_replays_history_then_times_out() {
    let server = FakeApiServer::start_local();
    let rv_a = server.apply(svc("a", json!({})));
    server.apply(svc("b", json!({})));
    let mut a2 = svc("a", json!({"v": "2"}));
    a2["spec"]["clusterIP"] = json!("10.96.0.11");
    server.apply(a2);
    server.delete(Kind::Service, "default", "b");
    let started = Instant::now();
    let reply = get(
        &server,
        &format!("/api/v1/services?watch=true&resourceVersion={rv_a}&timeoutSeconds=1"),
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "ended before timeoutSeconds"
    );
    assert_eq!(reply.status, 200);
    assert!(reply.complete);
    assert_eq!(
        reply.event_summary(),
        ["ADDED b", "MODIFIED a", "DELETED b"]
    );
    let events = reply.events();
    // Every event carries its own resourceVersion, increasing.
    let rvs: Vec<u64> = events
        .iter()
        .map(|e| {
            e["object"]["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(rvs.windows(2).all(|w| w[0] < w[1]), "{rvs:?}");
    assert_eq!(*rvs.last().unwrap(), server.resource_version());
    assert_eq!(events[1]["object"]["spec"]["clusterIP"], "10.96.0.11");
}

#[test]
fn watch_from_a_compacted_rv_gets_410() {
    let server = FakeApiServer::start_local();
    let rv = server.apply(svc("a", json!({})));
    server.compact();
    let reply = get(
        &server,
        &format!("/api/v1/services?watch=true&resourceVersion={rv}&timeoutSeconds=5"),
    );
    assert_eq!(reply.status, 200);
    assert!(reply.complete, "a 410 ends the stream at once");
    assert_eq!(reply.event_summary(), ["ERROR 410"]);
    let status = &reply.events()[0]["object"];
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "Expired");
    assert_eq!(status["status"], "Failure");

    // A fresh list hands out an RV that is valid again.
    let list = get(&server, "/api/v1/services").json();
    let list_rv: u64 = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(list_rv > rv);
    let reply = get(
        &server,
        &format!("/api/v1/services?watch=true&resourceVersion={list_rv}&timeoutSeconds=1"),
    );
    assert_eq!(reply.event_summary(), Vec::<String>::new());

    // An old continue token is refused with HTTP 410.
    server.apply(svc("b", json!({})));
    let page = get(&server, "/api/v1/services?limit=1").json();
    let token = page["metadata"]["continue"].as_str().unwrap().to_string();
    server.compact();
    let q: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("limit", "1")
        .append_pair("continue", &token)
        .finish();
    let reply = get(&server, &format!("/api/v1/services?{q}"));
    assert_eq!(reply.status, 410);
    assert_eq!(reply.json()["code"], 410);
}

/// Starts a watch on a background thread and waits until the server has registered it.
fn watch_in_background(
    server: &FakeApiServer,
    kind: Kind,
    path_and_query: String,
) -> std::thread::JoinHandle<Reply> {
    let before = server.open_watches(kind);
    let addr = server.addr();
    let handle = std::thread::spawn(move || {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut w = stream.try_clone().unwrap();
        write!(
            w,
            "GET {path_and_query} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        read_reply(BufReader::new(stream))
    });
    wait_for("the watch to be registered", || {
        server.open_watches(kind) > before
    });
    handle
}

#[test]
fn live_watch_follows_selectors_and_bookmarks() {
    let server = FakeApiServer::start_local();
    server.set_bookmark_interval(Duration::from_millis(200));
    server.apply(svc("a", json!({"app": "x"})));
    let watch = watch_in_background(
        &server,
        Kind::Service,
        "/api/v1/services?watch=true&labelSelector=app%3Dx&allowWatchBookmarks=true&timeoutSeconds=2"
            .into(),
    );
    server.apply(svc("b", json!({"app": "y"}))); // never matches: no event
    server.apply(svc("b", json!({"app": "x"}))); // enters the selector: ADDED
    server.apply(svc("a", json!({"app": "y"}))); // leaves it: DELETED
    server.delete(Kind::Service, "default", "b");
    let final_rv = server.resource_version();
    let reply = watch.join().unwrap();
    let summary: Vec<String> = reply
        .event_summary()
        .into_iter()
        .filter(|e| e != "BOOKMARK")
        .collect();
    assert_eq!(summary, ["ADDED b", "DELETED a", "DELETED b"]);
    let bookmarks: Vec<Value> = reply
        .events()
        .into_iter()
        .filter(|e| e["type"] == "BOOKMARK")
        .collect();
    assert!(
        bookmarks.len() >= 3,
        "expected bookmarks every 200 ms: {bookmarks:?}"
    );
    let last = bookmarks.last().unwrap();
    assert_eq!(last["object"]["kind"], "Service");
    assert_eq!(last["object"]["apiVersion"], "v1");
    assert_eq!(
        last["object"]["metadata"]["resourceVersion"],
        final_rv.to_string()
    );
    // No bookmarks unless asked for.
    let reply = get(&server, "/api/v1/services?watch=true&timeoutSeconds=1");
    assert_eq!(reply.event_summary(), Vec::<String>::new());
}

#[test]
fn silent_delete_emits_nothing() {
    let server = FakeApiServer::start_local();
    let rv = server.apply(svc("a", json!({})));
    assert!(server.delete_silently(Kind::Service, "default", "a"));
    assert!(!server.delete_silently(Kind::Service, "default", "a"));
    assert!(!server.delete(Kind::Service, "default", "a"));
    let reply = get(
        &server,
        &format!("/api/v1/services?watch=true&resourceVersion={rv}&timeoutSeconds=1"),
    );
    assert_eq!(reply.event_summary(), Vec::<String>::new());
    assert!(names(&get(&server, "/api/v1/services").json()).is_empty());
}

#[test]
fn drop_connections_cuts_watches() {
    let server = FakeApiServer::start_local();
    server.apply(svc("a", json!({})));
    let watch = watch_in_background(
        &server,
        Kind::Service,
        "/api/v1/services?watch=true&timeoutSeconds=30".into(),
    );
    server.apply(svc("b", json!({})));
    let started = Instant::now();
    server.drop_connections();
    let reply = watch.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        !reply.complete,
        "the chunked stream must end without its last chunk"
    );
    // "b" may or may not have left before the cut; nothing else can have.
    let summary = reply.event_summary();
    assert!(summary.is_empty() || summary == ["ADDED b"], "{summary:?}");
    assert_eq!(server.open_watches(Kind::Service), 0);
}

#[test]
fn expire_watches_sends_410_to_open_watches() {
    let server = FakeApiServer::start_local();
    let watch = watch_in_background(
        &server,
        Kind::EndpointSlice,
        "/apis/discovery.k8s.io/v1/endpointslices?watch=true&timeoutSeconds=30".into(),
    );
    server.expire_watches();
    let reply = watch.join().unwrap();
    assert!(reply.complete);
    assert_eq!(reply.event_summary(), ["ERROR 410"]);
}

#[test]
fn unavailable_answers_503() {
    let server = FakeApiServer::start_local();
    server.set_unavailable(true);
    let reply = get(&server, "/api/v1/services");
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["code"], 503);
    server.set_unavailable(false);
    assert_eq!(get(&server, "/api/v1/services").status, 200);

    server.set_unavailable_for(Kind::EndpointSlice, true);
    assert_eq!(
        get(&server, "/apis/discovery.k8s.io/v1/endpointslices").status,
        503
    );
    assert_eq!(get(&server, "/api/v1/services").status, 200);
    server.set_unavailable_for(Kind::EndpointSlice, false);
    assert_eq!(
        get(&server, "/apis/discovery.k8s.io/v1/endpointslices").status,
        200
    );
    // Every request is logged, refused ones too.
    assert_eq!(server.request_log().len(), 5);
}

#[test]
fn refusing_closes_new_connections() {
    let server = FakeApiServer::start_local();
    server.set_refusing(true);
    let mut stream = TcpStream::connect(server.addr()).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let _ = stream.write_all(b"GET /version HTTP/1.1\r\nHost: fake\r\n\r\n");
    let mut buf = Vec::new();
    let _ = stream.read_to_end(&mut buf);
    assert!(buf.is_empty(), "no response while refusing");
    server.set_refusing(false);
    assert_eq!(get(&server, "/version").status, 200);
}

#[test]
fn apply_keeps_uid_and_sets_defaults() {
    let server = FakeApiServer::start_local();
    let mut s = svc("a", json!({}));
    s["metadata"].as_object_mut().unwrap().remove("namespace");
    let rv1 = server.apply(s.clone());
    let uid = server.objects(Kind::Service)[0]["metadata"]["uid"].clone();
    // Unchanged: a no-op.
    assert_eq!(server.apply(s.clone()), rv1);
    assert_eq!(server.resource_version(), rv1);
    s["spec"]["clusterIP"] = json!("10.96.0.99");
    let rv2 = server.apply(s);
    assert!(rv2 > rv1);
    let stored = &server.objects(Kind::Service)[0];
    assert_eq!(stored["metadata"]["uid"], uid);
    assert_eq!(stored["metadata"]["namespace"], "default");
    assert_eq!(stored["metadata"]["resourceVersion"], rv2.to_string());
}

#[test]
fn binds_a_given_listener() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = FakeApiServer::start(listener);
    assert_eq!(server.url(), format!("http://{addr}"));
    assert_eq!(get(&server, "/version").status, 200);
    drop(server);
    // Stopped: nothing listens any more.
    assert!(TcpStream::connect(addr).is_err());
}
