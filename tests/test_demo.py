"""The bundled default job, as the README runs it."""

from __future__ import annotations

import json
import re

import pytest

from yatdeploy.cli import EXIT_OK, main


@pytest.mark.slow
def test_demo_trains_exports_validates_and_agrees(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "8"]) == EXIT_OK
    captured = capsys.readouterr()
    assert "epoch   8/8" in captured.err  # progress while it works
    for name in ("model.pt", "model.onnx", "digits_test.npz", "validation.json", "repository/model/config.pbtxt",
                 "repository/model/1/model.onnx"):
        assert (out / name).is_file(), name
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] is True
    cases = [c["case"] for c in report["backends"][0]["comparisons"]]
    assert "digits_test.npz[input]" in cases

    torch_acc = float(re.search(r"PyTorch\s+([\d.]+)%", captured.out).group(1))
    onnx_acc, backend = re.search(r"ONNX Runtime\s+([\d.]+)%\s+\(backend ([\w-]+)\)", captured.out).groups()
    assert torch_acc == float(onnx_acc) and torch_acc > 85.0
    assert backend == "ort-cpu"  # the fused kernels, built by the install
    assert "same prediction on   450/450 images" in captured.out


@pytest.mark.slow
def test_the_demo_model_validates_from_the_command_line_it_suggests(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-q", "--out", str(out), "--epochs", "2"]) == EXIT_OK
    suggested = [line for line in capsys.readouterr().out.splitlines() if line.startswith("next: yatdeploy ")][0]
    args = suggested.removeprefix("next: yatdeploy ").split()
    assert main([args[0], "-q", *args[1:]]) == EXIT_OK


@pytest.mark.slow
def test_the_lm_demo_trains_exports_validates_and_decodes_the_same_text(tmp_path, capsys):
    out = tmp_path / "lm"
    assert main(["demo", "--lm", "--out", str(out), "--steps", "40"]) == EXIT_OK
    captured = capsys.readouterr()
    assert "step 40/40" in captured.err
    for name in ("lm.pt", "lm.onnx", "validation.json", "repository/lm/config.pbtxt", "repository/lm/1/model.onnx",
                 "genai/model.onnx", "genai/genai_config.json", "genai/tokenizer.json", "genai/libyatdeploy_ort.so"):
        assert (out / name).is_file(), name
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] is True
    cases = {c["case"] for b in report["backends"] for c in b["comparisons"]}
    assert {"random batch 32", "random seq 1, batch 2", "random seq 16, batch 2"} <= cases
    assert report["checks"][0]["detail"] == "2 YatGemm nodes for 2 Yat layer calls"  # YatNMN and the attend head
    torch_text = re.search(r"PyTorch\s+'(.*)'", captured.out).group(1)
    onnx_text = re.search(r"ONNX Runtime \(ort-cpu\s*\)\s+'(.*)'", captured.out).group(1)
    assert torch_text == onnx_text and len(torch_text.encode().decode("unicode_escape")) == 80
    # To the context of 64 with the KV cache and without: the same characters, each timed.
    full = re.search(r"PyTorch, no cache\s+'(.*)'", captured.out).group(1)
    uncached, uncached_ms = re.search(r"ONNX Runtime, no cache\s+'(.*)'\s+([\d.]+) ms/token", captured.out).groups()
    cached, cached_ms = re.search(r"ONNX Runtime, KV cache\s+'(.*)'\s+([\d.]+) ms/token", captured.out).groups()
    assert full == uncached == cached and len(cached.encode().decode("unicode_escape")) == 64 - len("The yat neuron ")
    assert float(uncached_ms) > 0 and float(cached_ms) > 0
    assert captured.out.count("identical") == 2


def test_the_lm_demo_refuses_what_is_for_the_digits_demo(tmp_path, capsys):
    assert main(["demo", "--lm", "--tensorrt", "--out", str(tmp_path)]) == 2
    assert "--tensorrt is for the digits demo" in capsys.readouterr().err
