use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not an OCI image layout, an OCI archive or a `docker save` archive", path.display())]
    NotAnImage { path: PathBuf },
    #[error("invalid image: {0}")]
    Invalid(String),
    #[error("{what} does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("no linux/amd64 image among {0}")]
    NoPlatform(String),
    #[error("registry: {0}")]
    Registry(String),
    #[error("not supported: {0}")]
    Unsupported(String),
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}
