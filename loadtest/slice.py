#!/usr/bin/env python3
"""Sets the scheduler slice (EEVDF's custom slice, `sched_setattr` with `sched_runtime` on a
SCHED_OTHER thread; Linux 6.12 and later) of the given threads, and prints each thread's slice
as read back. The call also makes each thread SCHED_OTHER at nice 0 (what fulcrum's workers
run as). 0 restores the kernel's default slice. An experiment's tool, not fulcrum's:
the seventeenth session asked whether a shorter or longer slice for the proxy's workers changes
who preempts whom on the two shared cores (loadtest/RESULTS.md).

    loadtest/slice.py 100000 $(ls /proc/PID/task)      # 0.1 ms for every thread of PID
"""
import ctypes
import struct
import sys

SYS_SCHED_SETATTR, SYS_SCHED_GETATTR = 314, 315  # x86_64
# struct sched_attr: size, policy, flags, nice, priority, runtime, deadline, period,
# util_min, util_max
LAYOUT = "IIQiIQQQII"
SIZE = struct.calcsize(LAYOUT)
libc = ctypes.CDLL(None, use_errno=True)


def get(tid):
    buf = ctypes.create_string_buffer(SIZE)
    if libc.syscall(SYS_SCHED_GETATTR, tid, buf, SIZE, 0) != 0:
        raise OSError(ctypes.get_errno(), f"sched_getattr({tid})")
    return struct.unpack(LAYOUT, buf.raw)


def set_slice(tid, ns):
    buf = ctypes.create_string_buffer(struct.pack(LAYOUT, SIZE, 0, 0, 0, 0, ns, 0, 0, 0, 0), SIZE)
    if libc.syscall(SYS_SCHED_SETATTR, tid, buf, 0) != 0:
        raise OSError(ctypes.get_errno(), f"sched_setattr({tid})")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    slice_ns = int(sys.argv[1])
    for t in map(int, sys.argv[2:]):
        set_slice(t, slice_ns)
        print(t, "slice", get(t)[5], "ns")
