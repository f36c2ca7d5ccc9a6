//! Snapshot names and generations: `vm1` names a VM's snapshots, `vm1@3` its third
//! generation. A name is 1 to 64 characters of `[A-Za-z0-9._-]`, not starting with `.`.

use std::fmt;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{0:?} is not a snapshot name: 1 to 64 characters of A-Z a-z 0-9 . _ -, not \
         starting with '.', optionally @<generation>"
    )]
    Name(String),
}

pub const MANIFESTS: &str = "manifests/";

/// A name and a generation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GenName {
    pub name: String,
    pub generation: u64,
}

impl fmt::Display for GenName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.generation)
    }
}

impl GenName {
    /// The backend key of the manifest.
    pub fn key(&self) -> String {
        format!("{MANIFESTS}{self}")
    }

    /// The generation a manifest key names, if it is one.
    pub fn from_key(key: &str) -> Option<GenName> {
        key.strip_prefix(MANIFESTS)?.parse().ok()
    }
}

pub fn check_name(name: &str) -> Result<(), Error> {
    let ok = (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Name(name.to_string()))
    }
}

/// `vm1` (no generation: the latest) or `vm1@N`, N ≥ 1.
pub fn parse_ref(s: &str) -> Result<(String, Option<u64>), Error> {
    match s.split_once('@') {
        None => check_name(s).map(|()| (s.to_string(), None)),
        Some((name, number)) => {
            check_name(name)?;
            let g: u64 = number
                .parse()
                .ok()
                .filter(|&g| g >= 1 && !number.starts_with('0') && !number.starts_with('+'))
                .ok_or_else(|| Error::Name(s.to_string()))?;
            Ok((name.to_string(), Some(g)))
        }
    }
}

impl std::str::FromStr for GenName {
    type Err = Error;
    fn from_str(s: &str) -> Result<GenName, Error> {
        match parse_ref(s)? {
            (name, Some(generation)) => Ok(GenName { name, generation }),
            (_, None) => Err(Error::Name(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse_ref("vm1").unwrap(), ("vm1".into(), None));
        assert_eq!(
            parse_ref("vm-1.a_b@12").unwrap(),
            ("vm-1.a_b".into(), Some(12))
        );
        for bad in [
            "", ".x", "a/b", "a@", "a@0", "a@01", "a@-1", "a@+1", "a@1@2", "a b",
        ] {
            assert!(parse_ref(bad).is_err(), "{bad:?}");
        }
        let g: GenName = "vm1@7".parse().unwrap();
        assert_eq!(g.key(), "manifests/vm1@7");
        assert_eq!(GenName::from_key("manifests/vm1@7"), Some(g));
        assert_eq!(GenName::from_key("manifests/vm1"), None);
        assert!(check_name(&"a".repeat(65)).is_err());
    }
}
