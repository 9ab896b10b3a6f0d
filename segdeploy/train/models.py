"""`--model` of `segdeploy train`: any family of the registry, from a Hub id, a local
folder or `scratch:` (random weights, no hub: what the tests and the offline demo train).

Scratch ids are `scratch:<family>-<size>` (`segdeploy.families.scratch_ids()`, e.g.
scratch:mobilevit-small, scratch:upernet-tiny-swin); `scratch:tiny` and
`scratch:b0`..`b5` are SegFormer's, the names segdeploy has always taken.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from segdeploy import families
from segdeploy.errors import SegdeployError, first_line
from segdeploy.families import MIT_SIZES, Family, family_of
from segdeploy.folders import CONFIG_FILE

#: scratch:<size> alone means SegFormer (the ids of the first releases).
SCRATCH_SIZES = tuple(MIT_SIZES)


def scratch_config(size: str, id2label: dict[int, str]):
    """A `SegformerConfig` for `scratch:<size>` with the given classes (the family
    registry owns the sizes)."""
    if size not in MIT_SIZES:
        raise ValueError(f"unknown SegFormer size {size!r}; choose one of {', '.join(MIT_SIZES)}")
    return families.scratch_config("segformer", size, id2label)


# ---------------------------------------------------------------------------
# Resolving and loading `--model`
# ---------------------------------------------------------------------------

SCRATCH_PREFIX = "scratch:"
_ALTERNATIVES = (
    "use a local model folder (config.json + weights), or scratch:<family>-<size> "
    "(e.g. scratch:tiny, scratch:b0, scratch:mobilevit-small) to train from random weights"
)


def model_kind(model: str) -> str:
    """How `--model` will be loaded: "scratch", "local" or "hub".

    A string is a local folder when that folder exists or it is spelled like a
    path (./x, /x, ~/x, x/y/z); anything else of the form name or org/name is a
    Hub id.
    """
    if model.startswith(SCRATCH_PREFIX):
        return "scratch"
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        return "local"
    return "hub"


def is_pretrained(model: str) -> bool:
    """Whether `--model` starts from trained weights (and so wants a small learning rate)."""
    return model_kind(model) != "scratch"


def parse_scratch(model: str) -> tuple[Family, str]:
    """scratch:<family>-<size> (or SegFormer's scratch:<size>) -> (family, size)."""
    name = model[len(SCRATCH_PREFIX) :]
    if name in MIT_SIZES:
        return families.FAMILIES["segformer"], name
    try:
        return families.parse_scratch(name)
    except SegdeployError:
        raise SegdeployError(
            "--model",
            f"unknown scratch architecture {model!r}; choose one of "
            + ", ".join(SCRATCH_PREFIX + s for s in (*SCRATCH_SIZES, *families.scratch_ids())),
        ) from None


def check_model_source(model: str) -> Family:
    """Fail fast, before any data is read, if `--model` cannot be loaded; its family.

    Scratch ids and local folders are checked on disk; a Hub id is checked by
    fetching its config (cheap), or from the local cache when the Hub cannot be
    reached. Raises SegdeployError naming the alternatives.
    """
    kind = model_kind(model)
    if kind == "scratch":
        return parse_scratch(model)[0]
    return family_of(_load_config(model, kind))


def train_image_size(model: str, family: Family, requested: int | None) -> int | None:
    """The side `--model` (of `family`, as check_model_source found) trains at: `requested`,
    except that a pretrained model of a family that runs only at its config.image_size
    (BEiT, Data2VecVision) keeps that size (None: the processor's own size)."""
    if not family.size_bound:
        return requested
    kind = model_kind(model)
    if kind == "scratch":
        _, size = parse_scratch(model)
        return requested if requested is not None else int(family.scratch[size]()["image_size"])
    native = int(_load_config(model, kind).image_size)  # read only for these two families
    if requested is not None and requested != native:
        raise SegdeployError(
            "--image-size",
            f"{requested} differs from {model}'s image_size {native}: {family.name} runs only "
            f"at the size it was built for ({family.fixed_size_why}); drop --image-size",
        )
    return native


def load_model(
    model: str, id2label: dict[int, str], *, ignore_index: int = 255, image_size: int | None = None
):
    """The family's *ForSemanticSegmentation for `--model`, with a head for `id2label`.

    Pretrained weights keep their encoder; a decode head of another size is
    re-initialised (the guide's fine-tuning recipe). The loss ignores
    `ignore_index` (the family's config field for it is set). A scratch model is
    built for `image_size` where its config has one (the size export traces at).
    """
    from transformers import AutoModelForSemanticSegmentation

    id2label = {int(k): str(v) for k, v in id2label.items()}
    label2id = {v: k for k, v in id2label.items()}
    kind = model_kind(model)
    if kind == "scratch":
        family, size = parse_scratch(model)
        config = families.scratch_config(family, size, id2label)
        if image_size is not None and hasattr(config, "image_size"):
            config.image_size = image_size
        setattr(config, family.loss_ignore_attr, ignore_index)
        return AutoModelForSemanticSegmentation.from_config(config)
    config = _load_config(model, kind)
    family = family_of(config)
    config.id2label, config.label2id = id2label, label2id  # num_labels follows id2label
    setattr(config, family.loss_ignore_attr, ignore_index)
    families.check_trainable(config)
    try:
        return AutoModelForSemanticSegmentation.from_pretrained(
            _source(model, kind),
            config=config,
            ignore_mismatched_sizes=True,
            local_files_only=not hub_reachable() if kind == "hub" else True,
        )
    except OSError as err:
        raise SegdeployError(model, f"cannot load model weights: {first_line(err)}") from None


def load_processor(model: str, family: Family, image_size: int | None = None):
    """The image processor of `--model` (of `family`), giving `image_size` squares when given.

    Labels are reduced by `segdeploy.data.label_array`, never by the processor,
    so `do_reduce_labels` is always False here. Models without a processor
    config (and scratch models) get the family processor's defaults.
    """
    cls = families.processor_class(family)
    overrides: dict = {"do_reduce_labels": False}
    if image_size is not None:
        overrides.update(families.square_processor_kwargs(family, image_size))
    kind = model_kind(model)
    if kind != "scratch":
        try:
            return cls.from_pretrained(
                _source(model, kind),
                local_files_only=not hub_reachable() if kind == "hub" else True,
                **overrides,
            )
        except OSError:
            pass  # e.g. an encoder-only checkpoint saved without preprocessor_config.json
    return cls(**overrides)


def processor_image_size(processor) -> int:
    """The square side a processor gives: its crop when it crops, else its resize."""
    size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    return int(size.get("height") or size.get("shortest_edge") or 512)


def _source(model: str, kind: str) -> str:
    return str(Path(model).expanduser()) if kind == "local" else model


def _load_config(model: str, kind: str):
    if kind == "hub" and not hub_reachable() and not _in_hub_cache(model):
        # Decided with huggingface_hub alone: importing transformers (and torch)
        # would take longer than the answer.
        raise SegdeployError(
            model,
            "is not a local folder nor in the Hugging Face cache, and the Hub "
            f"cannot be reached (offline); {_ALTERNATIVES}",
        )
    from transformers import AutoConfig

    if kind == "local":
        path = Path(model).expanduser()
        if not path.is_dir():
            raise SegdeployError(model, f"no such model folder; {_ALTERNATIVES}")
        if not (path / CONFIG_FILE).is_file():
            raise SegdeployError(
                model, f"not a Hugging Face model folder (no config.json); {_ALTERNATIVES}"
            )
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise SegdeployError(path / CONFIG_FILE, f"unreadable: {first_line(err)}") from None
    else:
        online = hub_reachable()
        try:
            config = AutoConfig.from_pretrained(model, local_files_only=not online)
        except (OSError, ValueError) as err:
            if not online:
                raise SegdeployError(
                    model,
                    "is not a local folder nor in the Hugging Face cache, and the Hub "
                    f"cannot be reached (offline); {_ALTERNATIVES}",
                ) from None
            raise SegdeployError(
                model, f"cannot load from the Hugging Face Hub: {first_line(err)}"
            ) from None
    family_of(config, where=model)  # a model_type segdeploy does not know: one line
    return config


def _in_hub_cache(model: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, CONFIG_FILE), str)
    except ValueError:  # not a valid repo id
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub answers at all, decided in seconds.

    huggingface_hub would otherwise retry an unreachable host for about half a
    minute per file before giving up; offline we go straight to the cache.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------
# Weight and checkpoint files: corrupt ones are bad input, named before any work
# ---------------------------------------------------------------------------


def check_weight_file(path: str | os.PathLike) -> None:
    """SegdeployError naming `path` unless it is a readable weight or checkpoint file.

    Cheap enough to run before every export, validation and resume: safetensors
    files by their header (safetensors itself checks that the data covers exactly
    the rest of the file, so truncation shows), torch.save files (zip) by the CRC
    of every member, JSON by parsing. Only legacy (non-zip) pickles are loaded, by
    torch with weights_only=True, because nothing cheaper can read them.
    """
    path = Path(path)
    try:
        _WEIGHT_CHECKS.get(path.suffix, _check_torch_file)(path)
    except SegdeployError:
        raise
    except OSError as err:
        raise SegdeployError(path, f"cannot read: {err.strerror or err}") from None
    except (
        Exception
    ) as err:  # each format raises its own types (SafetensorError, UnpicklingError...)
        raise SegdeployError(path, f"corrupt or truncated: {first_line(err)}") from None


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(path, framework="numpy"):
        pass


def _check_json(path: Path) -> None:
    import json

    json.loads(path.read_text(encoding="utf-8"))


def _check_torch_file(path: Path) -> None:
    import zipfile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise SegdeployError(path, f"corrupt: member {bad} fails its CRC check")
        return
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        raise SegdeployError(path, "truncated: a zip archive without its central directory")
    if not head.startswith(b"\x80"):  # every pickle of protocol 2 or later starts so
        raise SegdeployError(
            path, "not a PyTorch weights file (neither a zip archive nor a pickle)"
        )
    import torch

    torch.load(path, map_location="cpu", weights_only=True)


_WEIGHT_CHECKS = {".safetensors": _check_safetensors, ".json": _check_json}
