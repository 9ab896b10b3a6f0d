"""segdeploy: semantic-segmentation models (the eight families of the Hugging Face guide) from
fine-tuning to fast ONNX Runtime deployment.

`import segdeploy` must stay free of torch and transformers: deployment
machines run only the ONNX Runtime path.
"""

__version__ = "0.1.0"

__all__ = ["Segmenter", "upsample_argmax", "__version__"]

# Resolved on first use (PEP 562) so that `import segdeploy` stays instant and
# pulls in neither onnxruntime nor numpy until the runtime is wanted.
_LAZY = {
    "Segmenter": "segdeploy.runtime.segmenter",
    "upsample_argmax": "segdeploy.runtime.upsample",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segdeploy' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
