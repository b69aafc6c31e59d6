//! Network namespaces: `ip` wrappers and running code inside a namespace.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};

use crate::error::{LabError, Result};
use crate::process::{check, describe, run_bounded};

/// Bound for one configuration command (`ip`, `sysctl`).
const CMD_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `ip <args>` (bounded) and fails on a non-zero exit.
pub(crate) fn ip(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let what = describe(&cmd);
    check(&what, run_bounded(cmd, None, CMD_TIMEOUT)?)?;
    Ok(())
}

/// Runs `ip netns exec <ns> <args>` (bounded) and fails on a non-zero exit.
pub(crate) fn netns_exec(ns: &str, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    let what = describe(&cmd);
    check(&what, run_bounded(cmd, None, CMD_TIMEOUT)?)?;
    Ok(())
}

pub(crate) fn netns_path(name: &str) -> String {
    format!("/var/run/netns/{name}")
}

pub(crate) fn netns_exists(name: &str) -> bool {
    Path::new(&netns_path(name)).exists()
}

/// Names of all named network namespaces (`/var/run/netns/*`).
pub(crate) fn netns_list() -> Vec<String> {
    let Ok(rd) = std::fs::read_dir("/var/run/netns") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// Runs `f` on a fresh thread that has joined the network namespace `ns` (a name under
/// `/var/run/netns`). Sockets `f` creates live in that namespace; the calling thread is not
/// affected. A panic in `f` is propagated.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let path = netns_path(ns);
    let file = File::open(&path).map_err(|e| LabError::io(format!("open {path}"), e))?;
    std::thread::scope(|s| {
        let handle = s.spawn(move || -> Result<T> {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|e| LabError::nix(format!("setns({path})"), e))?;
            Ok(f())
        });
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A network namespace for one test, with a unique name (`<prefix>-<pid>-<n>`, so tests run
/// in parallel), loopback up, deleted on drop even when the test fails.
pub struct TestNetns {
    name: String,
}

impl TestNetns {
    /// Creates the namespace; panics (it is for tests) if `ip netns add` fails.
    pub fn new(prefix: &str) -> TestNetns {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]).unwrap_or_else(|e| panic!("{e}"));
        let ns = TestNetns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all).unwrap_or_else(|e| panic!("{e}"));
    }

    /// `ip netns exec <ns> <args>` with `stdin` as input: its output, whatever the exit status.
    pub fn exec(&self, args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        run_bounded(cmd, stdin, CMD_TIMEOUT)
            .unwrap_or_else(|e| panic!("ip netns exec {} {args:?}: {e}", self.name))
    }

    /// Runs `f` on a thread that joined this namespace (checked: code under test never runs in
    /// the caller's namespace by mistake).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let here = || std::fs::read_link("/proc/thread-self/ns/net").ok();
        let outside = here();
        in_netns(&self.name, || {
            assert_ne!(here(), outside, "setns did not switch namespace");
            f()
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "delete", &self.name]);
    }
}
