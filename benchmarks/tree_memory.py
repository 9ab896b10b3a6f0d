"""Memory of a process and all its descendants, read from /proc: what a run of
segdeploy holds in all (the pipeline's fork server and workers, a clip's plot
process, Ray's raylet and workers under `segdeploy serve`).

RSS counts the pages a forked process shares with its parent in both, so a
tree's sum over-counts, alike for every run it compares. The kernel keeps each
process's own peak (VmHWM), so no process's peak falls between two looks; the
sum of those peaks is an upper bound (they need not coincide).
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

#: Seconds between two looks at the tree.
SAMPLE_S = 0.05


def tree_pids(pid: int) -> list[int]:
    """`pid` and every process below it (/proc/PID/task/TID/children)."""
    pids, todo = [], [pid]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):  # the thread or process ended meanwhile
                todo += [int(c) for c in task.read_text().split()]
    return pids


def tree_status_kb(pid: int) -> dict[int, dict[str, int]]:
    """VmRSS and VmHWM (kB) of each live process of the tree."""
    out = {}
    for p in tree_pids(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:  # ended meanwhile
            continue
        out[p] = {k: int(v.split()[0]) for k, _, v in (x.partition(":") for x in status)
                  if k in ("VmRSS", "VmHWM")}  # fmt: skip
    return out


def tree_rss_mib(pid: int) -> float:
    """The tree's RSS now, MiB."""
    return sum(kb.get("VmRSS", 0) for kb in tree_status_kb(pid).values()) / 1024


class TreeMemory:
    """Looks at a process tree every `interval` seconds from when it is made (or entered)
    until `stop()` (or the block's end): the largest sum of the tree's RSS seen at one
    look (`peak_kb`, `peak_mib`) and each process's own peak (`hwm_kb`)."""

    def __init__(self, pid: int, interval: float = SAMPLE_S):
        self.pid, self.interval = pid, interval
        self.peak_kb, self.hwm_kb = 0, {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    @property
    def peak_mib(self) -> float:
        return self.peak_kb / 1024

    def _look(self) -> None:
        status = tree_status_kb(self.pid)
        for p, kb in status.items():
            self.hwm_kb[p] = max(self.hwm_kb.get(p, 0), kb.get("VmHWM", 0))
        self.peak_kb = max(self.peak_kb, sum(kb.get("VmRSS", 0) for kb in status.values()))

    def _watch(self) -> None:
        while not self._done.wait(self.interval):
            self._look()

    def stop(self) -> dict:
        self._done.set()
        self._thread.join()
        return {
            "tree_peak_kb": self.peak_kb,
            "tree_hwm_sum_kb": sum(self.hwm_kb.values()),
            "processes": len(self.hwm_kb),
        }

    def __enter__(self) -> TreeMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
