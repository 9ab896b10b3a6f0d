"""Torch-free inference: image decoding, preprocessing, ONNX Runtime sessions, upsampling.

Nothing under `segdeploy.runtime` may import torch or transformers: this is the
code that runs on deployment machines, which have only onnxruntime, numpy and Pillow.
"""
