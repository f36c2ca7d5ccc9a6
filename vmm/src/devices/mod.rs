//! Guest devices reached through port I/O, and the bus that dispatches to them.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod serial_sinks;

pub use bus::{PioBus, PioDevice};
