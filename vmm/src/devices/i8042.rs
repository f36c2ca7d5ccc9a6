//! The i8042 keyboard controller, reduced to what guests use it for: the 0xFE command on
//! port 0x64 pulses the CPU reset line. This VMM treats that as "the guest is done" and
//! shuts down cleanly.

use super::PioDevice;
use crate::events::{Notifier, VmNotice};

/// Ports 0x61..=0x64 (system control port B and the controller), like Cloud Hypervisor.
pub const I8042_BASE: u16 = 0x61;
pub const I8042_LEN: u16 = 4;
const COMMAND_OFFSET: u16 = 3;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    events: Notifier<VmNotice>,
}

impl I8042 {
    pub fn new(events: Notifier<VmNotice>) -> Self {
        I8042 { events }
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so guests never wait on us.
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            log::info!("i8042 reset signalled by the guest");
            // The control loop may already be gone while the VMM exits; nothing to do then.
            let _ = self.events.send(VmNotice::GuestReset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_reaches_the_vmm() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut dev = I8042::new(Notifier::new(tx));
        dev.write(0, &[CMD_RESET_CPU]);
        assert!(rx.try_recv().is_err());
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert!(matches!(rx.try_recv(), Ok(VmNotice::GuestReset)));
    }
}
