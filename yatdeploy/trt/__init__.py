"""TensorRT: the YatGemm plugin (tensorrt.plugin, ahead-of-time PTX) and engine building.

Only `plugin_logic` and the pure parts of `engine` import without TensorRT; `plugin` and the
building and running code import it, lazily, where they are used.
"""
