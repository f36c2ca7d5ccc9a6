//! Typed parsers for the test guest's serial lines (`test-guest.md`, "Serial output"):
//!
//! ```text
//! TG boot nonce=<hex> cpus=<n> mem=<bytes> mode=<mode>
//! TG ready pages=<n>
//! TG tick n=<n> nonce=<hex> gen=<total writes> verified=<pages> errors=<n>
//! TG error page=<idx> gpa=<hex> want_gen=<n> got_gen=<n> reason=<zero|stale|corrupt>
//! ```
//!
//! Keys the spec does not name are kept in `extra`, so a guest that prints more evidence
//! (e.g. per-vCPU counters) does not break the parsers and tests can still look at it.

use std::collections::BTreeMap;
use std::fmt;

/// Why a `TG ...` line could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not a `TG {kind}` line: {line:?}")]
    WrongKind { kind: &'static str, line: String },
    #[error("`TG {kind}` line lacks `{key}=`: {line:?}")]
    MissingKey {
        kind: &'static str,
        key: &'static str,
        line: String,
    },
    #[error("`TG {kind}` line has a bad value for `{key}`: {value:?}")]
    BadValue {
        kind: &'static str,
        key: &'static str,
        value: String,
    },
}

/// The `key=value` words after `TG <kind>`, and where the line came from.
struct Fields<'a> {
    kind: &'static str,
    line: &'a str,
    map: BTreeMap<&'a str, &'a str>,
}

impl<'a> Fields<'a> {
    /// Finds `TG <kind>` anywhere in `line` (serial output can carry leftovers from
    /// before the guest's first newline) and splits the rest into `key=value` words.
    fn parse(kind: &'static str, line: &'a str) -> Result<Fields<'a>, ParseError> {
        let start = line.find("TG ").ok_or_else(|| ParseError::WrongKind {
            kind,
            line: line.to_string(),
        })?;
        let mut words = line[start + 3..].split_ascii_whitespace();
        if words.next() != Some(kind) {
            return Err(ParseError::WrongKind {
                kind,
                line: line.to_string(),
            });
        }
        let map = words.filter_map(|w| w.split_once('=')).collect();
        Ok(Fields { kind, line, map })
    }

    fn str(&self, key: &'static str) -> Result<&'a str, ParseError> {
        self.map
            .get(key)
            .copied()
            .ok_or_else(|| ParseError::MissingKey {
                kind: self.kind,
                key,
                line: self.line.to_string(),
            })
    }

    fn bad(&self, key: &'static str, value: &str) -> ParseError {
        ParseError::BadValue {
            kind: self.kind,
            key,
            value: value.to_string(),
        }
    }

    /// Decimal, or hex with a `0x` prefix.
    fn num(&self, key: &'static str) -> Result<u64, ParseError> {
        let v = self.str(key)?;
        let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => v.parse(),
        };
        parsed.map_err(|_| self.bad(key, v))
    }

    /// Hex, with or without a `0x` prefix (the spec writes `<hex>`).
    fn hex(&self, key: &'static str) -> Result<u64, ParseError> {
        let v = self.str(key)?;
        let digits = v
            .strip_prefix("0x")
            .or_else(|| v.strip_prefix("0X"))
            .unwrap_or(v);
        u64::from_str_radix(digits, 16).map_err(|_| self.bad(key, v))
    }

    fn extra(&self, known: &[&str]) -> BTreeMap<String, String> {
        self.map
            .iter()
            .filter(|(k, _)| !known.contains(k))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

/// `TG boot nonce=<hex> cpus=<n> mem=<bytes> mode=<mode>`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    pub nonce: u64,
    pub cpus: u32,
    pub mem: u64,
    pub mode: String,
    pub extra: BTreeMap<String, String>,
}

impl Boot {
    pub fn parse(line: &str) -> Result<Boot, ParseError> {
        let f = Fields::parse("boot", line)?;
        let cpus = f.num("cpus")?;
        Ok(Boot {
            nonce: f.hex("nonce")?,
            cpus: u32::try_from(cpus).map_err(|_| f.bad("cpus", &cpus.to_string()))?,
            mem: f.num("mem")?,
            mode: f.str("mode")?.to_string(),
            extra: f.extra(&["nonce", "cpus", "mem", "mode"]),
        })
    }
}

/// `TG ready pages=<n>`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub pages: u64,
    pub extra: BTreeMap<String, String>,
}

impl Ready {
    pub fn parse(line: &str) -> Result<Ready, ParseError> {
        let f = Fields::parse("ready", line)?;
        Ok(Ready {
            pages: f.num("pages")?,
            extra: f.extra(&["pages"]),
        })
    }
}

/// `TG tick n=<n> nonce=<hex> gen=<total writes> verified=<pages> errors=<n>`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tick {
    pub n: u64,
    pub nonce: u64,
    /// `gen=`: total page writes so far.
    pub generation: u64,
    pub verified: u64,
    pub errors: u64,
    pub extra: BTreeMap<String, String>,
}

impl Tick {
    pub fn parse(line: &str) -> Result<Tick, ParseError> {
        let f = Fields::parse("tick", line)?;
        Ok(Tick {
            n: f.num("n")?,
            nonce: f.hex("nonce")?,
            generation: f.num("gen")?,
            verified: f.num("verified")?,
            errors: f.num("errors")?,
            extra: f.extra(&["n", "nonce", "gen", "verified", "errors"]),
        })
    }
}

/// Why the guest's verifier rejected a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorReason {
    Zero,
    Stale,
    Corrupt,
    Other(String),
}

impl fmt::Display for ErrorReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorReason::Zero => f.write_str("zero"),
            ErrorReason::Stale => f.write_str("stale"),
            ErrorReason::Corrupt => f.write_str("corrupt"),
            ErrorReason::Other(s) => f.write_str(s),
        }
    }
}

/// `TG error page=<idx> gpa=<hex> want_gen=<n> got_gen=<n> reason=<zero|stale|corrupt>`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestError {
    pub page: u64,
    pub gpa: u64,
    pub want_gen: u64,
    pub got_gen: u64,
    pub reason: ErrorReason,
    pub extra: BTreeMap<String, String>,
}

impl GuestError {
    pub fn parse(line: &str) -> Result<GuestError, ParseError> {
        let f = Fields::parse("error", line)?;
        let reason = match f.str("reason")? {
            "zero" => ErrorReason::Zero,
            "stale" => ErrorReason::Stale,
            "corrupt" => ErrorReason::Corrupt,
            other => ErrorReason::Other(other.to_string()),
        };
        Ok(GuestError {
            page: f.num("page")?,
            gpa: f.hex("gpa")?,
            want_gen: f.num("want_gen")?,
            got_gen: f.num("got_gen")?,
            reason,
            extra: f.extra(&["page", "gpa", "want_gen", "got_gen", "reason"]),
        })
    }
}

/// Any guest line, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestLine {
    Boot(Boot),
    Ready(Ready),
    Tick(Tick),
    Error(GuestError),
    /// Not a `TG boot/ready/tick/error` line (other guest output).
    Other(String),
}

impl GuestLine {
    /// Classifies `line`; a line that names a known kind but does not decode is an error,
    /// because that is a guest (or serial) bug a test must see.
    pub fn parse(line: &str) -> Result<GuestLine, ParseError> {
        let kind = line
            .find("TG ")
            .and_then(|i| line[i + 3..].split_ascii_whitespace().next());
        match kind {
            Some("boot") => Boot::parse(line).map(GuestLine::Boot),
            Some("ready") => Ready::parse(line).map(GuestLine::Ready),
            Some("tick") => Tick::parse(line).map(GuestLine::Tick),
            Some("error") => GuestError::parse(line).map(GuestLine::Error),
            _ => Ok(GuestLine::Other(line.to_string())),
        }
    }
}

/// True if `line` is a `TG <kind> ...` line.
pub fn is_kind(line: &str, kind: &str) -> bool {
    line.find("TG ")
        .and_then(|i| line[i + 3..].split_ascii_whitespace().next())
        == Some(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_kinds() {
        let b = Boot::parse("TG boot nonce=1a2b cpus=4 mem=16777216 mode=dirty").unwrap();
        assert_eq!(
            (b.nonce, b.cpus, b.mem, b.mode.as_str()),
            (0x1a2b, 4, 16 << 20, "dirty")
        );
        let b = Boot::parse("\0garbageTG boot nonce=0xff cpus=1 mem=0x1000 mode=idle\r").unwrap();
        assert_eq!((b.nonce, b.cpus, b.mem), (0xff, 1, 0x1000));
        assert_eq!(Ready::parse("TG ready pages=4096").unwrap().pages, 4096);
        let t =
            Tick::parse("TG tick n=7 nonce=deadbeef gen=100 verified=50 errors=0 cpu0=3").unwrap();
        assert_eq!(
            (t.n, t.nonce, t.generation, t.verified, t.errors),
            (7, 0xdeadbeef, 100, 50, 0)
        );
        assert_eq!(t.extra.get("cpu0").map(String::as_str), Some("3"));
        let e = GuestError::parse("TG error page=3 gpa=0x203000 want_gen=5 got_gen=4 reason=stale")
            .unwrap();
        assert_eq!((e.page, e.gpa, e.want_gen, e.got_gen), (3, 0x203000, 5, 4));
        assert_eq!(e.reason, ErrorReason::Stale);
    }

    #[test]
    fn rejects_truncated_and_garbage() {
        assert!(matches!(
            Tick::parse("TG tick n=7 nonce=deadbeef gen=100 verified=50"),
            Err(ParseError::MissingKey { key: "errors", .. })
        ));
        assert!(matches!(
            Tick::parse("TG tick n=x nonce=1 gen=1 verified=1 errors=0"),
            Err(ParseError::BadValue { key: "n", .. })
        ));
        assert!(matches!(
            Tick::parse("TG ready pages=1"),
            Err(ParseError::WrongKind { .. })
        ));
        assert!(matches!(Tick::parse(""), Err(ParseError::WrongKind { .. })));
        assert!(Boot::parse("TG boot nonce=zz cpus=1 mem=1 mode=x").is_err());
        assert!(Boot::parse("TG boot nonce=1 cpus=99999999999 mem=1 mode=x").is_err());
        assert_eq!(
            GuestLine::parse("hello").unwrap(),
            GuestLine::Other("hello".to_string())
        );
        assert!(GuestLine::parse("TG tick n=").is_err());
        assert!(is_kind("TG tick n=1", "tick"));
        assert!(!is_kind("TG ticker", "tick"));
    }
}
