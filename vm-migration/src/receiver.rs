//! The receiver's side of the main connection, as a phase table: which request may come
//! next (see the crate docs' sequence). Every receiver (a VMM's, a daemon's) walks it;
//! what each does with a request is its own.

use crate::protocol::Command;

/// Where a receiver is in the main connection's sequence. `Abandon` may come in any
/// phase and is not in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReceiverPhase {
    /// Connected; `Start` comes first.
    Established,
    /// `Start` accepted: `MemoryFd`s, then `Config`.
    Started,
    /// `Config` accepted: `Memory` tables, then `State`.
    Configured,
    /// `State` accepted: `Complete` or `CompletePaused` ends the migration.
    StateReceived,
}

impl ReceiverPhase {
    /// The phase after `command`, or `None` if the protocol does not allow `command`
    /// here. `Complete` and `CompletePaused` leave the phase as it is: they end the
    /// connection.
    pub fn next(self, command: Command) -> Option<ReceiverPhase> {
        use ReceiverPhase::*;
        match (self, command) {
            (Established, Command::Start) => Some(Started),
            (Started, Command::MemoryFd) => Some(Started),
            (Started, Command::Config) => Some(Configured),
            (Configured, Command::Memory) => Some(Configured),
            (Configured, Command::State) => Some(StateReceived),
            (StateReceived, Command::Complete | Command::CompletePaused) => Some(StateReceived),
            _ => None,
        }
    }

    /// What the protocol allows next, for an error about an out-of-order request.
    pub fn expects(self) -> &'static str {
        match self {
            ReceiverPhase::Established => "Start",
            ReceiverPhase::Started => "MemoryFd or Config",
            ReceiverPhase::Configured => "Memory or State",
            ReceiverPhase::StateReceived => "Complete or CompletePaused",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The main sequence walks the table to its end; each phase refuses the rest, and
    /// `expects` names exactly what `next` allows.
    #[test]
    fn table_follows_the_protocol_sequence() {
        use Command::*;
        let sequence = [Start, MemoryFd, MemoryFd, Config, Memory, State, Complete];
        let mut phase = ReceiverPhase::Established;
        for c in sequence {
            phase = phase
                .next(c)
                .unwrap_or_else(|| panic!("{c} refused in {phase:?}"));
        }
        assert_eq!(phase, ReceiverPhase::StateReceived);
        let all = [
            Start,
            Config,
            State,
            Memory,
            Complete,
            Abandon,
            MemoryFd,
            CompletePaused,
        ];
        for p in [
            ReceiverPhase::Established,
            ReceiverPhase::Started,
            ReceiverPhase::Configured,
            ReceiverPhase::StateReceived,
        ] {
            for c in all {
                let named = p.expects().split(" or ").any(|n| n == c.to_string());
                assert_eq!(p.next(c).is_some(), named, "{p:?} {c}");
            }
        }
    }
}
