#!/usr/bin/env bash
# The main job: set the machine up, build the VMM and the test guest, boot the guest,
# show its progress lines, snapshot it, stop that VMM, restore the snapshot on demand
# (userfaultfd) in a new VMM, and show the guest carrying on with the same nonce.
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

# Waits (bounded) until $1 holds a line matching $2; the VMM with pid $3 must stay up.
wait_line() {
    for _ in $(seq 1 300); do
        if grep -q "$2" "$1" 2>/dev/null; then return 0; fi
        if ! kill -0 "$3" 2>/dev/null; then
            echo "the VMM exited early; stderr:" >&2
            cat "$WORK"/stderr*.log >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "no line matching '$2' after 30 s in $1:" >&2
    cat "$1" >&2 || true
    exit 1
}

wait_line "$SERIAL" "TG tick" "$VMM_PID"
echo "==> guest serial output for $DEMO_SECONDS s:"
timeout "$DEMO_SECONDS" tail -n +1 -f "$SERIAL" || true

echo "==> pause and snapshot to $WORK/snapshot"
"$BIN/ch-remote" --api-socket "$SOCK" pause
"$BIN/ch-remote" --api-socket "$SOCK" snapshot "file://$WORK/snapshot"
du -sh --apparent-size "$WORK/snapshot" | sed 's/^/   apparent size: /'
du -sh "$WORK/snapshot" | sed 's/^/   on disk:       /'
echo "==> ch-remote shutdown-vmm (the original VM is gone now)"
"$BIN/ch-remote" --api-socket "$SOCK" shutdown-vmm
rc=0
wait "$VMM_PID" || rc=$?
VMM_PID=
[[ $rc -eq 0 ]] || { echo "the VMM exited with $rc" >&2; exit "$rc"; }
mv "$SERIAL" "$WORK/serial.before.log"

echo "==> restoring on demand in a new VMM"
"$BIN/cloud-hypervisor" \
    --api-socket "$SOCK" \
    --restore "source_url=file://$WORK/snapshot,memory_restore_mode=ondemand,resume=on" \
    --event-monitor "path=$WORK/events.restored.json" \
    2>"$WORK/stderr.restored.log" &
VMM_PID=$!
wait_line "$SERIAL" "TG tick" "$VMM_PID"
echo "==> restored guest serial output for $DEMO_SECONDS s (same nonce, counters go on):"
timeout "$DEMO_SECONDS" tail -n +1 -f "$SERIAL" || true
before=$(grep "TG tick" "$WORK/serial.before.log" | tail -n 1)
after=$(grep "TG tick" "$SERIAL" | head -n 1)
echo "   last tick before the snapshot: $before"
echo "   first tick after the restore:  $after"
nonce() { sed -n 's/.*nonce=\([0-9a-f]*\).*/\1/p' <<<"$1"; }
if [[ $(nonce "$before") != "$(nonce "$after")" ]]; then
    echo "the restored guest has a different nonce: it rebooted" >&2
    exit 1
fi

echo "==> ch-remote info (memory_restore shows the on-demand restore)"
"$BIN/ch-remote" --api-socket "$SOCK" info | grep -A12 '"memory_restore"' || true
echo "==> ch-remote shutdown-vmm"
"$BIN/ch-remote" --api-socket "$SOCK" shutdown-vmm
rc=0
wait "$VMM_PID" || rc=$?
VMM_PID=
echo "==> VMM exited with code $rc"
echo "==> events of the restored VMM:"
cat "$WORK/events.restored.json" || true
exit "$rc"
