//! The test guest (`test_infra/guest`, documented in `docs/test_guest.md`): a
//! freestanding PVH kernel built from source by this crate's build script.

use std::fmt;
use std::path::PathBuf;

/// Absolute path of the test guest ELF, built by `test_infra`'s build script.
pub fn elf_path() -> PathBuf {
    PathBuf::from(env!("GUEST_ELF"))
}

/// What the guest does with its memory (`mode=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Write every page once, then only verify.
    Fill,
    /// Keep rewriting pages at `rate` MiB/s while verifying.
    Dirty,
    /// Fill once, then only halt and tick.
    Idle,
}

/// The guest's kernel command line. `Display` gives the `--cmdline` string; fields left
/// `None` take the guest's defaults (mem=64M mode=dirty rate=64 tick=500, random seed).
#[derive(Clone, Debug, Default)]
pub struct Cmdline {
    /// Workload region in bytes (`mem=`).
    pub mem: Option<u64>,
    pub mode: Option<Mode>,
    /// Dirty mode: MiB rewritten per second over the whole VM, 0 = flat out (`rate=`).
    pub rate: Option<u64>,
    /// Milliseconds between `TG tick` lines (`tick=`).
    pub tick_ms: Option<u64>,
    /// Pattern seed (`seed=`).
    pub seed: Option<u64>,
    /// Reset through the i8042 (port 0x64, 0xFE) after this many tick lines.
    pub exit_after: Option<u64>,
    /// LAPIC timer frequency, 1..=1000 (`hz=`, default 100).
    pub hz: Option<u64>,
}

impl fmt::Display for Cmdline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        let mut put = |f: &mut fmt::Formatter<'_>, key: &str, val: &dyn fmt::Display| {
            let r = write!(f, "{sep}{key}={val}");
            sep = " ";
            r
        };
        if let Some(v) = self.mem {
            put(f, "mem", &v)?;
        }
        if let Some(m) = self.mode {
            let name = match m {
                Mode::Fill => "fill",
                Mode::Dirty => "dirty",
                Mode::Idle => "idle",
            };
            put(f, "mode", &name)?;
        }
        for (key, val) in [
            ("rate", self.rate),
            ("tick", self.tick_ms),
            ("seed", self.seed),
            ("exit_after", self.exit_after),
            ("hz", self.hz),
        ] {
            if let Some(v) = val {
                put(f, key, &v)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_exists_and_has_pvh_note() {
        let elf = std::fs::read(elf_path()).expect("guest ELF built by build.rs");
        assert_eq!(&elf[..4], b"\x7fELF");
        // The PVH entry note: namesz 4, descsz 4, type 18, "Xen\0", entry 0x100000.
        let note = [
            4u8, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0, 0, 0, 0x10, 0,
        ];
        assert!(elf.windows(note.len()).any(|w| w == note));
    }

    #[test]
    fn cmdline_string() {
        let c = Cmdline {
            mem: Some(16 << 20),
            mode: Some(Mode::Fill),
            tick_ms: Some(200),
            exit_after: Some(3),
            ..Default::default()
        };
        assert_eq!(
            c.to_string(),
            "mem=16777216 mode=fill tick=200 exit_after=3"
        );
        assert_eq!(Cmdline::default().to_string(), "");
    }
}
