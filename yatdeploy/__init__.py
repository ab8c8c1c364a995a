"""yatdeploy: take PyTorch Yat (nmn) models to production through ONNX."""

__version__ = "0.1.0"

__all__ = ["__version__", "export", "load", "validate"]


def __getattr__(name: str):
    # yatdeploy.export / .validate / .load (yatdeploy.api), imported on first use: `import yatdeploy` and the
    # CLI's --help stay free of torch.
    if name in ("export", "load", "validate"):
        from yatdeploy import api

        return getattr(api, name)
    raise AttributeError(f"module 'yatdeploy' has no attribute {name!r}")
