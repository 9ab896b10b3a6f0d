"""segdeploy: SegFormer from fine-tuning to fast ONNX Runtime deployment.

`import segdeploy` must stay free of torch and transformers: deployment
machines run only the ONNX Runtime path.
"""

__version__ = "0.1.0"
