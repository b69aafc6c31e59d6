//! Datapath events (`--datapath-events`): the kernel programs' aya-log records (see the
//! programs' `events` module), read on a thread of their own and logged through `tracing`
//! under the target `kpr::datapath`, with the frontend's Service and the drop reason named.
//!
//! The programs write `key=value` text; this module reads back `proto=`, `frontend=` and
//! `reason=` to add what only the agent knows: which Service port a frontend is (from the
//! last programmed state) and the reason's name (a `Counter`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use aya::Ebpf;
use aya_log::EbpfLogger;

use crate::model::DesiredState;

/// Which Service port each frontend (address, port, IANA protocol) belongs to, as of the last
/// sync. Shared between the dataplane (which updates it) and the event reader.
#[derive(Clone, Default)]
pub struct FrontendNames(Arc<RwLock<HashMap<(SocketAddr, u8), String>>>);

impl FrontendNames {
    /// Replaces the names with `state`'s frontends.
    pub fn update(&self, state: &DesiredState) {
        let names = state
            .services
            .iter()
            .map(|(f, s)| {
                let key = (SocketAddr::new(f.ip, f.port), f.protocol.number());
                (key, s.name.to_string())
            })
            .collect();
        if let Ok(mut n) = self.0.write() {
            *n = names;
        }
    }

    fn get(&self, frontend: SocketAddr, proto: u8) -> Option<String> {
        self.0.read().ok()?.get(&(frontend, proto)).cloned()
    }
}

/// One datapath event, read back from the program's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// What happened: `socket translated`, `socket refused`, `flow translated`,
    /// `flow dropped`.
    pub what: String,
    pub proto: Option<u8>,
    pub frontend: Option<SocketAddr>,
    /// The `Counter` named by `reason=`, for refusals and drops.
    pub reason: Option<&'static str>,
    /// The program's message as written.
    pub text: String,
}

impl Event {
    /// Reads a program's message (see the module doc for its keys).
    pub fn parse(text: &str) -> Event {
        let mut what = Vec::new();
        let mut fields: HashMap<&str, &str> = HashMap::new();
        for word in text.split_whitespace() {
            match word.split_once('=') {
                Some((k, v)) => {
                    fields.insert(k, v);
                }
                None if fields.is_empty() => what.push(word),
                None => {}
            }
        }
        Event {
            what: what.join(" "),
            proto: fields.get("proto").and_then(|p| p.parse().ok()),
            frontend: fields.get("frontend").and_then(|f| f.parse().ok()),
            reason: fields
                .get("reason")
                .and_then(|r| r.parse().ok())
                .and_then(kpr_common::Counter::from_index)
                .map(kpr_common::Counter::name),
            text: text.to_string(),
        }
    }
}

impl Event {
    /// The program's text with the protocol and the reason by name (`proto=TCP`,
    /// `reason=drop_source_range`).
    pub fn named(&self) -> String {
        self.text
            .split_whitespace()
            .map(|word| match word.split_once('=') {
                Some(("proto", _)) => match self.proto {
                    Some(6) => "proto=TCP".to_string(),
                    Some(17) => "proto=UDP".to_string(),
                    Some(132) => "proto=SCTP".to_string(),
                    _ => word.to_string(),
                },
                Some(("reason", _)) => match self.reason {
                    Some(r) => format!("reason={r}"),
                    None => word.to_string(),
                },
                _ => word.to_string(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// aya-log's records, into `tracing`.
struct EventLog {
    names: FrontendNames,
}

impl log::Log for EventLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let e = Event::parse(&record.args().to_string());
        let service = e
            .frontend
            .and_then(|f| self.names.get(f, e.proto?))
            .unwrap_or_else(|| "(unknown)".into());
        let text = e.named();
        match record.level() {
            log::Level::Error | log::Level::Warn => {
                tracing::warn!(target: "kpr::datapath", service = %service, "{text}")
            }
            _ => tracing::info!(target: "kpr::datapath", service = %service, "{text}"),
        }
    }

    fn flush(&self) {}
}

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("reading datapath events: {0}")]
    Logger(#[from] aya_log::Error),
    #[error("starting the datapath event reader: {0}")]
    Thread(std::io::Error),
}

/// Starts reading `ebpf`'s events on a thread of its own, for the agent's life. The thread
/// wakes when records arrive (and once a second), so an idle datapath costs nothing.
pub fn start(ebpf: &mut Ebpf, names: FrontendNames) -> Result<(), EventsError> {
    let mut logger = EbpfLogger::init_with_logger(ebpf, EventLog { names })?;
    let fd: RawFd = logger.as_raw_fd();
    std::thread::Builder::new()
        .name("kpr-events".into())
        .spawn(move || loop {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let timeout = Duration::from_secs(1).as_millis() as i32;
            // SAFETY: one valid pollfd; the ring buffer's fd lives as long as `logger`, which
            // this thread owns.
            let n = unsafe { libc::poll(&mut pfd, 1, timeout) };
            if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                tracing::warn!("datapath events: poll failed; no more events");
                return;
            }
            logger.flush();
        })
        .map_err(EventsError::Thread)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_messages_are_read_back() {
        let e = Event::parse("socket refused proto=6 frontend=10.96.0.11:80 rev_nat=4 reason=1");
        assert_eq!(e.what, "socket refused");
        assert_eq!(e.proto, Some(6));
        assert_eq!(e.frontend, Some("10.96.0.11:80".parse().unwrap()));
        assert_eq!(e.reason, Some("drop_no_backend"));
        assert_eq!(
            e.named(),
            "socket refused proto=TCP frontend=10.96.0.11:80 rev_nat=4 reason=drop_no_backend"
        );
        let e = Event::parse(
            "flow translated proto=17 client=192.0.2.1:5000 frontend=192.0.2.10:30053 \
             backend=10.244.1.5:53 rev_nat=9 affinity=1",
        );
        assert_eq!(e.what, "flow translated");
        assert_eq!(e.frontend, Some("192.0.2.10:30053".parse().unwrap()));
        assert_eq!(e.reason, None);
        // IPv6 addresses are bracketed, so the frontend reads back as a socket address.
        let e = Event::parse(
            "flow dropped proto=6 client=[fd00::64]:5000 frontend=[fd00:10:96::10]:80 rev_nat=3 reason=2",
        );
        assert_eq!(e.frontend, Some("[fd00:10:96::10]:80".parse().unwrap()));
        // A reason this build does not know is not named.
        assert_eq!(Event::parse("flow dropped reason=999").reason, None);
    }
}
