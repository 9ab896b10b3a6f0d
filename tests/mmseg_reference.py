"""MMSegmentation's slide inference as the reference of the tiling tests, and an identity-like
model: what `segdeploy.runtime.tiles` must reproduce exactly."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _prepare(pixels: np.ndarray) -> np.ndarray:
    """A stand-in for a processor's per-pixel steps: h x w x 3 uint8 -> float32 [3, h, w]."""
    return (pixels.astype(np.float32).transpose(2, 0, 1) / 64 - 2).astype(np.float32)


prepare = _prepare


def linear_model(classes: int, stride: int, seed: int = 0):
    """Logits = a fixed affine function of the input's pixels, one every `stride` pixels
    (SegFormer's logits are 1/4 of the input per side): identity-like, and 0..C-1 all win
    somewhere."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((classes, 3)).astype(np.float32)
    bias = rng.standard_normal(classes).astype(np.float32)

    def run(x: np.ndarray) -> np.ndarray:
        sub = x[:, :, ::stride, ::stride]
        out = np.einsum("ck,nkhw->nchw", weights, sub) + bias[None, :, None, None]
        return out.astype(np.float32)

    return run


def photo(h: int, w: int, seed: int = 0, block: int = 8) -> np.ndarray:
    """Blocks of random colours with noise: class borders everywhere, at every scale."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // block + 1, w // block + 1, 3)).astype(np.uint8)
    big = np.repeat(np.repeat(base, block, 0), block, 1)[:h, :w].astype(np.int64)
    return np.clip(big + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def mmseg_slide(image, run, classes, crop, stride, weights=None, prepare=None) -> np.ndarray:
    """MMSegmentation's slide_inference (mmseg/models/segmentors/encoder_decoder.py), line
    for line, then the argmax; `weights(h, w)` multiplies each window's logits and its
    count as MONAI's importance map does. `prepare`: the per-pixel steps (default: the
    stand-in above), applied to the whole image as MMSegmentation normalises it first."""
    inputs = torch.from_numpy((prepare or _prepare)(image))[None]
    h_stride, w_stride = stride
    h_crop, w_crop = crop
    batch_size, _, h_img, w_img = inputs.size()
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = inputs.new_zeros((batch_size, classes, h_img, w_img))
    count_mat = inputs.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_img = inputs[:, :, y1:y2, x1:x2]
            logit = torch.from_numpy(run(crop_img.numpy()))
            logit = F.interpolate(logit, crop_img.shape[2:], mode="bilinear", align_corners=False)
            pad = (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2))
            if weights is None:
                preds += F.pad(logit, pad)
                count_mat[:, :, y1:y2, x1:x2] += 1
            else:
                w = torch.from_numpy(np.array(weights(y2 - y1, x2 - x1)))[None, None]
                preds += F.pad(logit * w, pad)
                count_mat[:, :, y1:y2, x1:x2] += w
    assert (count_mat == 0).sum() == 0
    seg_logits = preds / count_mat
    return seg_logits.argmax(1)[0].numpy()
