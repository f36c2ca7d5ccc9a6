#!/usr/bin/env bash
# The main job: set the machine up, build the VMM and the test guest, boot the guest,
# show its progress lines for a few seconds, then shut the VMM down through ch-remote.
#
#   DEMO_SECONDS=5 DEMO_CPUS=2 scripts/demo.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEMO_SECONDS=${DEMO_SECONDS:-5}
DEMO_CPUS=${DEMO_CPUS:-2}

scripts/setup.sh

echo "==> building cloud-hypervisor and ch-remote (release)"
cargo build --release -p cloud-hypervisor --bins
echo "==> building the test guest"
# build-guest.sh prints the ELF path on its last line of stdout.
GUEST=$(scripts/build-guest.sh | tail -n 1)
echo "guest: $GUEST"

BIN=target/release
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ch-demo.XXXXXX")
SERIAL=$WORK/serial.log
SOCK=$WORK/api.sock
VMM_PID=
cleanup() {
    # Only our own VMM, by pid, if it is still there.
    if [[ -n $VMM_PID ]] && kill -0 "$VMM_PID" 2>/dev/null; then
        kill -KILL "$VMM_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "==> booting the test guest: $DEMO_CPUS vCPUs, ticks every 500 ms"
"$BIN/cloud-hypervisor" \
    --kernel "$GUEST" \
    --cmdline "mem=32M tick=500" \
    --cpus "boot=$DEMO_CPUS" \
    --memory size=512M \
    --serial "file=$SERIAL" \
    --console off \
    --api-socket "$SOCK" \
    --event-monitor "path=$WORK/events.json" \
    2>"$WORK/stderr.log" &
VMM_PID=$!

# Wait (bounded) for the first tick before showing the log.
for _ in $(seq 1 300); do
    if grep -q "TG tick" "$SERIAL" 2>/dev/null; then break; fi
    if ! kill -0 "$VMM_PID" 2>/dev/null; then
        echo "the VMM exited early; stderr:" >&2
        cat "$WORK/stderr.log" >&2
        exit 1
    fi
    sleep 0.1
done
grep -q "TG tick" "$SERIAL" 2>/dev/null || {
    echo "no tick line after 30 s; serial log:" >&2
    cat "$SERIAL" >&2 || true
    exit 1
}

echo "==> guest serial output for $DEMO_SECONDS s:"
timeout "$DEMO_SECONDS" tail -n +1 -f "$SERIAL" || true

echo "==> ch-remote info"
"$BIN/ch-remote" --api-socket "$SOCK" info | head -c 2000
echo
echo "==> ch-remote shutdown-vmm"
"$BIN/ch-remote" --api-socket "$SOCK" shutdown-vmm
rc=0
wait "$VMM_PID" || rc=$?
VMM_PID=
echo "==> VMM exited with code $rc"
echo "==> events:"
cat "$WORK/events.json" || true
exit "$rc"
