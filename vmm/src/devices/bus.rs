//! Port I/O dispatch. The bus is built once before the vCPUs start and then only read, so
//! vCPU threads share it without a lock; each device has its own mutex.

use std::sync::{Arc, Mutex};

/// A device occupying a range of I/O ports. `offset` is relative to the range start.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}

struct Range {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

#[derive(Default)]
pub struct PioBus {
    ranges: Vec<Range>,
}

#[derive(Debug, thiserror::Error)]
#[error("I/O ports {base:#x}+{len} overlap a device already on the bus")]
pub struct OverlapError {
    pub base: u16,
    pub len: u16,
}

impl PioBus {
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        device: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), OverlapError> {
        let end = u32::from(base) + u32::from(len);
        let overlaps = self.ranges.iter().any(|r| {
            u32::from(base) < u32::from(r.base) + u32::from(r.len) && u32::from(r.base) < end
        });
        if len == 0 || overlaps {
            return Err(OverlapError { base, len });
        }
        self.ranges.push(Range { base, len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(&Range, u16)> {
        self.ranges
            .iter()
            .find(|r| port >= r.base && u32::from(port) < u32::from(r.base) + u32::from(r.len))
            .map(|r| (r, port - r.base))
    }

    /// Reads from the device at `port`; a port nobody decodes floats high (0xff), as on a
    /// real ISA bus. Returns whether a device answered.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some((range, offset)) => {
                lock(&range.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `port`; writes nobody decodes are dropped.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
            Some((range, offset)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device whose lock was poisoned by a panicking vCPU thread is still in a consistent
/// register state (every access is a single register update), so keep using it.
fn lock(device: &Mutex<dyn PioDevice>) -> std::sync::MutexGuard<'_, dyn PioDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u16, u8)>);
    impl PioDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn dispatch_by_range() {
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        let mut bus = PioBus::default();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x3f8, &[7]));
        assert_eq!(dev.lock().unwrap().0, vec![(0, 7)]);
    }

    #[test]
    fn overlap_is_refused() {
        let mut bus = PioBus::default();
        bus.insert(0x60, 4, Arc::new(Mutex::new(Echo(vec![]))))
            .unwrap();
        assert!(
            bus.insert(0x63, 2, Arc::new(Mutex::new(Echo(vec![]))))
                .is_err()
        );
        assert!(
            bus.insert(0x64, 1, Arc::new(Mutex::new(Echo(vec![]))))
                .is_ok()
        );
    }
}
