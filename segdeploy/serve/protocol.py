"""The Open Inference Protocol (KServe v2, what Triton serves) for one segmentation model.

Inputs (one of them, one image per request):

- `image`, BYTES, shape [1]: the encoded image file (JPEG, PNG...), decoded on
  the server exactly as `segdeploy infer` decodes files;
- `pixels`, UINT8, shape [H, W, 3] (or [1, H, W, 3]): the RGB pixels.

Output `labels`: the class ids, [H, W] (or [1, H, W] when `pixels` came with its
leading 1), UINT8, or UINT16 for models of more than 256 classes.

Both the JSON form and the binary tensor extension are read and written: the
request's JSON header is followed by raw tensor bytes when the
`Inference-Header-Content-Length` header says how long the JSON is, and each input
names its `binary_data_size`; a BYTES element is a 4-byte little-endian length and
its bytes. Outputs come back binary when asked (the output's `binary_data`
parameter, or the request's `binary_data_output`, as `tritonclient` sends them).

Written here rather than taken from KServe's Python server: its request classes come
with the whole server (kubernetes, pandas, and a protobuf below the one ONNX needs),
while the part we need is this small codec.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The header that carries the JSON part's length when binary tensors follow it.
HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE_INPUT = "image"
PIXELS_INPUT = "pixels"
LABELS_OUTPUT = "labels"
MODEL_VERSION = "1"
#: v2 datatype names of the numpy dtypes we read or write.
DATATYPES = {
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.int32): "INT32",
}


class ProtocolError(ValueError):
    """A request that does not follow the protocol (or this model's inputs): HTTP 400."""


@dataclass(frozen=True)
class InferRequest:
    """One parsed `POST /v2/models/NAME/infer`: the image as a file's bytes or as pixels."""

    id: str | None
    image: bytes | None
    pixels: np.ndarray | None
    batched: bool  # pixels came as [1, H, W, 3]: the labels go back as [1, H, W]
    binary_output: bool


def _json_part(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    if header_length is None:
        json_bytes, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} is not a number: {header_length!r}") from None
        if not 0 < n <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {n} is outside the body ({len(body)} bytes)")
        json_bytes, binary = body[:n], body[n:]
    if not json_bytes.strip():
        raise ProtocolError("empty body: send an inference request (JSON)")
    try:
        header = json.loads(json_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"the request is not valid JSON: {err}") from None
    if not isinstance(header, dict):
        raise ProtocolError("the request must be a JSON object")
    return header, binary


def _shape(tensor: dict) -> tuple[int, ...]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ProtocolError(f"input {tensor.get('name')!r}: shape must be a list of sizes")
    return tuple(shape)


def _flatten(data: Any) -> list:
    if not isinstance(data, list):
        return [data]
    out: list = []
    for item in data:
        out.extend(_flatten(item))
    return out


def _bytes_elements(raw: bytes, name: str) -> list[bytes]:
    """A binary BYTES tensor: each element a 4-byte little-endian length, then its bytes."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise ProtocolError(f"input {name!r}: a BYTES element's length is cut off")
        (n,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + n > len(raw):
            raise ProtocolError(f"input {name!r}: a BYTES element is longer than its data")
        out.append(raw[at : at + n])
        at += n
    return out


def _tensor_data(tensor: dict, binary: bytes, at: int) -> tuple[Any, int]:
    """(the input's data: raw bytes when binary, else the JSON list, flattened; next offset)."""
    params = tensor.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if not isinstance(size, int) or size < 0 or at + size > len(binary):
            raise ProtocolError(
                f"input {tensor.get('name')!r}: binary_data_size {size} is past the "
                f"{len(binary)} bytes of binary data"
            )
        return binary[at : at + size], at + size
    if "data" not in tensor:
        raise ProtocolError(f"input {tensor.get('name')!r} has no data")
    return _flatten(tensor["data"]), at


def _image(tensor: dict, data: Any) -> bytes:
    shape = _shape(tensor)
    if tensor.get("datatype") != "BYTES":
        raise ProtocolError(
            f"input 'image' must be BYTES (the image file), got {tensor.get('datatype')!r}"
        )
    if int(np.prod(shape)) != 1:
        raise ProtocolError(f"input 'image' takes one image file, shape [1]; got {list(shape)}")
    if isinstance(data, bytes):
        elements = _bytes_elements(data, IMAGE_INPUT)
    else:
        elements = [d.encode("utf-8") if isinstance(d, str) else d for d in data]
    if len(elements) != 1 or not isinstance(elements[0], bytes):
        raise ProtocolError(f"input 'image' holds {len(elements)} elements for shape {list(shape)}")
    return elements[0]


def _pixels(tensor: dict, data: Any) -> tuple[np.ndarray, bool]:
    shape = _shape(tensor)
    if tensor.get("datatype") != "UINT8":
        raise ProtocolError(f"input 'pixels' must be UINT8, got {tensor.get('datatype')!r}")
    batched = len(shape) == 4 and shape[0] == 1
    hw3 = shape[1:] if batched else shape
    if len(hw3) != 3 or hw3[2] != 3 or hw3[0] < 1 or hw3[1] < 1:
        raise ProtocolError(
            f"input 'pixels' must be RGB, shape [H, W, 3] or [1, H, W, 3]; got {list(shape)}"
        )
    count = int(np.prod(hw3))
    if isinstance(data, bytes):
        if len(data) != count:
            raise ProtocolError(
                f"input 'pixels': shape {list(shape)} needs {count} bytes, got {len(data)}"
            )
        array = np.frombuffer(data, np.uint8)
    else:
        if len(data) != count:
            raise ProtocolError(
                f"input 'pixels': shape {list(shape)} needs {count} values, got {len(data)}"
            )
        try:
            values = np.asarray(data, dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise ProtocolError("input 'pixels': values must be integers 0..255") from None
        if values.size and (values.min() < 0 or values.max() > 255):
            raise ProtocolError("input 'pixels': values must be integers 0..255")
        array = values.astype(np.uint8)
    return array.reshape(hw3), batched


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """The request's one image, checked against the model's inputs; ProtocolError if not."""
    header, binary = _json_part(body, header_length)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("the request names no inputs")
    image = pixels = None
    batched = False
    at = 0
    for tensor in inputs:
        if not isinstance(tensor, dict):
            raise ProtocolError("each input must be a JSON object")
        name = tensor.get("name")
        data, at = _tensor_data(tensor, binary, at)
        if name == IMAGE_INPUT:
            image = _image(tensor, data)
        elif name == PIXELS_INPUT:
            pixels, batched = _pixels(tensor, data)
        else:
            raise ProtocolError(
                f"unknown input {name!r}: this model takes {IMAGE_INPUT!r} (BYTES, the image "
                f"file) or {PIXELS_INPUT!r} (UINT8, H x W x 3)"
            )
    if (image is None) == (pixels is None):
        raise ProtocolError(f"give exactly one of the inputs {IMAGE_INPUT!r} and {PIXELS_INPUT!r}")
    if at != len(binary):
        raise ProtocolError(f"{len(binary) - at} bytes of binary data belong to no input")
    return InferRequest(
        id=str(header["id"]) if header.get("id") is not None else None,
        image=image,
        pixels=pixels,
        batched=batched,
        binary_output=_binary_output(header),
    )


def _binary_output(header: dict) -> bool:
    outputs = header.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise ProtocolError("outputs must be a list")
        for out in outputs:
            name = out.get("name") if isinstance(out, dict) else None
            if name != LABELS_OUTPUT:
                raise ProtocolError(f"unknown output {name!r}: this model gives {LABELS_OUTPUT!r}")
            params = out.get("parameters") or {}
            if isinstance(params, dict) and "binary_data" in params:
                return bool(params["binary_data"])
    params = header.get("parameters") or {}
    return bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False


def infer_response(
    model: str, request: InferRequest, labels: np.ndarray
) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of the answer holding `labels` (H x W), binary when asked."""
    shape = [1, *labels.shape] if request.batched else list(labels.shape)
    out: dict[str, Any] = {
        "name": LABELS_OUTPUT,
        "datatype": DATATYPES[labels.dtype],
        "shape": shape,
    }
    result: dict[str, Any] = {"model_name": model, "model_version": MODEL_VERSION}
    if request.id is not None:
        result["id"] = request.id
    result["outputs"] = [out]
    if not request.binary_output:
        out["data"] = labels.ravel().tolist()
        return json.dumps(result).encode(), {"Content-Type": "application/json"}
    raw = np.ascontiguousarray(labels, labels.dtype.newbyteorder("<")).tobytes()
    out["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps(result).encode()
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    return head + raw, headers


def model_metadata(model: str, label_dtype: np.dtype, platform: str) -> dict[str, Any]:
    """`GET /v2/models/NAME`: the inputs and output above (-1: any size)."""
    return {
        "name": model,
        "versions": [MODEL_VERSION],
        "platform": platform,
        "inputs": [
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [1]},
            {"name": PIXELS_INPUT, "datatype": "UINT8", "shape": [-1, -1, 3]},
        ],
        "outputs": [
            {"name": LABELS_OUTPUT, "datatype": DATATYPES[np.dtype(label_dtype)], "shape": [-1, -1]}
        ],
    }


def server_metadata(version: str) -> dict[str, Any]:
    """`GET /v2`: who answers, and the protocol extensions it speaks."""
    return {"name": "segdeploy", "version": version, "extensions": ["binary_tensor_data"]}
