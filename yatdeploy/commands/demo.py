"""`yatdeploy demo`: the bundled digits model (or with --lm the tiny character LM) trained, exported and validated
(yatdeploy.api.demo)."""

from __future__ import annotations

import argparse
import time

from yatdeploy.commands.common import EXIT_OK, EXIT_VALIDATION_FAILED

NAME = "demo"
TORCH = True


def add_parser(subparsers, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    demo = subparsers.add_parser(
        NAME, parents=[common], help="train, export and validate the bundled digits model (--lm: a character LM)",
        description="Train a small Yat MLP on scikit-learn's bundled digits data (no download), save it, "
                    "export it, validate it, and compare test accuracy in PyTorch and ONNX Runtime.",
    )
    demo.add_argument("--out", metavar="DIR",
                      help="where to write (default ./yatdeploy-demo; with --lm, ./yatdeploy-demo-lm)")
    demo.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    demo.add_argument("--seed", type=int, default=0, help="seed for data split and training (default 0)")
    demo.add_argument("--lm", action="store_true",
                      help="instead: train a tiny Yat character LM (YatEmbed, causal attention, YatNMN, the tied "
                           "attend head) on text shipped with yatdeploy, export it with dynamic batch and length, "
                           "validate it, and decode a prompt greedily in PyTorch and ONNX Runtime side by side; also "
                           "export it with its KV cache as an ONNX Runtime GenAI folder (genai/, its characters as "
                           "tokenizer.json) and time a token with the cache and without")
    demo.add_argument("--steps", type=int, default=1000, help="--lm: training steps (default 1000)")
    demo.add_argument("--tensorrt", action="store_true",
                      help="also build a TensorRT engine (model.plan) and validate it against PyTorch: the first "
                           "thing to run on a machine with TensorRT and a GPU")
    return demo


def run(args: argparse.Namespace, progress) -> int:
    from yatdeploy import api
    from yatdeploy.validation import format_report

    started = time.perf_counter()
    result = api.demo(args.out, lm=args.lm, epochs=args.epochs, steps=args.steps, seed=args.seed,
                      tensorrt=args.tensorrt, progress=progress)
    print(format_report(result.report))
    return _lm(result) if args.lm else _digits(result, time.perf_counter() - started)


def _digits(result, seconds: float) -> int:
    out = result.model_path.parent
    print()
    print(f"test accuracy on {result.test_size} held-out digits:")
    print(f"  PyTorch              {result.torch_accuracy:.2%}")
    print(f"  ONNX Runtime         {result.onnx_accuracy:.2%}   (backend {result.backend})")
    if result.tensorrt_accuracy is not None:
        print(f"  TensorRT             {result.tensorrt_accuracy:.2%}   (engine {result.engine_path})")
    print(f"  same prediction on   {result.predictions_agree}/{result.test_size} images")
    plan = f", {result.engine_path.name}" if result.engine_path else ""
    print(f"\nfiles in {out}/: model.pt, model.onnx{plan}, digits_test.npz, validation.json, repository/ "
          f"({seconds:.1f} s)")
    print(f"next: yatdeploy validate {result.onnx_path} --against {result.model_path} --inputs {result.test_inputs_path}")
    agree = result.report.passed and result.predictions_agree == result.test_size
    return EXIT_OK if agree else EXIT_VALIDATION_FAILED


def _lm(result) -> int:
    same = result.torch_text == result.onnx_text
    print(f"\ngreedy continuation of {result.prompt!r}:")
    print(f"  PyTorch                 {result.torch_text!r}")
    print(f"  ONNX Runtime ({result.backend:<8}) {result.onnx_text!r}")
    print(f"  {'identical' if same else 'DIFFERENT'}")
    layout, cached, full = result.cached_export.decoder, result.with_cache, result.without_cache
    print(f"\nto the context of {layout.context_length}, the whole sequence each step or with the KV cache "
          f"({result.cached_export.path}):")
    print(f"  PyTorch, no cache       {result.cached_torch_text!r}")
    print(f"  ONNX Runtime, no cache  {full.text!r}  {full.ms_per_token:.3f} ms/token (median)")
    print(f"  ONNX Runtime, KV cache  {cached.text!r}  {cached.ms_per_token:.3f} ms/token (median, "
          f"{full.ms_per_token / cached.ms_per_token:.1f}x faster)")
    print(f"  {'identical' if result.cache_agrees else 'DIFFERENT'}")
    print(f"\ntrained to loss {result.final_loss:.3f} in {result.train_seconds:.1f} s; exports "
          f"{result.export_seconds:.1f} s, validation {result.validate_seconds:.1f} s")
    print(f"files in {result.model_path.parent}/: lm.pt, lm.onnx, validation.json, repository/lm/, genai/ (model.onnx "
          "with its KV cache, genai_config.json, tokenizer.json: onnxruntime_genai.Model runs it)")
    agree = result.report.passed and same and result.cache_agrees
    return EXIT_OK if agree else EXIT_VALIDATION_FAILED
