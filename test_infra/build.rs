//! Builds the test guest (`guest/`, its own cargo root with its own target and rustflags)
//! and publishes its path as `GUEST_ELF`. Fails the build when the guest's ring-0
//! sections contain an instruction the PVM host's emulator cannot run.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let guest = manifest.join("guest");
    for p in [
        "src",
        "link.ld",
        "build.rs",
        "Cargo.toml",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", guest.join(p).display());
    }

    let target_dir = out.join("guest-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // cargo reads .cargo/config.toml from the working directory, not --manifest-path.
    // A separate target dir avoids waiting on the outer build's lock.
    cmd.current_dir(&guest)
        .args(["build", "--release", "--target-dir"])
        .arg(&target_dir);
    // The outer build's settings must not reach the guest: RUSTFLAGS would arrive as
    // CARGO_ENCODED_RUSTFLAGS, replace the guest's rustflags and break its static link.
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || matches!(
                key,
                "RUSTFLAGS"
                    | "RUSTC_WRAPPER"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "TARGET"
                    | "HOST"
                    | "PROFILE"
                    | "OUT_DIR"
                    | "OPT_LEVEL"
                    | "DEBUG"
                    | "NUM_JOBS"
            )
        {
            cmd.env_remove(key);
        }
    }
    let status = cmd.status().expect("running cargo for the test guest");
    assert!(
        status.success(),
        "building the test guest failed ({status})"
    );

    let elf = target_dir.join("x86_64-unknown-linux-gnu/release/test_guest");
    let hits = ring0_gate(&elf);
    if !hits.is_empty() {
        panic!(
            "the test guest's ring-0 code contains instructions the PVM host cannot \
             emulate:\n{}",
            hits.join("\n")
        );
    }
    println!("cargo:rustc-env=GUEST_ELF={}", elf.display());
}

/// Disassembles each ring-0 section with the decoder for its CPU mode and returns the
/// lines that use a forbidden instruction (see docs/test_guest.md and
/// scripts/build-guest.sh, which applies the same rule with grep).
fn ring0_gate(elf: &Path) -> Vec<String> {
    let mut hits = Vec::new();
    for (mode, section) in [
        ("i8086", ".r0text16"),
        ("i386", ".r0text32"),
        ("x86-64", ".r0text"),
    ] {
        let out = Command::new("objdump")
            .args(["-d", "--no-show-raw-insn", "-M", mode, "-j", section])
            .arg(elf)
            .output()
            .expect("running objdump (binutils) on the test guest");
        assert!(out.status.success(), "objdump failed on {section}");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut count = 0;
        for line in text.lines() {
            // Instruction lines look like "  100052:\tmovl   $0x10,%eax".
            let Some((addr, insn)) = line.split_once(":\t") else {
                continue;
            };
            if !addr.trim().chars().all(|c| c.is_ascii_hexdigit()) || addr.trim().is_empty() {
                continue;
            }
            count += 1;
            if forbidden(insn) {
                hits.push(format!("{section}: {}", line.trim()));
            }
        }
        assert!(count > 0, "objdump found no instructions in {section}");
    }
    hits
}

fn forbidden(insn: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "lock", "rep", "repz", "repnz", "repe", "repne", "data16", "data32", "addr16", "addr32",
        "cs", "ds", "es", "fs", "gs", "ss", "notrack", "bnd", "xacquire", "xrelease",
    ];
    const BANNED: &[&str] = &[
        "popcnt",
        "lzcnt",
        "tzcnt",
        "andn",
        "bextr",
        "bzhi",
        "pdep",
        "pext",
        "shlx",
        "shrx",
        "sarx",
        "rorx",
        "mulx",
        "rdtscp",
        "rdpid",
        "xgetbv",
        "cmpxchg16b",
        "int",
        "int3",
        "movbe",
        "ldmxcsr",
        "stmxcsr",
        "syscall",
        "sysenter",
        "(bad)",
    ];
    const BANNED_PREFIX: &[&str] = &["bls", "crc32", "xsave", "xrstor", "vzero"];
    if ["%xmm", "%ymm", "%zmm", "%mm", "%st"]
        .iter()
        .any(|r| insn.contains(r))
    {
        return true;
    }
    let Some(m) = insn
        .split_whitespace()
        .find(|t| !PREFIXES.contains(t) && !t.starts_with("rex"))
    else {
        return false;
    };
    // x87 (and its f-prefixed relatives) is banned except fxsave64/fxrstor64, which the
    // emulator handles.
    (m.starts_with('f') && m != "fxsave64" && m != "fxrstor64")
        || BANNED.contains(&m)
        || BANNED_PREFIX.iter().any(|p| m.starts_with(p))
}
