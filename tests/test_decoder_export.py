"""`export --kv-cache`: causal Yat LMs as decoders with a KV cache (yatdeploy.decoder's contract), each attention's
scores one batched YatGemm; what can't be mapped is refused naming the module.

Each export is run here in plain ONNX Runtime (the YatGemm function, no custom-op library) and checked against the
PyTorch model recomputing the whole sequence: a prompt, then single-token steps feeding the presents back.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from nmn.torch import MultiHeadYatAttention, YatEmbed
from torch import nn

import yatdeploy
from yatdeploy import backends
from yatdeploy.cli import main
from yatdeploy.decoder import DecoderLayout, layout_of
from yatdeploy.errors import YatDeployError
from yatdeploy.graph import metadata, yat_gemm_nodes

from tests.model_zoo import yat_gpt

pytestmark = pytest.mark.slow  # each test exports a model of its own


VOCABULARY, CONTEXT = 53, 40  # tests.model_zoo.YatGPT's defaults


def _gpt(**options) -> nn.Module:
    return yat_gpt(**options)


def _alphas(model: nn.Module) -> list[float]:
    return [float(m.alpha) for m in model.modules() if isinstance(m, MultiHeadYatAttention)]


def _session(path):
    """Plain ONNX Runtime (the YatGemm function, no custom-op library), as the ort-function backend opens it."""
    return backends.get("ort-function").open(path, backends.Options())


def _cached_logits(session, layout: DecoderLayout, ids: np.ndarray, prompt: int, dtype=np.float32) -> np.ndarray:
    """Each position's logits, [batch, seq, vocab]: the prompt at once, then one token per step through the cache."""
    batch = ids.shape[0]
    past = [np.zeros((batch, layout.heads, 0, layout.head_dim), dtype) for _ in range(2 * layout.layers)]

    def feeds(start: int, stop: int, past: list[np.ndarray]) -> dict[str, np.ndarray]:
        positions = [np.broadcast_to(np.arange(start, stop), (batch, stop - start)).astype(np.int64)]
        values = [ids[:, start:stop], np.ones((batch, stop), np.int64),
                  *(positions if layout.position_ids else []), *past]
        return dict(zip(layout.input_names(), values))

    out = session.run(feeds(0, prompt, past))
    logits = [out[0]]
    for at in range(prompt, ids.shape[1]):
        out = session.run(feeds(at, at + 1, out[1:]))
        logits.append(out[0][:, -1:])
    return np.concatenate(logits, axis=1)


def _full(model: nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(ids)).float().numpy()


def _export(model: nn.Module, path, **options):
    return yatdeploy.export(model, path=path, kv_cache=True, validate=False, **options)


OPTIONS = {
    "learnable alpha": {},
    "spherical, no bias": {"spherical": True, "bias": False},
    "normalize_qk, constant alpha": {"normalize_qk": True, "constant_alpha": True},
    "constant alpha 0.5, no alpha": {"constant_alpha": 0.5},
    "no alpha, no out_proj": {"use_alpha": False, "use_out_proj": False},
    "no positions, Linear MLP, nn.Embedding, Linear head": {"positions": False, "linear_mlp": True,
                                                             "tokens": "embedding", "head": "linear"},
    "YatNMN head": {"head": "yatnmn"},
    "epsilon 1e-3": {"epsilon": 1e-3},
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_a_decoder_with_its_cache_computes_what_the_model_computes_in_full(options, tmp_path):
    model = _gpt(**options)
    result = _export(model, tmp_path / "lm.onnx")
    layout = result.decoder
    assert layout is not None and layout.layers == 2 and layout.heads == 4 and layout.head_dim == 8
    assert layout.position_ids == options.get("positions", True)
    assert layout.context_length == (CONTEXT if layout.position_ids else 2048)
    ids = np.random.default_rng(1).integers(0, VOCABULARY, (2, 20)).astype(np.int64)
    got = _cached_logits(_session(result.path), layout, ids, prompt=7)
    expected = _full(model, ids)
    assert got.shape == expected.shape == (2, 20, VOCABULARY)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_attention_scores_are_one_batched_yat_gemm_per_layer_and_counted_per_kind(tmp_path):
    torch_model = _gpt()
    result = _export(torch_model, tmp_path / "lm.onnx")
    assert result.yat_gemm_kinds == {"YatNMN": 2, "attend head": 1, "attention": 2}
    model = onnx.load(result.path)
    nodes = yat_gemm_nodes(model)
    assert len(nodes) == result.yat_gemm_nodes == 5
    # the attention nodes take the keys (a graph value, batched), the others a weight initializer
    initializers = {t.name for t in model.graph.initializer}
    batched = [n for n in nodes if n.input[1] not in initializers]
    assert len(batched) == 2
    alphas = sorted(a.f for n in batched for a in n.attribute if a.name == "alpha")
    assert alphas == pytest.approx(sorted(a / math.sqrt(8) for a in _alphas(torch_model)))  # alpha over √head_dim, folded
    assert len(set(alphas)) == 2  # each layer's own (tests.model_zoo.perturb moved them off 1)
    ops = [n.op_type for n in model.graph.node]
    assert "Einsum" not in ops and ops.count("Where") == 2  # one masking pass per layer (nmn's makes three)


def test_spherical_scores_stay_decomposed_and_the_export_says_so(tmp_path, capsys):
    result = _export(_gpt(spherical=True), tmp_path / "lm.onnx")
    assert result.yat_gemm_kinds["attention"] == 0
    assert any("blocks.0.attention (spherical scores)" in note for note in result.notes)


def test_the_contract_s_names_dims_and_metadata(tmp_path):
    result = _export(_gpt(), tmp_path / "lm.onnx")
    model = onnx.load(result.path)

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {v.name: dims(v) for v in model.graph.input}
    outputs = {v.name: dims(v) for v in model.graph.output}
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                            "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    assert inputs["input_ids"] == inputs["position_ids"] == ["batch", "seq"]
    assert inputs["attention_mask"] == ["batch", "past + seq"]
    assert inputs["past_key_values.1.value"] == ["batch", 4, "past", 8]
    assert list(outputs) == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    assert outputs["logits"] == ["batch", "seq", VOCABULARY]
    assert outputs["present.0.key"] == ["batch", 4, "past + seq", 8]
    assert layout_of(metadata(model)) == result.decoder
    recorded = {s.name: s for s in result.inputs}
    assert recorded["input_ids"].values == (0, VOCABULARY) and recorded["position_ids"].values == (0, CONTEXT)


def test_logits_last_gives_only_the_last_position(tmp_path):
    model = _gpt()
    result = _export(model, tmp_path / "lm.onnx", logits="last")
    session, layout = _session(result.path), result.decoder
    ids = np.random.default_rng(2).integers(0, VOCABULARY, (3, 12)).astype(np.int64)
    got = _cached_logits(session, layout, ids, prompt=5)
    assert got.shape == (3, 8, VOCABULARY)  # the prompt's last position, then each step's
    np.testing.assert_allclose(got, _full(model, ids)[:, 4:], rtol=1e-4, atol=1e-5)


def test_left_padding_through_the_attention_mask_matches_each_prompt_alone(tmp_path):
    model = _gpt()
    result = _export(model, tmp_path / "lm.onnx")
    session, layout = _session(result.path), result.decoder
    rng = np.random.default_rng(3)
    short, long = rng.integers(0, VOCABULARY, 4), rng.integers(0, VOCABULARY, 9)
    pad = len(long) - len(short)
    ids = np.stack([np.concatenate([np.zeros(pad, np.int64), short]), long]).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, :pad] = 0
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    past = [np.zeros((2, 4, 0, 8), np.float32) for _ in range(4)]
    logits = session.run(dict(zip(layout.input_names(), [ids, mask, positions, *past])))[0]
    np.testing.assert_allclose(logits[0, pad:], _full(model, short[None])[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits[1], _full(model, long[None])[0], rtol=1e-4, atol=1e-5)
    assert np.isfinite(logits).all()  # the padding rows see no key: a finite floor, not NaN


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_16_bit_decoder_keeps_a_16_bit_cache_and_agrees(dtype, tmp_path):
    model = _gpt()
    result = _export(model, tmp_path / "lm.onnx", dtype=dtype)
    layout = result.decoder
    assert layout.dtype == dtype
    ids = np.random.default_rng(4).integers(0, VOCABULARY, (1, 10)).astype(np.int64)
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    got = _cached_logits(_session(result.path), layout, ids, prompt=4, dtype=np_dtype).astype(np.float32)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    expected = _full(model.to(getattr(torch, dtype)), ids)
    np.testing.assert_allclose(got, expected, atol=0.05 * np.abs(expected).max())


class _NoMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(30, 16)
        self.att = MultiHeadYatAttention(16, 2)

    def forward(self, ids):
        return self.att(self.tok(ids))


class _FullMask(_NoMask):
    def forward(self, ids):
        t = ids.shape[1]
        return self.att(self.tok(ids), mask=torch.ones(1, 1, t, t, dtype=torch.bool))


class _Cross(_NoMask):
    def forward(self, ids):
        x = self.tok(ids)
        return self.att(x, x * 2, mask=torch.ones(ids.shape[1], ids.shape[1]).tril())


class _Sinusoidal(nn.Module):
    """Positions computed from arange without a table: not mappable, caught by the check against the full model."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(30, 16)
        self.att = MultiHeadYatAttention(16, 2)
        self.out = nn.Linear(16, 30)

    def forward(self, ids):
        t = ids.shape[1]
        x = self.tok(ids) + torch.sin(torch.arange(t, dtype=torch.float32))[:, None]
        return self.out(self.att(x, mask=torch.ones(t, t, dtype=torch.bool).tril()))


class _NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = YatEmbed(30, 16)

    def forward(self, ids):
        return self.tok.attend(self.tok(ids))


REFUSED = {
    "no mask": (_NoMask, "layer 'att': option mask can't be exported: it is called without a mask"),
    "a mask that is not causal": (_FullMask, "layer 'att': option mask can't be exported: the mask it is given"),
    "cross-attention": (_Cross, "layer 'att': option key can't be exported: it is called as cross-attention"),
    "sinusoidal positions": (_Sinusoidal, "with its KV cache the model does not compute what it computes in full"),
    "no attention": (_NoAttention, "the model runs no MultiHeadYatAttention"),
}


@pytest.mark.parametrize("case", REFUSED.values(), ids=REFUSED.keys())
def test_what_can_t_be_mapped_is_refused_naming_the_module_and_nothing_is_written(case, tmp_path):
    build, message = case
    torch.manual_seed(0)
    with pytest.raises(YatDeployError, match="^" + message.replace("(", r"\(")):
        _export(build().eval(), tmp_path / "lm.onnx")
    assert not (tmp_path / "lm.onnx").exists()


def test_decoder_options_without_kv_cache_or_a_wrong_declaration_are_refused_before_loading(tmp_path):
    with pytest.raises(YatDeployError, match="is for a decoder export: add"):
        yatdeploy.export("no_such_model.pt", ["ids:int64[batch=1,seq=8]"], tmp_path / "m.onnx", logits="last")
    with pytest.raises(YatDeployError, match="one input is its token ids"):
        yatdeploy.export("no_such_model.pt", ["x:float32[batch=1,16]"], tmp_path / "m.onnx", kv_cache=True)
    with pytest.raises(YatDeployError, match="context_length. 0: from 1"):
        yatdeploy.export("no_such_model.pt", None, tmp_path / "m.onnx", kv_cache=True, context_length=0)
    model = _gpt()
    with pytest.raises(YatDeployError, match="a context of 64 is longer than the position table 'pos' .40 rows."):
        _export(model, tmp_path / "m.onnx", context_length=64)


def test_the_cli_exports_a_state_dict_with_arch_and_kv_cache(tmp_path, capsys):
    torch.manual_seed(0)
    from yatdeploy import demo_lm

    source = tmp_path / "lm.pt"
    torch.save(demo_lm.build_lm_model().state_dict(), source)
    out = tmp_path / "lm.onnx"
    status = main(["export", "-q", str(source), "--arch", demo_lm.ARCH, "--kv-cache", "--logits", "last",
                   "-o", str(out), "--no-validate"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "3 YatGemm node(s) (1 YatNMN, 1 attend head, 1 attention)" in printed
    assert "decoder with a KV cache: 1 attention layer(s), 4 heads of 12" in printed and "logits last" in printed
    assert layout_of(metadata(onnx.load(out))).logits == "last"
