"""Every family's tiny model through its exporter route: time, fidelity, mask agreement.

Per family (UPerNet with both backbones): the registry's route, opset and dynamic
axes; export seconds; max |delta logit| between ONNX Runtime and torch (absolute,
and relative to max |logit|) at the traced size and at a second size (or
"refused" where the graph's spatial axes are fixed); the share of equal pixels of
the masks (runtime upsample_argmax vs torch bilinear + argmax) at a photo size;
and the same for the whole torch-free path (our processor, ONNX Runtime,
upsample_argmax) against the guide's torch path on three photos.

    .venv/bin/python benchmarks/bench_families.py [--only upernet]

Tiny models are built by tests/family_models.py (He-normal re-initialised).
Writes benchmarks/results/families.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
PHOTO = (150, 200)


def measure(model_type: str, size: str, root: Path) -> dict:
    import onnxruntime as ort
    import torch
    import transformers
    from family_models import SIDE, save_model_folder
    from PIL import Image

    from segdeploy.data.synthetic import synthetic_sample
    from segdeploy.export.routes import export_fp32
    from segdeploy.families import FAMILIES
    from segdeploy.runtime.processors import processor_from_dir
    from segdeploy.runtime.upsample import upsample_argmax

    family = FAMILIES[model_type]
    model_dir = save_model_folder(root / "model", model_type, size)
    start = time.perf_counter()
    path = export_fp32(model_dir, root / "onnx")
    seconds = time.perf_counter() - start
    model = transformers.AutoModelForSemanticSegmentation.from_pretrained(model_dir).eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)

    def compare(hw):
        x = rng.standard_normal((2, 3, *hw)).astype(np.float32)
        try:
            got = session.run(["logits"], {"pixel_values": x})[0]
        except Exception as err:  # a fixed-size graph refuses other sizes
            return {"size": list(hw), "refused": str(err).splitlines()[0][:80]}
        with torch.no_grad():  # (BEiT's torch model itself fails off its image_size)
            expected = model(pixel_values=torch.from_numpy(x)).logits.numpy()
        delta = float(np.abs(got - expected).max())
        torch_mask = torch.nn.functional.interpolate(
            torch.from_numpy(expected), size=PHOTO, mode="bilinear", align_corners=False
        ).argmax(1)
        agree = float((upsample_argmax(got, PHOTO) == torch_mask.numpy()).mean())
        return {
            "size": list(hw),
            "max_abs_delta": delta,
            "rel_delta": delta / float(np.abs(expected).max()),
            "max_abs_logit": float(np.abs(expected).max()),
            "mask_agreement": agree,
        }

    second = (96, 96) if family.square_only else (96, 128)
    reference = transformers.AutoImageProcessor.from_pretrained(model_dir, use_fast=False)
    ours = processor_from_dir(model_dir)
    agreements, bit_equal = [], True
    for i, (h, w) in enumerate([(150, 200), (97, 61), (64, 64)]):
        photo = Image.fromarray(synthetic_sample(i, size=(h, w))[0])
        pixels, geometry = ours(photo)
        ref = reference(images=photo, return_tensors="np")["pixel_values"]
        bit_equal &= bool(np.array_equal(pixels[None], ref))
        mask = upsample_argmax(session.run(["logits"], {"pixel_values": pixels[None]})[0], (h, w))
        with torch.no_grad():
            t = model(pixel_values=torch.from_numpy(ref)).logits
        t = torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
        agreements.append(float((mask == t.argmax(1).numpy()).mean()))
    return {
        "family": model_type,
        "scratch": f"{family.scratch_name}-{size}",
        "route": family.route,
        "opset": family.default_opset,
        "dynamic_spatial": family.dynamic_spatial,
        "square_only": family.square_only,
        "export_seconds": round(seconds, 2),
        "traced": compare((SIDE, SIDE)),
        "second": compare(second),
        "processor_bit_equal": bit_equal,
        "photo_mask_agreement_min": min(agreements),
    }


def main() -> None:
    from family_models import CASES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model types to measure (default: all)")
    parser.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks" / "results" / "families.json"
    )
    args = parser.parse_args()
    rows = []
    print(
        f"{'case':24} {'route':15} {'opset':>5} {'dyn':>4} {'export s':>8}  {'traced rel':>10}  {'second':>22}  {'mask':>6} {'photos':>6}"
    )
    for model_type, size in CASES:
        if args.only and model_type not in args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(model_type, size, Path(tmp))
        rows.append(r)
        second = r["second"]
        second_text = (
            f"refused {second['size'][0]}x{second['size'][1]}"
            if "refused" in second
            else f"{second['size'][0]}x{second['size'][1]} {second['rel_delta']:.1e}"
        )
        print(
            f"{r['scratch']:24} {r['route']:15} {r['opset']:>5} {'yes' if r['dynamic_spatial'] else 'no':>4} "
            f"{r['export_seconds']:>8.1f}  {r['traced']['rel_delta']:>10.1e}  {second_text:>22}  "
            f"{r['traced']['mask_agreement']:>6.4f} {r['photo_mask_agreement_min']:>6.4f}",
            flush=True,
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "photo_size": list(PHOTO),
    }
    args.output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
