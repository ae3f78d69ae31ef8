//! One error type for everything a user can get wrong. Every variant names the file, key or sample and says what
//! to do; the CLI prints it on one line and exits non-zero. Nothing user-facing panics.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source} ({})", io_hint(.source))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{path}: key `{key}`: {msg}")]
    Key {
        path: PathBuf,
        key: String,
        msg: String,
    },
    #[error("{0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn key(path: impl Into<PathBuf>, key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Key {
            path: path.into(),
            key: key.into(),
            msg: msg.into(),
        }
    }
    pub fn input(msg: impl Into<String>) -> Self {
        Error::Input(msg.into())
    }
}

/// What to do about an I/O error, by its kind.
fn io_hint(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::StorageFull | K::QuotaExceeded => {
            "the disk is full: free space or set `output` to a larger disk, then run again with --resume"
        }
        K::FileTooLarge => {
            "the file outgrew the filesystem's or the process's size limit (`ulimit -f`): raise it or set `output` elsewhere"
        }
        K::ReadOnlyFilesystem => {
            "the filesystem is read-only: set `output` to a writable directory"
        }
        K::PermissionDenied => {
            "permission denied: check the owner and mode of the directory, or set `output` elsewhere"
        }
        _ => "check the path",
    }
}

/// Writes through a temporary file beside `path` and a rename, so a reader (or a run killed mid-write) never sees
/// half a file; errors name the file. The one atomic writer: JSON, reports, caches and lists go through it.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    std::fs::write(&tmp, bytes).map_err(|source| Error::Io {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// `write_atomic` of pretty JSON.
pub fn write_json_atomic(path: &std::path::Path, v: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| Error::file(path, format!("cannot serialize: {e}")))?;
    write_atomic(path, text.as_bytes())
}

/// Reads a file, naming it in the error.
pub fn read(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub fn read_string(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses a JSON file into `T`, naming the file and serde's line/column in the error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = read_string(path)?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}
