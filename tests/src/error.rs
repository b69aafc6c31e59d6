use std::time::Duration;

/// Everything that can go wrong building, using or tearing down a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the lab needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN)")]
    NotRoot,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("command `{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("timed out after {timeout:?}: {what}")]
    Timeout { what: String, timeout: Duration },
    #[error("{0}")]
    Other(String),
}

impl LabError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        LabError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn nix(context: impl Into<String>, errno: nix::errno::Errno) -> Self {
        LabError::Io {
            context: context.into(),
            source: std::io::Error::from_raw_os_error(errno as i32),
        }
    }
}

pub(crate) type Result<T, E = LabError> = std::result::Result<T, E>;
