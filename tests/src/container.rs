//! Running kpr's container image with a real OCI runtime: the image layout is unpacked into a
//! runtime bundle by umoci and run by crun, with the runtime spec adjusted as a DaemonSet's
//! pod spec would (host network namespace of a lab node, the bpffs and cgroup mounts,
//! privileged). crun keeps its state in the bundle's directory and creates no cgroup
//! (`--cgroup-manager=disabled`), so nothing outside the test's directories is touched;
//! [`Container`] kills and deletes the container on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{LabError, Result};
use crate::process::run_bounded;

/// The tag `cargo xtask image` gives the image (`v` and the workspace version).
pub fn image_tag() -> String {
    format!("v{}", env!("CARGO_PKG_VERSION"))
}

/// Where the agent lives in the image.
pub const BINARY_IN_IMAGE: &str = "/usr/local/bin/kpr";

/// The image layout `cargo xtask image` writes: `$KPR_IMAGE_OCI`, else `target/image/oci`
/// beside the kpr binary's profile directory. Fails naming how to build it.
pub fn image_layout() -> PathBuf {
    let p = std::env::var_os("KPR_IMAGE_OCI")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let kpr = crate::kpr::kpr_path();
            let target = kpr
                .parent()
                .and_then(Path::parent)
                .unwrap_or(Path::new("target"));
            target.join("image/oci")
        });
    assert!(
        p.join("index.json").is_file(),
        "no container image at {}: `cargo xtask image` builds it (`cargo xtask test` does \
         too), or set KPR_IMAGE_OCI",
        p.display()
    );
    p
}

/// Every capability by name, in the kernel's numbering (a privileged container gets them all,
/// or all the runtime has: [`privileged_caps`]).
const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// An unpacked image: a runtime bundle (`config.json` and `rootfs/`) in `dir`.
pub struct Container {
    dir: PathBuf,
    id: String,
    started: bool,
}

impl Container {
    /// Unpacks `layout`'s image tagged [`image_tag`] into `dir/bundle`.
    pub fn unpack(layout: &Path, dir: &Path, id: &str) -> Result<Container> {
        std::fs::create_dir_all(dir)
            .map_err(|e| LabError::Other(format!("{}: {e}", dir.display())))?;
        let c = Container {
            dir: dir.to_path_buf(),
            id: id.to_string(),
            started: false,
        };
        let image = format!("{}:{}", layout.display(), image_tag());
        let mut cmd = Command::new("umoci");
        cmd.args(["unpack", "--image", &image]).arg(c.bundle());
        check(
            "umoci unpack",
            run_bounded(cmd, None, Duration::from_secs(60))?,
        )?;
        Ok(c)
    }

    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle")
    }

    /// Edits the bundle's runtime spec.
    pub fn edit_config(&self, f: impl FnOnce(&mut Value)) -> Result<()> {
        let path = self.bundle().join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| LabError::Other(format!("{}: {e}", path.display())))?;
        let mut v: Value = serde_json::from_str(&text)
            .map_err(|e| LabError::Other(format!("{}: {e}", path.display())))?;
        f(&mut v);
        std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap())
            .map_err(|e| LabError::Other(format!("{}: {e}", path.display())))
    }

    /// The process runs `args`, without a terminal.
    pub fn set_args(&self, args: &[&str]) -> Result<()> {
        self.edit_config(|v| {
            v["process"]["args"] = json!(args);
            v["process"]["terminal"] = json!(false);
        })
    }

    /// Privileged, as kpr's DaemonSet runs it: every capability, no masked or read-only
    /// paths, new privileges allowed.
    pub fn set_privileged(&self) -> Result<()> {
        let caps = privileged_caps();
        self.edit_config(|v| {
            for set in [
                "bounding",
                "effective",
                "inheritable",
                "permitted",
                "ambient",
            ] {
                v["process"]["capabilities"][set] = json!(caps);
            }
            v["process"]["noNewPrivileges"] = json!(false);
            let linux = &mut v["linux"];
            if let Some(l) = linux.as_object_mut() {
                l.remove("maskedPaths");
                l.remove("readonlyPaths");
            }
        })
    }

    /// Joins the network namespace at `path` (a lab node's: the DaemonSet's `hostNetwork`).
    pub fn set_netns(&self, path: &Path) -> Result<()> {
        self.edit_config(|v| {
            if let Some(ns) = v["linux"]["namespaces"].as_array_mut() {
                ns.retain(|n| n["type"] != "network");
                ns.push(json!({"type": "network", "path": path}));
            }
        })
    }

    /// Bind-mounts `host` at `container` (read-write, recursive).
    pub fn bind(&self, host: &Path, container: &str) -> Result<()> {
        self.edit_config(|v| {
            if let Some(m) = v["mounts"].as_array_mut() {
                m.push(json!({
                    "destination": container,
                    "type": "bind",
                    "source": host,
                    "options": ["rbind", "rw"],
                }));
            }
        })
    }

    /// crun, in a mount namespace of its own where /sys/fs/cgroup is a plain cgroup v2
    /// mount: crun refuses hosts whose cgroups are "hybrid" (v1 controllers beside a v2
    /// hierarchy, as these machines have) even when it is told to create none. The host's
    /// mounts are untouched.
    fn crun(&self) -> Command {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = Command::new("crun");
        cmd.arg("--root")
            .arg(self.dir.join("crun-state"))
            .arg("--cgroup-manager=disabled");
        // SAFETY: only async-signal-safe calls (unshare, mount) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                use nix::mount::{mount, MsFlags};
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
                mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                    None::<&str>,
                )?;
                mount(
                    Some("cgroup2"),
                    "/sys/fs/cgroup",
                    Some("cgroup2"),
                    MsFlags::empty(),
                    None::<&str>,
                )?;
                Ok(())
            });
        }
        cmd
    }

    /// Runs the container to its end and returns its output.
    pub fn run(&mut self, timeout: Duration) -> Result<Output> {
        let mut cmd = self.crun();
        cmd.args(["run", "--bundle"])
            .arg(self.bundle())
            .arg(&self.id);
        self.started = true;
        run_bounded(cmd, None, timeout)
    }

    /// Starts the container in the background, its output going to `log`.
    pub fn start_detached(&mut self, log: &Path) -> Result<()> {
        let out = std::fs::File::create(log)
            .map_err(|e| LabError::Other(format!("{}: {e}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(|e| LabError::Other(format!("{}: {e}", log.display())))?;
        let mut cmd = self.crun();
        cmd.args(["run", "--detach", "--bundle"])
            .arg(self.bundle())
            .arg(&self.id)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        self.started = true;
        let status = cmd
            .status()
            .map_err(|e| LabError::Other(format!("crun run: {e}")))?;
        if !status.success() {
            return Err(LabError::Other(format!(
                "crun run --detach failed ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            )));
        }
        Ok(())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.started {
            // `delete --force` kills the container's processes first.
            let mut cmd = self.crun();
            cmd.args(["delete", "--force", &self.id]);
            let _ = run_bounded(cmd, None, Duration::from_secs(20));
        }
    }
}

/// The capabilities a privileged container can get here: those in this process's bounding
/// set (a sandbox may lack some, e.g. CAP_SYS_RESOURCE; the runtime cannot grant more).
pub fn privileged_caps() -> Vec<&'static str> {
    let bounding = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        })
        .unwrap_or(u64::MAX);
    ALL_CAPS
        .iter()
        .enumerate()
        .filter(|(bit, _)| bounding & (1 << bit) != 0)
        .map(|(_, c)| *c)
        .collect()
}

fn check(what: &str, out: Output) -> Result<Output> {
    if out.status.success() {
        Ok(out)
    } else {
        Err(LabError::Other(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}
