"""Decoder validation (yatdeploy.validation_decoder) and the generation loop it steps (yatdeploy.decoding): greedy
generation with the KV cache on the CPU backends against PyTorch's greedy full recompute, at batch 1, batch 3 with
ragged (left-padded) prompts and the full context; passing on correct exports, failing, and saying where, on broken
ones (an ONNX file edited: the attention mask ignored, one row of the position table changed)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import yatdeploy
from tests.model_zoo import yat_gpt
from yatdeploy import backends, demo_lm
from yatdeploy.cli import main
from yatdeploy.decoder import ATTENTION_MASK, META_DECODER, DecoderLayout, layout_of
from yatdeploy.decoding import Decoder, Generation
from yatdeploy.errors import YatDeployError
from yatdeploy.graph import metadata
from yatdeploy.validation import TOL_DERIVED, CaseTolerances, Tolerance, format_report
from yatdeploy.validation_decoder import STEPS, Expected, Run, compare_run, plan_runs

pytestmark = pytest.mark.slow  # exports and generates on every backend

CPU_BACKENDS = ["ort-cpu", "ort-function"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo LM's architecture, untrained, saved as a state_dict and exported with its cache (not validated)."""
    folder = tmp_path_factory.mktemp("decoder_validation")
    torch.manual_seed(0)
    source = folder / "lm.pt"
    torch.save(demo_lm.build_lm_model().state_dict(), source)
    result = yatdeploy.export(source, path=folder / "lm.onnx", kv_cache=True, arch=demo_lm.ARCH, validate=False)
    return source, result.path


def _validate(onnx_path, source, **options):
    return yatdeploy.validate(onnx_path, source, arch=demo_lm.ARCH, backends=CPU_BACKENDS, **options)


def _edited(path, out, edit) -> str:
    model = onnx.load(path)
    edit(model)
    onnx.save(model, out)
    return str(out)


def test_the_demo_lm_generates_64_tokens_as_pytorch_does_on_both_cpu_backends(demo, tmp_path):
    source, path = demo
    report = _validate(path, source, report=tmp_path / "report.json")
    text = format_report(report)
    assert report.passed, text
    assert [b.name for b in report.backends if b.available] == CPU_BACKENDS
    context = layout_of(metadata(onnx.load(path))).context_length  # 64: 8 + 57 tokens fill it
    for backend in (b for b in report.backends if b.available):
        assert [c.case for c in backend.comparisons] == ["batch 1, prompt 8", "batch 3, prompts 5/9/13"]
        assert [c.top1_agreement for c in backend.comparisons] == [1.0, 1.0]
        assert all(c.tolerance_from == TOL_DERIVED and c.max_abs_err <= c.atol for c in backend.comparisons)
    assert f"greedy {context + 1 - 8} tokens, batch 1, prompt 8 (the full context, {context}): tokens equal (57/57)" \
        in text
    assert "greedy 52 tokens, batch 3, ragged prompts 5/9/13 (left pads 8/4/0): tokens equal (156/156)" in text
    assert "ok   decoder: 1 attention layer(s), 4 heads of 12" in text and "max logit err" in text
    assert "YatGemm ran as the library kernel" in text  # ort-cpu ran the batched kernels
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["passed"] and saved["backends"][0]["comparisons"][1]["shape"] == [156, 39]


GPT_OPTIONS = {
    "spherical, no bias, no positions, Linear MLP, logits last": (
        {"spherical": True, "bias": False, "positions": False, "linear_mlp": True},
        {"logits": "last", "context_length": 48}),
    "normalize_qk, constant alpha": ({"normalize_qk": True, "constant_alpha": True}, {}),
}


@pytest.mark.parametrize("options", GPT_OPTIONS.values(), ids=GPT_OPTIONS.keys())
def test_export_validates_a_yat_gpt_with_its_options_by_generation(options, tmp_path):
    model_options, export_options = options
    result = yatdeploy.export(yat_gpt(**model_options), path=tmp_path / "gpt.onnx", kv_cache=True, **export_options)
    report = result.report
    text = format_report(report)
    assert report.passed, text
    assert "validation of decoders is not written yet" not in text
    ran = [b for b in report.backends if b.available]
    assert {b.name for b in ran} >= set(CPU_BACKENDS)
    # 64 tokens (fewer where the context is shorter), at batch 1, batch 3 ragged and the full context
    cases = [c.case for c in ran[0].comparisons]
    assert cases[1] == "batch 3, prompts 5/9/13" and len(cases) in (2, 3)
    assert str(result.decoder.context_length) in text and "the full context" in text


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_16_bit_decoder_validates_with_the_tolerance_its_dtype_derives(dtype, tmp_path):
    model = yat_gpt()
    result = yatdeploy.export(model, path=tmp_path / "gpt.onnx", kv_cache=True, dtype=dtype, validate=False)
    report = yatdeploy.validate(result.path, result.reference, backends=CPU_BACKENDS, tokens=12)
    assert report.passed, format_report(report)
    assert report.dtype == dtype and f"PyTorch {dtype} - PyTorch float64" in report.tolerance_rule
    assert all(c.dtype == dtype for b in report.backends if b.available for c in b.comparisons)


def test_ragged_prompts_really_pad_and_an_ignored_attention_mask_fails_only_there(demo, tmp_path):
    source, path = demo
    layout = layout_of(metadata(onnx.load(path)))
    ragged = plan_runs(layout, 8)[1]
    assert [len(p) for p in ragged.prompts] == [5, 9, 13]
    decoder = Decoder.open(path, "ort-function")
    generation = decoder.generate(ragged.prompts, 3)
    assert generation.pads == [8, 4, 0] and decoder.cache.pads() == [8, 4, 0]
    assert decoder.cache.attention_mask.shape == (3, 13 + 2) and decoder.cache.attention_mask[0, :8].sum() == 0

    def ignore_the_mask(model):  # attention_mask > 0 made attention_mask >= 0: the padding is attended to
        (node,) = [n for n in model.graph.node if n.op_type == "Greater" and n.input[0] == ATTENTION_MASK]
        node.op_type = "GreaterOrEqual"

    broken = _edited(path, tmp_path / "no_mask.onnx", ignore_the_mask)
    report = _validate(broken, source, tokens=8)
    assert not report.passed
    for backend in (b for b in report.backends if b.available):
        first, padded, full = backend.comparisons
        assert first.passed and full.passed and not padded.passed
        assert padded.problem.startswith("greedy 8 tokens, batch 3, ragged prompts 5/9/13 (left pads 8/4/0): ")
        assert "sequence 0" in padded.problem or "sequence 1" in padded.problem  # the padded ones
    assert "FAILED" in format_report(report)


def test_a_changed_weight_fails_and_the_full_context_run_finds_the_last_position(demo, tmp_path):
    source, path = demo

    def last_position(model):  # only the context's last position reads this row
        (table,) = [t for t in model.graph.initializer if t.name.endswith("position.table")]
        values = onnx.numpy_helper.to_array(table).copy()
        values[-1] += 0.5
        table.CopyFrom(onnx.numpy_helper.from_array(values, table.name))

    report = _validate(_edited(path, tmp_path / "row.onnx", last_position), source, tokens=8)
    for backend in (b for b in report.backends if b.available):
        first, padded, full = backend.comparisons
        assert first.passed and padded.passed and not full.passed
        assert full.case == "full context 64"
        assert "step 7 of sequence 0" in full.problem  # the 8th token, predicted at position 63
        assert full.bad_values > 0 and full.max_abs_err > full.atol

    def scaled_head(model):
        (head,) = [t for t in model.graph.initializer if t.name.endswith("head.weight")]
        head.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(head) * 1.01, head.name))

    report = _validate(_edited(path, tmp_path / "head.onnx", scaled_head), source, tokens=8)
    assert not report.passed
    assert all(not c.passed for b in report.backends if b.available for c in b.comparisons)
    failures = "\n".join(report.failures())
    assert "the logits differ beyond tolerance" in failures or "tokens differ from step" in failures
    assert "if these differences are acceptable, pass" in failures


def _tolerances(steps: int, atol: float) -> list[list[CaseTolerances]]:
    return [[CaseTolerances([Tolerance(atol, 0.0)], [atol / 8], TOL_DERIVED, None) for _ in range(steps)]]


def test_a_near_tie_of_the_argmax_within_tolerance_passes_and_is_said_but_a_real_difference_fails():
    run = Run("batch 1, prompt 2", "greedy 3 tokens, batch 1, prompt 2", ((1, 2),), 3)
    want = [np.array([0.0, 1.0, 0.5], np.float32), np.array([2.0, 2.0005, 0.0], np.float32),
            np.array([0.0, 0.0, 3.0], np.float32)]
    expected = [Expected([1, 1, 2], want, None)]
    tied = np.stack([want[0], np.array([2.0004, 2.0, 0.0], np.float32), want[2]])[None]  # step 1 chooses 0
    generated = Generation([[1, 2]], [[1, 0, 2]], tied, [0])
    forced = Generation([[1, 2]], [[1, 0, 2]], tied, [0])  # on PyTorch's tokens the later logits agree
    comparison = compare_run(run, generated, forced, expected, _tolerances(3, 1e-3), None, "float32")
    assert comparison.passed, comparison.detail
    assert "tokens differ from step 1 of sequence 0 (prompt 2): the backend chose 0, PyTorch 1" in comparison.detail
    assert "a near tie" in comparison.detail and "compared on PyTorch's tokens" in comparison.detail
    assert comparison.top1_agreement == pytest.approx(2 / 3)

    apart = np.stack([want[0], np.array([2.5, 2.0, 0.0], np.float32), want[2]])[None]
    comparison = compare_run(run, Generation([[1, 2]], [[1, 0, 2]], apart, [0]),
                             Generation([[1, 2]], [[1, 0, 2]], apart, [0]), expected, _tolerances(3, 1e-3), None,
                             "float32")
    assert not comparison.passed
    assert "tokens differ from step 1 of sequence 0" in comparison.problem
    assert "the logits there differ by 0.5 (tol 0.001)" in comparison.problem

    same_tokens = np.stack([want[0], want[1], want[2] + np.float32(0.01)])[None]
    comparison = compare_run(run, Generation([[1, 2]], [[1, 1, 2]], same_tokens, [0]), None, expected,
                             _tolerances(3, 1e-3), None, "float32")
    assert not comparison.passed
    assert "tokens equal (3/3), but the logits differ beyond tolerance at 1 of 3 steps (worst: step 2 of sequence 0" \
        in comparison.problem


def test_the_runs_fit_the_context():
    layout = DecoderLayout(layers=1, heads=2, head_dim=4, hidden_size=8, vocab_size=20, context_length=40,
                           position_ids=True, logits="all", dtype="float32")
    runs = plan_runs(layout)  # context 40: batch 1 fills it
    assert [(r.label, r.steps) for r in runs] == [("batch 1, prompt 8", 33), ("batch 3, prompts 5/9/13", 28)]
    assert all(max(map(len, r.prompts)) + r.steps - 1 <= layout.context_length for r in runs)
    assert all(0 <= t < 20 for r in runs for p in r.prompts for t in p)
    runs = plan_runs(layout, 4)
    assert [(r.label, r.steps, len(r.prompts[0])) for r in runs][-1] == ("full context 40", 4, 37)
    assert STEPS == 64
    with pytest.raises(YatDeployError, match="tokens. 0: must be at least 1"):
        plan_runs(layout, 0)


def test_the_decoder_session_refuses_what_the_model_cannot_take(demo, tmp_path):
    _, path = demo
    decoder = Decoder.open(path, "ort-function")
    with pytest.raises(YatDeployError, match="step before prefill"):
        decoder.step([1])
    with pytest.raises(YatDeployError, match="token id 39 is outside the vocabulary .0, 39."):
        decoder.prefill([[1, 39]])
    with pytest.raises(YatDeployError, match="65 tokens .padding included. exceed the model's context of 64"):
        decoder.prefill([[1] * 65])
    logits = decoder.prefill([[1] * 64])
    assert logits.shape == (1, 39) and decoder.cache.length == 64 and decoder.cache.nbytes > 0
    with pytest.raises(YatDeployError, match="exceed the model's context"):
        decoder.step([2])
    with pytest.raises(YatDeployError, match="not a decoder export"):
        Decoder.open(_edited(path, tmp_path / "plain.onnx", _drop_the_layout), "ort-function")


def _drop_the_layout(model) -> None:
    kept = [p for p in model.metadata_props if p.key != META_DECODER]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)


def test_the_generation_loop_runs_on_any_backend_s_runner(demo):
    _, path = demo
    layout = layout_of(metadata(onnx.load(path)))
    runner = backends.get("ort-cpu").open(path, backends.Options())
    decoder = Decoder(runner, layout)
    generation = decoder.generate([[3, 4, 5], [6]], 4)
    assert [len(t) for t in generation.tokens] == [4, 4] and generation.logits.shape == (2, 4, 39)
    assert decoder.runs == 4 and decoder.cache.length == 3 + 3 and decoder.cache.pads() == [0, 2]
    np.testing.assert_array_equal(decoder.cache.next_positions(), [6, 4])


def test_the_cli_validates_a_decoder_and_exits_by_its_verdict(demo, tmp_path, capsys):
    source, path = demo
    common = ["validate", str(path), "--against", str(source), "--arch", demo_lm.ARCH, "--tokens", "6"]
    assert main([*common, "--backend", "ort-function"]) == 0
    printed = capsys.readouterr().out
    assert "greedy 6 tokens, batch 3, ragged prompts 5/9/13 (left pads 8/4/0): tokens equal (18/18)" in printed
    assert "PASSED" in printed

    def ignore_the_mask(model):
        (node,) = [n for n in model.graph.node if n.op_type == "Greater" and n.input[0] == ATTENTION_MASK]
        node.op_type = "GreaterOrEqual"

    broken = _edited(path, tmp_path / "no_mask.onnx", ignore_the_mask)
    assert main(["validate", broken, *common[2:], "--backend", "ort-function"]) == 1
    assert "FAILED" in capsys.readouterr().out

    assert main([*common, "--batches", "1,2"]) == 2
    assert "--batches is for models validated on input batches: lm.onnx is a decoder export" in capsys.readouterr().err


def test_decoder_only_options_are_refused_for_other_models_and_batch_options_for_decoders(demo, exported_mlp):
    source, path = demo
    with pytest.raises(YatDeployError, match="`tokens` is for decoder exports"):
        yatdeploy.validate(exported_mlp.onnx, exported_mlp.source, tokens=8)
    with pytest.raises(YatDeployError, match="`input_shape` and `engine` are for models validated on input batches"):
        yatdeploy.validate(path, source, input_shape=(1, 8), engine=path)
    with pytest.raises(YatDeployError, match="`input_files` is for models validated on input batches"):
        yatdeploy.export(source, path=path.with_name("again.onnx"), kv_cache=True, input_files=["x.npy"])


@pytest.mark.slow  # a fresh interpreter
def test_the_generation_loop_does_not_import_torch():
    """The LM server and the benchmark step a Decoder without paying for torch's import."""
    out = subprocess.run([sys.executable, "-c", "import sys, yatdeploy.decoding; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_validate_command_s_help_states_the_tokens_default():
    from yatdeploy.commands import validate

    parser = validate.add_parser(argparse.ArgumentParser().add_subparsers(), argparse.ArgumentParser(add_help=False))
    (tokens,) = [a for a in parser._actions if a.dest == "tokens"]
    assert f"default {STEPS}," in tokens.help
