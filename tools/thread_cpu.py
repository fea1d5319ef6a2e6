"""Per-thread CPU use of running processes (from /proc), to see who holds the interpreter.

    python3 tools/thread_cpu.py PATTERN SECONDS

Samples every 0.5 s the processes whose command line contains PATTERN; at the end prints, per
process, its busiest threads: CPU seconds and share of the time the thread was seen."""

import os
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def procs(pattern: str) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit() and int(p) != os.getpid():
            try:
                cmd = open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if pattern in cmd and "thread_cpu" not in cmd:
                out.append(int(p))
    return out


def sample(pid: int) -> dict[int, tuple[str, float]]:
    rows = {}
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                stat = open(f"/proc/{pid}/task/{t}/stat").read()
                comm = open(f"/proc/{pid}/task/{t}/comm").read().strip()
            except OSError:
                continue
            f = stat[stat.rindex(")") + 2 :].split()
            rows[int(t)] = (comm, (int(f[11]) + int(f[12])) / TICK)
    except OSError:
        pass
    return rows


def main() -> None:
    pattern, seconds = sys.argv[1], float(sys.argv[2])
    first: dict[tuple[int, int], tuple[float, float, str]] = {}  # (pid, tid) -> (t, cpu, comm)
    last: dict[tuple[int, int], tuple[float, float]] = {}
    cmds: dict[int, str] = {}
    end = time.time() + seconds
    while time.time() < end:
        now = time.time()
        for pid in procs(pattern):
            if pid not in cmds:
                cmds[pid] = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()[:90]
            for tid, (comm, cpu) in sample(pid).items():
                first.setdefault((pid, tid), (now, cpu, comm))
                last[(pid, tid)] = (now, cpu)
        time.sleep(0.5)
    for pid, cmd in cmds.items():
        rows = []
        for (p, tid), (t0, c0, comm) in first.items():
            if p != pid:
                continue
            t1, c1 = last[(p, tid)]
            if t1 > t0:
                rows.append((c1 - c0, (c1 - c0) / (t1 - t0), tid, comm, t1 - t0))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        print(f"pid {pid} ({cmd}): {total:.1f} CPU s in all threads")
        for cpu, share, tid, comm, span in rows[:8]:
            main_mark = " (main)" if tid == pid else ""
            print(f"   tid {tid:>8} {comm:<16}{main_mark:<7} {cpu:7.2f} CPU s  {share * 100:5.1f}% of {span:5.1f} s")


if __name__ == "__main__":
    main()
