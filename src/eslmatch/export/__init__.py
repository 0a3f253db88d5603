"""Exports of a model for other runtimes: ONNX encoders (:mod:`.onnx`) and their ONNX Runtime twin."""

from .onnx import OnnxEncoders, encoder_graphs, export_onnx, read_manifest, require_onnx

__all__ = ["OnnxEncoders", "encoder_graphs", "export_onnx", "read_manifest", "require_onnx"]
