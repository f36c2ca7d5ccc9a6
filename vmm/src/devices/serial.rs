//! COM1: a 16550 UART (vm-superio) whose interrupt line is an irqfd on GSI 4 and whose
//! output goes to a file, the VMM's stdout, or nowhere.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::PioDevice;
use crate::state::{self, StateError, Stateful};

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
    uart: Serial<IrqTrigger, NoEvents, SerialOutput>,
    irq: EventFd,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: SerialOutput) -> std::io::Result<Self> {
        Ok(SerialDevice {
            uart: Serial::new(IrqTrigger(irq.try_clone()?), out),
            irq,
        })
    }
}

/// The UART registers and received-but-unread bytes (vm-superio's `SerialState`, which
/// has no serde of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl Stateful for SerialDevice {
    type State = SerialDeviceState;

    fn state_id(&self) -> String {
        "serial".into()
    }

    fn save_state(&self) -> state::Result<SerialDeviceState> {
        let s = self.uart.state();
        Ok(SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        })
    }

    fn restore_state(&mut self, s: SerialDeviceState) -> state::Result<()> {
        let invalid = |reason: String| StateError::Invalid {
            id: "serial".into(),
            reason,
        };
        let trigger = self
            .irq
            .try_clone()
            .map_err(|e| invalid(format!("cannot clone the irqfd: {e}")))?;
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        };
        // The output stays where this VMM's config points it; only registers move.
        let out = std::mem::replace(self.uart.writer_mut(), Box::new(std::io::sink()));
        match Serial::from_state(&state, IrqTrigger(trigger), NoEvents, out) {
            Ok(uart) => {
                self.uart = uart;
                Ok(())
            }
            Err(e) => Err(invalid(format!("{e:?}"))),
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
        let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(out.clone())).unwrap();
        dev.write(0, b"TG");
        assert_eq!(&*out.0.lock().unwrap(), b"TG");
    }

    #[test]
    fn state_round_trip_keeps_output() {
        let out = Shared::default();
        let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(out.clone())).unwrap();
        dev.write(7, &[0x5a]); // scratch register
        dev.write(3, &[0x03]); // 8N1
        let saved = dev.save_state().unwrap();
        assert_eq!(saved.scratch, 0x5a);
        let mut fresh = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(out.clone())).unwrap();
        fresh.restore_state(saved.clone()).unwrap();
        assert_eq!(fresh.save_state().unwrap(), saved);
        fresh.write(0, b"x");
        assert_eq!(&*out.0.lock().unwrap(), b"x");
    }

    #[test]
    fn oversized_fifo_is_refused() {
        let mut dev =
            SerialDevice::new(EventFd::new(0).unwrap(), Box::new(std::io::sink())).unwrap();
        let mut s = dev.save_state().unwrap();
        s.in_buffer = vec![0; 1 << 20];
        assert!(dev.restore_state(s).is_err());
    }
}
