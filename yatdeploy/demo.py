"""The bundled default job's own parts: a small Yat MLP, scikit-learn's digits, training, the accuracy measured.

`yatdeploy.api.demo` runs it: these parts, and the API's export, build_engine and validate between them. The digits
data ships inside scikit-learn, so nothing is downloaded.
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
from yatdeploy.exporting import INPUT_NAME, ExportResult
from yatdeploy.loading import LoadedModel
from yatdeploy.progress import Progress
from yatdeploy.validation import ValidationReport

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


@dataclass(frozen=True)
class Trained:
    model_path: Path  # the trained model, torch.save'd whole
    test_inputs_path: Path  # the held-out digits, for validation
    x_test: np.ndarray
    y_test: np.ndarray


def engine_backend() -> backends.Backend:
    """The backend the demo's engine is built on: build-engine's default (the data-center TensorRT, YatGemm as
    yatdeploy's plugin: needs TensorRT and a GPU); refused at once where it can't run."""
    chosen = backends.default_builder()
    reason = chosen.availability()
    if reason:
        raise YatDeployError(f"{option('tensorrt')}: {reason}")
    return chosen


def train_and_save(out: Path, epochs: int, seed: int, progress: Progress) -> Trained:
    """[1/4]: the demo model trained on the digits' training split, saved to `out` with the test split."""
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
    return Trained(model_path, test_inputs_path, x_test, y_test)


def measure(trained: Trained, loaded: LoadedModel, export: ExportResult, report: ValidationReport,
            engine_backend: backends.Backend | None, engine_path: Path | None) -> DemoResult:
    """[4/4]: test accuracy in PyTorch, on the default backend and on the engine, and where they agree."""
    x_test, y_test = trained.x_test, trained.y_test
    with torch.inference_mode():
        torch_pred = loaded.module(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    backend = backends.default()
    onnx_pred = backend.open(export.path, backends.Options()).run({INPUT_NAME: x_test})[0].argmax(axis=1)
    tensorrt_accuracy = None
    if engine_backend is not None:
        engine_runner = engine_backend.open(export.path, backends.Options(engine=engine_path))
        trt_pred = engine_runner.run({INPUT_NAME: x_test})[0].argmax(axis=1)
        tensorrt_accuracy = float((trt_pred == y_test).mean())
    return DemoResult(
        model_path=trained.model_path,
        onnx_path=export.path,
        test_inputs_path=trained.test_inputs_path,
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
