"""The bundled default job: train a small Yat MLP on scikit-learn's digits, then export and validate it.

The digits data ships inside scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nmn.torch import YatNMN
from torch import nn

from yatdeploy import backends
from yatdeploy.errors import YatDeployError, option
from yatdeploy.exporting import INPUT_NAME, ExportOptions, ExportResult, export_model
from yatdeploy.loading import load_model
from yatdeploy.progress import Progress
from yatdeploy.validation import ValidationReport, validate

DIGITS_FEATURES = 64
DIGITS_CLASSES = 10


@dataclass
class DemoResult:
    model_path: Path
    onnx_path: Path
    test_inputs_path: Path
    torch_accuracy: float
    onnx_accuracy: float
    predictions_agree: int
    test_size: int
    backend: str
    export: ExportResult
    report: ValidationReport
    engine_path: Path | None = None  # with tensorrt=True
    tensorrt_accuracy: float | None = None


def build_demo_model() -> nn.Module:
    """Two YatNMN layers with an ordinary LayerNorm between them; no activation is needed."""
    return nn.Sequential(
        YatNMN(DIGITS_FEATURES, 64),
        nn.LayerNorm(64),
        YatNMN(64, DIGITS_CLASSES),
    )


def load_digits_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    features, labels = load_digits(return_X_y=True)
    features = (features / 16.0).astype(np.float32)
    return train_test_split(features, labels, test_size=0.25, random_state=seed, stratify=labels)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int, progress: Progress) -> None:
    torch.manual_seed(seed)
    started = time.perf_counter()
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(inputs))
        total = 0.0
        for start in range(0, len(inputs), 64):
            batch = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss) * len(batch)
        if epoch == 0 or (epoch + 1) % 5 == 0 or epoch + 1 == epochs:
            progress.say(f"  epoch {epoch + 1:>3}/{epochs}  loss {total / len(inputs):.4f}")
    progress.say(f"  trained in {time.perf_counter() - started:.1f} s")
    model.eval()


# The engine's batch profile: single images up to the whole test set (450) in one batch.
ENGINE_PROFILE = (1, 64, 512)


def run_demo(out_dir: str | Path, *, epochs: int = 20, seed: int = 0, tensorrt: bool = False,
             progress: Progress | None = None) -> DemoResult:
    """tensorrt: also build an engine (model.plan) on the backend build-engine uses by default (the data-center
    TensorRT, YatGemm as yatdeploy's plugin: needs TensorRT and a GPU), put it in the repository and validate it."""
    progress = progress or Progress()
    engine_backend = backends.default_builder() if tensorrt else None
    if engine_backend is not None:  # say so before training, not after
        reason = engine_backend.availability()
        if reason:
            raise YatDeployError(f"{option('tensorrt')}: {reason}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_train, x_test, y_train, y_test = load_digits_split(seed)

    progress.say(f"[1/4] training a Yat MLP on scikit-learn digits ({len(x_train)} train / {len(x_test)} test images)")
    torch.manual_seed(seed)
    model = build_demo_model()
    train(model, x_train, y_train, epochs, seed, progress)
    model_path = out / "model.pt"
    torch.save(model, model_path)
    test_inputs_path = out / "digits_test.npz"
    np.savez(test_inputs_path, **{INPUT_NAME: x_test})

    progress.say(f"[2/4] exporting {model_path}")
    loaded = load_model(model_path)
    onnx_path = out / "model.onnx"
    export = export_model(loaded, onnx_path, ExportOptions(input_shape=(1, DIGITS_FEATURES)), progress)

    # A model repository too, for `yatdeploy serve` and the compose stack (docker-compose.yml).
    from yatdeploy import native
    from yatdeploy.packaging import write_repository

    write_repository(out / "repository", "model", onnx_path, op_library=native.ort_library_path())
    engine_path = None
    if engine_backend is not None:
        from yatdeploy.build import build_engine

        engine_path = out / f"model{engine_backend.builder.suffix}"
        progress.say(f"[2/4] building the engine {engine_path} ({engine_backend.name})")
        min_batch, opt_batch, max_batch = ENGINE_PROFILE
        build_engine(onnx_path, engine_path, backend=engine_backend.name, min_batch=min_batch, opt_batch=opt_batch,
                     max_batch=max_batch, repository=out / "repository", name="model_trt", progress=progress)

    progress.say("[3/4] validating against PyTorch")
    report = validate(onnx_path, export.reference, input_files=[test_inputs_path], engine=engine_path, progress=progress)
    report.write_json(out / "validation.json")

    progress.say("[4/4] measuring test accuracy")
    with torch.inference_mode():
        torch_pred = loaded.module(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    backend = backends.default()
    onnx_pred = backend.open(onnx_path, backends.Options()).run({INPUT_NAME: x_test})[0].argmax(axis=1)
    tensorrt_accuracy = None
    if engine_backend is not None:
        engine_runner = engine_backend.open(onnx_path, backends.Options(engine=engine_path))
        trt_pred = engine_runner.run({INPUT_NAME: x_test})[0].argmax(axis=1)
        tensorrt_accuracy = float((trt_pred == y_test).mean())
    return DemoResult(
        model_path=model_path,
        onnx_path=onnx_path,
        test_inputs_path=test_inputs_path,
        torch_accuracy=float((torch_pred == y_test).mean()),
        onnx_accuracy=float((onnx_pred == y_test).mean()),
        predictions_agree=int((torch_pred == onnx_pred).sum()),
        test_size=len(y_test),
        backend=backend.name,
        export=export,
        report=report,
        engine_path=engine_path,
        tensorrt_accuracy=tensorrt_accuracy,
    )
