"""The bundled default job, as the README runs it."""

from __future__ import annotations

import json

from yatdeploy.cli import EXIT_OK, main


def test_demo_trains_exports_validates_and_agrees(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "8"]) == EXIT_OK
    captured = capsys.readouterr()
    assert "epoch   8/8" in captured.err  # progress while it works
    for name in ("model.pt", "model.onnx", "digits_test.npz", "validation.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] is True
    cases = [c["case"] for c in report["backends"][0]["comparisons"]]
    assert "digits_test.npz[input]" in cases

    lines = {line.split()[0]: line for line in captured.out.splitlines() if line.strip().startswith(("PyTorch", "ONNX"))}
    torch_acc = float(lines["PyTorch"].split()[-1].rstrip("%"))
    onnx_acc = float(lines["ONNX"].split()[-1].rstrip("%"))
    assert torch_acc == onnx_acc and torch_acc > 85.0
    assert "same prediction on   450/450 images" in captured.out


def test_the_demo_model_validates_from_the_command_line_it_suggests(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-q", "--out", str(out), "--epochs", "2"]) == EXIT_OK
    suggested = [line for line in capsys.readouterr().out.splitlines() if line.startswith("next: yatdeploy ")][0]
    args = suggested.removeprefix("next: yatdeploy ").split()
    assert main([args[0], "-q", *args[1:]]) == EXIT_OK
