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
