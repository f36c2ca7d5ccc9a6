#!/usr/bin/env python3
"""Which syscalls each thread of our binaries made, from an strace log.

    strace -f -qq -X raw -s 48 -o /tmp/trace cargo nextest run --workspace
    python3 scripts/seccomp-syscalls.py /tmp/trace

Only processes that exec'd cloud-hypervisor or offload_daemon are reported. A thread is
labelled by the name it gave itself (PR_SET_NAME, digits folded: vcpuN); an unnamed
thread by its creator's label plus ">anon" (it inherits its creator's filters). For the
syscalls whose arguments the filters check (vmm/src/seccomp/rules.rs), the values seen
are listed. Compare with the lists when a new feature makes new calls
(docs/seccomp.md)."""
import re
import sys
from collections import defaultdict

BINS = {"cloud-hypervisor", "offload_daemon"}
LINE = re.compile(r"^(\d+)\s+(.*)$")
CALL = re.compile(r"^([a-z0-9_]+)\((.*)$")
RESUMED = re.compile(r"^<\.\.\. ([a-z0-9_]+) resumed>(.*)$")
CLONE_THREAD = 0x10000

exe = {}  # tid -> binary name after execve
parent = {}  # tid -> creator tid
thread = {}  # tid -> created with CLONE_THREAD
names = {}  # tid -> last PR_SET_NAME
calls = defaultdict(lambda: defaultdict(set))  # tid -> syscall -> argument values
pending = {}  # tid -> (syscall, args so far) of an unfinished call


def split_args(s):
    """Top-level comma-separated arguments, up to the closing parenthesis."""
    out, depth, cur, quoted, i = [], 0, "", False, 0
    while i < len(s):
        c = s[i]
        if quoted:
            cur += c
            if c == "\\" and i + 1 < len(s):
                cur += s[i + 1]
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted, cur = True, cur + c
        elif c in "([{":
            depth, cur = depth + 1, cur + c
        elif c in ")]}":
            if depth == 0:
                break
            depth, cur = depth - 1, cur + c
        elif c == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += c
        i += 1
    out.append(cur.strip())
    return out


# The argument whose value the filters check, per syscall.
CHECKED = {
    "ioctl": 1, "socket": 0, "socketpair": 0, "prctl": 0, "openat": 2, "mmap": 2,
    "mprotect": 2, "clone": 0, "getpriority": 0, "setpriority": 0, "tgkill": 0,
}


def handle(tid, sc, argstr, tail):
    args = split_args(argstr)
    m = re.search(r"\)\s+=\s+(-?\w+)", tail)
    ret = m.group(1) if m else None
    if sc in ("clone", "clone3", "fork", "vfork") and ret and ret.isdigit():
        child = int(ret)
        parent[child] = tid
        f = re.search(r"flags=(0x[0-9a-f]+)", argstr)
        thread[child] = bool(f and int(f.group(1), 16) & CLONE_THREAD)
        exe.setdefault(child, exe.get(tid))
    if sc == "execve" and ret == "0":
        exe[tid] = args[0].strip('"').rsplit("/", 1)[-1]
        names.pop(tid, None)
        calls[tid].clear()
    if sc == "prctl" and args[0] == "0xf" and ret == "0":
        names[tid] = args[1].strip('"').rstrip(".").strip('"')
    value = ""
    if sc in CHECKED and CHECKED[sc] < len(args):
        value = args[CHECKED[sc]].replace("<unfinished ...>", "").strip()
        if sc == "clone":
            f = re.search(r"flags=(0x[0-9a-f]+)", argstr)
            value = f.group(1) if f else value
    calls[tid][sc].add(value)


def main(path):
    for line in open(path, errors="replace"):
        m = LINE.match(line)
        if not m:
            continue
        tid, rest = int(m.group(1)), m.group(2)
        r = RESUMED.match(rest)
        if r:
            p = pending.pop(tid, None)
            handle(tid, r.group(1), (p[1] if p else "") + r.group(2), r.group(2))
            continue
        c = CALL.match(rest)
        if not c:
            continue
        if rest.endswith("<unfinished ...>"):
            pending[tid] = (c.group(1), c.group(2).replace("<unfinished ...>", ""))
        else:
            handle(tid, c.group(1), c.group(2), rest)

    def binary(t, seen=()):
        if exe.get(t) is None and t in parent and t not in seen:
            exe[t] = binary(parent[t], seen + (t,))
        return exe.get(t)

    def label(t, depth=0):
        if t in names:
            return re.sub(r"\d+$", "N", names[t])
        if thread.get(t) and t in parent and depth < 20:
            return label(parent[t], depth + 1) + ">anon"
        return exe.get(t, "?")[:15]

    by_label = defaultdict(lambda: defaultdict(set))
    for t in list(calls):
        b = binary(t)
        if b in BINS:
            for sc, values in calls[t].items():
                by_label[f"{b}: {label(t)}"][sc] |= values
    for lb in sorted(by_label):
        print(f"== {lb}")
        for sc in sorted(by_label[lb]):
            values = sorted(v for v in by_label[lb][sc] if v)
            print(f"  {sc}" + (f"  [{' | '.join(values)}]" if values else ""))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
