//! `kpr-labtool`: echo servers and bounded traffic loops for the kpr lab. Every client
//! subcommand prints one JSON object on stdout.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kpr_lab::tool;

#[derive(Parser)]
#[command(name = "kpr-labtool", about = "Traffic tool for the kpr lab")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Answer `NAME\n` to every TCP connection (after its first read) and UDP datagram.
    Serve {
        #[arg(long)]
        name: String,
        /// Comma-separated TCP ports.
        #[arg(long, default_value = "8080,8081")]
        tcp: String,
        /// Comma-separated UDP ports.
        #[arg(long, default_value = "5353")]
        udp: String,
        /// Comma-separated SCTP ports (not served, with a note, on kernels without SCTP).
        #[arg(long, default_value = "")]
        sctp: String,
        /// Accepting threads per TCP port.
        #[arg(long, default_value_t = 8)]
        workers: usize,
    },
    /// N sequential TCP connections: connect, send "x", read the name, close.
    TcpSpread {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Stop early (before `count`) once this file exists.
        #[arg(long)]
        stop_file: Option<std::path::PathBuf>,
    },
    /// N sequential SCTP associations: connect, send "x", read the name, close.
    SctpSpread {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// N UDP requests: each from a new unconnected socket (its own flow, sendto/recvfrom); with
    /// --one-socket all from one unconnected socket; with --connected over one connected socket.
    UdpSpread {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        count: u64,
        #[arg(long, conflicts_with = "one_socket")]
        connected: bool,
        #[arg(long)]
        one_socket: bool,
        /// Pause between requests (to keep a flow alive while something changes).
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        #[arg(long, default_value_t = 500)]
        timeout_ms: u64,
        /// Stop early (before `count`) once this file exists.
        #[arg(long)]
        stop_file: Option<std::path::PathBuf>,
        /// Rewritten after each request: `<requests so far> <last backend or ->`.
        #[arg(long)]
        progress_file: Option<std::path::PathBuf>,
    },
    /// Connection-rate loop (connect, 1 byte, response, RST) bounded by duration and max.
    BenchConnect {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 1_000_000)]
        max: u64,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Per-operation timeout (connect, write, read).
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Stop early once this file exists.
        #[arg(long)]
        stop_file: Option<std::path::PathBuf>,
    },
    /// One TCP connection kept open, a request/answer exchange every --interval-ms, until
    /// --stop-file appears or --max-ms passed; stops at the first failed exchange.
    TcpHold {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 10)]
        interval_ms: u64,
        #[arg(long, default_value_t = 60_000)]
        max_ms: u64,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        #[arg(long)]
        stop_file: Option<std::path::PathBuf>,
        /// Rewritten after each exchange: `<exchanges so far>`.
        #[arg(long)]
        progress_file: Option<std::path::PathBuf>,
    },
    /// COUNT TCP SYNs from a raw socket, each from its own source port (half-open
    /// connections, as in a SYN flood); bounded by --count.
    SynBurst {
        #[arg(long)]
        target: std::net::SocketAddrV4,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 20000)]
        first_port: u16,
    },
    /// One connection attempt.
    ConnectOnce {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// One HTTP/1.1 GET (for health-check ports).
    HttpGet {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
}

fn print<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string(v).expect("serializable"));
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let ms = Duration::from_millis;
    match cli.cmd {
        Cmd::Serve {
            name,
            tcp,
            udp,
            sctp,
            workers,
        } => {
            let tcp = tool::parse_ports(&tcp).map_err(anyhow::Error::msg)?;
            let udp = tool::parse_ports(&udp).map_err(anyhow::Error::msg)?;
            let sctp = tool::parse_ports(&sctp).map_err(anyhow::Error::msg)?;
            tool::serve(&name, &tcp, &udp, &sctp, workers)?
        }
        Cmd::SctpSpread {
            target,
            count,
            timeout_ms,
        } => print(&tool::sctp_spread(target, count, ms(timeout_ms))),
        Cmd::TcpSpread {
            target,
            count,
            timeout_ms,
            stop_file,
        } => print(&tool::tcp_spread_until(
            target,
            count,
            ms(timeout_ms),
            stop_file.as_deref(),
        )),
        Cmd::UdpSpread {
            target,
            count,
            connected,
            one_socket,
            timeout_ms,
            interval_ms,
            stop_file,
            progress_file,
        } => {
            let mode = if connected {
                tool::UdpMode::Connected
            } else if one_socket {
                tool::UdpMode::OneSocket
            } else {
                tool::UdpMode::SocketPerRequest
            };
            print(&tool::udp_spread(
                target,
                count,
                mode,
                ms(timeout_ms),
                ms(interval_ms),
                tool::FlowControl {
                    stop_file: stop_file.as_deref(),
                    progress_file: progress_file.as_deref(),
                },
            ))
        }
        Cmd::BenchConnect {
            target,
            duration_ms,
            max,
            concurrency,
            timeout_ms,
            stop_file,
        } => print(&tool::bench_connect_until(
            target,
            ms(duration_ms),
            max,
            concurrency,
            ms(timeout_ms),
            stop_file.as_deref(),
        )),
        Cmd::TcpHold {
            target,
            interval_ms,
            max_ms,
            timeout_ms,
            stop_file,
            progress_file,
        } => print(&tool::tcp_hold(
            target,
            ms(interval_ms),
            ms(max_ms),
            ms(timeout_ms),
            tool::FlowControl {
                stop_file: stop_file.as_deref(),
                progress_file: progress_file.as_deref(),
            },
        )),
        Cmd::SynBurst {
            target,
            count,
            first_port,
        } => print(&tool::syn_burst(target, count, first_port)),
        Cmd::ConnectOnce { target, timeout_ms } => {
            print(&tool::connect_once(target, ms(timeout_ms)))
        }
        Cmd::HttpGet {
            target,
            path,
            timeout_ms,
        } => print(&tool::http_get(target, &path, ms(timeout_ms))),
    }
    Ok(())
}
