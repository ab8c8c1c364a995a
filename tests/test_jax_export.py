"""Flax NNX models exported through jax2onnx, fused and validated against JAX (issue 24; docs/jax.md).

LAYER_CONFIGS are the nmn.nnx layer configurations of nmn 0.3.5's own NNX tests (tests/test_nnx/ in
github.com/mlnomadpy/nmn) that have an ONNX form; NO_ONNX_FORM lists those that don't, and why.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="the JAX extra is not installed: pip install 'yatdeploy[jax]'")
pytest.importorskip("flax.nnx", reason="the JAX extra is not installed: pip install 'yatdeploy[jax]'")
pytest.importorskip("jax2onnx", reason="the JAX extra is not installed: pip install 'yatdeploy[jax]'")

import jax.numpy as jnp  # noqa: E402
import nmn.nnx as yat  # noqa: E402
import onnxruntime as ort  # noqa: E402
from flax import nnx  # noqa: E402

import yatdeploy  # noqa: E402
from yatdeploy.errors import YatDeployError  # noqa: E402
from yatdeploy.graph import META_SOURCE_FORMAT, metadata  # noqa: E402

BACKENDS = ("ort-cpu", "ort-function")


class Attend(nnx.Module):
    """A YatEmbed's tied head alone: queries against the table."""

    def __init__(self, embed: nnx.Module):
        self.embed = embed

    def __call__(self, q):
        return self.embed.attend(q)


def causal_mask(t):
    return jnp.tril(jnp.ones((t, t), bool))[None, None]


class Masked(nnx.Module):
    """MultiHeadYatAttention with a mask, as nmn's test_attention_with_mask calls it (causal here)."""

    def __init__(self, attention: nnx.Module):
        self.attention = attention

    def __call__(self, x):
        return self.attention(x, mask=causal_mask(x.shape[1]), decode=False)


def _r():
    return nnx.Rngs(0)


def _nmn(**kw):
    return lambda: yat.YatNMN(8, 16, rngs=_r(), **kw)


def _embed(**kw):
    return lambda: Attend(yat.YatEmbed(50, 16, rngs=_r(), **kw))


def _mha(**kw):
    return lambda: yat.MultiHeadYatAttention(num_heads=4, in_features=16, decode=False, rngs=_r(), **kw)


X = ["x:float32[batch=2,8]"]
SEQ = ["x:float32[batch=2,seq=5:32,16]"]
# name: (builder, inputs, YatGemm nodes the fused export has)
LAYER_CONFIGS = {
    # YatNMN: test_all_layers, test_constant_alpha_false, test_fused_yatnmn, test_yatnmn_lazy
    "YatNMN": (_nmn(), X, 1),
    "YatNMN use_bias=False": (_nmn(use_bias=False), X, 1),
    "YatNMN use_bias=False use_alpha=False": (_nmn(use_bias=False, use_alpha=False), X, 1),
    "YatNMN use_alpha=False": (_nmn(use_alpha=False), X, 1),
    "YatNMN constant_alpha=True": (_nmn(constant_alpha=True), X, 1),
    "YatNMN constant_alpha=1.5": (_nmn(constant_alpha=1.5), X, 1),
    "YatNMN constant_alpha=False": (_nmn(use_alpha=True, constant_alpha=False), X, 1),
    "YatNMN constant_bias=0.5": (_nmn(constant_bias=0.5), X, 1),
    "YatNMN epsilon=1e-3": (_nmn(epsilon=1e-3), X, 1),
    "YatNMN learnable_epsilon": (_nmn(learnable_epsilon=True), X, 1),
    "YatNMN scalar+softplus bias, learnable_epsilon": (
        _nmn(scalar_bias=True, softplus_bias=True, learnable_epsilon=True), X, 1),
    "YatNMN fused=True": (_nmn(fused=True), X, 1),
    "YatNMN lazy=True learnable_epsilon": (_nmn(lazy=True, learnable_epsilon=True), X, 1),
    "YatNMN freeze_kernel=True": (_nmn(freeze_kernel=True), X, 1),
    # YatEmbed (test_embed): the lookup, and attend with each alpha / distance form
    "YatEmbed lookup": (lambda: yat.YatEmbed(50, 16, rngs=_r()), ["ids:int32[batch=2,seq=5]"], 0),
    "YatEmbed.attend": (_embed(), SEQ, 1),
    "YatEmbed.attend constant_alpha=True": (_embed(constant_alpha=True), SEQ, 1),
    "YatEmbed.attend use_alpha=False": (_embed(use_alpha=False), SEQ, 1),
    "YatEmbed.attend spherical": (_embed(spherical=True), SEQ, 1),
    "YatEmbed.attend weight_normalized": (_embed(weight_normalized=True), SEQ, 1),
    # MultiHeadYatAttention (test_all_layers, test_comprehensive, test_attention_alpha)
    "MultiHeadYatAttention": (_mha(), SEQ, 1),
    "MultiHeadYatAttention causal mask": (lambda: Masked(_mha()()), SEQ, 1),
    "MultiHeadYatAttention constant_alpha=True": (_mha(constant_alpha=True), SEQ, 1),
    "MultiHeadYatAttention constant_alpha=1.5": (_mha(constant_alpha=1.5), SEQ, 1),
    "MultiHeadYatAttention constant_alpha=2.0": (_mha(constant_alpha=2.0), SEQ, 1),
    "MultiHeadYatAttention use_alpha=False": (_mha(use_alpha=False), SEQ, 1),
    # YatConv / YatConvTranspose (test_basic, test_all_layers): decomposed (Conv and the Yat math around it)
    "YatConv 1D VALID": (lambda: yat.YatConv(3, 8, kernel_size=(3,), padding="VALID", rngs=_r()),
                         ["x:float32[batch=2,10,3]"], 0),
    "YatConv 1D SAME": (lambda: yat.YatConv(3, 8, kernel_size=(3,), padding="SAME", rngs=_r()),
                        ["x:float32[batch=2,10,3]"], 0),
    "YatConv 2D VALID": (lambda: yat.YatConv(3, 8, kernel_size=(3, 3), padding="VALID", rngs=_r()),
                         ["x:float32[batch=2,8,8,3]"], 0),
    "YatConv 2D SAME": (lambda: yat.YatConv(3, 8, kernel_size=(3, 3), padding="SAME", rngs=_r()),
                        ["x:float32[batch=2,8,8,3]"], 0),
    "YatConv 2D strides=2": (lambda: yat.YatConv(3, 8, kernel_size=(3, 3), strides=(2, 2), padding="SAME",
                                                 rngs=_r()), ["x:float32[batch=2,8,8,3]"], 0),
    "YatConv 2D no bias, no alpha": (lambda: yat.YatConv(3, 8, kernel_size=(3, 3), use_bias=False, use_alpha=False,
                                                         rngs=_r()), ["x:float32[batch=2,8,8,3]"], 0),
    "YatConvTranspose 2D": (lambda: yat.YatConvTranspose(3, 8, kernel_size=(3, 3), rngs=_r()),
                            ["x:float32[batch=2,8,8,3]"], 0),
}
# Configurations of nmn's NNX tests with no ONNX form through jax2onnx 0.17.1, and why.
NO_ONNX_FORM = {
    "YatNMN use_dropconnect (test_comprehensive)": "its mask draws from an nnx.Rngs stream at call time, which "
    "jax2onnx cannot trace (TraceContextError: cannot mutate RngCount)",
    "RotaryYatAttention (test_attention_alpha; use_bias=False, its default)": "jax2onnx's nnx.linear_general plugin "
    "takes no bias=None",
    "fused / Pallas / Maclaurin / radial / spherical-performer attention (test_fused_yat_attention, "
    "test_pallas_yat_attention, test_maclaurin_radial_yat, test_spherical_yat_performer)": "functions with custom "
    "kernels or random features, not layers of a model here",
}


def _passed(result) -> None:
    report = result.report
    assert report.passed, [str(f) for f in report.failures()]
    ran = [b.name for b in report.backends if b.available]
    assert set(BACKENDS) <= set(ran), ran


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYER_CONFIGS))
def test_nmn_nnx_layer_configurations_export_and_validate(name, tmp_path):
    build, inputs, yat_gemms = LAYER_CONFIGS[name]
    result = yatdeploy.export(build(), inputs, tmp_path / "m.onnx")
    _passed(result)
    assert result.yat_gemm_nodes == yat_gemms, result.notes
    assert metadata(result.model)[META_SOURCE_FORMAT] == "flax-nnx"


def test_layer_configuration_counts():
    """The table this issue asks for: nmn 0.3.5's NNX test configurations, with and without an ONNX form."""
    kinds = {}
    for name in LAYER_CONFIGS:
        kinds[name.split()[0].split(".")[0]] = kinds.get(name.split()[0].split(".")[0], 0) + 1
    assert kinds == {"YatNMN": 14, "YatEmbed": 6, "MultiHeadYatAttention": 6, "YatConv": 6, "YatConvTranspose": 1}
    assert len(LAYER_CONFIGS) == 33 and len(NO_ONNX_FORM) == 3


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # plain: YatGemm as its function


@pytest.mark.slow
def test_plain_onnxruntime_matches_jax_float32(tmp_path):
    model = nnx.Sequential(yat.YatNMN(32, 64, rngs=_r()), nnx.Linear(64, 10, rngs=_r()))
    result = yatdeploy.export(model, ["x:float32[batch=4,32]"], tmp_path / "m.onnx", validate=False)
    assert result.yat_gemm_nodes == 1
    x = np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32)
    got = _session(result.path).run(None, {"x": x})[0]
    want = np.asarray(model(jnp.asarray(x)))
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


class Block(nnx.Module):
    def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attention = yat.MultiHeadYatAttention(num_heads=heads, in_features=dim, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.up = yat.YatNMN(dim, 2 * dim, rngs=rngs)
        self.down = nnx.Linear(2 * dim, dim, rngs=rngs)

    def __call__(self, x):
        x = x + self.attention(self.norm1(x), mask=causal_mask(x.shape[1]), decode=False)
        return x + self.down(self.up(self.norm2(x)))


class YatGPT(nnx.Module):
    """A small NNX Yat GPT: YatEmbed, learned positions, causal MultiHeadYatAttention, YatNMN MLPs, tied head."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, layers: int = 2, context: int = 32, *,
                 rngs: nnx.Rngs):
        self.embed = yat.YatEmbed(vocab, dim, rngs=rngs)
        self.positions = nnx.Embed(context, dim, rngs=rngs)
        self.blocks = nnx.List([Block(dim, heads, rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)

    def __call__(self, ids):
        # the table sliced: jax2onnx 0.17.1 can't export jnp.arange of a symbolic length (docs/jax.md)
        x = self.embed(ids) + self.positions.embedding[...][: ids.shape[1]][None]
        for block in self.blocks:
            x = block(x)
        return self.embed.attend(self.norm(x))


@pytest.mark.slow
def test_nnx_yat_gpt_exports_with_dynamic_batch_and_length(tmp_path):
    gpt = YatGPT(rngs=_r())
    result = yatdeploy.export(gpt, ["ids:int32[batch=2,seq=8:32]"], tmp_path / "gpt.onnx")
    _passed(result)
    # one YatGemm per Yat product: 2 attention scores, 2 YatNMN, the tied head
    assert result.yat_gemm_nodes == 5, result.notes
    assert result.yat_gemm_kinds == {"YatNMN": 2, "attend head": 1, "attention": 2}
    feed = result.model.graph.input[0]
    assert [d.dim_param for d in feed.type.tensor_type.shape.dim] == ["batch", "seq"]
    session = _session(result.path)
    rng = np.random.default_rng(3)
    for batch, seq in ((1, 3), (5, 17), (3, 32)):
        ids = rng.integers(0, 64, (batch, seq)).astype(np.int32)
        got = session.run(None, {"ids": ids})[0]
        want = np.asarray(gpt(jnp.asarray(ids)))
        assert got.shape == (batch, seq, 64)
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    recorded = {s["name"]: s for s in json.loads(metadata(result.model)["yatdeploy.inputs"])}
    assert recorded["ids"]["values"] == [0, 64]  # the YatEmbed's table bounds the ids


MODELS_PY = """
from flax import nnx
import nmn.nnx as yat


class Mlp(nnx.Module):
    def __init__(self, rngs):
        self.yat = yat.YatNMN(8, 16, rngs=rngs)
        self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(self.yat(x))


def build():
    return Mlp(nnx.Rngs(0))
"""


@pytest.mark.slow
def test_cli_exports_arch_with_a_saved_state(tmp_path, monkeypatch, capsys):
    from flax import serialization

    from yatdeploy.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "models.py").write_text(textwrap.dedent(MODELS_PY))
    import models

    trained = models.Mlp(nnx.Rngs(7))
    (tmp_path / "state.msgpack").write_bytes(serialization.msgpack_serialize(nnx.state(trained).to_pure_dict()))
    status = main(["export", "state.msgpack", "--arch", "models:build", "--input", "x:float32[batch=2,8]",
                   "-o", "mlp.onnx"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "1 YatGemm node(s) (1 YatNMN)" in out and "PASSED" in out
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    got = _session(tmp_path / "mlp.onnx").run(None, {"x": x})[0]
    want = np.asarray(trained(jnp.asarray(x)))  # the checkpoint's weights, not build()'s
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    # validate reads the same checkpoint through --against
    assert main(["validate", "mlp.onnx", "--against", "state.msgpack", "--arch", "models:build",
                 "--backend", "ort-function"]) == 0


@pytest.mark.slow
def test_orbax_checkpoint_loads(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "models.py").write_text(textwrap.dedent(MODELS_PY))
    import models

    trained = models.Mlp(nnx.Rngs(7))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", nnx.state(trained))
    checkpointer.wait_until_finished()
    loaded = yatdeploy.load(tmp_path / "ckpt", arch="models:build")
    x = jnp.ones((2, 8))
    assert np.array_equal(np.asarray(loaded.module(x)), np.asarray(trained(x)))
    assert loaded.checkpoint == "orbax checkpoint"


def test_checkpoints_refused_clearly(tmp_path, monkeypatch):
    import pickle

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "models.py").write_text(textwrap.dedent(MODELS_PY))
    import models

    state = nnx.state(models.Mlp(nnx.Rngs(1))).to_pure_dict()
    (tmp_path / "state.pkl").write_bytes(pickle.dumps(state))
    with pytest.raises(YatDeployError, match="a pickle, whose code runs"):
        yatdeploy.load(tmp_path / "state.pkl", arch="models:build")
    assert yatdeploy.load(tmp_path / "state.pkl", arch="models:build", trust_pickle=True).checkpoint == \
        "pickle of the state's pure dict"
    del state["head"]
    from flax import serialization

    (tmp_path / "partial.msgpack").write_bytes(serialization.msgpack_serialize(state))
    with pytest.raises(YatDeployError, match="missing: head/bias, head/kernel"):
        yatdeploy.load(tmp_path / "partial.msgpack", arch="models:build")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(YatDeployError, match="not a Flax NNX checkpoint"):
        yatdeploy.load(tmp_path / "junk.bin", arch="models:build")


def test_jax_export_refuses_what_it_does_not_do(tmp_path):
    model = yat.YatNMN(8, 4, rngs=_r())
    with pytest.raises(YatDeployError, match="PyTorch models only"):
        yatdeploy.export(model, ["ids:int64[batch=1,seq=4]"], tmp_path / "m.onnx", kv_cache=True)
    with pytest.raises(YatDeployError, match="exports in its own dtype"):
        yatdeploy.export(model, ["x:float32[batch=1,8]"], tmp_path / "m.onnx", dtype="float16")
    assert not (tmp_path / "m.onnx").exists()


def test_jax_modules_import_no_torch():
    import subprocess

    script = ("import sys; import yatdeploy.jax_loading, yatdeploy.jax_reference, yatdeploy.model_reference, "
              "yatdeploy.validation, yatdeploy.arch; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", script], check=True)
