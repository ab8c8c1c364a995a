"""yatdeploy: take PyTorch Yat (nmn) models to production through ONNX."""

__version__ = "0.1.0"

# yatdeploy.api's functions offered here. `doctor` and `demo` are yatdeploy.api's only: yatdeploy.doctor and
# yatdeploy.demo are modules, which an import would put in their place.
_API = ("bench", "build_engine", "export", "fuse", "load", "serve", "validate")

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    # Imported on first use: `import yatdeploy` and the CLI's --help stay free of torch (and yatdeploy.api itself
    # imports it only in the functions that run PyTorch).
    if name in _API:
        from yatdeploy import api

        return getattr(api, name)
    raise AttributeError(f"module 'yatdeploy' has no attribute {name!r}")
