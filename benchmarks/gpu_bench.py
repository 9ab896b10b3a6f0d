"""GPU benchmark (issue 7): torch eager fp32/fp16 vs ONNX Runtime CUDA fp32/fp16.

Same images, same model, one call. For each backend and batch size it measures
end-to-end images/s (decode -> label map in host memory), model-only latency
p50/p95 (the forward alone on prepared batches, synchronised), peak GPU memory,
and pixel agreement of the label maps with torch fp32. Writes
`<out>/gpu-<device>.json` and `.md`.

It needs only what the lent GPU machine has (torch, transformers, numpy, Pillow)
plus onnxruntime-gpu, which travels in the working tree: see
benchmarks/gpu/README.md for the exact device command. `--device cpu` runs the
same code on the CPU (torch CPU, ORT CPUExecutionProvider), which is how it is
tested on machines without a GPU.

    python benchmarks/gpu_bench.py --model models/camvid-b0 \
        --images ../shared/data/camvid/images/val --batch-sizes 1,16
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing segdeploy

from segdeploy.runtime.image_io import is_image_name, load_image  # noqa: E402


def _percentiles(times: list[float]) -> dict[str, float]:
    ms = np.asarray(times) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


class TorchBackend:
    """transformers' SegFormer in eager mode: the guide's inference path."""

    def __init__(self, model_dir: Path, device: str, fp16: bool):
        import torch
        from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

        self.torch, self.device = torch, device
        self.dtype = torch.float16 if fp16 else torch.float32
        self.model = SegformerForSemanticSegmentation.from_pretrained(model_dir)
        self.model = self.model.to(device=device, dtype=self.dtype).eval()
        self.processor = SegformerImageProcessor.from_pretrained(model_dir)

    def prepare(self, images):
        return self.processor(images=images, return_tensors="np")["pixel_values"]

    def forward(self, pixels: np.ndarray):
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(pixels).to(self.device, self.dtype, non_blocking=True)
            return self.model(pixel_values=x).logits

    def masks(self, logits, sizes) -> list[np.ndarray]:
        torch = self.torch
        out = []
        with torch.inference_mode():
            for i, size in enumerate(sizes):
                up = torch.nn.functional.interpolate(
                    logits[i : i + 1].float(), size=size, mode="bilinear", align_corners=False
                )
                out.append(up.argmax(1)[0].to(torch.uint8).cpu().numpy())
        return out

    def sync(self):
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()


class OrtBackend:
    """segdeploy's Segmenter: numpy preprocessing, IO binding, upsampling off the GPU thread."""

    def __init__(self, model_dir: Path, provider: str, variant: str, batch_size: int, pool):
        import onnxruntime as ort

        from segdeploy.runtime.segmenter import Segmenter

        if provider == "cuda" and hasattr(ort, "preload_dlls"):
            # The GPU machine's CUDA 13 / cuDNN libraries live in torch's nvidia/* wheels,
            # not on the library path; onnxruntime knows how to find and load them.
            ort.preload_dlls()
        self.seg = Segmenter(model_dir, provider, variant, batch_size=batch_size)
        self.pool = pool

    def prepare(self, images):
        return np.stack(list(self.pool.map(self.seg.prepare, images)))

    def run(self, pixels, sizes):
        return self.seg.forward(list(pixels), sizes)

    def sync(self):
        pass


def _gpu_memory_mb(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import os

    try:
        rows = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for row in rows.splitlines():
        pid, mem = (s.strip() for s in row.split(","))
        if pid == str(os.getpid()):
            return float(mem)
    return None


def bench_one(args, backend_name: str, batch_size: int, paths: list[Path]) -> dict:
    """One backend at one batch size; runs in its own process so memory peaks do not mix."""
    pool = ThreadPoolExecutor(4)
    model_dir = Path(args.model)
    onnx_dir = model_dir / "onnx" if (model_dir / "onnx").is_dir() else model_dir
    provider = "cuda" if args.device.startswith("cuda") else "cpu"
    kind, _, precision = backend_name.partition("-")
    if kind == "torch":
        be = TorchBackend(model_dir, args.device, fp16=precision == "fp16")
    else:
        variant = {"fp32": "fp32", "fp16": "fp16", "fp16fused": "fp16_fused"}[precision]
        be = OrtBackend(onnx_dir, provider, variant, batch_size, pool)

    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    batches = [b for b in batches if len(b) == batch_size] or batches[:1]

    def end_to_end(batch):
        images = list(pool.map(load_image, batch))
        sizes = [(im.height, im.width) for im in images]
        pixels = be.prepare(images)
        if kind == "torch":
            return be.masks(be.forward(pixels), sizes)
        pending = be.run(pixels, sizes)
        return list(pool.map(lambda p: p(), pending))

    # Warm-up: first batch twice (cuDNN autotuning, ORT arena growth).
    for _ in range(2):
        end_to_end(batches[0])
    be.sync()
    rates, masks = [], {}
    for _ in range(args.runs):
        t0 = time.perf_counter()
        n = 0
        for batch in batches:
            for p, m in zip(batch, end_to_end(batch), strict=True):
                masks[str(p)] = m
            n += len(batch)
        be.sync()
        rates.append(n / (time.perf_counter() - t0))

    first = [load_image(p) for p in batches[0]]
    pixels = be.prepare(first)
    # A fused graph's forward includes its upsampling to the images' real size.
    first_sizes = [(im.height, im.width) for im in first]
    times = []
    for _ in range(max(20, 5 * args.runs)):
        be.sync()
        t0 = time.perf_counter()
        if kind == "torch":
            be.forward(pixels)
        else:
            # forward() leaves the outputs on the device (IO binding), as torch's forward does.
            be.run(pixels, first_sizes)
        be.sync()
        times.append(time.perf_counter() - t0)
    if kind == "torch" and args.device.startswith("cuda"):
        memory = be.torch.cuda.max_memory_allocated() / 2**20
    else:
        memory = _gpu_memory_mb(args.device)
    np.savez_compressed(args.masks_out, **{f"m{i}": m for i, m in enumerate(masks.values())})
    return {
        "backend": backend_name,
        "batch_size": batch_size,
        "images": len(paths),
        "images_per_s": float(np.median(rates)),
        **_percentiles(times),
        "gpu_memory_mb": memory,
        "provider": getattr(getattr(be, "seg", None), "provider", args.device),
    }


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "onnxruntime", "numpy", "PIL"):
        try:
            out[name] = __import__(name).__version__
        except Exception as err:  # absent or broken: record why rather than fail
            out[name] = f"unavailable ({type(err).__name__})"
    return out


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="trained model folder with its export in onnx/")
    p.add_argument("--images", required=True, help="folder of images (e.g. CamVid val)")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--backends", default="torch-fp32,torch-fp16,ort-fp32,ort-fp16,ort-fp16fused")
    p.add_argument("--runs", type=int, default=3, help="timed passes over the images (median)")
    p.add_argument("--limit", type=int, default=96, help="images used (a multiple of 16 is best)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu to smoke-test the script")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: backend,batch in a child process
    p.add_argument("--masks-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    paths = sorted(q for q in Path(args.images).rglob("*") if q.is_file() and is_image_name(q))
    paths = paths[: args.limit]
    if not paths:
        p.error(f"{args.images}: no images")
    if args.one:
        name, batch = args.one.split(",")
        print(json.dumps(bench_one(args, name, int(batch), paths)))
        return 0

    onnx_dir = Path(args.model) / "onnx"
    rows, tmp = [], Path(args.out) / ".gpu_bench_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        reference = None
        for name in args.backends.split(","):
            graph = {"ort-fp16": "model_fp16.onnx", "ort-fp16fused": "model_fp16_fused.onnx"}.get(
                name
            )
            if graph and not (onnx_dir / graph).is_file():
                rows.append(
                    {"backend": name, "batch_size": batch, "skipped": f"no {graph} in {onnx_dir}"}
                )
                continue
            masks_file = tmp / f"{name}-{batch}.npz"
            cmd = [
                sys.executable,
                __file__,
                "--model",
                args.model,
                "--images",
                args.images,
                "--runs",
                str(args.runs),
                "--limit",
                str(args.limit),
                "--device",
                args.device,
                "--one",
                f"{name},{batch}",
                "--masks-out",
                str(masks_file),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                reason = (done.stderr.strip().splitlines() or ["failed"])[-1]
                rows.append({"backend": name, "batch_size": batch, "skipped": reason})
                print(f"{name} b{batch}: {reason}", file=sys.stderr)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            with np.load(masks_file) as z:
                masks = [z[k] for k in sorted(z.files, key=lambda k: int(k[1:]))]
            if reference is None and name == "torch-fp32":
                reference = masks
            if reference is not None:
                same = sum(int((a == b).sum()) for a, b in zip(masks, reference, strict=True))
                row["agreement_vs_torch_fp32"] = same / sum(a.size for a in reference)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)

    for r in rows:
        ref = next(
            (
                q
                for q in rows
                if q["backend"] == "torch-fp32"
                and q["batch_size"] == r["batch_size"]
                and "images_per_s" in q
            ),
            None,
        )
        if ref and "images_per_s" in r:
            r["speedup_vs_torch_fp32_same_batch"] = r["images_per_s"] / ref["images_per_s"]
    device = _device_name(args.device)
    report = {
        "device": device,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "model": str(args.model),
        "images": args.images,
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    out = Path(args.out)
    (out / f"gpu-{slug}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"gpu-{slug}.md").write_text(_markdown(report))
    print(_markdown(report))
    for f in tmp.glob("*.npz"):
        f.unlink()
    tmp.rmdir()
    return 0


def _markdown(report: dict) -> str:
    lines = [
        f"# GPU benchmark: {report['device']}, {report['date']}",
        "",
        f"Model `{report['model']}`, images `{report['images']}`. Versions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        "| backend | batch | images/s end to end | x torch fp32 | model p50 ms | model p95 ms | GPU MiB | agreement vs torch fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        if "skipped" in r:
            lines.append(
                f"| {r['backend']} | {r['batch_size']} | skipped: {r['skipped']} | | | | | |"
            )
            continue
        fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"| {r['backend']} | {r['batch_size']} | {r['images_per_s']:.1f} | "
            f"{fmt(r.get('speedup_vs_torch_fp32_same_batch'), '.2f')} | {r['p50_ms']:.2f} | "
            f"{r['p95_ms']:.2f} | {fmt(r.get('gpu_memory_mb'), '.0f')} | "
            f"{fmt(r.get('agreement_vs_torch_fp32'), '.5f')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
