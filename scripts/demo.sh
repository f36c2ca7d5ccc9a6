#!/usr/bin/env bash
# The main job: set the machine up, build the VMM, the offload daemon and the test guest,
# boot the guest, show its progress lines, snapshot it through the offload daemon (the
# source VMM exits), restore it on demand through the daemon into a new VMM (the guest
# runs before its memory is back), and show the guest carrying on with the same nonce.
#
#   DEMO_SECONDS=5 DEMO_CPUS=2 scripts/demo.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEMO_SECONDS=${DEMO_SECONDS:-5}
DEMO_CPUS=${DEMO_CPUS:-2}

scripts/setup.sh

echo "==> building cloud-hypervisor, ch-remote and offload_daemon (release)"
cargo build --release -p cloud-hypervisor -p offload_daemon --bins
echo "==> building the test guest"
# build-guest.sh prints the ELF path on its last line of stdout.
GUEST=$(scripts/build-guest.sh | tail -n 1)
echo "guest: $GUEST"

BIN=target/release
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ch-demo.XXXXXX")
SERIAL=$WORK/serial.log
SOCK=$WORK/api.sock
VMM_PID=
DAEMON_PID=
cleanup() {
    # Only our own processes, by pid, if they are still there.
    for pid in $VMM_PID $DAEMON_PID; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "==> booting the test guest: $DEMO_CPUS vCPUs, ticks every 500 ms"
"$BIN/cloud-hypervisor" \
    --kernel "$GUEST" \
    --cmdline "mem=32M tick=500" \
    --cpus "boot=$DEMO_CPUS" \
    --memory size=512M,shared=on \
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

echo "==> snapshot through the offload daemon into $WORK/snapshot"
"$BIN/offload_daemon" snapshot --socket "$WORK/snap.sock" --output-dir "$WORK/snapshot" \
    2>"$WORK/daemon.snapshot.log" &
DAEMON_PID=$!
for _ in $(seq 1 100); do [[ -S $WORK/snap.sock ]] && break; sleep 0.05; done
"$BIN/ch-remote" --api-socket "$SOCK" send-migration \
    "destination_url=unix:$WORK/snap.sock,local=on"
wait "$DAEMON_PID"
DAEMON_PID=
rc=0
wait "$VMM_PID" || rc=$?
VMM_PID=
[[ $rc -eq 0 ]] || { echo "the source VMM exited with $rc" >&2; exit "$rc"; }
echo "   the source VMM has exited; the VM lives only in the snapshot now:"
ls -ls "$WORK/snapshot" | sed 's/^/   /'
du -sh "$WORK/snapshot" | sed 's/^/   on disk: /'
mv "$SERIAL" "$WORK/serial.before.log"

echo "==> restoring on demand through the daemon into a new VMM"
# A VM that arrives by migration writes to the destination's own --serial, never to a
# path the sender names.
"$BIN/cloud-hypervisor" --api-socket "$SOCK" --serial "file=$SERIAL" \
    --event-monitor "path=$WORK/events.restored.json" \
    2>"$WORK/stderr.restored.log" &
VMM_PID=$!
for _ in $(seq 1 100); do [[ -S $SOCK ]] && break; sleep 0.05; done
"$BIN/ch-remote" --api-socket "$SOCK" receive-migration \
    "receiver_url=unix:$WORK/restore.sock,postcopy=on" &
RECEIVE_PID=$!
for _ in $(seq 1 100); do [[ -S $WORK/restore.sock ]] && break; sleep 0.05; done
"$BIN/offload_daemon" restore --socket "$WORK/restore.sock" --input-dir "$WORK/snapshot" \
    --resume --ondemand 2>"$WORK/daemon.restore.log" &
DAEMON_PID=$!
wait "$RECEIVE_PID"
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
if [[ -n $DAEMON_PID ]]; then
    wait "$DAEMON_PID" && echo "   the restore daemon exited 0: every page is in"
    DAEMON_PID=
fi
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
