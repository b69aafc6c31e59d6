//! Child processes: placement into a network namespace and cgroup, bounded runs, and a guard
//! that kills and reaps on drop.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use crate::error::{LabError, Result};

/// How long [`ProcessGuard`] waits after SIGTERM before it sends SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(2);

/// A child process that is terminated (SIGTERM, then SIGKILL after [`TERM_GRACE`]) and
/// reaped when the guard is dropped.
#[derive(Debug)]
pub struct ProcessGuard {
    child: Option<Child>,
    what: String,
}

impl ProcessGuard {
    pub(crate) fn new(child: Child, what: impl Into<String>) -> Self {
        ProcessGuard {
            child: Some(child),
            what: what.into(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// A short description (pod or node, program).
    pub fn what(&self) -> &str {
        &self.what
    }

    /// The underlying child, e.g. to take its stdout pipe.
    pub fn child_mut(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .expect("ProcessGuard used after release")
    }

    /// `Some(status)` if the process has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let what = self.what.clone();
        self.child_mut()
            .try_wait()
            .map_err(|e| LabError::io(format!("waiting for {what}"), e))
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Sends a signal to the process (no-op if it has already been reaped).
    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        kill(Pid::from_raw(self.pid() as i32), sig)
            .map_err(|e| LabError::nix(format!("kill({sig}) {}", self.what), e))
    }

    /// Terminates the process now (SIGTERM, SIGKILL after [`TERM_GRACE`]) and returns its
    /// exit status.
    pub fn terminate(mut self) -> Option<ExitStatus> {
        self.child.take().and_then(stop_child)
    }

    /// Gives up ownership without killing the process (it keeps running; nobody reaps it
    /// but init once this process exits). Returns its pid.
    pub fn detach(mut self) -> u32 {
        self.child.take().map(|c| c.id()).unwrap_or(0)
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child);
        }
    }
}

/// SIGTERM, wait up to [`TERM_GRACE`], SIGKILL, reap. Never panics.
fn stop_child(mut child: Child) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + TERM_GRACE;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Where a child goes: a network namespace (by its file), optionally a cgroup (by its
/// `cgroup.procs` file). Both are opened before fork; the child only calls `setns` and
/// `write`, which are async-signal-safe.
pub(crate) struct Placement {
    pub netns: Option<File>,
    pub cgroup_procs: Option<File>,
}

impl Placement {
    pub(crate) fn open(netns: Option<&str>, cgroup_dir: Option<&Path>) -> Result<Self> {
        let netns = match netns {
            Some(name) => {
                let path = format!("/var/run/netns/{name}");
                Some(File::open(&path).map_err(|e| LabError::io(format!("open {path}"), e))?)
            }
            None => None,
        };
        let cgroup_procs = match cgroup_dir {
            Some(dir) => {
                let path = dir.join("cgroup.procs");
                Some(
                    OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(|e| LabError::io(format!("open {}", path.display()), e))?,
                )
            }
            None => None,
        };
        Ok(Placement {
            netns,
            cgroup_procs,
        })
    }

    /// Installs the pre_exec hook. `self` must stay alive until the command is spawned.
    pub(crate) fn apply(&self, cmd: &mut Command) {
        let ns_fd = self.netns.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);
        let cg_fd = self
            .cgroup_procs
            .as_ref()
            .map(|f| f.as_raw_fd())
            .unwrap_or(-1);
        // SAFETY: the closure only calls setns(2) and write(2), both async-signal-safe, and
        // builds io::Errors from errno (no allocation).
        unsafe {
            cmd.pre_exec(move || {
                if cg_fd >= 0 {
                    let buf = b"0";
                    if libc::write(cg_fd, buf.as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if ns_fd >= 0 && libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Spawns `cmd` placed as given.
pub(crate) fn spawn_placed(mut cmd: Command, placement: &Placement) -> Result<Child> {
    placement.apply(&mut cmd);
    let what = describe(&cmd);
    cmd.spawn()
        .map_err(|e| LabError::io(format!("spawn `{what}`"), e))
}

/// Runs `cmd` to completion with a time bound: stdout and stderr are captured, `stdin` (if
/// any) is written to its standard input. The child gets its own process group, which is
/// killed with SIGKILL on timeout ([`LabError::Timeout`]). A non-zero exit is NOT an error
/// here: inspect `Output::status`.
pub fn run_bounded(cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Output> {
    run_bounded_placed(cmd, stdin, timeout, None)
}

pub(crate) fn run_bounded_placed(
    mut cmd: Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
    placement: Option<&Placement>,
) -> Result<Output> {
    let what = describe(&cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    if let Some(p) = placement {
        p.apply(&mut cmd);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| LabError::io(format!("spawn `{what}`"), e))?;
    let pid = child.id() as i32;

    let input = stdin.map(|s| s.to_vec());
    if let (Some(input), Some(mut pipe)) = (input, child.stdin.take()) {
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let out_rx = drain(child.stdout.take());
    let err_rx = drain(child.stderr.take());

    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) => {}
            Err(e) => return Err(LabError::io(format!("wait for `{what}`"), e)),
        }
        let now = Instant::now();
        if now >= deadline {
            break None;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    let status = match status {
        Some(s) => s,
        None => {
            // Not reaped yet, so the process group is still ours: kill all of it.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = child.wait();
            let stderr = recv_bounded(&err_rx);
            return Err(LabError::Timeout {
                what: format!(
                    "`{what}` (stderr: {})",
                    String::from_utf8_lossy(&stderr).trim()
                ),
                timeout,
            });
        }
    };
    Ok(Output {
        status,
        stdout: recv_bounded(&out_rx),
        stderr: recv_bounded(&err_rx),
    })
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    } else {
        let _ = tx.send(Vec::new());
    }
    rx
}

fn recv_bounded(rx: &mpsc::Receiver<Vec<u8>>) -> Vec<u8> {
    rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default()
}

/// Checks that a bounded run exited 0, turning a failure into [`LabError::Command`].
pub(crate) fn check(what: &str, out: Output) -> Result<Output> {
    if out.status.success() {
        Ok(out)
    } else {
        let status = match (out.status.code(), out.status.signal()) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(s)) => format!("signal {s}"),
            _ => "unknown".into(),
        };
        Err(LabError::Command {
            command: what.to_string(),
            status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
