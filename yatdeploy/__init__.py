"""yatdeploy: take PyTorch Yat (nmn) models to production through ONNX."""

__version__ = "0.1.0"
