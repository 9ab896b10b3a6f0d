"""Accuracy-aware int8: find which nodes must stay in float for a given accuracy limit.

`segdeploy export --quantize int8 --max-drop 0.01` calls `quantize_int8_within`.
The search sees only an ONNX graph, preprocessed images and the fp32 graph's
predictions, so it works for any architecture that export writes:

1. Quantize with the starting exclusions (segdeploy's defaults: Softmax,
   LayerNorm, attention scores; see segdeploy.export.quantize) and measure the drop on
   held-out training images (neither the validation split nor the calibration
   images). The drop is 1 - mean IoU of the int8 predictions against the fp32
   graph's predictions taken as the reference: a disagreement measure that bounds
   how far int8 can move mean IoU against any ground truth in practice and needs
   no labels. (The fp32 graph is itself validated against PyTorch by export.)
2. While the drop exceeds the limit: measure each candidate group's sensitivity
   (the drop with that group kept in float as well), then try the groups in
   order of measured gain, keeping each in float that lowers the re-measured
   drop of the combination, until the drop is within the limit (or every group
   was tried, or the budget is spent). This is NNCF accuracy control's rank-then-revert, done
   with onnxruntime's quantizer (which NNCF's ONNX backend cannot drive with our
   QDQ edits) and written by hand for that reason.

Groups are the graph's quantizable nodes cut by their name scope (/a/b/c/Conv
-> /a/b at the depth that gives at most `max_groups` groups), so one evaluation
covers a block of the network, not one node: every evaluation re-calibrates,
and the number of evaluations is bounded by `max_evaluations` (ranking costs one
per group, the greedy pass one per group kept). When the budget runs out, the
result says so, and export's validation judges the graph as it is.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.errors import SegdeployError
from segdeploy.folders import read_config

log = logging.getLogger(__name__)

DEFAULT_MAX_GROUPS = 16
DEFAULT_MAX_EVALUATIONS = 40
DEFAULT_HELD_OUT_IMAGES = 16


def predictions(onnx_path: str | os.PathLike, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Argmax class maps at the graph's output resolution, one array per batch."""
    from segdeploy.runtime.providers import create_session

    session = create_session(onnx_path, "cpu")
    name = session.get_inputs()[0].name
    return [session.run(None, {name: b})[0].argmax(1).astype(np.int32) for b in batches]


def drop_against(reference: Sequence[np.ndarray], preds: Sequence[np.ndarray], n: int) -> float:
    """1 - mean IoU of `preds` with `reference` taken as the labels (0 when identical)."""
    from segdeploy.train.metrics import MeanIoU

    metric = MeanIoU(n, ignore_index=-1)
    for ref, pred in zip(reference, preds, strict=True):
        metric.update(pred, ref)
    return float(1.0 - metric.compute()["mean_iou"])


# Ops that only move or reshape a tensor: in a QDQ graph they pass quantized values
# through unchanged, so keeping one in float buys no accuracy and costs a Q/DQ pair.
PASS_THROUGH_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})


def candidate_groups(
    onnx_path: str | os.PathLike,
    op_types: Sequence[str],
    excluded_op_types: Sequence[str],
    max_groups: int = DEFAULT_MAX_GROUPS,
    *,
    skip_symbolic_shape: bool = False,
) -> dict[str, list[str]]:
    """The quantizable nodes that survive quantize_int8's pre-processing, grouped by name
    scope into at most `max_groups` groups.

    Starting from one group, the largest group that a deeper scope splits is split
    while the total stays within `max_groups`: big blocks get cut finer, small ones
    stay whole. Nodes without a scope are grouped by op type.
    """
    import onnx

    from segdeploy.export.quantize import pre_process
    from segdeploy.export.quantize.edits import fuse_gelu as _fuse_gelu

    source = onnx.load(os.fspath(onnx_path), load_external_data=False).graph
    with tempfile.TemporaryDirectory(prefix="segdeploy-int8-groups-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        pre_process(onnx_path, pre, skip_symbolic_shape=skip_symbolic_shape)
        model = onnx.load(os.fspath(pre))
        _fuse_gelu(model)  # as quantize_int8 does: the fused nodes cannot be excluded
        present = {n.name for n in model.graph.node}
    wanted = set(op_types) - set(excluded_op_types) - PASS_THROUGH_OPS
    op_of = {n.name: n.op_type for n in source.node}
    module_scopes = {n.name: _module_scopes(n) for n in source.node}
    nodes = [n.name for n in source.node if n.name in present and n.op_type in wanted]

    def scopes(name: str) -> list[str]:
        if module_scopes[name]:  # torch's dynamo exporter: node_conv2d_1, scopes in metadata
            return module_scopes[name]
        parts = [p for p in name.split("/") if p][:-1]
        return ["/" + "/".join(parts[: d + 1]) for d in range(len(parts))] or [op_of[name]]

    def split(members: list[str], depth: int) -> dict[tuple[str, int], list[str]]:
        out: dict[tuple[str, int], list[str]] = {}
        for name in members:
            chain = scopes(name)
            out.setdefault((chain[min(depth, len(chain) - 1)], depth), []).append(name)
        return out

    groups = split(nodes, 0) if nodes else {}
    while len(groups) < max_groups:
        for key in sorted(groups, key=lambda k: -len(groups[k])):
            # Descend through scopes every member shares (/model -> /model/encoder).
            depth, parts = key[1] + 1, split(groups[key], key[1] + 1)
            while len(parts) == 1 and depth < max(len(scopes(n)) for n in groups[key]):
                depth += 1
                parts = split(groups[key], depth)
            if len(parts) > 1 and len(groups) - 1 + len(parts) <= max_groups:
                del groups[key]
                groups.update(parts)
                break
        else:
            break
    order = {name: i for i, name in enumerate(nodes)}
    ranked = sorted(groups.items(), key=lambda kv: order[kv[1][0]])
    return {scope: members for (scope, _), members in ranked}


def _module_scopes(node) -> list[str]:
    """The module scopes torch's dynamo exporter records on a node ("/model",
    "/model/backbone", ...), from its `pkg.torch.onnx.name_scopes` metadata; [] for graphs
    whose node names carry the scopes themselves (TorchScript and Optimum: /model/x/Conv)."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            names = [n for n in ast.literal_eval(prop.value)[:-1] if n]  # last: the op itself
            return ["/" + n.replace(".", "/") for n in names]
    return []


class _Evaluator:
    """Quantize with an exclusion list and measure the drop; counts evaluations."""

    def __init__(
        self, onnx_path, calibration, held_out, reference, num_labels, work, budget, skip_symbolic
    ):
        self.onnx_path, self.calibration, self.held_out = Path(onnx_path), calibration, held_out
        self.reference, self.num_labels, self.work = reference, num_labels, Path(work)
        self.budget, self.count, self.skip_symbolic = budget, 0, skip_symbolic

    def left(self) -> int:
        return self.budget - self.count

    def drop(self, op_types: Sequence[str], nodes: Sequence[str], output: Path | None = None):
        from segdeploy.export.quantize import quantize_int8

        self.count += 1
        out = output or self.work / f"eval-{self.count}.onnx"
        report = quantize_int8(
            self.onnx_path,
            out,
            iter(self.calibration),
            exclude_op_types=op_types,
            nodes_to_exclude=list(nodes),
            skip_symbolic_shape=self.skip_symbolic,
        )
        value = drop_against(self.reference, predictions(out, self.held_out), self.num_labels)
        if output is None:
            out.unlink(missing_ok=True)
        log.info(
            "int8 search: evaluation %d, %d nodes in float: drop %.4f",
            self.count,
            len(nodes),
            value,
        )
        return value, report


def _keep_worst_in_float(
    ev: _Evaluator, start: Sequence[str], groups: dict[str, list[str]], drop: float, max_drop: float
) -> tuple[list[str], list[dict[str, Any]], dict[str, str]]:
    """Rank each group by its gain when it alone stays in float, then keep groups in float
    greedily, best first, re-measuring the combination each time, until the drop is within
    `max_drop` or the evaluations run out. (nodes kept, each group's effect, why each group
    kept in float is there).

    The greedy pass goes on past the groups whose gain alone was not positive: alone, a
    group's effect hides how it combines with the others (on a tiny SegFormer, one block
    alone in float raised the drop from 0.113 to 0.125, yet kept with four others it
    lowered the drop from 0.035 to 0.024), and the budget is there to be spent.
    """
    effects = []
    for name, nodes in groups.items():
        if ev.left() <= 1:
            break
        d, _ = ev.drop(start, nodes)
        effects.append({"group": name, "nodes": len(nodes), "drop_if_float": round(d, 5),
                        "gain": round(drop - d, 5)})  # fmt: skip
    ranked = sorted(effects, key=lambda e: -e["gain"])  # stable: graph order among equals
    kept: list[str] = []
    why: dict[str, str] = {}
    for effect in ranked:
        if drop <= max_drop or ev.left() <= 1:
            break
        trial = kept + groups[effect["group"]]
        d, _ = ev.drop(start, trial)
        effect["drop_after_keeping"] = round(d, 5)
        if d < drop:
            why[effect["group"]] = (
                f"measured: keeping it in float as well moved the drop from {drop:.4f} to "
                f"{d:.4f} (alone in float: {effect['drop_if_float']:.4f})"
            )
            kept, drop = trial, d
    return kept, effects, why


def search_exclusions(
    onnx_path: str | os.PathLike,
    output_path: str | os.PathLike,
    calibration: Sequence[np.ndarray],
    held_out: Sequence[np.ndarray],
    max_drop: float,
    *,
    num_labels: int,
    start_op_types: Sequence[str] | None = None,
    max_groups: int = DEFAULT_MAX_GROUPS,
    max_evaluations: int = DEFAULT_MAX_EVALUATIONS,
    skip_symbolic_shape: bool = False,
) -> dict[str, Any]:
    """Write to `output_path` the int8 graph of `onnx_path` whose drop on `held_out` is at
    most `max_drop`, keeping the fewest measured-worst node groups in float.

    Returns quantize_int8's report of the written graph with a "search" section:
    the limit, the drop reached, each evaluated group's measured effect, what
    stayed in float and why, and the evaluations spent.
    """
    from segdeploy.export.quantize import DEFAULT_FLOAT_OP_TYPES, _quantizable_op_types

    if not 0.0 <= max_drop <= 1.0:
        raise SegdeployError("--max-drop", f"must be between 0 and 1, got {max_drop}")
    if max_evaluations < 1:
        raise SegdeployError("max_evaluations", f"must be >= 1, got {max_evaluations}")
    if not held_out:
        raise SegdeployError("--max-drop", "no held-out images to measure the drop on")
    start = tuple(DEFAULT_FLOAT_OP_TYPES if start_op_types is None else start_op_types)
    output_path = Path(output_path)
    reference = predictions(onnx_path, held_out)
    groups = candidate_groups(
        onnx_path,
        _quantizable_op_types(),
        start,
        max_groups,
        skip_symbolic_shape=skip_symbolic_shape,
    )

    with tempfile.TemporaryDirectory(prefix="segdeploy-int8-search-") as tmp:
        ev = _Evaluator(
            onnx_path,
            calibration,
            held_out,
            reference,
            num_labels,
            tmp,
            max_evaluations,
            skip_symbolic_shape,
        )
        start_drop, _ = ev.drop(start, [])
        kept, effects, why = [], [], {}
        if start_drop > max_drop:
            kept, effects, why = _keep_worst_in_float(ev, start, groups, start_drop, max_drop)
        final_drop, report = ev.drop(start, kept, output=output_path)

    reached = final_drop <= max_drop
    if not reached:
        log.warning(
            "int8 search: drop %.4f still above --max-drop %.4f after %d evaluations",
            final_drop,
            max_drop,
            ev.count,
        )
    report["search"] = {
        "max_drop": max_drop,
        "measure": "1 - mean IoU of int8 predictions against the fp32 graph's, "
        f"on {sum(len(b) for b in held_out)} held-out training images",
        "starting_float_op_types": list(start),
        "starting_drop": round(start_drop, 5),
        "final_drop": round(final_drop, 5),
        "reached": reached,
        "groups": len(groups),
        "group_effects": effects,
        "kept_in_float": why,
        # What quantize_int8 actually kept in float by name (it drops names its
        # pre-processing fused away).
        "nodes_kept_in_float": report["float_nodes"]["by_name"],
        "evaluations": ev.count,
        "max_evaluations": max_evaluations,
    }
    return report


def held_out_images(model_dir: str | os.PathLike, calibration: Sequence[Any], n: int) -> list:
    """`n` training images of `model_dir` that are not among `calibration` (PIL images)."""
    from segdeploy.export.quantize import training_images

    seen = {np.asarray(im).tobytes() for im in calibration}
    pool = training_images(model_dir, len(calibration) + n, seed=1)
    return [im for im in pool if np.asarray(im).tobytes() not in seen][:n]


def quantize_int8_within(
    onnx_path: str | os.PathLike,
    output_path: str | os.PathLike,
    model_dir: str | os.PathLike,
    calibration_images: int,
    max_drop: float,
    *,
    held_out: int = DEFAULT_HELD_OUT_IMAGES,
    **kwargs,
) -> dict[str, Any]:
    """`segdeploy export --max-drop`: the search on `model_dir`'s recorded training images.

    Calibrates on the images plain `--quantize int8` calibrates on and measures on
    `held_out` other training images.
    """

    from segdeploy.export.quantize import calibration_batches, training_images
    from segdeploy.runtime.processors import model_processor

    preprocess = model_processor(model_dir).pixel_values
    calib_images = training_images(model_dir, calibration_images)
    held = held_out_images(model_dir, calib_images, held_out)
    if not held:
        raise SegdeployError(
            model_dir, "--max-drop needs training images beyond the calibration images"
        )
    config = read_config(Path(model_dir))
    return search_exclusions(
        onnx_path,
        output_path,
        list(calibration_batches(calib_images, preprocess)),
        list(calibration_batches(held, preprocess, batch_size=4)),
        max_drop,
        num_labels=len(config["id2label"]),
        **kwargs,
    )
