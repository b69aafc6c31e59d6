//! The agent's local admin socket: a Unix socket that answers every connection with the
//! agent's latest status as JSON (what the status file holds: sync figures, counters and
//! every programmed frontend with its Service's name), then closes it. `kpr status` and
//! `kpr trace` read the live maps themselves and ask here only for what the maps do not hold
//! (which Service a frontend belongs to), so they work while the agent is down too.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where the agent serves it unless told otherwise (`--admin-socket`).
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/kpr/admin.sock";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {0}: {1}")]
    Io(PathBuf, io::Error),
}

/// The serving side: [`AdminSocket::publish`] replaces what connections get.
#[derive(Clone)]
pub struct AdminSocket {
    latest: Arc<Mutex<Arc<Vec<u8>>>>,
}

impl AdminSocket {
    /// Binds `path` (replacing a socket an earlier agent left) and answers connections on a
    /// thread of its own.
    pub fn serve(path: &Path) -> Result<AdminSocket, AdminError> {
        let err = |e| AdminError::Io(path.to_path_buf(), e);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        let latest: Arc<Mutex<Arc<Vec<u8>>>> = Arc::new(Mutex::new(Arc::new(b"{}".to_vec())));
        let served = latest.clone();
        std::thread::Builder::new()
            .name("kpr-admin".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut conn) = conn else { continue };
                    let body = served.lock().map(|b| b.clone()).unwrap_or_default();
                    let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
                    // A client that went away is its own problem.
                    let _ = conn.write_all(&body);
                }
            })
            .map_err(err)?;
        Ok(AdminSocket { latest })
    }

    /// What the next connections get.
    pub fn publish(&self, json: Vec<u8>) {
        if let Ok(mut l) = self.latest.lock() {
            *l = Arc::new(json);
        }
    }
}

/// Reads the agent's status from the socket at `path`.
pub fn query(path: &Path, timeout: Duration) -> Result<Vec<u8>, AdminError> {
    let err = |e| AdminError::Io(path.to_path_buf(), e);
    let mut s = UnixStream::connect(path).map_err(err)?;
    s.set_read_timeout(Some(timeout)).map_err(err)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(err)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_the_latest_published_status_and_replaces_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/admin.sock");
        let first = AdminSocket::serve(&path).unwrap();
        assert_eq!(query(&path, Duration::from_secs(2)).unwrap(), b"{}");
        first.publish(b"{\"syncs\":1}".to_vec());
        assert_eq!(
            query(&path, Duration::from_secs(2)).unwrap(),
            b"{\"syncs\":1}"
        );
        // A restarted agent takes the path over.
        let second = AdminSocket::serve(&path).unwrap();
        second.publish(b"{\"syncs\":2}".to_vec());
        assert_eq!(
            query(&path, Duration::from_secs(2)).unwrap(),
            b"{\"syncs\":2}"
        );
        assert!(query(&dir.path().join("none.sock"), Duration::from_secs(1)).is_err());
    }
}
