#!/usr/bin/env bash
# Prepares this machine for building and testing the project. Idempotent: installs only
# what is missing (running `apt-get update` only then), and checks /dev/kvm.
set -euo pipefail

# System packages:
#   libclang-dev  bindgen in the userfaultfd crate's build script
#   binutils      objdump, the test guest build's forbidden-instruction gate
#   util-linux    setpriv, used by the tests to run the VMM as an unprivileged user
#   build-essential  cc, the linker rustc drives for the VMM and the guest
#   strace        deriving the seccomp allowlists (docs/seccomp.md)
PACKAGES=(libclang-dev binutils util-linux build-essential strace)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        sudo=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    echo "setup: system packages present (${PACKAGES[*]})"
fi

# The Rust toolchain with the components the test command uses.
if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found; install a Rust toolchain (stable >= 1.88, edition 2024)" >&2
    exit 1
fi
if command -v rustup >/dev/null; then
    for comp in rustfmt clippy; do
        if ! rustup component list --installed 2>/dev/null | grep -q "^$comp"; then
            rustup component add "$comp"
        fi
    done
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "setup: cargo-nextest not found; scripts/test.sh will fall back to cargo test"
fi

# KVM: the tests and the demo need read/write access.
if [[ ! -e /dev/kvm ]]; then
    echo "setup: /dev/kvm does not exist: this machine cannot run VMs" >&2
    exit 1
fi
if [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
    echo "setup: no read/write access to /dev/kvm for $(id -un); add yourself to its group" \
         "($(stat -c %G /dev/kvm)) or run as root" >&2
    exit 1
fi
echo "setup: /dev/kvm is accessible"
