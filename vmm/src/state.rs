//! The VM state tree: one JSON node per component (each vCPU, the VM-wide KVM state, each
//! device), under a format version. Every component implements `Stateful`; the tree
//! refuses missing, duplicate and unknown components, so a snapshot from a different VM
//! shape or format fails with a clear error instead of restoring a garbled guest.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Bumped on any incompatible change to any component's state.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "state format version {found} is not supported (this VMM reads version {FORMAT_VERSION})"
    )]
    Version { found: u32 },
    #[error("component {0} appears twice in the state")]
    Duplicate(String),
    #[error("component {0} is missing from the state")]
    Missing(String),
    #[error("the state has components this VM does not have: {0:?}")]
    Unknown(Vec<String>),
    #[error("cannot encode the state of {id}")]
    Encode {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the state of {id} is malformed")]
    Decode {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the state of {id} is invalid: {reason}")]
    Invalid { id: String, reason: String },
    #[error("cannot read the state of {id} from KVM ({call})")]
    KvmGet {
        id: String,
        call: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot load the state of {id} into KVM ({call})")]
    KvmSet {
        id: String,
        call: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

pub type Result<T> = std::result::Result<T, StateError>;

/// A component whose state can be saved and later applied to a freshly built instance of
/// the same component (built from the same config). No default bodies: a component that
/// forgets its state does not compile.
pub trait Stateful {
    type State: Serialize + DeserializeOwned;

    /// Unique key of this component in the tree (e.g. `vcpu-0`, `serial`).
    fn state_id(&self) -> String;
    fn save_state(&self) -> Result<Self::State>;
    /// Checks `state` (bounds, lengths) and applies it; an error leaves no partial state
    /// the caller would run.
    fn restore_state(&mut self, state: Self::State) -> Result<()>;
}

/// Each component's node is kept as its raw JSON text until that component decodes it:
/// no intermediate value tree is built, which is most of the cost of reading a state
/// (it sits in a migration's downtime).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StateTree {
    pub format_version: u32,
    pub components: BTreeMap<String, Box<RawValue>>,
}

impl StateTree {
    pub fn new() -> Self {
        StateTree {
            format_version: FORMAT_VERSION,
            components: BTreeMap::new(),
        }
    }

    /// Adds an already saved component.
    pub fn insert<T: Serialize>(&mut self, id: String, state: &T) -> Result<()> {
        if self.components.contains_key(&id) {
            return Err(StateError::Duplicate(id));
        }
        let value =
            serde_json::value::to_raw_value(state).map_err(|source| StateError::Encode {
                id: id.clone(),
                source,
            })?;
        self.components.insert(id, value);
        Ok(())
    }

    /// Saves `component` into the tree.
    pub fn save<S: Stateful>(&mut self, component: &S) -> Result<()> {
        let state = component.save_state()?;
        self.insert(component.state_id(), &state)
    }

    /// Removes and decodes the node `id`.
    pub fn take<T: DeserializeOwned>(&mut self, id: &str) -> Result<T> {
        self.take_if_present(id)?
            .ok_or_else(|| StateError::Missing(id.to_string()))
    }

    /// Removes and decodes the node `id` if the tree has one.
    pub fn take_if_present<T: DeserializeOwned>(&mut self, id: &str) -> Result<Option<T>> {
        let Some(raw) = self.components.remove(id) else {
            return Ok(None);
        };
        serde_json::from_str(raw.get())
            .map(Some)
            .map_err(|source| StateError::Decode {
                id: id.to_string(),
                source,
            })
    }

    /// Takes `component`'s node out of the tree and applies it.
    pub fn restore<S: Stateful>(&mut self, component: &mut S) -> Result<()> {
        let state = self.take(&component.state_id())?;
        component.restore_state(state)
    }

    pub fn check_version(&self) -> Result<()> {
        if self.format_version == FORMAT_VERSION {
            Ok(())
        } else {
            Err(StateError::Version {
                found: self.format_version,
            })
        }
    }

    /// After every component took its node: anything left over is unknown to this VM.
    pub fn finish(self) -> Result<()> {
        if self.components.is_empty() {
            Ok(())
        } else {
            Err(StateError::Unknown(self.components.into_keys().collect()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counter {
        id: u8,
        value: u32,
    }

    impl Stateful for Counter {
        type State = u32;
        fn state_id(&self) -> String {
            format!("counter-{}", self.id)
        }
        fn save_state(&self) -> Result<u32> {
            Ok(self.value)
        }
        fn restore_state(&mut self, state: u32) -> Result<()> {
            if state > 100 {
                return Err(StateError::Invalid {
                    id: self.state_id(),
                    reason: "too large".into(),
                });
            }
            self.value = state;
            Ok(())
        }
    }

    #[test]
    fn round_trip() {
        let mut tree = StateTree::new();
        tree.save(&Counter { id: 0, value: 7 }).unwrap();
        let json = serde_json::to_string(&tree).unwrap();
        let mut back: StateTree = serde_json::from_str(&json).unwrap();
        back.check_version().unwrap();
        let mut c = Counter { id: 0, value: 0 };
        back.restore(&mut c).unwrap();
        assert_eq!(c.value, 7);
        back.finish().unwrap();
    }

    #[test]
    fn refuses_duplicate_missing_unknown_and_version() {
        let mut tree = StateTree::new();
        tree.save(&Counter { id: 0, value: 1 }).unwrap();
        assert!(matches!(
            tree.save(&Counter { id: 0, value: 1 }),
            Err(StateError::Duplicate(_))
        ));
        let mut other = Counter { id: 1, value: 0 };
        assert!(matches!(
            tree.restore(&mut other),
            Err(StateError::Missing(_))
        ));
        assert!(matches!(
            tree.clone().finish(),
            Err(StateError::Unknown(ids)) if ids == vec!["counter-0".to_string()]
        ));
        tree.format_version = 99;
        assert!(matches!(
            tree.check_version(),
            Err(StateError::Version { found: 99 })
        ));
    }

    #[test]
    fn invalid_and_malformed_nodes_are_errors() {
        let mut tree = StateTree::new();
        tree.insert("counter-0".into(), &1000u32).unwrap();
        let mut c = Counter { id: 0, value: 0 };
        assert!(matches!(
            tree.restore(&mut c),
            Err(StateError::Invalid { .. })
        ));
        tree.insert("counter-0".into(), &"text").unwrap();
        assert!(matches!(
            tree.restore(&mut c),
            Err(StateError::Decode { .. })
        ));
    }
}
