"""yatdeploy's ONNX Runtime custom-op library: built by the install, registered, and right."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from yatdeploy import backends, dtypes, native
from yatdeploy.backends import ort
from yatdeploy.cli import main
from yatdeploy.exporting.attach import attach_yat_gemm_function
from yatdeploy.ops.reference import output_shape
from yatdeploy.ops.torch_op import yat_gemm_reference
from yatdeploy.spec import ONNX_DOUBLE, ONNX_FLOAT, ONNX_FLOAT16, YAT_GEMM

CPU_LIB = backends.get("ort-cpu")
FUNCTION = backends.get("ort-function")
CUDA_BACKEND = backends.get("ort-cuda")
needs_gpu = pytest.mark.skipif(
    CUDA_BACKEND.availability() is not None, reason=f"ort-cuda unavailable: {CUDA_BACKEND.availability()}"
)

TOLERANCE = {"float32": 1e-5, "float64": 1e-12, "float16": 2e-3, "bfloat16": 1.6e-2}

HAS_AVX512 = "avx512f" in open("/proc/cpuinfo").read().split()


@pytest.fixture(params=["avx512", "blas"])
def float_kernel(request, monkeypatch):
    """Both float32 CPU paths: the AVX-512 micro-kernel (where the CPU has it) and OpenBLAS."""
    if request.param == "avx512" and not HAS_AVX512:
        pytest.skip("this CPU has no AVX-512F; the library uses its OpenBLAS path")
    if request.param == "blas":
        monkeypatch.setenv("YATDEPLOY_CPU_KERNEL", "blas")
    return request.param


def _initializer(array: np.ndarray, name: str) -> onnx.TensorProto:
    if array.dtype == ml_dtypes.bfloat16:
        return helper.make_tensor(name, TensorProto.BFLOAT16, array.shape, array.tobytes(), raw=True)
    return numpy_helper.from_array(array, name)


def yat_gemm_model(w, b, x_shape, *, eps=1e-5, alpha=1.0, w_as_input=False, with_function=True, elem=None,
                   w_shape=None, y_shape="rows") -> onnx.ModelProto:
    """One YatGemm node: X a graph input, W an initializer (or, `w_as_input` or `w` None, an input of `w_shape`), B an
    initializer when given. `y_shape` "rows": Y [..., N] of X's rows; None: left to inference (batched W)."""
    elem = elem or next(t.onnx for t in dtypes.FLOAT_TYPES if t.numpy == w.dtype)
    w_shape = list(w.shape) if w is not None else w_shape
    inputs = ["X", "W"] + (["B"] if b is not None else [])
    node = helper.make_node(YAT_GEMM.name, inputs, ["Y"], domain=YAT_GEMM.domain, eps=eps, alpha=alpha)
    graph_inputs = [helper.make_tensor_value_info("X", elem, x_shape)]
    initializers = [] if b is None else [_initializer(b, "B")]
    if w_as_input or w is None:
        graph_inputs.append(helper.make_tensor_value_info("W", elem, w_shape))
    else:
        initializers.append(_initializer(w, "W"))
    y = [*x_shape[:-1], w_shape[0]] if y_shape == "rows" else None
    graph = helper.make_graph([node], "yat_gemm", graph_inputs, [helper.make_tensor_value_info("Y", elem, y)],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    if with_function:
        attach_yat_gemm_function(model)
    else:
        model.opset_import.append(helper.make_opsetid(YAT_GEMM.domain, YAT_GEMM.version))
    return model


def _random(shape, dtype, rng, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32).astype(dtypes.by_name(dtype).numpy)


def _reference(x, w, b, eps, alpha, dtype):
    """The spec's semantics in float64 (float32 for the 16-bit types, as the spec computes them).

    eps and alpha are float32 attributes, so the reference takes them rounded the same way.
    """
    t = torch.float32 if dtype in ("float16", "bfloat16") else torch.float64
    as_t = lambda a: None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64)).to(t)  # noqa: E731
    y = yat_gemm_reference(as_t(x), as_t(w), as_t(b), float(np.float32(eps)), float(np.float32(alpha)))
    if dtype in ("float16", "bfloat16"):
        limit = float(torch.finfo(dtypes.by_name(dtype).torch).max)
        y = y.clamp(-limit, limit)
    return y.double().numpy()


def _rel_errors(got, want):
    got = got.astype(np.float64)
    return np.abs(got - want) / np.maximum(np.abs(want), 1e-3)


def _max_rel(got, want):
    return float(_rel_errors(got, want).max())


def _assert_close(got, want, dtype):
    errors = _rel_errors(got, want)
    if dtype == "float32":
        # Typical error: float32's dot product cancels where x·w + b ≈ 0, so a few outputs near zero
        # carry larger relative errors in any float32 implementation.
        assert float(np.percentile(errors, 99)) <= TOLERANCE[dtype] and float(errors.max()) <= 10 * TOLERANCE[dtype]
    else:
        assert float(errors.max()) <= TOLERANCE[dtype]


def test_the_install_built_the_library_and_doctor_reports_it(capsys):
    path = native.ort_library_path()
    assert path is not None and path.is_absolute() and path.is_file()
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ort_custom_ops_library"] == str(path)
    if shutil.which("nvcc"):
        # The build turns the CUDA kernels on whenever nvcc is present (compile-only on a CPU machine).
        assert report["cuda_kernels_built"] is True
        assert native.ort_cuda_library_path() is not None
    assert report["backends"]["ort-cpu"]["available"] is True


def test_doctor_text(capsys):
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "custom-op library" in text and "ort-cpu" in text and "GPU:" in text


def test_gpu_kernels_are_found_and_listed_by_doctor(tmp_path, monkeypatch, capsys):
    """native.gpu_kernels_dir()/gpu_kernels_manifest() and doctor's gpu_kernels, on a stand-in folder."""
    kernels = tmp_path / native.GPU_KERNELS_DIR
    kernels.mkdir()
    entry = {"kernel": "yat_gemm", "arch": "sm_80", "dtype": "float16", "config": "small_m", "variant": "aligned",
             "ptx": "k.ptx", "cubin": "k.cubin"}
    (kernels / native.GPU_KERNELS_MANIFEST).write_text(json.dumps({"format": 1, "entries": [entry]}))
    monkeypatch.setenv(native.ENV_LIBRARY_DIR, str(tmp_path))
    assert native.gpu_kernels_dir() == kernels.resolve()
    assert native.gpu_kernels_manifest()["entries"] == [entry]
    assert main(["doctor", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["gpu_kernels"]
    assert listed == [{"arch": "sm_80", "dtype": "float16", "config": "small_m", "ptx": str(kernels.resolve() / "k.ptx"),
                       "cubin": str(kernels.resolve() / "k.cubin"), "kernel": "yat_gemm", "variant": "aligned"}]
    assert main(["doctor"]) == 0
    assert f"GPU kernels (AOT)      {kernels.resolve()} (1 kernel: sm_80; float16)" in capsys.readouterr().out
    monkeypatch.setenv(native.ENV_LIBRARY_DIR, str(tmp_path / "nothing"))
    assert native.gpu_kernels_dir() is None and native.gpu_kernels_manifest() is None


def test_the_library_loads_and_runs_in_a_fresh_process(tmp_path):
    rng = np.random.default_rng(0)
    model = yat_gemm_model(_random((4, 8), "float32", rng), _random((4,), "float32", rng), ["m", 8])
    onnx.save(model, str(tmp_path / "m.onnx"))
    script = textwrap.dedent(f"""
        import numpy as np, onnxruntime as ort
        from yatdeploy import native
        options = ort.SessionOptions()
        options.register_custom_ops_library(str(native.ort_library_path()))
        session = ort.InferenceSession({str(tmp_path / "m.onnx")!r}, options, providers=["CPUExecutionProvider"])
        print(session.run(None, {{"X": np.ones((2, 8), np.float32)}})[0].shape)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 4)"


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_the_kernel_runs_on_the_cpu_provider_for_every_dtype(dtype):
    rng = np.random.default_rng(1)
    model = yat_gemm_model(_random((6, 16), dtype, rng), _random((6,), dtype, rng), ["m", 16])
    x = _random((3, 16), dtype, rng)
    runs = ort.yat_gemm_kernel_runs(model, CPU_LIB, {"X": x})
    assert runs == {"CPUExecutionProvider": 1}
    assert ort.yat_gemm_kernel_runs(model, FUNCTION, {"X": x}) == {}


SHAPES = pytest.mark.parametrize(
    "m,k,n", [(1, 64, 32), (7, 33, 5), (300, 96, 130), (4, 1, 3), (5, 8, 1), (1, 1, 1), (70, 40, 600)],
    ids=["batch1", "odd", "several-tiles", "K=1", "N=1", "1x1x1", "several-panel-groups"],
)


@SHAPES
def test_float32_numerics_on_both_cpu_paths(float_kernel, m, k, n):
    test_numerics_against_the_spec("float32", m, k, n)


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
@SHAPES
def test_numerics_against_the_spec(dtype, m, k, n):
    rng = np.random.default_rng(m * 1000 + k * 10 + n)
    x, w, b = _random((m, k), dtype, rng), _random((n, k), dtype, rng, 0.5), _random((n,), dtype, rng, 0.1)
    session = ort.create_session(yat_gemm_model(w, b, ["m", k], eps=1e-3, alpha=1.25), CPU_LIB)
    assert session.uses_library
    got = ort.run(session, {"X": x})[0]
    assert got.dtype == dtypes.by_name(dtype).numpy and got.shape == (m, n)
    _assert_close(got, _reference(x, w, b, 1e-3, 1.25, dtype), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_leading_dimensions(dtype):
    rng = np.random.default_rng(5)
    x, w, b = _random((2, 3, 8), dtype, rng), _random((4, 8), dtype, rng), _random((4,), dtype, rng)
    got = ort.run(ort.create_session(yat_gemm_model(w, b, ["b", "t", 8]), CPU_LIB), {"X": x})[0]
    assert got.shape == (2, 3, 4)
    assert _max_rel(got, _reference(x, w, b, 1e-5, 1.0, dtype)) <= TOLERANCE[dtype]


def test_an_empty_batch():
    rng = np.random.default_rng(6)
    w, b = _random((4, 8), "float32", rng), _random((4,), "float32", rng)
    got = ort.run(ort.create_session(yat_gemm_model(w, b, ["m", 8]), CPU_LIB), {"X": np.zeros((0, 8), np.float32)})
    assert got[0].shape == (0, 4)


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_a_missing_bias_is_zero(dtype, float_kernel):
    rng = np.random.default_rng(7)
    x, w = _random((3, 8), dtype, rng), _random((4, 8), dtype, rng)
    # Without B the function can't run (docs/yatgemm.md), so this node exists for the library only.
    model = yat_gemm_model(w, None, ["m", 8], with_function=False)
    got = ort.run(ort.create_session(model, CPU_LIB), {"X": x})[0]
    assert _max_rel(got, _reference(x, w, None, 1e-5, 1.0, dtype)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_weights_given_at_run_time_are_prepared_per_run(dtype, float_kernel):
    rng = np.random.default_rng(8)
    b = _random((5,), dtype, rng)
    session = ort.create_session(yat_gemm_model(_random((5, 12), dtype, rng), b, ["m", 12], w_as_input=True),
                                     CPU_LIB)
    x = _random((4, 12), dtype, rng)
    for seed in (1, 2):  # two different W through one session
        w = _random((5, 12), dtype, np.random.default_rng(seed))
        got = ort.run(session, {"X": x, "W": w})[0]
        assert _max_rel(got, _reference(x, w, b, 1e-5, 1.0, dtype)) <= TOLERANCE[dtype]


def test_x_close_to_w_stays_within_the_cancellation_bound(float_kernel):
    rng = np.random.default_rng(9)
    w = _random((6, 64), "float32", rng)
    x = (w + 1e-3 * rng.standard_normal(w.shape)).astype(np.float32)
    eps = 1e-5
    got = ort.run(ort.create_session(yat_gemm_model(w, np.zeros(6, np.float32), ["m", 64], eps=eps), CPU_LIB),
                      {"X": x})[0].astype(np.float64)
    assert np.isfinite(got).all() and (got >= 0).all()
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    implied_dist = np.einsum("ik,ik->i", x64, w64) ** 2 / np.diag(got) - eps
    true_dist = ((x64 - w64) ** 2).sum(axis=1)
    bound = 16 * np.finfo(np.float32).eps * ((x64**2).sum(1) + (w64**2).sum(1))
    assert (np.abs(implied_dist - true_dist) <= bound).all()


def test_16bit_results_saturate():
    w = np.full((1, 4), 100.0, np.float16)
    got = ort.run(ort.create_session(yat_gemm_model(w, np.zeros(1, np.float16), ["m", 4]), CPU_LIB),
                      {"X": w.copy()})[0]
    assert got.item() == np.finfo(np.float16).max


def test_shapes_that_do_not_fit_are_named():
    rng = np.random.default_rng(10)
    model = yat_gemm_model(_random((3, 4), "float32", rng), _random((3,), "float32", rng), ["m", "k"])
    session = ort.create_session(model, CPU_LIB)
    with pytest.raises(Exception, match=r"YatGemm: X \[2, 5\] and W \[3, 4\] do not fit"):
        ort.run(session, {"X": np.ones((2, 5), np.float32)})


def test_attribute_defaults_come_from_the_spec():
    rng = np.random.default_rng(11)
    w, b, x = _random((3, 8), "float32", rng), _random((3,), "float32", rng), _random((2, 8), "float32", rng)
    model = yat_gemm_model(w, b, ["m", 8])
    del model.graph.node[0].attribute[:]  # no eps, no alpha on the node
    got = ort.run(ort.create_session(model, CPU_LIB), {"X": x})[0]
    assert _max_rel(got, _reference(x, w, b, YAT_GEMM.attribute("eps").default, 1.0, "float32")) <= 1e-5


def batched_model(x_shape, w_shape, dtype, *, b=None, w=None, eps=1e-3, alpha=1.25, with_function=True):
    """One YatGemm node with a batched W ([..., N, K]): X and W graph inputs (W an initializer when `w` is
    given), B an initializer when given (the function path needs it: docs/yatgemm.md)."""
    return yat_gemm_model(w, b, x_shape, eps=eps, alpha=alpha, with_function=with_function,
                          elem=dtypes.by_name(dtype).onnx, w_shape=w_shape, y_shape=None)


# (X, W) shapes of a batched W: attention's queries [batch, heads, q_len, head_dim] against keys
# [batch, heads, kv_len, head_dim], and the other ways MatMul broadcasts the leading dimensions.
BATCHED_SHAPES = pytest.mark.parametrize("x_shape,w_shape", [
    ((2, 3, 5, 16), (2, 3, 7, 16)),  # the same leading dims
    ((2, 1, 5, 16), (1, 3, 7, 16)),  # [B, 1, ...] against [1, H, ...]
    ((5, 16), (2, 3, 7, 16)),  # X of rank 2 against every slice of W
    ((3, 5, 8), (2, 3, 7, 8)),  # ranks differ: X's leading dims right-aligned
    ((1, 4, 1, 64), (1, 4, 300, 64)),  # decode: M = 1
    ((1, 12, 1, 64), (1, 12, 1024, 64)),  # decode at a past of 1024: enough work for the thread pool
    ((2, 2, 3, 33), (2, 2, 40, 33)),  # few rows, K odd
    ((1, 2, 70, 40), (1, 2, 600, 40)),  # prefill-like: many rows, slices across the pool
    ((2, 3, 9, 5), (2, 3, 1, 5)),  # N = 1
    ((2, 2, 4, 1), (2, 2, 5, 1)),  # K = 1
    ((2, 3, 4, 16), (1, 1, 6, 16)),  # W's leading dims all 1: one W for every row
], ids=["same", "broadcast", "x-rank-2", "ranks-differ", "decode", "decode-1024", "few-rows-odd-k", "prefill",
        "N=1", "K=1", "w-leading-ones"])


def _batched_case(x_shape, w_shape, dtype, bias, seed):
    rng = np.random.default_rng(seed)
    x, w = _random(x_shape, dtype, rng), _random(w_shape, dtype, rng, 0.5)
    b = _random((w_shape[-2],), dtype, rng, 0.1) if bias else None
    return x, w, b


@pytest.mark.parametrize("bias", [True, False], ids=["B", "no-B"])
@BATCHED_SHAPES
def test_batched_w_float32_on_both_cpu_paths(float_kernel, x_shape, w_shape, bias):
    test_batched_w_against_the_spec("float32", x_shape, w_shape, bias)


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
@pytest.mark.parametrize("bias", [True, False], ids=["B", "no-B"])
@BATCHED_SHAPES
def test_batched_w_against_the_spec(dtype, x_shape, w_shape, bias):
    x, w, b = _batched_case(x_shape, w_shape, dtype, bias, len(x_shape) * 100 + w_shape[-2])
    session = ort.create_session(batched_model(list(x_shape), list(w_shape), dtype, b=b, with_function=bias), CPU_LIB)
    assert session.uses_library
    got = ort.run(session, {"X": x, "W": w})[0]
    want = _reference(x, w, b, 1e-3, 1.25, dtype)
    assert got.dtype == dtypes.by_name(dtype).numpy and got.shape == want.shape
    _assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("x_shape,w_shape", [
    ((1, 4, 1, 64), (1, 4, 0, 64)),  # an empty past: kv_len 0
    ((1, 4, 0, 64), (1, 4, 9, 64)),  # M = 0
    ((0, 3, 2, 8), (1, 3, 5, 8)),  # an empty batch
    ((1, 3, 2, 8), (0, 1, 5, 8)),  # an empty batch of W
], ids=["kv-0", "M=0", "batch-0", "w-batch-0"])
def test_batched_w_with_empty_dims(dtype, x_shape, w_shape):
    x, w, _ = _batched_case(x_shape, w_shape, dtype, False, 16)
    b = np.zeros(w_shape[-2], dtypes.by_name(dtype).numpy)
    want_shape = output_shape(x_shape, w_shape)
    session = ort.create_session(batched_model(list(x_shape), list(w_shape), dtype, b=b), CPU_LIB)
    got = ort.run(session, {"X": x, "W": w})[0]
    assert got.shape == want_shape and got.dtype == dtypes.by_name(dtype).numpy


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("w_shape", [(2, 6, 16), (1, 1, 6, 16)], ids=["two-slices", "leading-ones"])
def test_a_constant_batched_w(dtype, w_shape, float_kernel):
    """W as an initializer: one of several slices is prepared per run; one whose leading dims are all 1 once."""
    x, w, b = _batched_case((2, 5, 16), w_shape, dtype, True, 17)
    session = ort.create_session(batched_model([2, 5, 16], list(w_shape), dtype, b=b, w=w), CPU_LIB)
    for _ in range(2):
        got = ort.run(session, {"X": x})[0]
        _assert_close(got, _reference(x, w, b, 1e-3, 1.25, dtype), dtype)


@pytest.mark.parametrize("x_shape,w_shape,b_shape,message", [
    ((2, 3, 5, 8), (2, 4, 7, 8), None,
     r"YatGemm: the leading dimensions of X \[2, 3, 5, 8\] and W \[2, 4, 7, 8\] do not broadcast"),
    ((8,), (2, 7, 8), None, r"YatGemm: X \[8\] and W \[2, 7, 8\] do not fit"),
    ((2, 5, 8), (2, 7, 9), None, r"YatGemm: X \[2, 5, 8\] and W \[2, 7, 9\] do not fit"),
    ((2, 5, 8), (2, 7, 8), (8,), r"YatGemm: B is \[8\], expected \[7\]"),
], ids=["leading-dims", "x-rank-1", "k", "b"])
def test_batched_shapes_that_do_not_fit_are_named(x_shape, w_shape, b_shape, message):
    b = None if b_shape is None else np.zeros(b_shape, np.float32)
    model = batched_model([None] * len(x_shape), [None] * len(w_shape), "float32", b=b, with_function=False)
    session = ort.create_session(model, CPU_LIB)
    with pytest.raises(Exception, match=message):
        ort.run(session, {"X": np.ones(x_shape, np.float32), "W": np.ones(w_shape, np.float32)})


class TestRouting:
    """Which path a session takes, and the one line that says why."""

    def test_cpu_library_serves_every_dtype(self):
        for elem in YAT_GEMM.dtypes:
            use, why = ort.library_decision(CPU_LIB, {elem}, YAT_GEMM.version)
            assert use and "CPUExecutionProvider kernel" in why

    def test_double_on_cuda_runs_on_the_libraries_cpu_kernels(self):
        use, why = ort.library_decision(CUDA_BACKEND, {ONNX_FLOAT, ONNX_DOUBLE}, YAT_GEMM.version)
        if native.ort_cuda_library_path() is None:
            pytest.skip("the CUDA library was not built (no nvcc)")
        assert use and "float64 YatGemm nodes run on the library's CPU kernels" in why

    def test_a_dtype_without_a_kernel_is_routed_to_the_function(self):
        cuda_only = ort.OrtBackend("cuda-only", "test", (ort.CUDA,), "cuda")
        if cuda_only.library_path() is None:
            pytest.skip("the CUDA library was not built (no nvcc)")
        use, why = ort.library_decision(cuda_only, {ONNX_DOUBLE, ONNX_FLOAT16}, YAT_GEMM.version)
        assert not use
        assert why == "the library has no float64 YatGemm kernel: YatGemm runs as the model's ONNX function"

    def test_another_op_version_is_routed_to_the_function(self):
        use, why = ort.library_decision(CPU_LIB, {ONNX_FLOAT}, 2)
        assert not use and "version 2" in why

    def test_a_missing_library_is_routed_to_the_function(self, monkeypatch):
        monkeypatch.setattr(native, "ort_library_path", lambda: None)
        use, why = ort.library_decision(CPU_LIB, {ONNX_FLOAT}, YAT_GEMM.version)
        assert not use and "was not built" in why
        assert "was not built" in CPU_LIB.availability()

    def test_no_yat_nodes_needs_no_library(self):
        assert ort.library_decision(CPU_LIB, set(), None) == (
            False, "the model has no YatGemm nodes; the custom-op library is not needed")

    def test_the_reason_is_logged_once_per_session(self, caplog):
        rng = np.random.default_rng(12)
        model = yat_gemm_model(_random((3, 8), "float64", rng), _random((3,), "float64", rng), ["m", 8])
        with caplog.at_level("INFO", logger="yatdeploy.backends.ort"):
            ort.create_session(model, FUNCTION)
        assert [r.getMessage() for r in caplog.records] == [
            "ort-function: YatGemm runs as the model's ONNX function (backend ort-function)"]


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_kernel_numerics_and_execution(dtype):
    rng = np.random.default_rng(13)
    x, w, b = _random((300, 96), dtype, rng), _random((130, 96), dtype, rng, 0.5), _random((130,), dtype, rng, 0.1)
    model = yat_gemm_model(w, b, ["m", 96], eps=1e-3, alpha=1.25)
    assert ort.yat_gemm_kernel_runs(model, CUDA_BACKEND, {"X": x}) == {"CUDAExecutionProvider": 1}
    got = ort.run(ort.create_session(model, CUDA_BACKEND), {"X": x})[0]
    _assert_close(got, _reference(x, w, b, 1e-3, 1.25, dtype), dtype)


@needs_gpu
def test_cuda_kernel_stays_within_the_cancellation_bound_when_x_is_close_to_w():
    # The AOT Triton kernels use the spec's expanded distance (a tensor-core GEMM can't sum (x − w)²):
    # its float32 error is bounded by γ·(|x|² + |w|² + 2|x|·|w|), γ = (K + 8)·2⁻²⁴.
    rng = np.random.default_rng(14)
    w = _random((6, 256), "float32", rng)
    x = (w + 1e-2 * rng.standard_normal(w.shape)).astype(np.float32)
    eps = 1e-5
    got = ort.run(ort.create_session(yat_gemm_model(w, np.zeros(6, np.float32), ["m", 256], eps=eps),
                                             CUDA_BACKEND), {"X": x})[0].astype(np.float64)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    implied_dist = np.einsum("ik,ik->i", x64, w64) ** 2 / np.diag(got) - eps
    true_dist = ((x64 - w64) ** 2).sum(axis=1)
    x_sq, w_sq = (x64**2).sum(1), (w64**2).sum(1)
    bound = (256 + 8) * 2.0**-24 * (x_sq + w_sq + 2 * np.sqrt(x_sq * w_sq))
    assert (np.abs(implied_dist - true_dist) <= bound).all()


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("m,k,n,bias,w_as_input", [
    (1, 2048, 256, True, False),  # decode: split-K, |w|² kept for the constant W
    (16, 1000, 130, False, True),  # no B, W fed at run time (|w|² per run), ragged K and N: generic variant
    (200, 512, 384, True, False),  # large tiles: dynamic shared memory above 48 KiB
])
def test_cuda_kernel_paths(dtype, m, k, n, bias, w_as_input):
    rng = np.random.default_rng(15)
    x, w = _random((m, k), dtype, rng), _random((n, k), dtype, rng, 0.5)
    b = _random((n,), dtype, rng, 0.1) if bias else None
    model = yat_gemm_model(w, b, ["m", k], eps=1e-3, alpha=0.75, w_as_input=w_as_input)
    feeds = {"X": x, **({"W": w} if w_as_input else {})}
    session = ort.create_session(model, CUDA_BACKEND)
    for _ in range(2):  # the second run reuses the cached |w|² (constant W) or recomputes it
        got = ort.run(session, feeds)[0]
        _assert_close(got, _reference(x, w, b, 1e-3, 0.75, dtype), dtype)


OLD_RUNTIME = r"""
import ctypes, sys

# An ONNX Runtime too old for the library: its OrtApiBase has no API of the library's version, only API 1, whose
# first entry (CreateStatus) records the message the library sends back.
got = {}
CREATE_STATUS = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p)
GET_API = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)
VERSION = ctypes.CFUNCTYPE(ctypes.c_char_p)


def create_status(code, message):
    got["code"], got["message"] = code, message.decode()
    return 0x5EED


create_status_fn = CREATE_STATUS(create_status)
api_1 = (ctypes.c_void_p * 2)(ctypes.cast(create_status_fn, ctypes.c_void_p), None)
get_api_fn = GET_API(lambda version: ctypes.addressof(api_1) if version == 1 else None)
version_fn = VERSION(lambda: b"1.16.3")


class ApiBase(ctypes.Structure):
    _fields_ = [("GetApi", GET_API), ("GetVersionString", VERSION)]


library = ctypes.CDLL(sys.argv[1])
library.RegisterCustomOps.restype = ctypes.c_void_p
library.RegisterCustomOps.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
status = library.RegisterCustomOps(None, ctypes.byref(ApiBase(get_api_fn, version_fn)))
print(hex(status or 0), got["code"], got["message"])
"""


def test_an_onnx_runtime_too_old_for_the_library_gets_an_error_not_a_crash():
    """Triton releases before 25.03 ship an ONNX Runtime older than the API the library asks for: registering it
    there must answer an error status naming both versions (Triton then reports the model unloadable)."""
    from yatdeploy import native

    done = subprocess.run([sys.executable, "-c", OLD_RUNTIME, str(native.ort_library_path())], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    status, code, message = done.stdout.split(" ", 2)
    assert status == "0x5eed" and code == "1"  # ORT_FAIL
    assert "needs ONNX Runtime 1." in message and "this is ONNX Runtime 1.16.3" in message, message
