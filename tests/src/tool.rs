//! The traffic tool behind `kpr-labtool`: echo servers and bounded client loops, with
//! their JSON result types (shared with the tests that parse them).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream,
    UdpSocket,
};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Error kinds that always appear (possibly with 0) in `error_kinds`.
pub const COMMON_ERROR_KINDS: [&str; 5] = [
    "ECONNREFUSED",
    "ETIMEDOUT",
    "ECONNRESET",
    "EHOSTUNREACH",
    "ENETUNREACH",
];

/// Output of `kpr-labtool tcp-spread`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TcpSpread {
    pub target: String,
    pub count: u64,
    /// Answers per backend name.
    pub counts: BTreeMap<String, u64>,
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    /// getpeername() of the connected sockets.
    pub peers: BTreeMap<String, u64>,
    /// Answers per backend port (the port the backend's server answered on).
    #[serde(default)]
    pub ports: BTreeMap<String, u64>,
    /// The client addresses the backends saw.
    #[serde(default)]
    pub clients: BTreeMap<String, u64>,
}

/// Output of `kpr-labtool udp-spread`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UdpSpread {
    pub target: String,
    pub count: u64,
    pub connected: bool,
    pub counts: BTreeMap<String, u64>,
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    /// recvfrom() source addresses (getpeername() with --connected).
    pub sources: BTreeMap<String, u64>,
    /// The backend that answered each request, in order ("" for a failed request).
    #[serde(default)]
    pub sequence: Vec<String>,
    /// Answers per backend port.
    #[serde(default)]
    pub ports: BTreeMap<String, u64>,
    /// The client addresses the backends saw.
    #[serde(default)]
    pub clients: BTreeMap<String, u64>,
}

/// Output of `kpr-labtool bench-connect`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BenchConnect {
    pub target: String,
    pub concurrency: u64,
    /// Completed transactions (connect, request, response, RST).
    pub connections: u64,
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    pub per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Output of `kpr-labtool tcp-hold`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TcpHold {
    pub target: String,
    /// Request/response exchanges completed on the one connection.
    pub exchanges: u64,
    /// 0, or 1: the exchange that failed ended the run (the connection is broken).
    pub errors: u64,
    pub error: Option<String>,
    /// Answers by backend name (one key while the connection keeps its backend).
    pub backends: BTreeMap<String, u64>,
    pub elapsed_s: f64,
}

/// Output of `kpr-labtool syn-burst`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SynBurst {
    pub target: String,
    pub source: String,
    /// SYNs sent (each from its own source port).
    pub sent: u64,
    pub errors: u64,
    pub elapsed_s: f64,
}

/// Output of `kpr-labtool connect-once`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ConnectOnce {
    pub ok: bool,
    pub error: Option<String>,
    pub elapsed_us: u64,
    pub backend: Option<String>,
    /// getpeername() of the connected socket.
    pub peer: Option<String>,
}

/// A short name for an error: the errno name (`ECONNREFUSED`), `ETIMEDOUT` for timeouts.
pub fn error_kind(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EAGAIN) => "ETIMEDOUT".into(),
        Some(code) => format!("{:?}", nix::errno::Errno::from_raw(code)),
        None => match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "ETIMEDOUT".into(),
            io::ErrorKind::UnexpectedEof => "EMPTY_RESPONSE".into(),
            k => format!("{k:?}"),
        },
    }
}

fn error_kinds() -> BTreeMap<String, u64> {
    COMMON_ERROR_KINDS
        .iter()
        .map(|k| (k.to_string(), 0))
        .collect()
}

fn bump(map: &mut BTreeMap<String, u64>, key: String) {
    *map.entry(key).or_insert(0) += 1;
}

// ---------------------------------------------------------------------------------------
// Server

/// Request/read timeout of the TCP server for one connection.
const SERVE_READ_TIMEOUT: Duration = Duration::from_secs(1);
/// The same for an SCTP association: a lost DATA chunk comes again only after SCTP's
/// retransmission timeout (at least 1 s, 3 s before the first RTT sample), so waiting 1 s
/// turned one lost chunk into an empty answer.
const SCTP_SERVE_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Port 0 on the unspecified address of `ip`'s family (what a client binds to reach `ip`).
pub fn unspecified_like(ip: IpAddr) -> SocketAddr {
    match ip {
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

/// A socket of `family` bound to its unspecified address and `port`; IPv6 sockets only take
/// IPv6 (the servers keep one socket per family, so that an IPv4 client's address is shown
/// as IPv4).
fn bound_socket(family: Family, ty: nix::sys::socket::SockType, port: u16) -> io::Result<OwnedFd> {
    bound_socket_of(family, ty, None, port)
}

/// A socket of `family`, type `ty` and `protocol` (`None`: the type's default) bound to `port`
/// on every address.
fn bound_socket_of(
    family: Family,
    ty: nix::sys::socket::SockType,
    protocol: Option<nix::sys::socket::SockProtocol>,
    port: u16,
) -> io::Result<OwnedFd> {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockaddrIn, SockaddrIn6,
    };
    let af = match family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    };
    let fd: OwnedFd = socket(af, ty, SockFlag::SOCK_CLOEXEC, protocol)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    match family {
        Family::V4 => bind(
            fd.as_raw_fd(),
            &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
        )?,
        Family::V6 => {
            setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
            bind(
                fd.as_raw_fd(),
                &SockaddrIn6::from(std::net::SocketAddrV6::new(
                    Ipv6Addr::UNSPECIFIED,
                    port,
                    0,
                    0,
                )),
            )?
        }
    }
    Ok(fd)
}

/// The server's address families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

fn tcp_listener(family: Family, port: u16) -> io::Result<TcpListener> {
    use nix::sys::socket::{listen, Backlog, SockType};
    let fd = bound_socket(family, SockType::Stream, port)?;
    // -1: the namespace's net.core.somaxconn (4096 by default).
    listen(&fd, Backlog::MAXALLOWABLE)?;
    Ok(TcpListener::from(fd))
}

/// An SCTP one-to-one (stream) listener: accepted associations read and write like TCP
/// streams, so [`handle_tcp`] answers them. `None` when the kernel has no SCTP.
fn sctp_listener(family: Family, port: u16) -> io::Result<Option<TcpListener>> {
    use nix::sys::socket::{listen, Backlog, SockProtocol, SockType};
    let fd = match bound_socket_of(family, SockType::Stream, Some(SockProtocol::Sctp), port) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::EPROTONOSUPPORT) => return Ok(None),
        Err(e) => return Err(e),
    };
    listen(&fd, Backlog::MAXALLOWABLE)?;
    Ok(Some(TcpListener::from(fd)))
}

/// Whether this kernel can open SCTP sockets (the `sctp` module is built and loadable).
pub fn sctp_available() -> bool {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockProtocol, SockType};
    socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        Some(SockProtocol::Sctp),
    )
    .is_ok()
}

fn handle_tcp(mut s: TcpStream, reply: &[u8], timeout: Duration) {
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let mut buf = [0u8; 64];
    // Answer after the first read: with >= 1 byte of request, or on half-close (0 bytes).
    // n == 0 (the client half-closed without a request) is answered too.
    if let Ok(n) = s.read(&mut buf) {
        let peer = s
            .peer_addr()
            .map(|p| p.ip().to_string())
            .unwrap_or_default();
        let _ = s.write_all(&answer(reply, &peer));
        if n > 0 && buf[0] == HOLD_REQUEST {
            // A long-lived connection (`tcp-hold`): answer every request until it closes.
            let _ = s.set_read_timeout(Some(HOLD_READ_TIMEOUT));
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&answer(reply, &peer)).is_err() {
                    break;
                }
            }
            return;
        }
        let _ = s.shutdown(Shutdown::Write);
    }
}

/// The request byte of `tcp-hold`: the server keeps the connection and answers every one.
const HOLD_REQUEST: u8 = b'~';
/// How long a held connection may stay silent before the server closes it.
const HOLD_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// `NAME PORT CLIENT\n`: the backend, the port it answered on, and the client address it saw
/// (which tells a test whether the client's source address survived the service path).
fn answer(prefix: &[u8], client: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(prefix.len() + client.len() + 2);
    v.extend_from_slice(prefix);
    v.push(b' ');
    v.extend_from_slice(client.as_bytes());
    v.push(b'\n');
    v
}

/// Runs the echo servers: each accepted TCP connection gets `NAME\n` after its first read;
/// each UDP datagram gets `NAME\n` back to its sender. `workers` threads accept on each
/// TCP port and handle each short connection inline. Never returns unless a socket cannot
/// be set up (the process is meant to be killed).
pub fn serve(
    name: &str,
    tcp_ports: &[u16],
    udp_ports: &[u16],
    sctp_ports: &[u16],
    workers: usize,
) -> io::Result<()> {
    // The answer names the backend and the port that served it, so a test can tell which
    // target port a service port was translated to.
    let reply = |port: u16| -> Arc<[u8]> { Arc::from(format!("{name} {port}").into_bytes()) };
    let mut listeners = Vec::new();
    let mut udp = Vec::new();
    for family in [Family::V4, Family::V6] {
        for &port in tcp_ports {
            listeners.push((tcp_listener(family, port)?, reply(port), SERVE_READ_TIMEOUT));
        }
        for &port in udp_ports {
            let fd = bound_socket(family, nix::sys::socket::SockType::Datagram, port)?;
            udp.push((UdpSocket::from(fd), reply(port)));
        }
        for &port in sctp_ports {
            match sctp_listener(family, port)? {
                Some(l) => listeners.push((l, reply(port), SCTP_SERVE_READ_TIMEOUT)),
                None => eprintln!("no SCTP in this kernel: not serving SCTP port {port}"),
            }
        }
    }
    for (l, reply, timeout) in listeners {
        for _ in 0..workers.max(1) {
            let l = l.try_clone()?;
            let reply = reply.clone();
            std::thread::spawn(move || loop {
                match l.accept() {
                    Ok((s, _)) => handle_tcp(s, &reply, timeout),
                    // EMFILE and friends: back off briefly.
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            });
        }
    }
    for (sock, reply) in udp {
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&answer(&reply, &from.ip().to_string()), from);
                }
            }
        });
    }
    // Tell whoever watches our stdout that the sockets are bound.
    println!(
        "{}",
        serde_json::json!({"serving": name, "tcp": tcp_ports, "udp": udp_ports})
    );
    let _ = io::stdout().flush();
    loop {
        std::thread::park();
    }
}

// ---------------------------------------------------------------------------------------
// Clients

fn set_rst_on_close(s: &TcpStream) {
    let lg = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::Linger, &lg);
}

/// Reads a `NAME\n` answer (until newline or EOF, at most 64 bytes).
fn read_answer<R: Read>(s: &mut R) -> io::Result<String> {
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < buf.len() {
        let k = s.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
        if buf[..n].contains(&b'\n') {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf[..n]).trim().to_string();
    if text.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "empty response",
        ));
    }
    Ok(text)
}

/// A server's answer is `NAME PORT`: the backend's name and the port it answered on.
pub fn split_answer(answer: &str) -> (&str, &str) {
    let (name, port, _) = answer_parts(answer);
    (name, port)
}

/// A server's answer `NAME PORT CLIENT` in its parts (missing parts are empty).
pub fn answer_parts(answer: &str) -> (&str, &str, &str) {
    let mut it = answer.split(' ');
    (
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
    )
}

/// One TCP transaction: connect, send "x", read the name, close (with RST if `rst`).
/// Returns (backend name, getpeername()).
pub fn tcp_transaction(
    target: SocketAddr,
    timeout: Duration,
    rst: bool,
) -> io::Result<(String, SocketAddr)> {
    let mut s = TcpStream::connect_timeout(&target, timeout)?;
    let peer = s.peer_addr()?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(b"x")?;
    let name = read_answer(&mut s);
    if rst {
        set_rst_on_close(&s);
    }
    drop(s);
    Ok((name?, peer))
}

/// One SCTP association (one-to-one style): connect, send "x", read the answer, close.
/// Returns the answer and the peer address the socket reports.
pub fn sctp_transaction(target: SocketAddr, timeout: Duration) -> io::Result<(String, SocketAddr)> {
    use nix::sys::socket::{
        connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockProtocol, SockType,
        SockaddrIn, SockaddrIn6,
    };
    let af = match target {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(
        af,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        Some(SockProtocol::Sctp),
    )?;
    // A blocking connect() gives up after the send timeout, as TCP's connect_timeout does.
    let tv =
        nix::sys::time::TimeVal::new(timeout.as_secs() as i64, i64::from(timeout.subsec_micros()));
    setsockopt(&fd, sockopt::SendTimeout, &tv)?;
    match target {
        SocketAddr::V4(a) => connect(fd.as_raw_fd(), &SockaddrIn::from(a))?,
        SocketAddr::V6(a) => connect(fd.as_raw_fd(), &SockaddrIn6::from(a))?,
    }
    let mut s = TcpStream::from(fd);
    let peer = s.peer_addr()?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"x")?;
    let name = read_answer(&mut s);
    drop(s);
    Ok((name?, peer))
}

/// `count` sequential SCTP associations, reported as [`TcpSpread`] is.
pub fn sctp_spread(target: SocketAddr, count: u64, timeout: Duration) -> TcpSpread {
    spread(target, count, None, || sctp_transaction(target, timeout))
}

/// `count` sequential TCP transactions.
pub fn tcp_spread(target: SocketAddr, count: u64, timeout: Duration) -> TcpSpread {
    tcp_spread_until(target, count, timeout, None)
}

/// [`tcp_spread`], ending early once `stop_file` exists.
pub fn tcp_spread_until(
    target: SocketAddr,
    count: u64,
    timeout: Duration,
    stop_file: Option<&std::path::Path>,
) -> TcpSpread {
    spread(target, count, stop_file, || {
        tcp_transaction(target, timeout, false)
    })
}

/// `count` sequential `transaction`s (of any stream protocol), ending early once `stop_file`
/// exists: who answered, on which port, as which client, through which peer address.
fn spread(
    target: SocketAddr,
    count: u64,
    stop_file: Option<&std::path::Path>,
    mut transaction: impl FnMut() -> io::Result<(String, SocketAddr)>,
) -> TcpSpread {
    let mut r = TcpSpread {
        target: target.to_string(),
        count,
        error_kinds: error_kinds(),
        ..Default::default()
    };
    for _ in 0..count {
        if stop_file.is_some_and(|f| f.exists()) {
            break;
        }
        match transaction() {
            Ok((answer, peer)) => {
                let (name, port, client) = answer_parts(&answer);
                bump(&mut r.counts, name.to_string());
                bump(&mut r.ports, port.to_string());
                bump(&mut r.clients, client.to_string());
                bump(&mut r.peers, peer.to_string());
            }
            Err(e) => {
                r.errors += 1;
                bump(&mut r.error_kinds, error_kind(&e));
            }
        }
    }
    r
}

/// How `udp_spread` uses sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpMode {
    /// A new unconnected socket per request: every request is its own flow (5-tuple).
    SocketPerRequest,
    /// One unconnected socket (sendto/recvfrom) for all requests: one flow.
    OneSocket,
    /// One connected socket (connect/send/recv).
    Connected,
}

/// Where a long UDP flow reports itself, for a test that acts on its progress.
#[derive(Clone, Copy, Default)]
pub struct FlowControl<'a> {
    /// Stop early (before `count`) once this file exists (checked before each request).
    pub stop_file: Option<&'a std::path::Path>,
    /// After each request, rewritten with `<requests so far> <backend that answered the last
    /// one, or "-">`.
    pub progress_file: Option<&'a std::path::Path>,
}

/// `count` UDP request/response pairs; fewer if the stop file appears first, so a test can
/// keep a flow alive until it has seen what it waits for.
pub fn udp_spread(
    target: SocketAddr,
    count: u64,
    mode: UdpMode,
    timeout: Duration,
    interval: Duration,
    control: FlowControl<'_>,
) -> UdpSpread {
    let stop_file = control.stop_file;
    let mut r = UdpSpread {
        target: target.to_string(),
        count,
        connected: mode == UdpMode::Connected,
        error_kinds: error_kinds(),
        ..Default::default()
    };
    let open = || -> io::Result<UdpSocket> {
        let s = UdpSocket::bind(unspecified_like(target.ip()))?;
        s.set_read_timeout(Some(timeout))?;
        if mode == UdpMode::Connected {
            s.connect(target)?;
        }
        Ok(s)
    };
    let mut shared: Option<UdpSocket> = None;
    let mut buf = [0u8; 2048];
    for i in 0..count {
        if i > 0 && !interval.is_zero() {
            std::thread::sleep(interval);
        }
        if stop_file.is_some_and(|f| f.exists()) {
            break;
        }
        let res = (|| -> io::Result<(usize, SocketAddr)> {
            let sock = match (mode, &shared) {
                (UdpMode::SocketPerRequest, _) => open()?,
                (_, Some(s)) => s.try_clone()?,
                (_, None) => {
                    let s = open()?;
                    shared = Some(s.try_clone()?);
                    s
                }
            };
            if mode == UdpMode::Connected {
                sock.send(b"x")?;
                let n = sock.recv(&mut buf)?;
                Ok((n, sock.peer_addr()?))
            } else {
                sock.send_to(b"x", target)?;
                sock.recv_from(&mut buf)
            }
        })();
        match res {
            Ok((n, from)) => {
                let answer = String::from_utf8_lossy(&buf[..n]).trim().to_string();
                let (name, port, client) = answer_parts(&answer);
                r.sequence.push(name.to_string());
                bump(&mut r.counts, name.to_string());
                bump(&mut r.ports, port.to_string());
                bump(&mut r.clients, client.to_string());
                bump(&mut r.sources, from.to_string());
            }
            Err(e) => {
                r.sequence.push(String::new());
                r.errors += 1;
                bump(&mut r.error_kinds, error_kind(&e));
                // A socket that failed (not one that timed out) is opened and connected again,
                // as a resolver does: a socket the kernel aborted stays failed.
                if !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    shared = None;
                }
            }
        }
        if let Some(p) = control.progress_file {
            let last = r
                .sequence
                .last()
                .filter(|b| !b.is_empty())
                .map_or("-", |b| b.as_str());
            let tmp = p.with_extension("tmp");
            if std::fs::write(&tmp, format!("{} {last}\n", r.sequence.len())).is_ok() {
                let _ = std::fs::rename(&tmp, p);
            }
        }
    }
    r
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64
}

/// One TCP connection kept open, exchanging a request and its answer every `interval` until
/// the stop file appears or `max` has passed. Stops at the first failed exchange. With a
/// progress file, rewrites `<exchanges so far>` after each one.
pub fn tcp_hold(
    target: SocketAddr,
    interval: Duration,
    max: Duration,
    timeout: Duration,
    control: FlowControl<'_>,
) -> TcpHold {
    let start = Instant::now();
    let mut r = TcpHold {
        target: target.to_string(),
        ..Default::default()
    };
    let result = (|| -> io::Result<()> {
        let mut s = TcpStream::connect_timeout(&target, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        while start.elapsed() < max && !control.stop_file.is_some_and(|f| f.exists()) {
            s.write_all(&[HOLD_REQUEST])?;
            let answer = read_answer(&mut s)?;
            let (name, _) = split_answer(&answer);
            bump(&mut r.backends, name.to_string());
            r.exchanges += 1;
            if let Some(p) = control.progress_file {
                let tmp = p.with_extension("tmp");
                if std::fs::write(&tmp, format!("{}\n", r.exchanges)).is_ok() {
                    let _ = std::fs::rename(&tmp, p);
                }
            }
            std::thread::sleep(interval);
        }
        Ok(())
    })();
    if let Err(e) = result {
        r.errors = 1;
        r.error = Some(error_kind(&e));
    }
    r.elapsed_s = start.elapsed().as_secs_f64();
    r
}

/// Sends `count` TCP SYNs to `target` from a raw socket, source ports `first_port..`
/// (wrapping within 1024..=65535), as fast as the socket takes them. Nothing answers them on
/// this side: the client's kernel resets the half-open connections when the SYN-ACKs come.
/// Bounded by `count`; only to lab addresses.
pub fn syn_burst(target: SocketAddrV4, count: u64, first_port: u16) -> SynBurst {
    let start = Instant::now();
    let mut r = SynBurst {
        target: target.to_string(),
        ..Default::default()
    };
    // The source address the kernel will use towards the target (for the TCP checksum).
    let source = match UdpSocket::bind("0.0.0.0:0")
        .and_then(|u| u.connect(target).map(|_| u))
        .and_then(|u| u.local_addr())
    {
        Ok(SocketAddr::V4(a)) => *a.ip(),
        _ => {
            r.errors = count;
            return r;
        }
    };
    r.source = source.to_string();
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
    if fd < 0 {
        r.errors = count;
        return r;
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(target.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    for i in 0..count {
        let sport = 1024 + ((u64::from(first_port.max(1024)) - 1024 + i) % (65536 - 1024)) as u16;
        let seg = syn_segment(source, *target.ip(), sport, target.port(), i as u32);
        // SAFETY: valid buffer and address of the given lengths.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                seg.as_ptr().cast(),
                seg.len(),
                0,
                (&dst as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n == seg.len() as isize {
            r.sent += 1;
        } else {
            r.errors += 1;
        }
    }
    r.elapsed_s = start.elapsed().as_secs_f64();
    r
}

/// A 20-byte TCP SYN with its checksum (the kernel adds the IPv4 header).
fn syn_segment(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, seq: u32) -> [u8; 20] {
    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.wrapping_mul(2_654_435_761).to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut sum: u32 = 0;
    for pair in src.octets().chunks(2).chain(dst.octets().chunks(2)) {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    sum += u32::from(libc::IPPROTO_TCP as u16) + 20;
    for pair in t.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    t[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    t
}

/// What a progress file (`--progress-file` of `udp-spread`, `tcp-hold`) says so far: its
/// first number (0 before the first write).
pub fn read_progress(file: &std::path::Path) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Waits (up to 20 s) until the progress file says at least `n`; returns what it says. Panics
/// naming `what` when the load does not get there.
pub fn wait_for_progress(file: &std::path::Path, n: u64, what: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = read_progress(file);
        if got >= n {
            return got;
        }
        assert!(Instant::now() < deadline, "{what}: {got} < {n} after 20 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Connection-rate benchmark: `concurrency` threads loop connect, send 1 byte, read the
/// answer, close with RST (no TIME_WAIT), until `duration` has passed or `max`
/// transactions were started.
pub fn bench_connect(
    target: SocketAddr,
    duration: Duration,
    max: u64,
    concurrency: usize,
    timeout: Duration,
) -> BenchConnect {
    bench_connect_until(target, duration, max, concurrency, timeout, None)
}

/// [`bench_connect`], ending early once `stop_file` exists (checked before each transaction).
pub fn bench_connect_until(
    target: SocketAddr,
    duration: Duration,
    max: u64,
    concurrency: usize,
    timeout: Duration,
    stop_file: Option<&std::path::Path>,
) -> BenchConnect {
    let stop_file = stop_file.map(std::path::Path::to_path_buf);
    let concurrency = concurrency.max(1);
    let remaining = Arc::new(AtomicU64::new(max));
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<_> = (0..concurrency)
        .map(|_| {
            let remaining = remaining.clone();
            let stop_file = stop_file.clone();
            std::thread::spawn(move || {
                let mut lat: Vec<u32> = Vec::with_capacity(65536);
                let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
                let mut errors = 0u64;
                while Instant::now() < deadline && !stop_file.as_ref().is_some_and(|f| f.exists()) {
                    if remaining
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| r.checked_sub(1))
                        .is_err()
                    {
                        break;
                    }
                    let t0 = Instant::now();
                    match tcp_transaction(target, timeout, true) {
                        Ok(_) => lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32),
                        Err(e) => {
                            errors += 1;
                            bump(&mut kinds, error_kind(&e));
                        }
                    }
                }
                (lat, errors, kinds)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut r = BenchConnect {
        target: target.to_string(),
        concurrency: concurrency as u64,
        error_kinds: error_kinds(),
        ..Default::default()
    };
    for h in handles {
        if let Ok((lat, errors, kinds)) = h.join() {
            all.extend(lat);
            r.errors += errors;
            for (k, v) in kinds {
                *r.error_kinds.entry(k).or_insert(0) += v;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    r.connections = all.len() as u64;
    r.elapsed_s = elapsed;
    r.per_sec = if elapsed > 0.0 {
        r.connections as f64 / elapsed
    } else {
        0.0
    };
    r.p50_us = percentile(&all, 50.0);
    r.p99_us = percentile(&all, 99.0);
    r
}

/// Output of `kpr-labtool http-get`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HttpGet {
    /// The status code; 0 when no response came.
    pub status: u16,
    pub body: String,
    pub error: Option<String>,
}

/// One HTTP/1.1 GET with `Connection: close`, read to the end.
pub fn http_get(target: SocketAddr, path: &str, timeout: Duration) -> HttpGet {
    let res = (|| -> io::Result<String> {
        let mut s = TcpStream::connect_timeout(&target, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })();
    match res {
        Ok(text) => HttpGet {
            status: text
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0),
            body: text
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default(),
            error: None,
        },
        Err(e) => HttpGet {
            error: Some(error_kind(&e)),
            ..Default::default()
        },
    }
}

/// One connection attempt (connect, send "x", read the name, close).
pub fn connect_once(target: SocketAddr, timeout: Duration) -> ConnectOnce {
    let t0 = Instant::now();
    let res = tcp_transaction(target, timeout, false);
    let elapsed_us = t0.elapsed().as_micros() as u64;
    match res {
        Ok((answer, peer)) => ConnectOnce {
            ok: true,
            error: None,
            elapsed_us,
            backend: Some(split_answer(&answer).0.to_string()),
            peer: Some(peer.to_string()),
        },
        Err(e) => ConnectOnce {
            ok: false,
            error: Some(error_kind(&e)),
            elapsed_us,
            backend: None,
            peer: None,
        },
    }
}

/// Parses "8080,8081" (empty string: no ports).
pub fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u16>().map_err(|e| format!("bad port {p:?}: {e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(
            error_kind(&io::Error::from_raw_os_error(libc::ECONNREFUSED)),
            "ECONNREFUSED"
        );
        assert_eq!(
            error_kind(&io::Error::from_raw_os_error(libc::EAGAIN)),
            "ETIMEDOUT"
        );
        assert_eq!(
            error_kind(&io::Error::new(io::ErrorKind::TimedOut, "x")),
            "ETIMEDOUT"
        );
    }

    #[test]
    fn ports() {
        assert_eq!(parse_ports("8080, 8081").unwrap(), vec![8080, 8081]);
        assert_eq!(parse_ports("").unwrap(), Vec::<u16>::new());
        assert!(parse_ports("x").is_err());
    }

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 51.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    /// Server and clients over loopback in this (unprivileged is fine) namespace.
    #[test]
    fn loopback_roundtrip() {
        let l = tcp_listener(Family::V4, 0).unwrap();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, l.local_addr().unwrap().port()));
        std::thread::spawn(move || {
            for s in l.incoming().take(3).flatten() {
                handle_tcp(s, b"t1 8080", SERVE_READ_TIMEOUT);
            }
        });
        let r = tcp_spread(addr, 2, Duration::from_secs(1));
        assert_eq!(r.counts.get("t1"), Some(&2), "{r:?}");
        assert_eq!(r.ports.get("8080"), Some(&2), "{r:?}");
        assert_eq!(r.clients.get("127.0.0.1"), Some(&2), "{r:?}");
        assert_eq!(r.peers.get(&addr.to_string()), Some(&2));
        let o = connect_once(addr, Duration::from_secs(1));
        assert!(o.ok && o.backend.as_deref() == Some("t1"), "{o:?}");
    }
}
