//! The route table: (method, endpoint) -> a handler that turns the request body into an
//! [`ApiRequest`]. Adding an endpoint is one row here, one `ApiRequest` arm and its
//! handling in the VMM.

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{ApiError, ApiRequest};
use crate::config::migration_params::{ReceiveMigrationConfig, SendMigrationConfig};
use crate::config::{RestoreConfig, VmSnapshotConfig, file_url_path};

/// Every endpoint lives under this prefix.
pub const API_PREFIX: &str = "/api/v1/";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

/// Builds the request from the raw body (already bounded in size by the HTTP layer).
pub type Handler = fn(&[u8]) -> Result<ApiRequest, ApiError>;

#[derive(Debug)]
pub struct Route {
    pub method: Method,
    /// The endpoint name after [`API_PREFIX`], e.g. `vm.info`.
    pub endpoint: &'static str,
    pub handler: Handler,
}

pub static ROUTES: &[Route] = &[
    Route {
        method: Method::Get,
        endpoint: "vmm.ping",
        handler: |body| no_body(body, ApiRequest::VmmPing),
    },
    Route {
        method: Method::Put,
        endpoint: "vmm.shutdown",
        handler: |body| no_body(body, ApiRequest::VmmShutdown),
    },
    Route {
        method: Method::Get,
        endpoint: "vm.info",
        handler: |body| no_body(body, ApiRequest::VmInfo),
    },
    Route {
        method: Method::Put,
        endpoint: "vm.pause",
        handler: |body| no_body(body, ApiRequest::VmPause),
    },
    Route {
        method: Method::Put,
        endpoint: "vm.resume",
        handler: |body| no_body(body, ApiRequest::VmResume),
    },
    Route {
        method: Method::Put,
        endpoint: "vm.shutdown",
        handler: |body| no_body(body, ApiRequest::VmShutdown),
    },
    Route {
        method: Method::Put,
        endpoint: "vm.snapshot",
        handler: vm_snapshot,
    },
    Route {
        method: Method::Put,
        endpoint: "vm.restore",
        handler: vm_restore,
    },
    Route {
        method: Method::Put,
        endpoint: "vm.send-migration",
        handler: vm_send_migration,
    },
    Route {
        method: Method::Put,
        endpoint: "vm.receive-migration",
        handler: vm_receive_migration,
    },
    Route {
        method: Method::Put,
        endpoint: "vm.cancel-migration",
        handler: |body| no_body(body, ApiRequest::VmCancelMigration),
    },
];

fn vm_send_migration(body: &[u8]) -> Result<ApiRequest, ApiError> {
    let config: SendMigrationConfig = parse_body(body)?;
    let params = config.params().map_err(|e| ApiError::bad_request(&e))?;
    Ok(ApiRequest::VmSendMigration(Box::new(params)))
}

fn vm_receive_migration(body: &[u8]) -> Result<ApiRequest, ApiError> {
    let config: ReceiveMigrationConfig = parse_body(body)?;
    let params = config.params().map_err(|e| ApiError::bad_request(&e))?;
    Ok(ApiRequest::VmReceiveMigration(params))
}

fn vm_snapshot(body: &[u8]) -> Result<ApiRequest, ApiError> {
    let config: VmSnapshotConfig = parse_body(body)?;
    let destination = file_url_path(&config.destination_url)
        .map_err(|e| ApiError::BadRequest(format!("destination_url: {e}").into()))?;
    Ok(ApiRequest::VmSnapshot { destination })
}

fn vm_restore(body: &[u8]) -> Result<ApiRequest, ApiError> {
    let config: RestoreConfig = parse_body(body)?;
    let params = config.params().map_err(|e| ApiError::bad_request(&e))?;
    Ok(ApiRequest::VmRestore(params))
}

/// Why no route matched.
#[derive(Debug, PartialEq, Eq)]
pub enum RouteError {
    /// No endpoint has this path.
    NotFound,
    /// The endpoint exists; these are the methods it accepts.
    MethodNotAllowed { allowed: Vec<&'static str> },
}

/// Finds the route for `method` and `path` (a full path; any `?query` is ignored).
pub fn find(method: &str, path: &str) -> Result<&'static Route, RouteError> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let endpoint = path.strip_prefix(API_PREFIX).ok_or(RouteError::NotFound)?;
    let mut allowed = Vec::new();
    for route in ROUTES.iter().filter(|r| r.endpoint == endpoint) {
        if route.method.as_str() == method {
            return Ok(route);
        }
        allowed.push(route.method.as_str());
    }
    if allowed.is_empty() {
        Err(RouteError::NotFound)
    } else {
        Err(RouteError::MethodNotAllowed { allowed })
    }
}

/// Decodes a JSON body strictly: unknown fields are a 400 naming the field (the types
/// use `deny_unknown_fields`; every field Cloud Hypervisor defines for the endpoint is
/// known, and the ones we cannot honour are refused by name after decoding).
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}").into()))
}

/// The body of an endpoint that takes no arguments: nothing at all, or `{}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoBody {}

fn no_body(body: &[u8], request: ApiRequest) -> Result<ApiRequest, ApiError> {
    if !body.iter().all(u8::is_ascii_whitespace) {
        parse_body::<NoBody>(body)?;
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_unique() {
        for (i, a) in ROUTES.iter().enumerate() {
            for b in &ROUTES[i + 1..] {
                assert!(
                    a.endpoint != b.endpoint || a.method != b.method,
                    "duplicate route {} {}",
                    a.method.as_str(),
                    a.endpoint
                );
            }
        }
    }

    #[test]
    fn find_routes() {
        let r = find("GET", "/api/v1/vm.info").unwrap();
        assert_eq!((r.handler)(b"").unwrap(), ApiRequest::VmInfo);
        let r = find("PUT", "/api/v1/vm.pause?x=1").unwrap();
        assert_eq!((r.handler)(b"{}").unwrap(), ApiRequest::VmPause);
        assert_eq!(
            find("GET", "/api/v1/vm.nope").unwrap_err(),
            RouteError::NotFound
        );
        assert_eq!(find("GET", "/vm.info").unwrap_err(), RouteError::NotFound);
        assert_eq!(
            find("GET", "/api/v1/vm.pause").unwrap_err(),
            RouteError::MethodNotAllowed {
                allowed: vec!["PUT"]
            }
        );
    }

    #[test]
    fn no_body_rules() {
        assert!(no_body(b"", ApiRequest::VmPause).is_ok());
        assert!(no_body(b" \r\n", ApiRequest::VmPause).is_ok());
        assert!(no_body(b"{}", ApiRequest::VmPause).is_ok());
        let e = no_body(b"{", ApiRequest::VmPause).unwrap_err();
        assert!(matches!(e, ApiError::BadRequest(_)), "{e}");
        let e = no_body(b"{\"force\":true}", ApiRequest::VmPause).unwrap_err();
        assert!(e.to_string().contains("unknown field `force`"), "{e}");
    }
}
