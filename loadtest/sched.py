"""Replays `perf script -F cpu,time,event,trace` of sched_switch, sched_wakeup(_new) and
sched_migrate_task into each CPU's run queue, and splits the time each CPU sat idle by what
the other CPUs held at that instant (loadtest/sched.sh says why).

    python3 sched.py EVENTS.txt REQ_PER_S "proxy:TID ...;backend:...;generator:...;pinned:..." CASE

Prints CASE<TAB>key<TAB>µs-a-request lines (and req/s) on stdout, a readable breakdown of the
bubbles on stderr. The replay starts once every CPU has switched once (what ran before is
unknown); a task woken while it still runs is not queued."""
import collections
import os
import re
import sys

SWITCH = re.compile(r"\[(\d+)\]\s+([\d.]+):\s+sched:sched_switch:\s+prev_comm=(.*?) prev_pid=(\d+) "
                    r"prev_prio=\d+ prev_state=(\S+) ==> next_comm=(.*?) next_pid=(\d+)")
WAKEUP = re.compile(r"\[(\d+)\]\s+([\d.]+):\s+sched:sched_wakeup(?:_new)?:\s+comm=(.*?) pid=(\d+) "
                    r"prio=\d+ target_cpu=(\d+)")
MIGRATE = re.compile(r"\[(\d+)\]\s+([\d.]+):\s+sched:sched_migrate_task:\s+comm=.*? pid=(\d+) "
                     r"prio=\d+ orig_cpu=(\d+) dest_cpu=(\d+)")


def main(path, rps, roles_arg, case):
    role, pinned = {}, set()
    for part in roles_arg.split(";"):
        name, _, tids = part.partition(":")
        for t in tids.split():
            if name == "pinned":
                pinned.add(int(t))
            else:
                role[int(t)] = name
    who = lambda pid: role.get(pid, "other")

    running = {}                              # cpu -> pid (0: idle)
    queued = collections.defaultdict(set)     # cpu -> runnable pids waiting there
    where = {}                                # pid -> the cpu whose queue holds it
    idle = collections.Counter()              # category -> seconds
    bubble = collections.Counter()            # (waiting roles, running role) -> seconds
    wait = collections.Counter()              # role -> seconds runnable but not running
    other_wait = collections.Counter()        # comm of an "other" task -> the same
    comm = {}
    state = {"last": None, "start": None, "cpus": set()}

    def advance(t):
        last = state["last"]
        state["last"] = t
        if last is None or state["start"] is None:
            return
        dt = t - last
        for c in state["cpus"]:
            for p in queued[c]:
                wait[who(p)] += dt
                if p not in role:
                    other_wait[comm.get(p, "?")] += dt
            if running.get(c) != 0:
                continue
            elsewhere = [p for o in state["cpus"] if o != c for p in queued[o]]
            movable = [p for p in elsewhere if p not in pinned]
            if movable:
                idle["idle: work waiting on another cpu"] += dt
                there = sorted({who(running.get(o, -1)) for o in state["cpus"] if o != c})
                bubble[(",".join(sorted({who(p) for p in movable})), ",".join(there))] += dt
            elif elsewhere:
                idle["idle: only pinned work waiting elsewhere"] += dt
            else:
                idle["idle: nothing runnable"] += dt

    def dequeue(pid):
        c = where.pop(pid, None)
        if c is not None:
            queued[c].discard(pid)

    for line in open(path):
        m = SWITCH.search(line)
        if m:
            cpu, t, prev, prev_state, nxt = int(m[1]), float(m[2]), int(m[4]), m[5], int(m[7])
            comm[prev], comm[nxt] = m[3], m[6]
            advance(t)
            state["cpus"].add(cpu)
            if prev != 0 and prev_state.startswith("R"):   # preempted or yielded: still runnable
                dequeue(prev)
                queued[cpu].add(prev)
                where[prev] = cpu
            dequeue(nxt)
            running[cpu] = nxt
            if state["start"] is None and len(running) == os.cpu_count():
                state["start"] = t
            continue
        m = WAKEUP.search(line)
        if m:
            t, pid, target = float(m[2]), int(m[4]), int(m[5])
            comm[pid] = m[3]
            advance(t)
            if pid not in running.values():
                dequeue(pid)
                queued[target].add(pid)
                where[pid] = target
            continue
        m = MIGRATE.search(line)
        if m:
            t, pid, orig, dest = float(m[2]), int(m[3]), int(m[4]), int(m[5])
            advance(t)
            if where.get(pid) == orig:
                queued[orig].discard(pid)
                queued[dest].add(pid)
                where[pid] = dest

    span = state["last"] - state["start"]
    req = rps * span
    us = lambda s: s * 1e6 / req
    print(f"{case}\treq/s\t{rps:.0f}")
    print(f"{case}\tidle\t{us(sum(idle.values())):.3f}")
    for k in ("idle: work waiting on another cpu", "idle: only pinned work waiting elsewhere",
              "idle: nothing runnable"):
        print(f"{case}\t{k}\t{us(idle[k]):.3f}")
    for k in ("proxy", "backend", "generator", "other"):
        print(f"{case}\twait: {k}\t{us(wait[k]):.3f}")
    for (w, r), s in bubble.most_common():
        print(f"{case}\tbubble: {w} waiting, {r} running there\t{us(s):.3f}")
    print(f"# {case}: {rps:.0f} req/s over {span:.2f} s of events; idle {us(sum(idle.values())):.2f} µs a request: "
          + ", ".join(f"{k[6:]} {us(v):.2f}" for k, v in idle.most_common()), file=sys.stderr)
    for (w, r), s in bubble.most_common(4):
        print(f"#   idle while {w} waited on another cpu ({r} running there): {us(s):.2f}", file=sys.stderr)
    if other_wait:
        print("#   other tasks' run-queue wait: " + ", ".join(f"{k} {us(v):.2f}" for k, v in other_wait.most_common(3)),
              file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4])
