"""End to end: a torch.save'd model → `export_model` → a plain onnxruntime, against PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from nmn.torch import (
    MultiHeadYatAttention,
    YatConv1D,
    YatConv2D,
    YatConv3D,
    YatConvTranspose1D,
    YatConvTranspose2D,
    YatNMN,
)
from torch import nn

from tests.model_zoo import YATNMN_OPTIONS, perturb, yat_mlp
from yatdeploy import backends
from yatdeploy.backends import ort
from yatdeploy.exporting import ExportOptions, export_model
from yatdeploy.graph import META_SOURCE_SHA256, node_elem_types, yat_gemm_nodes
from yatdeploy.loading import file_sha256, load_model
from yatdeploy.spec import PLUGIN_NAMESPACE, PLUGIN_VERSION, YAT_GEMM
from yatdeploy.validation import validate


def _max_rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float((np.abs(got.astype(np.float64) - want) / np.maximum(np.abs(want), 1e-6)).max())


def _plain_ort(path):
    return ort.create_session(path, backends.get("ort-function"))


@pytest.mark.slow
@pytest.mark.parametrize("option", sorted(YATNMN_OPTIONS))
def test_every_yatnmn_option_exports_to_one_node_per_layer(option, save_whole, tmp_path, progress):
    model = yat_mlp(YATNMN_OPTIONS[option])
    source = save_whole(model)
    result = export_model(load_model(source), tmp_path / "m.onnx", ExportOptions((1, 16)), progress)

    onnx_model = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(onnx_model, full_check=True)
    nodes = yat_gemm_nodes(onnx_model)
    assert len(nodes) == result.yat_gemm_nodes == 2
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"].decode() == PLUGIN_NAMESPACE
        assert attrs["plugin_version"].decode() == PLUGIN_VERSION
        assert attrs["eps"] > 0
    assert [(f.domain, f.name) for f in onnx_model.functions] == [(YAT_GEMM.domain, YAT_GEMM.name)]

    session = _plain_ort(tmp_path / "m.onnx")
    for batch in (1, 7):
        x = torch.randn(batch, 16, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = model(x).double().numpy()
        got = ort.run(session, {"input": x.numpy()})[0]
        assert got.shape == want.shape
        assert _max_rel_err(got, want) <= 1e-4, option


@pytest.mark.slow
def test_metadata_records_versions_and_the_source_hash(save_whole, tmp_path, progress):
    source = save_whole(yat_mlp())
    export_model(load_model(source), tmp_path / "m.onnx", ExportOptions((1, 16)), progress)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta[META_SOURCE_SHA256] == file_sha256(source)
    assert meta["yatdeploy.version.torch"] == torch.__version__
    assert meta["yatdeploy.version.nmn"].startswith("0.3")
    assert meta["yatdeploy.input_shape"] == "1,16"


@pytest.mark.slow
def test_batch_is_dynamic_by_default_and_static_on_request(save_whole, tmp_path, progress):
    loaded = load_model(save_whole(yat_mlp()))
    export_model(loaded, tmp_path / "dyn.onnx", ExportOptions((1, 16)), progress)
    export_model(loaded, tmp_path / "static.onnx", ExportOptions((3, 16), dynamic_batch=False), progress)
    dyn = onnx.load(str(tmp_path / "dyn.onnx")).graph.input[0].type.tensor_type.shape.dim
    static = onnx.load(str(tmp_path / "static.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert dyn[0].dim_param == "batch" and dyn[1].dim_value == 16
    assert static[0].dim_value == 3


@pytest.mark.slow
def test_leading_dimensions_export(save_whole, tmp_path, progress):
    torch.manual_seed(0)
    model = perturb(nn.Sequential(YatNMN(8, 6), nn.LayerNorm(6), YatNMN(6, 3))).eval()
    export_model(load_model(save_whole(model)), tmp_path / "m.onnx", ExportOptions((2, 5, 8)), progress)
    x = torch.randn(4, 5, 8)
    got = ort.run(_plain_ort(tmp_path / "m.onnx"), {"input": x.numpy()})[0]
    with torch.no_grad():
        assert _max_rel_err(got, model(x).double().numpy()) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
def test_other_dtypes_export_and_validate(dtype, save_whole, tmp_path, progress):
    torch.manual_seed(0)
    # Only Yat layers: nothing computed in float32 between casts (test_a_bfloat16_export_runs_on_...'s case).
    model = perturb(nn.Sequential(YatNMN(16, 12), YatNMN(12, 5, spherical=True))).eval()
    loaded = load_model(save_whole(model))
    result = export_model(loaded, tmp_path / "m.onnx", ExportOptions((1, 16), dtype=dtype), progress)
    assert result.dtype == dtype
    report = validate(tmp_path / "m.onnx", loaded)
    assert report.passed, report.failures()
    assert report.dtype == dtype


@pytest.mark.slow
def test_a_backend_that_cannot_run_a_dtype_is_a_validation_failure(tmp_path):
    """A file written by another exporter (yatdeploy refuses to write one: below)."""
    import io
    from contextlib import redirect_stdout

    from yatdeploy.loading import from_module

    model = nn.Sequential(nn.Linear(16, 4)).eval()
    with redirect_stdout(io.StringIO()):
        torch.onnx.export(model.to(torch.bfloat16), (torch.randn(2, 16, dtype=torch.bfloat16),), tmp_path / "m.onnx",
                          dynamo=True, input_names=["input"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    report = validate(tmp_path / "m.onnx", from_module(model), input_shape=(1, 16), backend_names=["ort-function"])
    assert not report.passed
    assert any("can't load the model" in line and "Gemm" in line for line in report.failures())


@pytest.mark.slow
def test_a_bfloat16_export_runs_on_onnx_runtimes_cpu_provider(save_whole, tmp_path):
    """ONNX Runtime's CPU provider has almost no bfloat16 kernels (no Gemm, MatMul, Add...): those ops compute in
    float32 between casts, as PyTorch computes them on the CPU, instead of a file no CPU session can open."""
    loaded = load_model(save_whole(yat_mlp()))
    result = export_model(loaded, tmp_path / "m.onnx", ExportOptions((1, 16), dtype="bfloat16"))
    assert any("Gemm" in note and "float32" in note for note in result.notes), result.notes
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert [i.type.tensor_type.elem_type for i in (*model.graph.input, *model.graph.output)] \
        == [onnx.TensorProto.BFLOAT16] * 2
    assert result.yat_gemm_nodes == len(yat_gemm_nodes(model)) == 2
    report = validate(tmp_path / "m.onnx", loaded)
    assert report.passed, report.failures()


@pytest.mark.slow
def test_an_export_no_cpu_session_can_open_is_refused_before_writing(save_whole, tmp_path):
    """ONNX Runtime's CPU provider has no float64 Conv: refused naming the op, nothing written."""
    from yatdeploy.errors import YatDeployError

    torch.manual_seed(0)
    loaded = load_model(save_whole(nn.Sequential(YatConv2D(1, 2, 3), nn.Flatten(), YatNMN(2 * 4 * 4, 3)).eval()))
    with pytest.raises(YatDeployError) as info:
        export_model(loaded, tmp_path / "m.onnx", ExportOptions((1, 1, 6, 6), dtype="float64"))
    message = str(info.value)
    assert "no float64 kernel for Conv" in message and "export in float16 or float32" in message, message
    assert list(tmp_path.iterdir()) == [tmp_path / "model.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["meta", "graph", "code"])
def test_a_submodule_named_like_a_graph_module_attribute_exports(name, tmp_path):
    """torch.onnx.export fails on a top-level child named as a torch.fx.GraphModule attribute (meta, graph, code...),
    even a plain nn.Linear; the export renames it internally."""
    from yatdeploy.loading import from_module

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = YatNMN(16, 8)
            setattr(self, name, nn.Linear(8, 4))

        def forward(self, x):
            return getattr(self, name)(self.body(x))

    torch.manual_seed(0)
    loaded = from_module(perturb(Named()).eval())
    result = export_model(loaded, tmp_path / "m.onnx", ExportOptions((1, 16)))
    assert result.yat_gemm_nodes == 1
    report = validate(tmp_path / "m.onnx", loaded)
    assert report.passed, report.failures()


@pytest.mark.slow
def test_a_declared_float_input_takes_the_export_dtype(save_whole, tmp_path):
    """--input 'x:float32[...]' --dtype float16: the model is cast to float16, and so is the input it takes."""
    import io

    from yatdeploy.inputs import parse_input
    from yatdeploy.progress import Progress

    loaded = load_model(save_whole(yat_mlp()))
    said = io.StringIO()
    result = export_model(loaded, tmp_path / "m.onnx",
                          ExportOptions(inputs=(parse_input("x:float32[batch=1,16]"),), dtype="float16"),
                          Progress(said))
    assert [(s.name, s.dtype) for s in result.inputs] == [("x", "float16")]
    assert "input 'x' declared float32 is exported as float16" in said.getvalue()
    report = validate(tmp_path / "m.onnx", loaded)
    assert report.passed, report.failures()


@pytest.mark.slow
@pytest.mark.parametrize(
    "layers,shape",
    [
        (lambda: nn.Sequential(YatConv2D(1, 3, 3), nn.Flatten(), YatNMN(3 * 6 * 6, 4)), (1, 1, 8, 8)),
        (lambda: nn.Sequential(YatConvTranspose2D(2, 3, 3), nn.Flatten(), nn.Linear(3 * 7 * 7, 4)), (1, 2, 5, 5)),
        (lambda: nn.Sequential(YatConv1D(2, 4, 3), nn.Flatten(), YatNMN(4 * 8, 3)), (1, 2, 10)),
        (lambda: nn.Sequential(YatConv3D(1, 2, 2), nn.Flatten(), YatNMN(2 * 3 * 3 * 3, 3)), (1, 1, 4, 4, 4)),
        (lambda: nn.Sequential(YatConvTranspose1D(2, 3, 3), nn.Flatten(), YatNMN(3 * 7, 3)), (1, 2, 5)),
        (lambda: nn.Sequential(MultiHeadYatAttention(8, 2), YatNMN(8, 3)), (1, 5, 8)),
    ],
    ids=["YatConv2D", "YatConvTranspose2D", "YatConv1D", "YatConv3D", "YatConvTranspose1D", "MultiHeadYatAttention"],
)
def test_other_nmn_layers_export_as_ordinary_ops_and_validate(layers, shape, save_whole, tmp_path, progress):
    torch.manual_seed(0)
    model = perturb(layers()).eval()
    loaded = load_model(save_whole(model))
    result = export_model(loaded, tmp_path / "m.onnx", ExportOptions(shape), progress)
    assert result.yat_gemm_nodes == sum(isinstance(m, YatNMN) for m in model.modules())
    assert any("ordinary ONNX ops" in note for note in result.notes)
    report = validate(tmp_path / "m.onnx", loaded)
    assert report.passed, report.failures()


@pytest.mark.slow
@pytest.mark.parametrize("conv,shape", [(YatConv1D, (1, 2, 9)), (YatConv2D, (1, 2, 7, 6)), (YatConv3D, (1, 2, 5, 4, 4))],
                         ids=["1D", "2D", "3D"])
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_yat_conv_in_every_padding_mode_exports_and_runs_in_onnxruntime(conv, shape, mode, save_whole, tmp_path):
    """nmn's own form of a non-zero padding mode writes a Conv whose pads ONNX Runtime refuses (2-D, 3-D)."""
    torch.manual_seed(0)
    model = perturb(nn.Sequential(conv(2, 3, 3, padding=1, padding_mode=mode))).eval()
    loaded = load_model(save_whole(model))
    export_model(loaded, tmp_path / "m.onnx", ExportOptions(shape))
    report = validate(tmp_path / "m.onnx", loaded, backend_names=["ort-function"])
    assert report.passed, report.failures()


@pytest.mark.slow
def test_a_model_with_several_outputs_gets_numbered_output_names(tmp_path, progress):
    from yatdeploy.loading import LoadedModel

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = YatNMN(6, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            h = self.body(x)
            return h, self.head(h)

    torch.manual_seed(0)
    model = TwoHeads().eval()
    loaded = LoadedModel(model, tmp_path / "src.pt", "pickled module", "0" * 64)
    result = export_model(loaded, tmp_path / "m.onnx", ExportOptions((1, 6)), progress)
    assert result.output_names == ["output_0", "output_1"]
    assert [o.name for o in onnx.load(str(tmp_path / "m.onnx")).graph.output] == ["output_0", "output_1"]


def test_a_failed_export_leaves_an_existing_file_alone(save_whole, tmp_path, progress):
    from yatdeploy.errors import YatDeployError

    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous export")
    with pytest.raises(YatDeployError):
        export_model(load_model(save_whole(yat_mlp())), target, ExportOptions((1, 99)), progress)
    assert target.read_bytes() == b"previous export"


@pytest.mark.slow
def test_a_tied_kernel_bank_exports_in_16_bit(save_whole, tmp_path):
    """nmn refuses .to(dtype) on tied kernel-bank layers (it used to be an internal error, exit 3)."""
    torch.manual_seed(0)
    model = nn.Sequential(YatNMN(8, 6, tie_kernel_bank=True, kernel_bank_size=10, kernel_bank_id="export16"),
                          nn.LayerNorm(6), nn.Linear(6, 8),
                          YatNMN(8, 4, tie_kernel_bank=True, kernel_bank_id="export16")).eval()
    loaded = load_model(save_whole(model))
    result = export_model(loaded, tmp_path / "m.onnx", ExportOptions((1, 8), dtype="float16"))
    assert result.yat_gemm_nodes == 2 and result.dtype == "float16"
    assert model[0].weight.dtype == torch.float32  # the loaded model is left as it was
    report = validate(tmp_path / "m.onnx", loaded)
    assert report.passed, report.failures()
    assert report.reference == "a float64 run of the PyTorch model on the same inputs"  # the bank cast too


@pytest.mark.slow
@pytest.mark.parametrize("inner", [torch.bfloat16, torch.float16])
def test_a_16_bit_yat_layer_inside_a_float32_model_exports_in_one_precision(inner, save_whole, tmp_path):
    torch.manual_seed(0)
    model = perturb(nn.Sequential(YatNMN(16, 12), YatNMN(12, 4, dtype=inner))).eval()
    loaded = load_model(save_whole(model))
    result = export_model(loaded, tmp_path / "m.onnx", ExportOptions((1, 16)))
    assert result.yat_gemm_nodes == 2
    elem_types = {onnx.helper.tensor_dtype_to_np_dtype(t) for t in node_elem_types(result.model).values()}
    assert elem_types == {np.dtype(np.float32)}  # the 16-bit layer widened: one ONNX function for both
    report = validate(tmp_path / "m.onnx", loaded)
    assert report.passed, report.failures()


@pytest.mark.slow
@pytest.mark.parametrize("opset", [18, 22])
def test_other_opsets_export_and_validate(opset, tmp_path, capsys):
    from yatdeploy.cli import EXIT_OK, main

    torch.save(yat_mlp(), tmp_path / "m.pt")
    assert main(["export", "-q", str(tmp_path / "m.pt"), "-o", str(tmp_path / "m.onnx"), "--input-shape", "1,16",
                 "--opset", str(opset)]) == EXIT_OK
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert {o.domain: o.version for o in model.opset_import}[""] == opset
    assert {o.domain: o.version for o in model.functions[0].opset_import}[""] == opset
    assert "PASSED" in capsys.readouterr().out


def test_an_opset_outside_the_functions_range_is_refused(tmp_path, capsys):
    from yatdeploy.cli import EXIT_USAGE, main

    torch.save(yat_mlp(), tmp_path / "m.pt")
    assert main(["export", "-q", str(tmp_path / "m.pt"), "--input-shape", "1,16", "--opset", "17"]) == EXIT_USAGE
    assert "--opset 17: yatdeploy exports opsets 18 to 22" in capsys.readouterr().err


@pytest.mark.slow
def test_the_exported_file_gets_the_usual_permissions(tmp_path):
    """A private (0600) model file can't be read by a server running as another user (a Triton container)."""
    import os
    import stat

    torch.save(yat_mlp(), tmp_path / "m.pt")
    old = os.umask(0o022)
    try:
        export_model(load_model(tmp_path / "m.pt"), tmp_path / "m.onnx", ExportOptions((1, 16)))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.onnx").stat().st_mode) == 0o644


# The export is one pass: yatdeploy/exporting/__init__.py lists its stages, export_model calls them in that order,
# and no stage reaches ahead to a later one.
_STAGES = [("settle", "settle_inputs"), ("example", "run_example"), ("rewrite", "rewrite_model"),
           ("decoder", "cache_decoder"), ("torch_export", "export_onnx"), ("attach", "attach_yat_gemm_function"), ("check", "check_model")]


def test_the_export_runs_its_stages_in_the_order_its_package_shows():
    import ast
    import inspect

    import yatdeploy.exporting as exporting

    listed = [line.split()[2] for line in exporting.__doc__.splitlines() if line.strip()[:1].isdigit()]
    assert listed == [f"{module}.py" for module, _ in _STAGES]
    body = ast.parse(inspect.getsource(exporting.export_model)).body[0]
    called = [n.func.id for n in sorted((n for n in ast.walk(body) if isinstance(n, ast.Call)), key=lambda n: n.lineno)
              if isinstance(n.func, ast.Name)]
    assert [name for name in called if name in dict(_STAGES).values()] == [function for _, function in _STAGES]
    package = exporting.__name__
    for index, (module, _) in enumerate(_STAGES):
        tree = ast.parse(inspect.getsource(__import__(f"{package}.{module}", fromlist=["_"])))
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        later = {f"{package}.{later}" for later, _ in _STAGES[index + 1:]}
        assert not imported & (later | {package}), f"{module}.py imports a later stage or the package"


def test_the_check_stage_reads_the_graphs_inputs_once_and_fits_the_specs_to_them(exported_mlp):
    from yatdeploy.errors import InputSpecError
    from yatdeploy.graph import GraphInput, declared_inputs
    from yatdeploy.inputs import fit_to_graph, parse_input

    model = onnx.load(str(exported_mlp.onnx))
    feeds = declared_inputs(model)
    assert feeds == [GraphInput("input", "float32", ("batch", 16))]
    # The shorthand's name gives way to the graph's, and a dim the graph leaves free takes its name there.
    assert [str(s) for s in fit_to_graph([parse_input("x:float32[3,16]")], feeds)] == ["input:float32[batch=3,16]"]
    with pytest.raises(InputSpecError, match="dimension 1 is 8, the model's input 'input' has 16"):
        fit_to_graph([parse_input("x:float32[batch=1,8]")], feeds)
