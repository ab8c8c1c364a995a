"""python run_source_module.py SOURCE_DIR MODULE [ARGS...]: MODULE.main(ARGS) from the source tree SOURCE_DIR,
whatever yatdeploy the interpreter could otherwise import.

The native build runs yatdeploy.gpu.aot and yatdeploy.gpu.host_table from the checkout it builds. Putting
that checkout on PYTHONPATH is not enough: pip's isolated build environment drops from sys.path every path a
.pth file of the outer environment adds (an editable install adds the checkout itself), and an editable
install's import hook (sys.meta_path) would resolve yatdeploy to its own checkout. So the source tree goes
first on sys.path here, after start-up, and import hooks that would resolve yatdeploy elsewhere are dropped.
The module level does this, so that the compiler processes aot.py spawns (which import this file as their
main module, with the same argv) do it too.
"""

import importlib
import importlib.machinery
import os
import sys

SOURCE = os.path.abspath(sys.argv[1])


def _elsewhere(finder) -> bool:
    if finder in (importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter,
                  importlib.machinery.PathFinder):
        return False
    try:
        spec = finder.find_spec("yatdeploy", None)
    except Exception:  # noqa: BLE001 - a hook that can't answer can't be trusted with yatdeploy either
        return True
    return spec is not None and not str(spec.origin or "").startswith(SOURCE + os.sep)


if SOURCE not in sys.path:
    sys.path.insert(0, SOURCE)
sys.meta_path[:] = [finder for finder in sys.meta_path if not _elsewhere(finder)]

if __name__ == "__main__":
    module_name, arguments = sys.argv[2], sys.argv[3:]
    module = importlib.import_module(module_name)
    if not os.path.abspath(module.__file__).startswith(SOURCE + os.sep):
        sys.exit(f"run_source_module: {module_name} was imported from {module.__file__}, not from {SOURCE}")
    sys.exit(module.main(arguments))
