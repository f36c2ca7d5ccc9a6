//! How a component tells its owner something happened, without knowing the owner's
//! event type: a vCPU, a device or a memory filler holds a [`Notifier`] for its own
//! notice type, and the control loop makes one that wraps each notice into its event
//! and sends it down its single channel. So the modules below the control loop never
//! name the control loop's event enum.

use std::fmt;
use std::sync::{Arc, mpsc};

/// What the VM's own threads report to whoever runs the VM.
#[derive(Debug)]
pub enum VmNotice {
    /// The guest asked for a reset (i8042 0xFE): this VMM shuts down cleanly (the test
    /// guest's way to end a run). A triple fault is a `VcpuFailed` instead.
    GuestReset,
    /// A vCPU thread hit an error it cannot recover from.
    VcpuFailed {
        id: u8,
        error: crate::errors::BoxError,
    },
    /// Guest RAM cannot be filled (on-demand restore): the VM must stop rather than run
    /// on missing pages.
    MemoryFailed { error: crate::errors::BoxError },
}

/// Sends notices of type `T` to an owner's channel, whatever that channel carries.
pub struct Notifier<T> {
    send: Arc<dyn Fn(T) -> bool + Send + Sync>,
}

impl<T: 'static> Notifier<T> {
    /// Notices go into `channel` as `E`s.
    pub fn new<E>(channel: mpsc::Sender<E>) -> Self
    where
        E: From<T> + Send + 'static,
    {
        Notifier {
            send: Arc::new(move |notice| channel.send(E::from(notice)).is_ok()),
        }
    }

    /// Sends `notice`; false when the owner no longer listens (it is shutting down, and
    /// then nobody needs to hear it).
    pub fn send(&self, notice: T) -> bool {
        (self.send)(notice)
    }
}

impl<T> Clone for Notifier<T> {
    fn clone(&self) -> Self {
        Notifier {
            send: Arc::clone(&self.send),
        }
    }
}

impl<T> fmt::Debug for Notifier<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Notifier")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum Owner {
        Vm(&'static str),
    }

    impl From<&'static str> for Owner {
        fn from(s: &'static str) -> Self {
            Owner::Vm(s)
        }
    }

    #[test]
    fn notices_arrive_wrapped_and_a_gone_owner_is_reported() {
        let (tx, rx) = mpsc::channel::<Owner>();
        let notifier = Notifier::<&'static str>::new(tx);
        assert!(notifier.clone().send("reset"));
        assert_eq!(rx.recv().unwrap(), Owner::Vm("reset"));
        drop(rx);
        assert!(!notifier.send("late"));
    }
}
