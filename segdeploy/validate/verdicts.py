"""The rules a graph is held to, and its verdict: it passes when every rule it was held to passes.

The report lists the rules in "rules" and the failing ones in "failed_rules":
mean_iou (mean IoU within `tolerance` of PyTorch's, either way: an export that
scores higher is as unfaithful as one that scores lower), pixel_agreement (label
maps equal to PyTorch's on at least MIN_AGREEMENT of the pixels for the graph's
precision), logits (an fp32 graph's logits match PyTorch's, since mean IoU alone
cannot see a change to classes the model never predicts; every graph's, without
labelled data), second_size (an fp32 graph with dynamic height and width: its logits
at a second input size, same tolerance, so that a graph right only at the traced size
fails) and fused_agreement (graphs that output labels).
"""

from __future__ import annotations

from segdeploy.train.metrics import finite

#: Largest allowed change of mean IoU (absolute, either way), per graph precision.
DEFAULT_TOLERANCE = {"fp32": 0.001, "fp16": 0.005, "int8": 0.01}
#: Largest allowed max |logit difference|, relative to the largest |logit| of PyTorch
#: (or 1, whichever is larger): for every graph without labelled data, for fp32 graphs
#: always. fp32 measured 1e-7..4e-6 relative (max |delta| 4.3e-6, CamVid b0,
#: benchmarks/results/camvid_validation_fp32.json), so 1e-3 fails only a changed graph.
DEFAULT_LOGIT_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "int8": 1e-1}
#: Smallest share of pixels whose label equals PyTorch's, per precision, for every
#: graph (with or without data). Measured: fp32 100.000% (CamVid b0, 101 val images,
#: benchmarks/results/camvid_validation_fp32.json; and the tiny test model), fp16
#: 99.997% (tiny model, README), int8 99.713% (CamVid b0, uint8 weights,
#: benchmarks/results/camvid_validation_int8.json). The untrained tiny test model
#: measured fp32 100.000%, fp16 99.951%, int8 98.33% on 8 synthetic images: with
#: random weights nearly every pixel is a near tie that int8 rounding flips, so
#: its int8 graph fails the floor, as it should fail any model it is that unsure
#: of. Each floor leaves room below the trained models' measurements and still
#: fails a graph that changes decisions the model is sure of.
MIN_AGREEMENT = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99}
#: Graphs with argmax fused in (`export --fuse-argmax`) return labels, not logits;
#: they are judged by agreement with PyTorch's label maps (issue 7: 99.9%).
FUSED_MIN_AGREEMENT = 0.999
RANDOM_INPUT_NOTE = (
    "no labelled data: compared logits on random images only, which proves less than "
    "mean IoU on real images (pass --dataset to validate on data)"
)


def judge(report, st, run, data, id2label, tolerance, logit_tolerance) -> None:
    """Hold the graph to its rules (see the module docstring); sets passed and failed_rules."""
    if data is not None:
        _judge_miou(report, run["torch_iou"], st.metric.compute(), id2label, tolerance)
    else:
        _mark_random_inputs(report)
    if st.fused:  # labels, not logits: only agreement can be compared
        _judge_agreement(report, FUSED_MIN_AGREEMENT, "fused_agreement")
    else:
        if data is None or report["precision"] == "fp32":
            _judge_logits(report, run["logit_scale"], logit_tolerance)
        if st.second_size is not None and report["precision"] == "fp32":
            _judge_second_size(report, st.second_size, logit_tolerance)
        _judge_agreement(report, MIN_AGREEMENT[report["precision"]], "pixel_agreement")
    _verdict(report)


def _rule(report: dict, name: str, ok: bool, text: str) -> None:
    """Record one rule's verdict; the report passes only when every rule it was held to does."""
    report.setdefault("rules", {})[name] = {"passed": bool(ok), "reason": text}


def _verdict(report: dict) -> None:
    rules = report.get("rules", {})
    report["failed_rules"] = [name for name, r in rules.items() if not r["passed"]]
    report["passed"] = not report["failed_rules"]
    report["reason"] = "; ".join(r["reason"] for r in rules.values())
    if report["failed_rules"]:
        report["reason"] += f" (failed: {', '.join(report['failed_rules'])})"


def _judge_miou(report, torch_result, onnx_result, id2label, tolerance) -> None:
    tol = DEFAULT_TOLERANCE[report["precision"]] if tolerance is None else float(tolerance)
    t_miou, o_miou = finite(torch_result["mean_iou"]), finite(onnx_result["mean_iou"])
    drop = None if t_miou is None or o_miou is None else t_miou - o_miou
    report.update(
        mean_iou_torch=t_miou,
        mean_iou_onnx=o_miou,
        mean_iou_drop=drop,
        tolerance=tol,
        per_class_iou=[
            {"id": i, "class": id2label.get(i, str(i)), "torch": finite(t), "onnx": finite(o)}
            for i, (t, o) in enumerate(
                zip(torch_result["per_category_iou"], onnx_result["per_category_iou"], strict=True)
            )
        ],
    )
    if drop is None:
        _rule(report, "mean_iou", False, "no labelled pixels: mean IoU is undefined")
    else:
        # A small epsilon: a drop equal to the tolerance must not fail on float rounding.
        ok = abs(drop) <= tol + 1e-12
        _rule(
            report,
            "mean_iou",
            ok,
            f"mean IoU {'dropped' if drop >= 0 else 'rose'} by {abs(drop):.5f}, "
            f"{'within' if ok else 'beyond'} the tolerance {tol}",
        )


def _judge_logits(report, logit_scale, logit_tolerance) -> None:
    """max |logit difference| within a tolerance relative to PyTorch's largest |logit|.

    Held to by every graph without labelled data, and by fp32 graphs always: mean
    IoU alone passed an fp32 graph with the classifier rows of two never-predicted
    classes swapped (max |delta logit| 0.78, issue 12).
    """
    tol = (
        DEFAULT_LOGIT_TOLERANCE[report["precision"]]
        if logit_tolerance is None
        else float(logit_tolerance)
    )
    allowed = tol * max(1.0, logit_scale)
    ok = report["max_abs_logit_diff"] <= allowed
    report.update(logit_tolerance=tol, max_abs_logit_allowed=allowed)
    _rule(
        report,
        "logits",
        ok,
        f"max |logit difference| {report['max_abs_logit_diff']:.3g} "
        f"{'within' if ok else 'beyond'} {allowed:.3g}",
    )


def _judge_second_size(report, second: dict, logit_tolerance) -> None:
    """Dynamic spatial axes must be right at other sizes too: the logits at a second size
    are held to the same tolerance as at the validated one."""
    tol = DEFAULT_LOGIT_TOLERANCE["fp32"] if logit_tolerance is None else float(logit_tolerance)
    allowed = tol * max(1.0, second["logit_scale"])
    ok = second["max_abs_logit_diff"] <= allowed
    report["second_size"] = {**second, "max_abs_logit_allowed": allowed}
    size = "x".join(map(str, second["size"]))
    _rule(
        report,
        "second_size",
        ok,
        f"at {size} (dynamic axes) max |logit difference| {second['max_abs_logit_diff']:.3g} "
        f"{'within' if ok else 'beyond'} {allowed:.3g}"
        + (f" ({second['error'][:200]})" if "error" in second else ""),
    )


def _mark_random_inputs(report) -> None:
    report.update(mean_iou_torch=None, mean_iou_onnx=None, mean_iou_drop=None, tolerance=None)
    report["note"] = RANDOM_INPUT_NOTE


def _judge_agreement(report, floor: float, name: str) -> None:
    """Label maps equal to PyTorch's on at least `floor` of the pixels."""
    agreement = report["pixel_agreement"] or 0.0
    ok = agreement >= floor
    report["min_pixel_agreement"] = floor
    _rule(
        report,
        name,
        ok,
        f"label maps agree with PyTorch on {100 * agreement:.3f}% of pixels, "
        f"{'at least' if ok else 'below'} {100 * floor:g}%",
    )
