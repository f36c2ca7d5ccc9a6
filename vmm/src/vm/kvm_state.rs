//! VM-wide in-kernel state: both PICs, the IOAPIC, the PIT and the KVM clock.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data, kvm_irqchip,
    kvm_pit_state2,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::state::{Result, StateError, Stateful};

pub const STATE_ID: &str = "kvm-vm";

#[derive(Debug, Serialize, Deserialize)]
pub struct KvmVmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The VM fd seen as a state component.
pub struct KvmVm<'a>(pub &'a VmFd);

fn get_err(call: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |source| StateError::KvmGet {
        id: STATE_ID.into(),
        call,
        source,
    }
}

fn set_err(call: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |source| StateError::KvmSet {
        id: STATE_ID.into(),
        call,
        source,
    }
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(get_err("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

impl Stateful for KvmVm<'_> {
    type State = KvmVmState;

    fn state_id(&self) -> String {
        STATE_ID.into()
    }

    fn save_state(&self) -> Result<KvmVmState> {
        Ok(KvmVmState {
            pic_master: get_chip(self.0, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_chip(self.0, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_chip(self.0, KVM_IRQCHIP_IOAPIC)?,
            pit: self.0.get_pit2().map_err(get_err("KVM_GET_PIT2"))?,
            clock: self.0.get_clock().map_err(get_err("KVM_GET_CLOCK"))?,
        })
    }

    fn restore_state(&mut self, state: KvmVmState) -> Result<()> {
        for (chip, want) in [
            (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&state.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if chip.chip_id != want {
                return Err(StateError::Invalid {
                    id: STATE_ID.into(),
                    reason: format!("irqchip {} found where chip {want} belongs", chip.chip_id),
                });
            }
            self.0
                .set_irqchip(chip)
                .map_err(set_err("KVM_SET_IRQCHIP"))?;
        }
        self.0
            .set_pit2(&state.pit)
            .map_err(set_err("KVM_SET_PIT2"))?;
        // KVM_SET_CLOCK only accepts the flags it can act on; the saved ones describe the
        // source host's clock (e.g. TSC_STABLE) and must not be handed back.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.0.set_clock(&clock).map_err(set_err("KVM_SET_CLOCK"))
    }
}
