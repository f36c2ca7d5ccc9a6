#!/usr/bin/env bash
# The project's test command (also what CI runs): formatting, lints, then every unit and
# integration test. The integration tests boot the real test guest on KVM.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

start=$SECONDS
step() { echo; echo "==> $* ($((SECONDS - start)) s)"; }

step cargo fmt --all -- --check
cargo fmt --all -- --check

step cargo clippy --workspace --all-targets -- -D warnings
cargo clippy --workspace --all-targets -- -D warnings

if cargo nextest --version >/dev/null 2>&1; then
    step cargo nextest run --workspace
    # The ci profile (.config/nextest.toml) kills hung tests and retries nothing.
    cargo nextest run --workspace --profile ci "$@"
else
    step cargo test --workspace
    cargo test --workspace "$@"
fi

echo
echo "==> all tests passed in $((SECONDS - start)) s"
