"""`segdeploy infer --engine ray` and `SegmentBatch` on a local 2-CPU Ray cluster (127.0.0.1).

One cluster per module (Ray takes seconds to start): this process is its
head, tests in-process join it, and a driver in a subprocess joins it through
its address. Every output must be byte-identical to the local engine's.

Beside it, clusters as a user's run in processes of their own (tests/ray_beside.py):
without an address segdeploy runs on a private Ray and leaves them alone; with
`--ray-address auto` it joins them; on two nodes both do work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segdeploy.atomic import TMP_MARKER
from segdeploy.cli import main
from segdeploy.data.synthetic import synthetic_sample
from segdeploy.runtime.ray_session import LOOPBACK_ENV

psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")


@pytest.fixture(scope="module")
def ray_cluster():
    """The address of a 2-CPU Ray on the loopback (`ray_session`'s private Ray, in this
    process), shut down after the module with every process it started."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    from segdeploy.runtime.ray_session import ray_session

    saved = os.environ.get("PYTHONPATH")
    # Workers are started by this process and inherit its environment: this checkout first.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [saved])])
    before = set(psutil.Process().children(recursive=True))
    try:
        with ray_session(None, num_cpus=2) as info:
            assert info.address.startswith("127.0.0.1:") and info.private
            yield info.address
            # Ray's processes, workers included (the raylet's children), before they go.
            started = set(psutil.Process().children(recursive=True)) - before
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"Ray processes left behind: {alive}"


def _photos(root: Path, n: int, size=(48, 64), start: int = 0) -> list[Path]:
    """`n` synthetic scenes in nested folders, as JPEG and PNG."""
    files = []
    for i in range(start, start + n):
        rgb = Image.fromarray(synthetic_sample(i, seed=3, size=size)[0])
        path = (
            root / f"d{i % 3}" / ("deep" if i % 2 else "") / f"img{i}.{'jpg' if i % 2 else 'png'}"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        rgb.save(path)
        files.append(path)
    return files


def _bad_files(root: Path) -> list[Path]:
    (root / "bad").mkdir(parents=True, exist_ok=True)
    corrupt = root / "bad" / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    empty = root / "empty.png"
    empty.write_bytes(b"")
    return [corrupt, empty]


def _digests(out: Path) -> dict[str, str]:
    """Every output file (labels, overlays) by relative path -> sha256, summary aside."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "summary.json" and not p.name.startswith(".")
    }


def _infer(*args: str):
    return CliRunner().invoke(main, ["infer", *args])


def _same_as_local(model: Path, root: Path, tmp: Path, address: str, *extra: str) -> dict:
    """Run both engines on `root`; assert identical outputs and schema; the Ray summary."""
    local = _infer("--model", str(model), str(root), "-o", str(tmp / "local"), *extra)
    ray_run = _infer(
        "--engine", "ray", "--ray-address", address, "--actors", "1-2",
        "--model", str(model), str(root), "-o", str(tmp / "ray"), *extra,
    )  # fmt: skip
    assert local.exit_code == 1, local.output
    assert ray_run.exit_code == 1, ray_run.output  # the bad files
    assert _digests(tmp / "ray") == _digests(tmp / "local")
    a = json.loads((tmp / "local" / "summary.json").read_text())
    b = json.loads((tmp / "ray" / "summary.json").read_text())
    # The local engine's schema, and where the work ran.
    assert b.keys() - {"ray"} == a.keys() and b["totals"].keys() == a["totals"].keys()
    assert b["ray"]["model_actors"] >= 1 and len(b["ray"]["nodes_used"]) >= 1
    for key in ("model", "variant", "provider", "num_labels", "id2label", "batch_size"):
        assert b[key] == a[key], key
    assert sorted(a["failures"], key=str) == sorted(b["failures"], key=str)
    by_input = {r["input"]: r for r in a["images"]}
    for rec in b["images"]:
        ref = by_input.pop(rec["input"])
        assert {k: v for k, v in rec.items() if k != "time_s"} == {
            k: v for k, v in ref.items() if k != "time_s"
        }
        assert rec["time_s"].keys() == ref["time_s"].keys() and rec["time_s"]["model"] > 0
    assert not by_input  # every image of the local run is in the Ray run
    assert not list((tmp / "ray").rglob(f"*{TMP_MARKER}*"))
    return b


def test_engine_ray_gives_the_local_engines_outputs(ray_cluster, tiny_onnx_dir, tmp_path):
    root = tmp_path / "photos"
    files = _photos(root, 5)
    bad = _bad_files(root)
    summary = _same_as_local(
        tiny_onnx_dir, root, tmp_path, ray_cluster, "--provider", "cpu", "--overlay",
        "--batch-size", "2",
    )  # fmt: skip
    assert summary["totals"]["images"] == len(files) and summary["totals"]["failed"] == 2
    reasons = {Path(f["input"]).name: f["reason"] for f in summary["failures"]}
    assert set(reasons) == {p.name for p in bad}
    assert "empty" in reasons["empty.png"] and "corrupt" in reasons["corrupt.jpg"]
    assert summary["interrupted"] is False and summary["totals"]["images_per_s"] > 0


def test_engine_ray_runs_a_cropping_family(ray_cluster, tmp_path):
    """MobileNetV2 (shortest_edge resize, center crop, a fixed-size graph): the Ray engine
    shares the local engine's stages, hence its masks, at each photo's own size."""
    from family_models import save_model_folder

    from segdeploy.export.routes import export_fp32

    model = save_model_folder(tmp_path / "model", "mobilenet_v2", "tiny")
    export_fp32(model, tmp_path / "onnx")
    root = tmp_path / "photos"
    files = _photos(root, 2) + _photos(root, 2, size=(90, 41), start=2)
    _bad_files(root)
    summary = _same_as_local(tmp_path / "onnx", root, tmp_path, ray_cluster, "--provider", "cpu")
    assert summary["totals"]["images"] == len(files)
    assert {tuple(r["size"]) for r in summary["images"]} == {(48, 64), (90, 41)}


def test_engine_ray_runs_an_openvino_ir_on_openvino(ray_cluster, tiny_onnx_dir, tmp_path):
    """--engine ray --provider openvino on an OpenVINO IR variant (export's
    model_openvino_int8.xml): the driver checks the model on OpenVINO (an IR opens on
    nothing else), the actors run it, and the outputs are the local engine's."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    import openvino as ov

    from segdeploy.export.quantize.openvino_int8 import save_ir

    model = tmp_path / "onnx"
    shutil.copytree(tiny_onnx_dir, model)
    save_ir(ov.Core().read_model(model / "model.onnx"), model / "model_openvino_int8.xml")
    root = tmp_path / "photos"
    files = _photos(root, 4)
    _bad_files(root)
    summary = _same_as_local(
        model, root, tmp_path, ray_cluster, "--provider", "openvino", "--variant",
        "openvino_int8", "--batch-size", "2", "--ov-cache", str(tmp_path / "ov-cache"),
    )  # fmt: skip
    assert summary["provider"] == "openvino" and summary["totals"]["images"] == len(files)


@pytest.mark.slow
def test_engine_ray_on_camvid_photos(ray_cluster, camvid, tiny_onnx_dir, tmp_path):
    root = tmp_path / "street"
    photos = sorted((camvid / "images" / "val").glob("*.jpg"))[:12]
    for i, src in enumerate(photos):  # nested folders, as a real archive
        dest = root / f"day{i % 2}" / ("cam" if i % 3 else "") / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    bad = _bad_files(root)
    summary = _same_as_local(tiny_onnx_dir, root, tmp_path, ray_cluster, "--provider", "cpu")
    assert summary["totals"]["images"] == 12
    assert {Path(f["input"]).name for f in summary["failures"]} == {p.name for p in bad}
    for rec in summary["images"]:  # labels at each photo's own size
        with Image.open(tmp_path / "ray" / rec["output"]) as im, Image.open(rec["input"]) as src:
            assert im.size == src.size and im.mode == "L"


def test_resume_after_the_driver_is_killed(ray_cluster, tiny_onnx_dir, tmp_path):
    """SIGKILL the driver once some labels exist; --skip-existing completes the job, and
    every label is complete and identical to an uninterrupted run's."""
    root = tmp_path / "in"
    n = 48
    _photos(root, n, size=(600, 800))  # large enough that writing takes a while
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "segdeploy", "infer", "--engine", "ray",
        "--ray-address", ray_cluster, "--model", str(tiny_onnx_dir), "--provider", "cpu",
        "--batch-size", "1", "--threads", "1", str(root), "-o", str(out),
    ]  # fmt: skip
    driver = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and driver.poll() is None:
        if len(list(out.rglob("img*.png"))) >= 3:
            break
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    _, err = driver.communicate(timeout=30)
    written = list(out.rglob("img*.png"))
    assert 3 <= len(written) < n, err.decode()[-2000:]
    assert not (out / "summary.json").exists()  # the driver never got to write it

    resumed = _infer(
        "--engine", "ray", "--ray-address", ray_cluster, "--model", str(tiny_onnx_dir),
        "--provider", "cpu", "--skip-existing", str(root), "-o", str(out),
    )  # fmt: skip
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads((out / "summary.json").read_text())
    skipped = summary["totals"]["skipped"]
    assert skipped >= len(written) and summary["totals"]["images"] == n - skipped
    assert len(summary["images"]) == n

    reference = _infer("--model", str(tiny_onnx_dir), "--provider", "cpu", str(root), "-o",
                       str(tmp_path / "ref"))  # fmt: skip
    assert reference.exit_code == 0, reference.output
    assert _digests(out) == _digests(tmp_path / "ref")


def test_segment_batch_adds_label_maps_to_a_dataset(ray_cluster, tiny_onnx_dir, tmp_path):
    import ray

    from segdeploy.runtime.ray_engine import SegmentBatch
    from segdeploy.runtime.segmenter import Segmenter

    images = [synthetic_sample(i, seed=5, size=(40 + 8 * i, 56))[0] for i in range(5)]
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"p{i}.png")
        Image.fromarray(im).save(paths[-1])
    ds = ray.data.from_items([{"image": im, "name": f"i{k}"} for k, im in enumerate(images)])
    rows = ds.map_batches(
        SegmentBatch,
        fn_constructor_kwargs={"model_dir": str(tiny_onnx_dir), "provider": "cpu"},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=2,
    ).take_all()
    seg = Segmenter(tiny_onnx_dir, provider="cpu")
    assert sorted(r["name"] for r in rows) == [f"i{k}" for k in range(5)]
    for row in rows:
        k = int(row["name"][1:])
        expected = seg.predict(images[k])
        assert row["labels"].shape == images[k].shape[:2]
        assert np.array_equal(row["labels"], expected)

    # File paths work too, and the column names are the caller's.
    by_path = ray.data.from_items([{"file": str(p)} for p in paths]).map_batches(
        SegmentBatch,
        fn_constructor_kwargs={
            "model_dir": str(tiny_onnx_dir),
            "provider": "cpu",
            "image_column": "file",
            "label_column": "mask",
        },
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=3,
    )
    for row in by_path.take_all():
        assert np.array_equal(row["mask"], seg.predict(row["file"]))


def test_private_ray_is_on_the_loopback_and_torch_free(tiny_onnx_dir, tmp_path):
    """`--engine ray` without an address starts its own Ray on 127.0.0.1; neither its
    driver nor a Ray worker imports torch or transformers (this test process has both
    loaded, hence a fresh interpreter)."""
    Image.fromarray(synthetic_sample(0, seed=1, size=(32, 48))[0]).save(tmp_path / "a.png")
    code = textwrap.dedent(
        f"""
        import json, sys
        from segdeploy.cli import main
        from segdeploy.runtime.ray_session import import_ray

        ray = import_ray()  # as the command imports it, to spy on its ray.init

        HEAVY = {set(HEAVY)!r}
        seen = {{}}

        def heavy():
            return sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)

        @ray.remote
        def in_worker(model, image):
            from segdeploy.runtime.ray_engine import SegmentBatch
            out = SegmentBatch(model, provider="cpu")({{"image": [image]}})
            assert out["labels"][0].shape == (32, 48)
            return heavy()

        def spy_init(*args, _init=ray.init, **kwargs):  # the command's own ray.init
            ctx = _init(*args, **kwargs)
            seen["node"] = ctx.address_info["node_ip_address"]
            seen["gcs"] = ctx.address_info["gcs_address"]
            seen["worker"] = ray.get(in_worker.remote({str(tiny_onnx_dir)!r}, sys.argv[1]))
            return ctx

        ray.init = spy_init
        code = main(["infer", "--engine", "ray", "--model", {str(tiny_onnx_dir)!r},
                     sys.argv[1], "-o", "out"], standalone_mode=False)
        seen["driver"] = heavy()
        print("SEEN=" + json.dumps(seen))
        sys.exit(code or 0)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *LOOPBACK_ENV)}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "a.png")],
        capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("SEEN=")][-1]
    seen = json.loads(line[len("SEEN=") :])
    assert seen["node"] == "127.0.0.1" and seen["gcs"].startswith("127.0.0.1:")
    assert seen["driver"] == [] and seen["worker"] == []
    assert (tmp_path / "out" / "a.png").is_file()


def test_without_ray_installed_exits_2_saying_how_to_install(tiny_onnx_dir, tmp_path):
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    code = (
        "import sys\n"
        "sys.modules['ray'] = None  # as if `pip install segdeploy[ray]` had not been run\n"
        "from segdeploy.cli import main\n"
        f"main(['infer', '--engine', 'ray', '--model', {str(tiny_onnx_dir)!r}, "
        f"{str(tmp_path / 'a.png')!r}, '-o', {str(tmp_path / 'out')!r}])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --engine ray: Ray is not installed: pip install 'segdeploy[ray]'"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--actors", "2"], "error: --actors: only with --engine ray"),
        (["--ray-address", "10.0.0.1:6379"], "error: --ray-address: only with --engine ray"),
        (["--ray-timeout", "5"], "error: --ray-timeout: only with --engine ray"),
        (["--engine", "ray", "--actors", "4-2"], "error: --actors: need 1 <= MIN <= MAX"),
        (["--engine", "ray", "--actors", "two"], "error: --actors: expected N or MIN-MAX"),
        (["--engine", "ray", "--workers", "2"], "error: --workers: only with --engine local"),
        (
            ["--engine", "ray", "--ray-address", "10.0.0.1:6379", "-o", "relative/out"],
            "error: relative/out: with a Ray cluster (--ray-address) OUTPUT must be an absolute",
        ),
    ],
)
def test_engine_options_are_checked(tiny_onnx_dir, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    result = _infer("--model", str(tiny_onnx_dir), "a.png", *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.output
    assert not (tmp_path / "segdeploy-out").exists() and not (tmp_path / "relative").exists()


def test_gpu_provider_on_a_gpu_less_cluster_is_refused(ray_cluster, tiny_onnx_dir, tmp_path):
    """Actors that need a GPU would wait forever here: one line, exit 2, nothing written."""
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    args = ["--engine", "ray", "--ray-address", ray_cluster, "--model", str(tiny_onnx_dir)]
    result = _infer(*args, "--provider", "cuda", str(tmp_path / "a.png"), "-o", str(out))
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: --provider: cuda needs a GPU, and the Ray cluster has none (add --fallback)"
    ]
    assert not out.exists()


def test_errors_raised_on_workers_reach_the_cli_as_one_line():
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")

    from segdeploy.errors import SegdeployError
    from segdeploy.runtime.ray_engine import _segdeploy_error

    cause = SegdeployError("--provider", "CUDA is not installed on this node")
    wrapped = ray.exceptions.RayTaskError("MapWorker.submit", "Traceback ...", cause)
    for err in (wrapped, wrapped.as_instanceof_cause()):
        try:
            raise RuntimeError("the job failed") from err
        except RuntimeError as outer:
            found = _segdeploy_error(outer)
        assert type(found) is SegdeployError and str(found) == str(cause)
    assert _segdeploy_error(RuntimeError("a bug")) is None


# -- a cluster running beside --------------------------------------------------------------

#: How segdeploy's own stderr lines start (log records, the CLI's lines): anything else
#: at default verbosity is someone else's (Ray's).
OWN_LINES = ("INFO segdeploy", "WARNING segdeploy", "ERROR segdeploy", "model: ", "error: ")
#: A line of Ray's C++ logging, or of its Python loggers.
RAY_LINE = ("] core_worker.cc:", " -- ")


@pytest.fixture(scope="module")
def beside():
    """A one-node Ray cluster running beside, as a user's (`ray_beside.Beside`)."""
    from ray_beside import Beside

    pytest.importorskip("ray", reason="the ray extra is not installed")
    cluster = Beside(nodes=1, cpus=1)
    try:
        yield cluster
    finally:
        left = cluster.close()
    assert not left, f"processes of the cluster beside left behind: {left}"


def _driver(args: list[str], env: dict, cwd: Path, *, affinity: list[int] | None = None):
    """`segdeploy ARGS` in a fresh process (pinned to `affinity`); its descendants are
    watched, so that none may outlive it."""
    from test_pipeline import Watched

    pin = ["taskset", "-c", ",".join(map(str, affinity))] if affinity else []
    env = {**env, "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])}
    run = Watched([*pin, sys.executable, "-m", "segdeploy", *args], env=env, cwd=cwd)
    code, out, err = run.wait(timeout=240)
    assert not run.survivors(grace=15), "Ray processes outlived the command"
    return code, out, err


def test_without_an_address_a_private_ray_leaves_a_running_cluster_alone(
    beside, tiny_onnx_dir, tmp_path
):
    """Ray's auto-detection would find the cluster beside ($RAY_TMPDIR is its): segdeploy
    starts its own Ray instead, on one core when pinned to one, and the cluster gets no
    job and no actor; nothing of Ray is printed at default verbosity."""
    if shutil.which("taskset") is None:
        pytest.skip("taskset (util-linux) is not installed")
    _photos(tmp_path / "in", 6)
    before = beside.state()
    code, out, err = _driver(
        ["infer", "--engine", "ray", "--model", str(tiny_onnx_dir), "in", "-o", "out"],
        beside.env, tmp_path, affinity=[sorted(os.sched_getaffinity(0))[0]],
    )  # fmt: skip
    assert code == 0, err[-3000:]
    assert beside.state() == before  # untouched: no job, no actor
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    ray_info = summary["ray"]
    assert ray_info["private"] is True and ray_info["address"].startswith("127.0.0.1:")
    assert ray_info["address"] != beside.address
    assert ray_info["cpus"] == 1 and ray_info["nodes"] == 1  # sized from the affinity
    assert summary["totals"]["images"] == 6
    strays = [line for line in err.splitlines() if not line.startswith(OWN_LINES)]
    assert strays == [], "lines that are not segdeploy's at default verbosity"
    last = out.strip().splitlines()[-1]  # the end-of-run line names Ray's actors and tasks
    assert last.startswith("per image, ms (Ray: 1 model actor(s), tasks on 1 CPUs, 1 node(s);")


def test_ray_address_auto_joins_the_running_cluster(beside, tiny_onnx_dir, tmp_path):
    """`--ray-address auto` is the way to join the cluster beside: the job runs there; and
    -v shows Ray's own lines, which the default hides."""
    _photos(tmp_path / "in", 6)
    jobs_before = beside.state()["jobs"]
    code, out, err = _driver(
        ["-v", "infer", "--engine", "ray", "--ray-address", "auto",
         "--model", str(tiny_onnx_dir), "in", "-o", str(tmp_path / "out")],
        beside.env, tmp_path,
    )  # fmt: skip
    assert code == 0, err[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["ray"]["private"] is False and summary["ray"]["address"] == beside.address
    state = beside.state()
    assert len(state["jobs"]) == len(jobs_before) + 1
    workers = [a for a in state["actors"] if "_ModelStage" in a["class"]]
    assert workers and {a["node"] for a in workers} <= set(beside.nodes)
    assert f"Ray: joined the cluster at {beside.address}" in err
    assert any(marker in line for line in err.splitlines() for marker in RAY_LINE), err[-3000:]


def test_ray_session_starts_a_private_ray_and_stops_it(tmp_path):
    """The module `serve` shares: a private Ray on the loopback only, sized as asked, gone
    with every process it started at the end of the block (and only those), signal
    handlers as before; sizing a cluster to join is refused."""
    code = textwrap.dedent(
        """
        import json, signal, subprocess, sys, psutil
        from segdeploy.errors import SegdeployError
        from segdeploy.runtime.ray_session import ray_session

        handler = signal.getsignal(signal.SIGTERM)
        with ray_session(None, num_cpus=1) as info:
            import ray
            # A child of the caller's, started inside the block: not Ray's to stop.
            mine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            procs = [p for p in psutil.Process().children(recursive=True) if p.pid != mine.pid]
            listening = sorted({
                c.laddr.ip for p in procs for c in p.net_connections("inet")
                if c.status == psutil.CONN_LISTEN
            })
        gone, alive = psutil.wait_procs(procs, timeout=1)
        kept = mine.poll() is None
        mine.kill()
        mine.wait()
        try:
            with ray_session("auto", num_cpus=2):
                pass
        except SegdeployError as err:
            refused = str(err)
        print(json.dumps({
            "info": [info.address, info.private, info.nodes, info.cpus, info.gpus],
            "listening": listening, "processes": len(procs), "alive": len(alive),
            "initialized": ray.is_initialized(),
            "handler": signal.getsignal(signal.SIGTERM) == handler, "refused": refused,
            "kept": kept,
        }))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *LOOPBACK_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    address, private, nodes, cpus, gpus = seen["info"]
    assert address.startswith("127.0.0.1:") and private is True
    assert (nodes, cpus, gpus) == (1, 1.0, 0.0)
    # IPv4 only, or IPv6 sockets that take IPv4-mapped loopback connections.
    assert {ip.removeprefix("::ffff:") for ip in seen["listening"]} == {"127.0.0.1"}
    assert seen["processes"] >= 2
    assert seen["alive"] == 0 and seen["initialized"] is False and seen["handler"] is True
    assert seen["kept"] is True  # the caller's own child outlives the block
    assert seen["refused"] == (
        "--ray-address: num_cpus and num_gpus size a private Ray, not a cluster"
    )


def test_ray_timeout_defaults_to_the_sessions_default():
    from segdeploy.cli.infer import infer
    from segdeploy.runtime.ray_session import DEFAULT_CONNECT_TIMEOUT_S, ray_session

    option = next(p for p in infer.params if p.name == "ray_timeout")
    assert option.default == DEFAULT_CONNECT_TIMEOUT_S == 30.0
    assert ray_session.__wrapped__.__kwdefaults__["connect_timeout_s"] == option.default


def test_two_nodes_both_do_work_with_the_local_engines_outputs(tiny_onnx_dir, tmp_path):
    """Issue 24: a two-node cluster on the loopback (1 CPU each): model actors or tasks
    ran on both nodes, and the label maps are byte-identical to the local engine's."""
    from ray_beside import Beside

    pytest.importorskip("ray", reason="the ray extra is not installed")
    root = tmp_path / "photos"
    _photos(root, 12)
    local = _infer("--model", str(tiny_onnx_dir), "--provider", "cpu", str(root), "-o",
                   str(tmp_path / "local"))  # fmt: skip
    assert local.exit_code == 0, local.output
    cluster = Beside(nodes=2, cpus=1)
    try:
        code, _, err = _driver(
            ["infer", "--engine", "ray", "--ray-address", cluster.address, "--provider", "cpu",
             "--batch-size", "2", "--model", str(tiny_onnx_dir), str(root), "-o",
             str(tmp_path / "ray")],
            cluster.env, tmp_path,
        )  # fmt: skip
        assert code == 0, err[-3000:]
        state = cluster.state()
    finally:
        left = cluster.close()
    assert not left, f"processes of the cluster left behind: {left}"
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["ray"]["nodes"] == 2
    assert set(summary["ray"]["nodes_used"]) == set(cluster.nodes)  # both did work
    # The cluster's own record agrees: the model actors ran on both nodes.
    model_nodes = {a["node"] for a in state["actors"] if "_ModelStage" in a["class"]}
    assert model_nodes == set(cluster.nodes)
    assert summary["totals"]["images"] == 12
    assert _digests(tmp_path / "ray") == _digests(tmp_path / "local")
