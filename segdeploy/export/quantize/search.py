"""Accuracy-aware int8: find which nodes must stay in float for a given accuracy limit.

`segdeploy export --quantize int8 --max-drop 0.01` calls `quantize_int8_within`.
The search sees only an ONNX graph, preprocessed images and the fp32 graph's
predictions, so it works for any architecture that export writes:

1. Quantize with the starting exclusions (segdeploy's defaults: Softmax,
   LayerNorm, attention scores; see segdeploy.export.quantize) and measure it on
   held-out images (images of the training split the model was not trained on
   where there are, else training images; never the validation split nor the
   calibration images) the way validation will judge it (`Measure`): label maps at each
   image's size (validation's upsample_argmax), compared with the fp32 graph's
   taken as the reference, for the drop (1 - mean IoU of the int8 maps with the
   fp32 maps as labels: a disagreement measure that bounds how far int8 can move
   mean IoU against any ground truth in practice and needs no labels) and the
   pixel agreement (validation's int8 floor). (The fp32 graph is itself validated
   against PyTorch by export.) A graph passes when the drop is within the limit
   and the agreement at least the floor: a search that judged the drop alone, at
   the graph's output resolution, on images the model was trained on, returned a
   DPT graph (drop 0.0099) that validation then failed at 98.6% agreement.
2. While the graph does not pass: measure each candidate group's sensitivity
   (how much closer to passing the graph gets with that group kept in float as
   well), then try the groups in order of measured gain, keeping each in float
   that brings the re-measured combination closer, until it passes (or every
   group was tried, or the budget is spent). This is NNCF accuracy control's
   rank-then-revert, done with onnxruntime's quantizer (which NNCF's ONNX backend
   cannot drive with our QDQ edits) and written by hand for that reason.

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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class HeldOut:
    """Preprocessed held-out batches and each image's (height, width): label maps are
    compared at image size, as validation compares them."""

    batches: list[np.ndarray]
    sizes: list[tuple[int, int]]
    what: str = "held-out images"

    def __post_init__(self):
        if len(self.sizes) != sum(int(b.shape[0]) for b in self.batches):
            raise ValueError("one (height, width) per held-out image")


def label_maps(onnx_path: str | os.PathLike, held_out: HeldOut) -> list[np.ndarray]:
    """The graph's label map of each held-out image at its own size, through validation's
    post-processing (bilinear upsampling of the logits, then argmax), so that the search
    counts the pixels validation counts (a SegFormer's logits are at 1/4 of its input)."""
    from segdeploy.runtime.providers import create_session
    from segdeploy.validate.compare import upsample_argmax

    session = create_session(onnx_path, "cpu")
    name = session.get_inputs()[0].name
    sizes = iter(held_out.sizes)
    return [
        upsample_argmax(logits, next(sizes)).astype(np.int32)
        for batch in held_out.batches
        for logits in session.run(None, {name: batch})[0]
    ]


def drop_against(reference: Sequence[np.ndarray], preds: Sequence[np.ndarray], n: int) -> float:
    """1 - mean IoU of `preds` with `reference` taken as the labels (0 when identical)."""
    from segdeploy.train.metrics import MeanIoU

    metric = MeanIoU(n, ignore_index=-1)
    for ref, pred in zip(reference, preds, strict=True):
        metric.update(pred, ref)
    return float(1.0 - metric.compute()["mean_iou"])


def agreement(reference: Sequence[np.ndarray], preds: Sequence[np.ndarray]) -> float:
    """Share of pixels whose label equals the reference's (validation's pixel_agreement)."""
    same = sum(int((r == p).sum()) for r, p in zip(reference, preds, strict=True))
    return same / max(1, sum(r.size for r in reference))


@dataclass(frozen=True)
class Measure:
    """One candidate graph, judged against the fp32 graph's label maps as validation
    judges a graph against PyTorch's: the mean IoU drop within `max_drop` and the pixel
    agreement at least `min_agreement` (validation's int8 floor)."""

    drop: float
    agreement: float
    max_drop: float
    min_agreement: float

    @property
    def shortfall(self) -> float:
        """How far the graph is from passing both rules (0 when it passes)."""
        return max(0.0, self.drop - self.max_drop) + max(0.0, self.min_agreement - self.agreement)

    @property
    def passes(self) -> bool:
        return self.shortfall == 0.0

    def __str__(self) -> str:
        return f"drop {self.drop:.4f}, agreement {self.agreement:.3%}"


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
    """Quantize with an exclusion list and measure it (a `Measure`); counts evaluations."""

    def __init__(self, onnx_path, calibration, held_out, rules, num_labels, work, budget, options):
        self.onnx_path, self.calibration, self.held_out = Path(onnx_path), calibration, held_out
        self.rules, self.num_labels, self.work = rules, num_labels, Path(work)
        self.budget, self.count, self.options = budget, 0, options
        self.reference = label_maps(onnx_path, held_out)

    def left(self) -> int:
        return self.budget - self.count

    def measure(self, op_types: Sequence[str], nodes: Sequence[str], output: Path | None = None):
        from segdeploy.export.quantize import quantize_int8

        self.count += 1
        out = output or self.work / f"eval-{self.count}.onnx"
        report = quantize_int8(
            self.onnx_path,
            out,
            iter(self.calibration),
            exclude_op_types=op_types,
            nodes_to_exclude=list(nodes),
            **self.options,
        )
        preds = label_maps(out, self.held_out)
        value = Measure(
            drop_against(self.reference, preds, self.num_labels),
            agreement(self.reference, preds),
            **self.rules,
        )
        if output is None:
            out.unlink(missing_ok=True)
        log.info("int8 search: evaluation %d, %d nodes in float: %s", self.count, len(nodes), value)
        return value, report


def _keep_worst_in_float(
    ev: _Evaluator, start: Sequence[str], groups: dict[str, list[str]], now: Measure
) -> tuple[list[str], list[dict[str, Any]], dict[str, str]]:
    """Rank each group by how much closer to passing (`Measure.shortfall`) the graph gets
    when it alone stays in float, then keep groups in float greedily, best first,
    re-measuring the combination each time, until the graph passes or the evaluations
    run out. (nodes kept, each group's effect, why each group kept in float is there).

    The greedy pass goes on past the groups whose gain alone was not positive: alone, a
    group's effect hides how it combines with the others (on a tiny SegFormer, one block
    alone in float raised the drop from 0.113 to 0.125, yet kept with four others it
    lowered the drop from 0.035 to 0.024), and the budget is there to be spent.
    """
    effects = []
    for name, nodes in groups.items():
        if ev.left() <= 1:
            break
        m, _ = ev.measure(start, nodes)
        effects.append({"group": name, "nodes": len(nodes), "drop_if_float": round(m.drop, 5),
                        "agreement_if_float": round(m.agreement, 6),
                        "gain": round(now.shortfall - m.shortfall, 6),
                        "error_gain": round(now.drop - m.drop + m.agreement - now.agreement, 6)})  # fmt: skip
    # Most shortfall removed first; among equals (one rule already met), what moves both.
    ranked = sorted(effects, key=lambda e: (-e["gain"], -e["error_gain"]))
    kept: list[str] = []
    why: dict[str, str] = {}
    for effect in ranked:
        if now.passes or ev.left() <= 1:
            break
        trial = kept + groups[effect["group"]]
        m, _ = ev.measure(start, trial)
        effect["drop_after_keeping"] = round(m.drop, 5)
        effect["agreement_after_keeping"] = round(m.agreement, 6)
        if m.shortfall < now.shortfall:
            why[effect["group"]] = (
                f"measured: keeping it in float as well moved the graph from {now} to {m}"
            )
            kept, now = trial, m
    return kept, effects, why


def search_exclusions(
    onnx_path: str | os.PathLike,
    output_path: str | os.PathLike,
    calibration: Sequence[np.ndarray],
    held_out: HeldOut,
    max_drop: float,
    *,
    num_labels: int,
    min_agreement: float | None = None,
    start_op_types: Sequence[str] | None = None,
    max_groups: int = DEFAULT_MAX_GROUPS,
    max_evaluations: int = DEFAULT_MAX_EVALUATIONS,
    **options,
) -> dict[str, Any]:
    """Write to `output_path` the int8 graph of `onnx_path` that passes validation's two
    rules on `held_out` against the fp32 graph (mean IoU drop at most `max_drop`, pixel
    agreement at least `min_agreement`, by default validation's int8 floor), keeping the
    fewest measured-worst node groups in float. `options` go to quantize_int8.

    Returns quantize_int8's report of the written graph with a "search" section:
    the limits, what was reached, each evaluated group's measured effect, what
    stayed in float and why, and the evaluations spent.
    """
    from segdeploy.export.quantize import DEFAULT_FLOAT_OP_TYPES, _quantizable_op_types
    from segdeploy.validate.verdicts import MIN_AGREEMENT

    if not 0.0 <= max_drop <= 1.0:
        raise SegdeployError("--max-drop", f"must be between 0 and 1, got {max_drop}")
    if max_evaluations < 1:
        raise SegdeployError("max_evaluations", f"must be >= 1, got {max_evaluations}")
    if not held_out.batches:
        raise SegdeployError("--max-drop", "no held-out images to measure the drop on")
    floor = MIN_AGREEMENT["int8"] if min_agreement is None else min_agreement
    start = tuple(DEFAULT_FLOAT_OP_TYPES if start_op_types is None else start_op_types)
    output_path = Path(output_path)
    groups = candidate_groups(
        onnx_path,
        _quantizable_op_types(),
        start,
        max_groups,
        skip_symbolic_shape=options.get("skip_symbolic_shape", False),
    )

    with tempfile.TemporaryDirectory(prefix="segdeploy-int8-search-") as tmp:
        rules = {"max_drop": max_drop, "min_agreement": floor}
        ev = _Evaluator(
            onnx_path, calibration, held_out, rules, num_labels, tmp, max_evaluations, options
        )
        first, _ = ev.measure(start, [])
        kept, effects, why = [], [], {}
        if not first.passes:
            kept, effects, why = _keep_worst_in_float(ev, start, groups, first)
        final, report = ev.measure(start, kept, output=output_path)

    if not final.passes:
        log.warning(
            "int8 search: %s still outside --max-drop %.4f / agreement %.1f%% after %d evaluations",
            final,
            max_drop,
            100 * floor,
            ev.count,
        )
    report["search"] = {
        "max_drop": max_drop,
        "min_agreement": floor,
        "measure": "against the fp32 graph's label maps at image size (bilinear upsampling "
        "of the logits, then argmax, as validation does), on "
        f"{len(held_out.sizes)} {held_out.what}: the drop is 1 - mean IoU of the "
        "int8 label maps with the fp32 ones as labels, the agreement the share of equal "
        "pixels",
        "starting_float_op_types": list(start),
        "starting_drop": round(first.drop, 5),
        "starting_agreement": round(first.agreement, 6),
        "final_drop": round(final.drop, 5),
        "final_agreement": round(final.agreement, 6),
        "reached": final.passes,
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


def held_out_images(
    model_dir: str | os.PathLike, calibration: Sequence[Any], n: int
) -> tuple[list, str]:
    """`n` held-out images for measuring an int8 graph, and what they are: images of the
    training split the model was not trained on when there are (see
    `unseen_training_images`), else training images that are not among `calibration`
    (PIL images)."""
    from segdeploy.export.quantize import training_images
    from segdeploy.export.quantize.calibration import unseen_training_images

    unseen = unseen_training_images(model_dir, n)
    if unseen:
        return unseen, "images of the training split that the model was not trained on"
    seen = {np.asarray(im).tobytes() for im in calibration}
    pool = training_images(model_dir, len(calibration) + n, seed=1)
    held = [im for im in pool if np.asarray(im).tobytes() not in seen][:n]
    return held, "training images (the model was trained on the whole split)"


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
    held, what = held_out_images(model_dir, calib_images, held_out)
    if not held:
        raise SegdeployError(
            model_dir, "--max-drop needs training images beyond the calibration images"
        )
    config = read_config(Path(model_dir))
    return search_exclusions(
        onnx_path,
        output_path,
        list(calibration_batches(calib_images, preprocess)),
        HeldOut(
            list(calibration_batches(held, preprocess, batch_size=4)),
            [(im.height, im.width) for im in held],
            what,
        ),
        max_drop,
        num_labels=len(config["id2label"]),
        **kwargs,
    )
