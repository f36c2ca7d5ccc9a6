#!/usr/bin/env bash
# Builds the test guest (test_infra/guest) standalone, exactly as test_infra's build
# script does, checks its ring-0 code for instructions the PVM host cannot emulate, and
# prints the absolute path of the ELF on stdout (everything else goes to stderr).
#
#   ELF=$(scripts/build-guest.sh)
#   cloud-hypervisor --kernel "$ELF" --cmdline "mem=16M tick=200" ...
set -euo pipefail

ws=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
guest="$ws/test_infra/guest"
target_dir="$ws/target/guest"

# The guest has its own target and rustflags (guest/.cargo/config.toml, found from the
# working directory). Outer cargo/rustc settings must not leak in: RUSTFLAGS, for one,
# replaces the guest's rustflags and breaks the static link.
unset RUSTFLAGS RUSTC_WRAPPER RUSTC_WORKSPACE_WRAPPER TARGET PROFILE OUT_DIR
for v in $(env | sed -n 's/^\(CARGO_[A-Za-z0-9_]*\)=.*/\1/p'); do
    [ "$v" = CARGO_HOME ] || unset "$v"
done

(cd "$guest" && "${CARGO:-cargo}" build --release --target-dir "$target_dir" >&2)
elf="$target_dir/x86_64-unknown-linux-gnu/release/test_guest"

# Ring 0 runs in the host's instruction emulator: SSE/x87/BMI/popcnt/int3/xsave... kill
# the VM there (tzcnt/lzcnt silently misbehave). Fail on any of them.
bad='%[xyz]?mm[0-9]|%st|\(bad\)|\s(f(?!xsave64|xrstor64)[a-z0-9]+|popcnt|[lt]zcnt|andn|bextr|bls[a-z]*|bzhi|pdep|pext|shlx|shrx|sarx|rorx|mulx|crc32[a-z]*|rdtscp|rdpid|xgetbv|xsave[a-z0-9]*|xrstor[a-z0-9]*|cmpxchg16b|int3?|movbe|[ls]dmxcsr|vzero[a-z]*|syscall|sysenter)(\s|$)'
status=0
for spec in "i8086 .r0text16" "i386 .r0text32" "x86-64 .r0text"; do
    set -- $spec
    if objdump -d --no-show-raw-insn -M "$1" -j "$2" "$elf" | grep -P '^\s+[0-9a-f]+:' | grep -P "$bad" >&2; then
        echo "build-guest: forbidden ring-0 instruction(s) in $2 (above)" >&2
        status=1
    fi
done
[ $status -eq 0 ] || exit 1
echo "$elf"
