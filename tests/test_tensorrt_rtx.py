"""TensorRT for RTX: a real TensorRT parser and builder, run on this machine without a GPU.

The engines are built, never run (running needs an RTX-class GPU; the tensorrt-rtx backend says so).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from tests.model_zoo import perturb, yat_mlp
from yatdeploy import backends
from yatdeploy.cli import EXIT_OK, EXIT_USAGE, main
from yatdeploy.demo import build_demo_model
from yatdeploy.errors import YatDeployError
from yatdeploy.exporting import ExportOptions, export_model
from yatdeploy.files import file_sha256
from yatdeploy.graph import yat_gemm_nodes
from yatdeploy.loading import from_module
from yatdeploy.serving.repository import discover
from yatdeploy.trt import rtx
from yatdeploy.trt.engine import BatchProfile

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx_bindings") is None,
    reason="TensorRT for RTX is not installed (pip install 'yatdeploy[tensorrt-rtx]'; the test extra has it)",
)]

DTYPES = ("float32", "float16", "bfloat16")
TARGETS = ("80", "86", "89", "120")
PROFILE = BatchProfile(1, 8, 64)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """{(model, dtype): ONNX}: the demo's digits MLP (64 -> 10) and an MLP of odd hidden sizes (16 -> 12 -> 5)."""
    folder = tmp_path_factory.mktemp("rtx")
    torch.manual_seed(0)
    models = {"demo": (perturb(build_demo_model()), (1, 64)), "odd": (perturb(yat_mlp(), seed=1), (1, 16))}
    paths = {}
    for name, (module, shape) in models.items():
        loaded = from_module(module)
        for dtype in DTYPES:
            path = folder / f"{name}-{dtype}.onnx"
            export_model(loaded, path, ExportOptions(shape, dtype=dtype))
            paths[name, dtype] = path
    return paths


@pytest.mark.parametrize("model", ["demo", "odd"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", TARGETS)
def test_an_export_builds_for_each_target_with_yat_gemm_as_tensorrt_layers(exports, tmp_path, model, dtype, target):
    source = exports[model, dtype]
    result = rtx.build_rtx_engine(source, tmp_path / "m.plan", PROFILE, rtx.RtxOptions((target,)))
    s = result.signature
    assert result.path.stat().st_size > 10_000
    assert (s.runtime, s.compute_capabilities, s.plugin_layers) == ("tensorrt-rtx", [target], 0)
    assert s.yat_gemm_nodes == 2 and s.onnx_sha256 == file_sha256(source)
    assert s.built["layers"] > 30  # the inlined YatGemm functions: dozens of layers (11 with the plugin)
    assert [t.dtype for t in s.inputs + s.outputs] == [dtype, dtype]


@pytest.mark.parametrize("model", ["demo", "odd"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_with_the_plugin_every_yat_gemm_is_a_plugin_layer_with_the_nodes_eps_and_alpha(exports, tmp_path, model,
                                                                                      dtype):
    source = exports[model, dtype]
    result = rtx.build_rtx_engine(source, tmp_path / "m.plan", PROFILE, rtx.RtxOptions(TARGETS, yat_plugin=True))
    s = result.signature
    assert s.plugin_layers == s.yat_gemm_nodes == 2 and s.compute_capabilities == list(TARGETS)
    nodes = yat_gemm_nodes(onnx.load(str(source)))
    want = [{"node": n.name, **{a.name: float(np.float32(helper.get_attribute_value(a)))
                                for a in n.attribute if a.name in ("eps", "alpha")}} for n in nodes]
    assert sorted(s.plugin_fields, key=lambda f: f["node"]) == sorted(want, key=lambda f: f["node"])
    assert len({f["alpha"] for f in s.plugin_fields}) == 2  # each node's own alpha, not a shared default


def test_the_cli_builds_and_says_what_it_built(exports, tmp_path, capsys):
    plan = tmp_path / "demo.plan"
    assert main(["build-engine", "-q", str(exports["demo", "float16"]), "-o", str(plan), "--backend", "tensorrt-rtx",
                 "--compute-capability", "8.6", "sm_89", "86", "--yat-plugin"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "2 YatGemm plugin layer(s)" in out and "tensorrt-rtx" in out and "for 86, 89" in out
    assert "--backend tensorrt-rtx" in out
    assert plan.is_file() and Path(f"{plan}.json").is_file()
    # A served .plan goes to the backend of the runtime it was built for.
    assert discover(plan)[0].backend == "tensorrt-rtx"


@pytest.mark.parametrize("args,message", [
    (["--compute-capability", "75"], "7.5 (Turing): TensorRT for RTX has no float32 GEMM there"),
    (["--compute-capability", "90"], "H100/H200 (9.0) is not a TensorRT for RTX target (build for it with the "
                                     "data-center TensorRT (--backend tensorrt))"),
    (["--compute-capability", "72"], "TensorRT for RTX targets 75, 80, 86, 89, 120, 121"),
    (["--compute-capability", "75", "--yat-plugin"], "the plugin can't target 7.5 (drop 75, or build without "
                                                     "--yat-plugin)"),
    (["--repository", "repo"], "can't go in a Triton repository"),
])
def test_a_target_or_a_choice_that_cannot_work_is_refused_in_one_line(exports, tmp_path, capsys, args, message):
    status = main(["build-engine", "-q", str(exports["odd", "float32"]), "-o", str(tmp_path / "m.plan"),
                   "--backend", "tensorrt-rtx", *args])
    err = capsys.readouterr().err
    assert status == EXIT_USAGE and message in err and "Traceback" not in err, err
    assert not (tmp_path / "m.plan").exists()


def test_bfloat16_on_turing_is_refused_naming_the_dtype(exports, tmp_path):
    with pytest.raises(YatDeployError, match=r"7.5 \(Turing\) has no bfloat16"):
        rtx.build_rtx_engine(exports["odd", "bfloat16"], tmp_path / "m.plan", PROFILE, rtx.RtxOptions(("75",)))


def test_an_option_a_backend_does_not_take_is_refused_naming_the_backend(exports, tmp_path, capsys):
    assert main(["build-engine", str(exports["odd", "float32"]), "--yat-plugin"]) == EXIT_USAGE
    assert "the tensorrt backend does not take --yat-plugin (the data-center TensorRT builds for the GPU it runs on" \
        in capsys.readouterr().err
    assert main(["build-engine", str(exports["odd", "float32"]), "--compute-capability", "86", "--workspace-mb", "1"]
                ) == EXIT_USAGE
    assert "the tensorrt backend does not take --compute-capability" in capsys.readouterr().err
    # --runtime, the option's former name, is --backend.
    assert main(["build-engine", str(exports["odd", "float32"]), "-o", str(tmp_path / "m.plan"), "--runtime",
                 "tensorrt-rtx", "--timing-cache", str(tmp_path / "cache")]) == EXIT_USAGE
    assert "the tensorrt-rtx backend does not take --timing-cache (TensorRT for RTX builds without a GPU" \
        in capsys.readouterr().err
    assert not (tmp_path / "m.plan").exists()


def test_a_model_the_parser_rejects_is_reported_with_the_parsers_message(exports, tmp_path):
    """YatGemm nodes without their ONNX function and without the plugin: the parser has nothing to run."""
    model = onnx.load(str(exports["odd", "float32"]))
    del model.functions[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(YatDeployError, match="parser rejected .*bare.onnx.*Plugin not found"):
        rtx.build_rtx_engine(tmp_path / "bare.onnx", tmp_path / "m.plan", PROFILE, rtx.RtxOptions(("86",)))


def test_without_the_package_the_error_says_how_to_install_it(exports, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_rtx(name, *args, **kwargs):
        if name == "tensorrt_rtx_bindings":
            raise ImportError("No module named 'tensorrt_rtx_bindings'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_rtx)
    with pytest.raises(YatDeployError, match=r"TensorRT for RTX is not installed.*yatdeploy\[tensorrt-rtx\]"):
        rtx.build_rtx_engine(exports["odd", "float32"], tmp_path / "m.plan", PROFILE)
    assert "not installed" in backends.get("tensorrt-rtx").availability()


def test_the_library_link_for_the_parser_points_at_the_wheels_library(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = rtx._library_folder()
    link = folder / rtx.LIBRARY
    assert link.is_symlink() and link.resolve().name == "libtensorrt_rtx.so.1" and link.resolve().is_file()
    assert rtx._library_folder() == folder and folder.is_relative_to(tmp_path)  # idempotent, in the user's cache
    assert not any(p.name.startswith(f"{rtx.LIBRARY}.") and p.name != rtx.LIBRARY for p in folder.iterdir())


def test_the_backend_runs_only_on_an_rtx_class_gpu_and_says_why_not_here(exports):
    reason = backends.get("tensorrt-rtx").availability()
    if reason is None:
        pytest.skip("an RTX-class GPU is here: the engine-running tests belong to the GPU runbook")
    assert "GPU" in reason or "compute capability" in reason
    report_backends = [b.name for b in backends.all()]
    assert "tensorrt-rtx" in report_backends


def test_the_data_center_backend_refuses_an_rtx_engine(exports, tmp_path):
    result = rtx.build_rtx_engine(exports["odd", "float32"], tmp_path / "m.plan", PROFILE, rtx.RtxOptions(("86",)))
    with pytest.raises(YatDeployError, match="built for tensorrt-rtx: open it with that backend, not tensorrt"):
        backends.get("tensorrt").open(result.path)


def test_no_plugin_build_stays_plugin_free_after_the_plugin_was_registered(exports, tmp_path):
    """The default (TensorRT's own layers) holds in a process where the plugin's creator is registered."""
    from yatdeploy.trt import rtx_plugin

    rtx_plugin.register()
    result = rtx.build_rtx_engine(exports["odd", "float32"], tmp_path / "m.plan", PROFILE, rtx.RtxOptions(("86",)))
    assert result.signature.plugin_layers == 0 and result.signature.built["layers"] > 30
    assert os.environ.get("LD_LIBRARY_PATH", "").find("tensorrt-rtx-lib") == -1  # the trap is the child's only
