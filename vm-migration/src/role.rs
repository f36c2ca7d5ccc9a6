//! Connection roles (spec §3).
//!
//! The first connection a receiver accepts is the *main* connection. It has no prefix: its
//! first bytes are the `Start` request, so "main" is not a [`ConnectionRole`] value and is
//! never written. Every later connection opens with a 2-byte role (u16 LE), then carries
//! that role's traffic. A receiver drops a connection whose role is 0 (`Invalid`) or
//! unknown; [`read_role`] reports both as errors so the caller can close it.

use std::io::{Read, Write};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::framing::read_exact_or_closed;

/// Size of the role prefix on the wire.
pub const ROLE_SIZE: usize = 2;

/// How long Cloud Hypervisor waits for the role of an accepted connection before dropping
/// it. Transports should apply a similar read timeout around [`read_role`].
pub const ROLE_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The most PrecopyMemory connections a Cloud Hypervisor receiver accepts.
pub const MAX_ADDITIONAL_CONNECTIONS: usize = 128;

/// The role of an additional (non-main) connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ConnectionRole {
    /// Sender → receiver `Memory` requests, each answered `Ok`. Opened by the sender after
    /// `Config` was acknowledged and before `State`.
    PrecopyMemory = 1,
    /// Postcopy / on-demand pages. Opened by the source, but the *destination* sends the
    /// `PageFault` requests on it and the source answers.
    Fault = 2,
}

impl ConnectionRole {
    /// Encodes the role prefix.
    pub fn to_bytes(self) -> [u8; ROLE_SIZE] {
        (self as u16).to_le_bytes()
    }

    /// Decodes a role prefix; 0 and unknown values are errors.
    pub fn from_bytes(b: [u8; ROLE_SIZE]) -> Result<Self> {
        match u16::from_le_bytes(b) {
            0 => Err(Error::InvalidConnectionRole),
            1 => Ok(ConnectionRole::PrecopyMemory),
            2 => Ok(ConnectionRole::Fault),
            other => Err(Error::UnknownConnectionRole(other)),
        }
    }
}

/// Writes the role prefix; call it first on every additional connection (after TLS).
pub fn write_role<W: Write>(w: &mut W, role: ConnectionRole) -> Result<()> {
    w.write_all(&role.to_bytes())
        .and_then(|()| w.flush())
        .map_err(Error::io("writing a connection role"))
}

/// Reads the role prefix of a freshly accepted additional connection.
pub fn read_role<R: Read>(r: &mut R) -> Result<ConnectionRole> {
    let mut b = [0u8; ROLE_SIZE];
    read_exact_or_closed(r, &mut b, "a connection role")?;
    ConnectionRole::from_bytes(b)
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    #[test]
    fn spec_prefixes() {
        assert_eq!(ConnectionRole::PrecopyMemory.to_bytes(), [0x01, 0x00]);
        assert_eq!(ConnectionRole::Fault.to_bytes(), [0x02, 0x00]);
    }

    #[test]
    fn round_trip() {
        for role in [ConnectionRole::PrecopyMemory, ConnectionRole::Fault] {
            let mut wire = Vec::new();
            write_role(&mut wire, role).unwrap();
            assert_eq!(read_role(&mut Cursor::new(wire)).unwrap(), role);
        }
    }

    #[test]
    fn invalid_and_unknown_roles() {
        assert!(matches!(
            ConnectionRole::from_bytes([0, 0]),
            Err(Error::InvalidConnectionRole)
        ));
        for n in [3u16, 0x100, u16::MAX] {
            assert!(matches!(
                ConnectionRole::from_bytes(n.to_le_bytes()),
                Err(Error::UnknownConnectionRole(got)) if got == n
            ));
        }
    }

    #[test]
    fn truncated_role() {
        assert!(matches!(
            read_role(&mut Cursor::new(Vec::new())),
            Err(Error::ConnectionClosed { .. })
        ));
        assert!(matches!(
            read_role(&mut Cursor::new(vec![1])),
            Err(Error::Truncated {
                got: 1,
                expected: 2,
                ..
            })
        ));
    }
}
