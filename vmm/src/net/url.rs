//! `unix:<path>` and `tcp:<host>:<port>` migration URLs, parsed once at the API edge.

use std::path::PathBuf;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUrl {
    Unix(PathBuf),
    /// `host:port` as given (a name, an IPv4 address, or `[v6]`), resolved on connect.
    Tcp {
        host: String,
        port: u16,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("{0:?} is not a migration URL (expected unix:<path> or tcp:<host>:<port>)")]
    Scheme(String),
    #[error("{0:?} has an empty path")]
    EmptyPath(String),
    #[error("{0:?} needs <host>:<port>")]
    NoPort(String),
    #[error("{url:?} has an invalid port {port:?}")]
    BadPort { url: String, port: String },
}

impl FromStr for MigrationUrl {
    type Err = UrlError;

    fn from_str(url: &str) -> Result<Self, UrlError> {
        if let Some(path) = url.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(UrlError::EmptyPath(url.into()));
            }
            return Ok(MigrationUrl::Unix(PathBuf::from(path)));
        }
        let Some(rest) = url.strip_prefix("tcp:") else {
            return Err(UrlError::Scheme(url.into()));
        };
        let (host, port) = rest
            .rsplit_once(':')
            .filter(|(h, _)| !h.is_empty())
            .ok_or_else(|| UrlError::NoPort(url.into()))?;
        let port = port.parse().map_err(|_| UrlError::BadPort {
            url: url.into(),
            port: port.into(),
        })?;
        Ok(MigrationUrl::Tcp {
            host: host.trim_start_matches('[').trim_end_matches(']').into(),
            port,
        })
    }
}

impl std::fmt::Display for MigrationUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrationUrl::Unix(p) => write!(f, "unix:{}", p.display()),
            MigrationUrl::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            MigrationUrl::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_and_tcp() {
        assert_eq!(
            "unix:/tmp/m.sock".parse::<MigrationUrl>().unwrap(),
            MigrationUrl::Unix("/tmp/m.sock".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:6000".parse::<MigrationUrl>().unwrap(),
            MigrationUrl::Tcp {
                host: "127.0.0.1".into(),
                port: 6000
            }
        );
        let v6: MigrationUrl = "tcp:[::1]:6000".parse().unwrap();
        assert_eq!(v6.to_string(), "tcp:[::1]:6000");
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "",
            "unix:",
            "tcp:1.2.3.4",
            "tcp::80",
            "tcp:h:99999",
            "file:///x",
            "h:1",
        ] {
            assert!(bad.parse::<MigrationUrl>().is_err(), "{bad}");
        }
    }
}
