"""A Ray cluster running beside the tests, as a user's would: `ray.cluster_utils.Cluster`
on the loopback in a process of its own, which the tests start and end (`Beside`).

Run as a script it starts the cluster (`--nodes N` nodes of `--cpus` CPUs each), prints
one JSON line (address, node ids), then answers each line read on stdin with one
JSON line of the cluster's state: its jobs, and its actors with the node each ran on.
At the end of stdin it shuts the cluster down and exits.

The cluster writes its address where `--ray-address auto` (and a plain `ray.init()`)
looks for it, under $RAY_TMPDIR: `Beside` gives it a folder of its own, so that the
tests' cluster is never found by Ray on this machine outside them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # see segdeploy.runtime.ray_session


def _state(cluster) -> dict:
    gs = cluster.global_state
    return {
        "jobs": [j["JobID"] for j in gs.job_table()],
        "actors": [
            {"class": a["ActorClassName"], "node": a["Address"]["NodeID"], "state": a["State"]}
            for a in gs.actor_table(None).values()
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=1)
    args = parser.parse_args()
    from ray._private.authentication.authentication_token_setup import (
        ensure_token_if_auth_enabled,
    )
    from ray.cluster_utils import Cluster

    # As `ray start --head` does: token authentication, with ~/.ray/auth_token (made if
    # missing, as every ray.init() of a new Ray does).
    ensure_token_if_auth_enabled({}, create_token_if_missing=True)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": args.cpus, "node_ip_address": "127.0.0.1"},
    )
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=args.cpus, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        nodes = [n.node_id for n in cluster.list_all_nodes()]
        print(json.dumps({"address": cluster.address, "nodes": nodes}), flush=True)
        for _ in sys.stdin:
            print(json.dumps(_state(cluster)), flush=True)
    finally:
        cluster.shutdown()


class Beside:
    """The cluster process, with its own $RAY_TMPDIR (`env` gives drivers the same, so
    that Ray's auto-detection finds this cluster and no other)."""

    def __init__(self, nodes: int = 1, cpus: int = 1, timeout: float = 120):
        import psutil

        # Short: Ray's socket paths under it must fit in 107 bytes.
        self.tmp = tempfile.mkdtemp(prefix="rb-", dir="/tmp")
        # RAY_AUTH_MODE: the cluster's, which its drivers must share (Ray's "auto" turns
        # token authentication on when ~/.ray/auth_token exists, and then no worker of
        # a cluster without it starts).
        self.env = {**os.environ, **LOOPBACK_ENV, "RAY_TMPDIR": self.tmp, "RAY_AUTH_MODE": "token"}
        self.env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--nodes", str(nodes), "--cpus", str(cpus)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self.env,
        )  # fmt: skip
        self.psutil = psutil
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()
        if not line or time.monotonic() > deadline:
            self.close()
            raise RuntimeError("the Ray cluster beside did not start")
        info = json.loads(line)
        self.address, self.nodes = info["address"], info["nodes"]

    def state(self) -> dict:
        self.proc.stdin.write("state\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def processes(self) -> list:
        try:
            return self.psutil.Process(self.proc.pid).children(recursive=True)
        except self.psutil.Error:
            return []

    def close(self) -> list[str]:
        """Shut the cluster down; the command lines of its processes still alive after 30 s."""
        procs = self.processes()
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        _, alive = self.psutil.wait_procs(procs, timeout=30)
        left = []
        for p in alive:
            try:
                left.append(" ".join(p.cmdline()))
                p.kill()
            except self.psutil.Error:
                pass
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)
        return left


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
