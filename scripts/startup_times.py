"""Start-up cost of the command line against the interpreter's own start.

Runs each command RUNS times, interleaved (one of each per round, so load that comes
and goes falls on all of them alike), and prints the best and the median wall time,
the children's CPU time (median), and each median's ratio to the first command's, the
floor: ``python -c pass`` with the same interpreter. Run it where the figure is wanted,
e.g. in the guest: ``scripts/run-in-qemu.sh -- .venv/bin/python scripts/startup_times.py``.

    python scripts/startup_times.py [--runs N] [NAME=COMMAND ...]

NAME must not contain "=" (the first one ends it); COMMAND is split on spaces; by default the floor, ``virtio-user --help`` and
``virtio-user read --help`` (the scripts next to this interpreter).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure(commands: dict[str, list[str]], runs: int) -> dict[str, tuple[list[float], list[float]]]:
    times: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in commands}
    for _ in range(runs):
        for name, argv in commands.items():
            cpu, start = cpu_seconds(), time.perf_counter()
            subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=True, timeout=600)
            wall = time.perf_counter() - start
            times[name][0].append(wall)
            times[name][1].append(cpu_seconds() - cpu)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("commands", nargs="*", metavar="NAME=COMMAND")
    args = ap.parse_args()
    bindir = os.path.dirname(sys.executable)
    cli = os.path.join(bindir, "virtio-user")
    commands = {"python -c pass": [sys.executable, "-c", "pass"]}
    if args.commands:
        commands.update(dict((n, c.split()) for n, c in (a.split("=", 1) for a in args.commands)))
    else:
        commands["virtio-user --help"] = [cli, "--help"]
        commands["virtio-user read --help"] = [cli, "read", "--help"]
    times = measure(commands, args.runs)
    floor = statistics.median(times["python -c pass"][0])
    print(f"{'command':34} {'best':>7} {'median':>7} {'cpu med':>8} {'x floor':>8}"
          f"   ({args.runs} runs each, interleaved)")
    for name, (wall, cpu) in times.items():
        med = statistics.median(wall)
        print(f"{name:34} {min(wall):7.3f} {med:7.3f} {statistics.median(cpu):8.3f} "
              f"{med / floor:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
