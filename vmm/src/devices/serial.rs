//! COM1: a 16550 UART (vm-superio) whose interrupt line is an irqfd on GSI 4 and whose
//! output goes to a file, the VMM's stdout, or nowhere.

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::PioDevice;

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_LEN: u16 = 8;
pub const COM1_GSI: u32 = 4;

/// Raises the UART's interrupt by signalling the irqfd KVM injects from.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type SerialOutput = Box<dyn Write + Send>;

pub struct SerialDevice {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, SerialOutput>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: SerialOutput) -> Self {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }
}

impl PioDevice for SerialDevice {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let value = u8::try_from(offset)
            .map(|o| self.uart.read(o))
            .unwrap_or(0xff);
        data.fill(value);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let Ok(offset) = u8::try_from(offset) else {
            return;
        };
        // `rep outsb` delivers several bytes in one exit; each is a separate register write.
        for byte in data {
            if let Err(e) = self.uart.write(offset, *byte) {
                log::warn!("serial output failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmit_reaches_output() {
        let out = Shared::default();
        let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(out.clone()));
        dev.write(0, b"TG");
        assert_eq!(&*out.0.lock().unwrap(), b"TG");
    }
}
