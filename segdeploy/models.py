"""SegFormer architectures: the MiT sizes of the SegFormer paper, plus a tiny one.

`scratch:<size>` builds one of these with random weights, which needs no hub
and is what the tests and the offline demo train.
"""

from __future__ import annotations

# (hidden_sizes, depths, decoder_hidden_size) per size; heads, sr ratios and MLP
# ratios are shared by all MiT variants (Xie et al. 2021, table 6).
_MIT = {
    "b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256),
    "b1": ([64, 128, 320, 512], [2, 2, 2, 2], 256),
    "b2": ([64, 128, 320, 512], [3, 4, 6, 3], 768),
    "b3": ([64, 128, 320, 512], [3, 4, 18, 3], 768),
    "b4": ([64, 128, 320, 512], [3, 8, 27, 3], 768),
    "b5": ([64, 128, 320, 512], [3, 6, 40, 3], 768),
    # Not in the paper: small enough to train in minutes on two CPU cores.
    "tiny": ([16, 32, 64, 128], [1, 1, 1, 1], 64),
}
SCRATCH_SIZES = tuple(_MIT)


def scratch_config(size: str, id2label: dict[int, str]):
    """A `SegformerConfig` for `scratch:<size>` with the given classes."""
    from transformers import SegformerConfig

    if size not in _MIT:
        raise ValueError(f"unknown SegFormer size {size!r}; choose one of {', '.join(_MIT)}")
    hidden, depths, decoder = _MIT[size]
    id2label = {int(k): str(v) for k, v in id2label.items()}
    return SegformerConfig(
        hidden_sizes=hidden,
        depths=depths,
        num_attention_heads=[1, 2, 5, 8] if size != "tiny" else [1, 2, 4, 8],
        sr_ratios=[8, 4, 2, 1],
        decoder_hidden_size=decoder,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
