"""`segdeploy serve --ray-address` on a two-node Ray cluster simulated on 127.0.0.1
(`ray.cluster_utils.Cluster`): one model replica on each node, and both answer. Slow
(CI's `make test-slow` runs it)."""

from __future__ import annotations

import concurrent.futures
import os

import pytest
from serve_helpers import free_port, photo_bytes, ray_environment, wait_gone

pytest.importorskip("ray.serve", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx")

from segdeploy.runtime.ray_session import LOOPBACK_ENV  # noqa: E402
from segdeploy.serve.service import serving  # noqa: E402
from segdeploy.serve.settings import ServeSettings  # noqa: E402


@pytest.mark.slow  # two Ray nodes and a service on two cores: ~25 s
def test_replicas_on_both_nodes_answer(tiny_onnx_dir):
    os.environ.update(LOOPBACK_ENV)  # before Ray is imported in this process
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    with ray_environment() as ray_dir:
        cluster = Cluster(initialize_head=True, head_node_args=node)
        try:
            cluster.add_node(**node)
            cluster.wait_for_nodes()
            # One CPU per node and one per replica: Ray must put a replica on each node.
            settings = ServeSettings(
                model_dir=str(tiny_onnx_dir),
                port=free_port(),
                replicas="2",
                threads=1,
                provider="cpu",
                ray_address=cluster.address,
            )
            with serving(settings) as running:
                nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
                assert len(nodes) == 2
                assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes())
                seen = _nodes_answering(running.url, rounds=10)
                # More than one replica: the front end keeps the service's metrics and queue.
                (app,) = serve.status().applications.values()
                assert set(app.deployments) == {"frontend", "model"}
            assert seen == nodes
        finally:
            cluster.shutdown()
        assert not wait_gone(ray_dir), "Ray processes outlived the cluster"


def _nodes_answering(url: str, rounds: int) -> set[str]:
    """The Ray nodes whose replicas answered bursts of concurrent requests."""
    seen: set[str] = set()

    def one(i: int) -> str:
        r = httpx.post(
            f"{url}/v1/segment",
            content=photo_bytes("png", i),
            headers={"Content-Type": "image/png", "Accept": "application/json"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        return r.json()["served_by"]["node"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(rounds):
            seen |= set(pool.map(one, range(16)))
            if len(seen) == 2:
                break
    return seen
