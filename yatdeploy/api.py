"""yatdeploy's Python API: every command of the CLI as a function, which the CLI's commands call.

    import yatdeploy
    result = yatdeploy.export(model, torch.randn(1, 784), "model.onnx")     # validates too
    print(result.report.passed)
    lm = yatdeploy.export(lm_model, torch.zeros(1, 32, dtype=torch.long), "lm.onnx",
                          dynamic_axes={0: "batch", 1: "seq"})
    report = yatdeploy.validate("model.onnx", "model.pt", batches=(1, 64))
    engine = yatdeploy.build_engine("model.onnx", backend="tensorrt-rtx").engine    # yatdeploy.build
    with yatdeploy.serve("model.onnx", port=8080, grpc_port=0) as server:           # a background thread
        yatdeploy.bench(server.url, "model", concurrencies=(1, 8), duration=2)
    fused, report = yatdeploy.fuse("jax_model.onnx", "fused.onnx")                 # decomposed Yat math → YatGemm
    yatdeploy.api.doctor()["backends"]
    yatdeploy.api.demo("out")                                                        # train, export, validate

`model` is a torch.nn.Module built in this process (put in eval mode) or a model file, loaded as
`yatdeploy export` loads one (`arch`, `trust_pickle`); or a flax.nnx.Module, or the checkpoint of one that `arch`
builds (yatdeploy.jax_loading; docs/jax.md): the framework is told from the object `model` or `arch` gives. Options are checked when a function is called, before any
work, with the command's checks; errors are yatdeploy.errors.YatDeployError, whose message names the function's
keywords and says what to do. This module imports neither torch nor a runtime: build_engine, serve, bench and
doctor run without importing torch, and export, validate, load, fuse and demo import it when called.
`doctor` and `demo` are this module's only: `yatdeploy.doctor` and `yatdeploy.demo` are modules.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

from yatdeploy import files
from yatdeploy.build import EngineBuild, build_engine
from yatdeploy.cases import DEFAULT_BATCHES
from yatdeploy.errors import InputSpecError, YatDeployError, option
from yatdeploy.packaging import DEFAULT_MAX_BATCH_SIZE, DEFAULT_OP_LIBRARY_ROOT
from yatdeploy.progress import QUIET, Progress
from yatdeploy.spec import FUNCTION_OPSET as OPSET

if TYPE_CHECKING:
    import torch
    from torch import nn

    from yatdeploy.demo import DemoResult
    from yatdeploy.demo_lm import LmDemoResult
    from yatdeploy.exporting import ExportResult
    import onnx

    from yatdeploy.exporting.settle import DynamicAxes
    from yatdeploy.fusion.report import FusionReport
    from yatdeploy.inputs import InputSpec
    from yatdeploy.loadgen import BenchResult
    from yatdeploy.loadgen_lm import LmBenchResult
    from yatdeploy.jax_loading import JaxLoadedModel
    from yatdeploy.loading import LoadedModel
    from yatdeploy.model_reference import ModelReference
    from yatdeploy.serving.server import ServerHandle
    from yatdeploy.validation import Tolerance, ValidationReport

__all__ = ["BenchResult", "EngineBuild", "ExportResult", "ServeSettings", "ServerHandle", "Tolerance",
           "ValidationReport", "bench", "build_engine", "demo", "doctor", "export", "fuse", "load", "serve", "validate"]

# The result and settings types, from their stages' modules when first asked for (they import torch or serving).
_TYPES = {"BenchResult": "yatdeploy.loadgen", "ExportResult": "yatdeploy.exporting",
          "ServeSettings": "yatdeploy.serving.server", "ServerHandle": "yatdeploy.serving.server",
          "Tolerance": "yatdeploy.validation", "ValidationReport": "yatdeploy.validation"}


def __getattr__(name: str):
    if name in _TYPES:
        import importlib

        return getattr(importlib.import_module(_TYPES[name]), name)
    raise AttributeError(f"module 'yatdeploy.api' has no attribute {name!r}")


def load(model: nn.Module | str | Path | LoadedModel | JaxLoadedModel | object | None, *, arch: str | None = None,
         trust_pickle: bool = False, state_key: str | None = None) -> LoadedModel | JaxLoadedModel:
    """`model` as export and validation take it: a module as it is (torch.nn or flax.nnx), a file through
    yatdeploy.loading (`arch` builds the module for a state_dict; `state_key` picks a training checkpoint's entry).
    When `arch` builds a flax.nnx.Module, `model` is its checkpoint (yatdeploy.jax_loading), or None: the module as
    built. A Flax NNX model is loaded without importing torch."""
    from yatdeploy import jax_loading

    if isinstance(model, jax_loading.JaxLoadedModel):
        return model
    if jax_loading.is_nnx_module(model):
        return jax_loading.from_module(model)
    built = None
    if arch is not None:
        from yatdeploy.arch import build

        built = build(arch)  # once: what it returns tells the framework
        if jax_loading.is_nnx_module(built):
            if state_key is not None:
                raise YatDeployError(f"{option('state_key')} is for PyTorch training checkpoints: {arch} builds a "
                                     "flax.nnx.Module")
            return jax_loading.load_checkpoint(built, model, arch, trust_pickle=trust_pickle)
    from torch import nn

    from yatdeploy.loading import LoadedModel, from_module, load_model

    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        return from_module(model)
    if model is None:
        if built is None:
            raise YatDeployError(f"no model given: a model file, or {option('arch')} module:callable building one")
        return from_module(built)
    return load_model(model, arch=arch, trust_pickle=trust_pickle, state_key=state_key, built=built)


ExampleInputs = Union["torch.Tensor", Sequence["torch.Tensor"], Sequence[int], str, Sequence[Union["InputSpec", str]]]


def export(
    model: nn.Module | str | Path | LoadedModel | JaxLoadedModel | object | None,
    example_inputs: ExampleInputs | None = None,
    path: str | Path | None = None,
    *,
    kv_cache: bool = False,
    logits: str = "all",
    context_length: int | None = None,
    tokenizer: str | Path | None = None,
    genai_ops: str = "library",
    dynamic_axes: DynamicAxes | None = None,
    dtype: str | None = None,
    opset: int = OPSET,
    validate: bool = True,
    int_ranges: Mapping[str, tuple[int, int]] | Sequence[str] | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
    state_key: str | None = None,
    tolerance: Tolerance | None = None,
    input_files: Sequence[str | Path] = (),
    seed: int = 0,
    report: str | Path | None = None,
    repository: str | Path | None = None,
    name: str | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    op_library_root: str = DEFAULT_OP_LIBRARY_ROOT,
    progress: Progress = QUIET,
) -> ExportResult:
    """Export `model` to the ONNX file `path` (default: the model file's, with .onnx) and, unless `validate` is
    False, validate it against PyTorch on every backend available (`result.report`; the file is written even when
    validation fails; `report`: also written there as JSON).

    `example_inputs`: a tensor or a tuple of tensors, passed to the model as its positional inputs (named
    `input`, or after forward's parameters when there are several); `dynamic_axes`: `{dim: label}` for one
    input, or one such dict per input; by default the first dim of every input is dynamic, labelled "batch".
    Also taken: a shape `(1, 784)` or its text "1,784" (one float input in the export dtype, batch dynamic
    unless `dynamic_axes={}`), or input specs (`inputs.InputSpec` or "ids:int64[batch=1,seq=32]" strings).
    `dtype`: export in this dtype ("float32", "float16", "bfloat16", "float64"), default the model's. `opset`:
    the ONNX opset (18 to 22, default 20). `int_ranges`: [low, high) of integer inputs' random values, by name
    (or "ids=0:256" strings). `tolerance`, `input_files`, `seed`: as for `validate`. A Flax NNX model (a flax.nnx.Module,
    or `arch` building one and `model` its checkpoint or None) is exported through jax2onnx and validated against JAX
    (docs/jax.md): its inputs declared as specs or a shape, in its own dtype, without `kv_cache`. `repository`: also write
    its entry `<repository>/<name>/1/model.onnx` (`name` default: the file's stem) with a config.pbtxt of
    `max_batch_size`, the custom-op library named under `op_library_root` (where Triton sees the repository).
    `kv_cache`: export a causal LM (token ids in, logits out, nmn's MultiHeadYatAttention with a causal mask) as a
    decoder that takes and gives its KV cache, with yatdeploy.decoder's inputs and outputs (`example_inputs` may
    then be left out: the token ids' example is drawn); `logits` "last": only the last position's logits;
    `context_length`: the longest sequence (default: the position table's rows, else 2048). `result.decoder` is
    its layout; it is validated as `validate` validates a decoder, by greedy generation (`input_files` refused).
    The stages, in order: yatdeploy.exporting. The declaration and the output paths are checked before the model
    loads.

    A decoder's folder is also made an ONNX Runtime GenAI model folder (yatdeploy.genai), right after the export:
    genai_config.json, the `tokenizer` (a Hugging Face tokenizer.json, or "bytes": token id = UTF-8 byte) and, with
    `genai_ops` "library", the custom-op library beside it ("function": no library, YatGemm as the ONNX function).
    """
    import torch

    from yatdeploy.exporting import ExportOptions, export_model
    from yatdeploy.inputs import InputSpec

    _check_seed(seed)
    genai_tokenizer = _genai_options(kv_cache, tokenizer, genai_ops)
    if kv_cache and validate and input_files:
        raise YatDeployError(f"{option('input_files')} is for models validated on input batches: a decoder "
                             f"({option('kv_cache', True)}) is validated by greedy generation from random prompts")
    declared = {"dtype": dtype, "int_ranges": int_ranges or {}, "opset": opset, "kv_cache": kv_cache,
                "logits": logits, "context_length": context_length}
    if example_inputs is None:
        example_inputs = ()
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    items = [] if isinstance(example_inputs, str) else list(example_inputs)
    if isinstance(example_inputs, str) or (items and all(isinstance(d, int) for d in items)):  # a shape, or its text
        options = ExportOptions(example_inputs if isinstance(example_inputs, str) else tuple(items),
                                dynamic_batch=dynamic_axes != {}, **declared)
    elif items and all(isinstance(t, torch.Tensor) for t in items):
        options = ExportOptions(examples=tuple(items), dynamic_axes=dynamic_axes, **declared)
    elif items and all(isinstance(s, (InputSpec, str)) for s in items):
        options = ExportOptions(inputs=tuple(items), dynamic_batch=dynamic_axes != {}, **declared)
    elif not items:
        options = ExportOptions(**declared)  # a decoder's token ids (kv_cache), else "no inputs declared"
    else:
        raise InputSpecError("example_inputs: expected a tensor, a tuple of tensors, a shape or input specs")
    source = Path(model) if isinstance(model, (str, Path)) else None
    if path is None:
        if source is None:
            raise YatDeployError(f"{option('path')}: the ONNX file to write (the model is not a file)")
        path = source.with_suffix(".onnx")
    output = Path(path)
    if source is not None and output.resolve() == source.resolve():
        raise YatDeployError(f"{option('path')} {output} would overwrite the model file")
    _check_outputs(output, report, repository)
    started = time.perf_counter()
    if source is not None:
        progress.say(f"loading {source}")
    loaded = load(model, arch=arch, trust_pickle=trust_pickle, state_key=state_key)
    progress.say(f"exporting ({loaded.format})")
    result = export_model(loaded, output, options, progress)
    result.seconds = time.perf_counter() - started
    if repository is not None:
        from yatdeploy import native
        from yatdeploy.packaging import write_repository

        result.repository_entry = write_repository(
            repository, name or result.path.stem, result.path, op_library=native.ort_library_path(),
            max_batch_size=max_batch_size, op_library_root=op_library_root)
    if result.decoder is not None:
        _genai_folder(result, genai_tokenizer, genai_ops, progress)
    if validate and result.decoder is not None:
        progress.say("validating the decoder by greedy generation")
        result.report = _validation(result.path, result.reference, report, progress, decoder=True,
                                    tolerance=tolerance, seed=seed)
    elif validate:
        progress.say("validating")
        result.report = _validation(result.path, result.reference, report, progress, input_files=input_files,
                                    tolerance=tolerance, int_ranges=result.int_ranges, seed=seed)
    return result


def _genai_options(kv_cache: bool, tokenizer: str | Path | None, genai_ops: str):
    """export's GenAI options checked before any work; the tokenizer read (a genai.Tokenizer), or None."""
    from yatdeploy import genai

    genai.check_ops(genai_ops)
    if not kv_cache and (tokenizer is not None or genai_ops != "library"):
        raise YatDeployError(f"{option('tokenizer')} and {option('genai_ops')} are for a decoder's ONNX Runtime "
                             f"GenAI folder: add {option('kv_cache', True)}")
    return None if tokenizer is None else genai.read_tokenizer(tokenizer)


def _genai_folder(result: ExportResult, tokenizer, genai_ops: str, progress: Progress) -> None:
    """The decoder export's folder made an ONNX Runtime GenAI model folder (yatdeploy.genai), said in a note."""
    from yatdeploy import genai

    progress.say("writing the ONNX Runtime GenAI files beside it")
    written = genai.write_folder(result.path, result.decoder, tokenizer=tokenizer, ops=genai_ops)
    kernel = "the custom-op library" if written.library else "the ONNX function"
    result.notes.append(f"ONNX Runtime GenAI: {', '.join(p.name for p in written.written)} beside it, YatGemm as "
                        f"{kernel} (onnxruntime_genai.Model({str(written.folder)!r}))")
    if written.note:
        result.notes.append(written.note)


def validate(
    onnx_path: str | Path,
    model: nn.Module | str | Path | LoadedModel | JaxLoadedModel | ModelReference | object | None = None,
    *,
    input_shape: Sequence[int] | str | None = None,
    inputs: Sequence[InputSpec | str] | None = None,
    int_ranges: Mapping[str, tuple[int, int]] | Sequence[str] | None = None,
    input_files: Sequence[str | Path] = (),
    batches: Sequence[int] | str | None = None,
    tokens: int | None = None,
    tolerance: Tolerance | None = None,
    backends: Sequence[str] | None = None,
    engine: str | Path | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
    state_key: str | None = None,
    seed: int = 0,
    report: str | Path | None = None,
    explain: bool = False,
    repro: str | Path | None = None,
    progress: Progress = QUIET,
) -> ValidationReport:
    """Compare the ONNX model at `onnx_path` with the PyTorch `model` on `backends` (default: every one available
    here), on random batches of the sizes `batches` (or their text, "1,7,32") and on the arrays in `input_files`
    (.npy, or .npz whose every array is one batch). `report.passed` says whether all agreed;
    `format_report(report)` prints it; `report`: also written there as JSON.

    `tolerance`: |onnx - torch| <= atol + rtol * |torch|; None derives one per output from PyTorch's own rounding
    error. `engine`: an engine for a backend that runs one (backends.builders()). `inputs` (specs or their text, as
    export takes them) or `input_shape` (one input; or its text "1,784"): the example sizes, when the export's
    record is not to be used. `int_ranges`: as for export. Everything is checked before the model loads.

    A decoder export (`export(..., kv_cache=True)`) is validated by greedy generation instead
    (yatdeploy.validation_decoder): `tokens` per run (default 64, fewer where the context is shorter) on random
    prompts of `seed`, at batch 1, batch 3 with ragged prompts and the full context; the options of input batches
    (`input_shape`, `inputs`, `int_ranges`, `input_files`, `batches`, `engine`) are refused for it, and `tokens`
    for other models.

    On a failure of values (and always, `explain`), the report's `first_divergence` names the first PyTorch module
    whose output ONNX computes otherwise (yatdeploy.localize); `repro`: a folder to write its minimal reproduction
    to. `onnx_path` may be such a folder: its model is then validated against its recorded outputs (`model` None).
    """
    from yatdeploy import backends as registry
    from yatdeploy.inputs import InputSpec, check_specs, parse_input, parse_int_ranges
    from yatdeploy.model_reference import is_reference
    from yatdeploy.parsing import option_numbers

    _check_seed(seed)
    for name in backends or ():
        registry.get(name)
    from yatdeploy.localize import is_reproduction

    if is_reproduction(onnx_path):
        return _validate_reproduction(onnx_path, model, tolerance, backends, report, progress, explain=explain,
                                      repro=repro, arch=arch)
    decoder = _is_decoder(onnx_path)
    if decoder:
        given = {"input_shape": input_shape, "inputs": inputs, "int_ranges": int_ranges, "input_files": input_files,
                 "batches": batches, "engine": engine}
        refused = [option(name) for name, value in given.items() if value not in (None, (), [], {})]
        if refused:
            raise YatDeployError(f"{' and '.join(refused)} {'is' if len(refused) == 1 else 'are'} for models "
                                 f"validated on input batches: {Path(onnx_path).name} is a decoder export, validated "
                                 "by greedy generation from random prompts", f"leave {' and '.join(refused)} out")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise YatDeployError(f"{option('tokens')} {tokens}: must be a whole number of at least 1")
    elif tokens is not None:
        raise YatDeployError(f"{option('tokens')} is for decoder exports (kv_cache): {Path(onnx_path).name} is not "
                             "one")
    batches = option_numbers("batches", DEFAULT_BATCHES if batches is None else batches, example="1,7,32")
    shape = None if input_shape is None else tuple(option_numbers("input_shape", input_shape, example="1,784",
                                                                  separators=",x"))
    specs = None if inputs is None else check_specs([s if isinstance(s, InputSpec) else parse_input(s)
                                                     for s in inputs])
    ranges = (dict(int_ranges) if isinstance(int_ranges, Mapping)
              else parse_int_ranges(int_ranges) if int_ranges is not None else None)
    if engine is not None:
        if not Path(engine).is_file():
            raise YatDeployError(f"{option('engine')} {engine}: no such file")
        engine_backends = [b.name for b in registry.builders()]  # the backends that run an engine
        if backends and not set(engine_backends) & set(backends):
            raise YatDeployError(f"{option('engine')} is for the {' or '.join(engine_backends)} backend: "
                                 f"add {option('backends')} {engine_backends[0]}")
    _check_outputs(None, report)
    if repro is not None:
        files.check_output_folder(repro)  # before the model loads, not once the validation has failed
    if is_reference(model):
        reference = model
    else:
        if isinstance(model, (str, Path)):
            progress.say(f"loading {model}")
        reference = load(model, arch=arch, trust_pickle=trust_pickle, state_key=state_key)
    if decoder:
        if explain or repro is not None:
            raise YatDeployError(f"{option('explain', True) if explain else option('repro')} is for models validated "
                                 f"on input batches: {Path(onnx_path).name} is a decoder export")
        return _validation(onnx_path, reference, report, progress, decoder=True, tolerance=tolerance,
                           backend_names=backends, seed=seed, **({} if tokens is None else {"tokens": tokens}))
    return _validation(onnx_path, reference, report, progress, input_shape=shape, inputs=specs, int_ranges=ranges,
                       input_files=input_files, batches=batches, tolerance=tolerance, backend_names=backends,
                       seed=seed, engine=engine, explain=explain, repro=repro)


def _validate_reproduction(folder, model, tolerance, backends, report, progress, *, explain: bool,
                           repro: str | Path | None, arch: str | None) -> ValidationReport:
    """A reproduction folder (localize.write_reproduction) validated against its recorded outputs."""
    from yatdeploy.localize import validate_reproduction

    given = [name for name, value in (("model", model), ("arch", arch), ("repro", repro)) if value is not None]
    if explain:
        given.append("explain")
    if given:
        raise YatDeployError(f"{Path(folder)} is a reproduction, validated against the outputs it records: "
                             f"{' and '.join(option(n) for n in given)} {'is' if len(given) == 1 else 'are'} for an "
                             "ONNX model validated against its model", f"leave {' and '.join(option(n) for n in given)} out")
    _check_outputs(None, report)
    result = validate_reproduction(folder, tolerance=tolerance, backend_names=backends, progress=progress)
    if report is not None:
        result.write_json(report)
    return result


def _is_decoder(onnx_path: str | Path) -> bool:
    """Whether the file is a decoder export (its metadata records a KV-cache layout), read without parsing its
    graph; False for a file that isn't there or can't be read, which validation then reports."""
    from yatdeploy.decoder import META_DECODER
    from yatdeploy.errors import OnnxModelError
    from yatdeploy.inputs import file_metadata

    if not Path(onnx_path).is_file():
        return False
    try:
        return META_DECODER in file_metadata(onnx_path)
    except OnnxModelError:
        return False


def _validation(onnx_path, reference, report: str | Path | None, progress: Progress, decoder: bool = False,
                **options) -> ValidationReport:
    """validation.validate, or validation_decoder.validate_decoder for a decoder export, its report also written to
    `report` (JSON)."""
    if decoder:
        from yatdeploy.validation_decoder import validate_decoder as run_validation
    else:
        from yatdeploy.localize import localizer
        from yatdeploy.validation import validate as run_validation

        # On a failure of values (always, `explain`): where ONNX first diverges (yatdeploy.localize).
        options["localize"] = localizer(explain=options.pop("explain", False), reproduction=options.pop("repro", None))
    result = run_validation(onnx_path, reference, progress=progress, **options)
    if report is not None:
        result.write_json(report)  # whole or not at all
    return result


def _check_outputs(output: Path | None, report: str | Path | None, repository: str | Path | None = None) -> None:
    """Refuse, before any work, an output path that can't be written: a folder for a file, a path under a file."""
    for path in (output, report):
        if path is not None:
            files.check_output(path)
    if repository is not None:
        files.check_output_folder(repository)


def serve(path: str | Path, *, foreground: bool = False, progress: Progress = QUIET, **settings) -> ServerHandle:
    """Serve the .onnx file, engine or model repository at `path` over HTTP and gRPC (the Open Inference
    Protocol), as `yatdeploy serve` does. `settings`: the keywords of serving.server.ServeSettings (host, port,
    grpc_port, backend, model_control_mode, load_models, strict_readiness, exit_on_error, max_batch_size,
    max_queue_delay_us, max_queue_size, dynamic_batching, cors_origins, max_body_mb, max_inflight_body_mb, threads,
    log_level, cache_config), checked before anything loads.

    Returns a ServerHandle once the server answers: it serves from a background thread of this process (its own
    event loop; this thread stays free) until `handle.stop()` or the end of its `with` block; `handle.url` and
    `handle.grpc_url` say where. With `foreground=True` it serves in this thread until SIGTERM or Ctrl-C, as the
    command does, and returns the stopped handle."""
    from yatdeploy.serving import server

    checked = server.ServeSettings(**settings)
    return (server.serve if foreground else server.start)(path, checked, progress)


def bench(
    url: str,
    model: str | None = None,
    *,
    concurrencies: Sequence[int] | str | None = None,
    rates: Sequence[float] | str = (),
    duration: float = 5.0,
    warmup: float = 1.0,
    batch: int = 1,
    json_payload: bool = False,
    max_inflight: int = 256,
    onnx: str | Path | None = None,
    lm: bool = False,
    prompt_tokens: Sequence[int] | str | None = None,
    max_tokens: Sequence[int] | str | None = None,
    requests: int | None = None,
    lm_export: str | Path | None = None,
    lm_threads: int | None = None,
    out: str | Path | None = None,
    progress: Progress = QUIET,
) -> BenchResult | LmBenchResult:
    """Load-test the model `model` at the Open Inference Protocol endpoint `url` (http://HOST:PORT or
    grpc://HOST:PORT): a closed loop at each of `concurrencies` (clients; default 1,4,16,32), then an open loop at
    each of `rates` (requests per second; either may be their text, "1,4,16"), `duration` measured seconds each
    after `warmup` seconds, every request a batch of `batch`. `json_payload`: HTTP sends JSON tensors, not binary
    ones. `max_inflight`: the open loop's connection limit. `onnx`: the model's file, also timed in-process for the
    server's overhead. `out`: a folder to write bench.csv, bench.html and bench.json to. Failed requests are
    counted per step (`result.steps[i].errors`), not raised.

    `lm`: a language model at an OpenAI-compatible server (yatdeploy.loadgen_lm; `model` default: the first of its
    /v1/models): streamed /v1/completions at each of `concurrencies` (default 1,8,32), requests mixing
    `prompt_tokens` (default 16,64,128) with `max_tokens` (default 16,64,128), for `duration` seconds or
    `requests` requests per step; TTFT, TPOT, tokens/s and errors (LmBenchResult). `lm_export`: the served decoder
    export's .onnx, also stepped in-process by yatdeploy's loop and ORT GenAI at `lm_threads` intra-op threads
    (default: serve's). `out`: bench.html and bench.json."""
    from yatdeploy.parsing import option_numbers

    if not duration > 0 or not warmup >= 0:
        raise YatDeployError(f"{option('duration')} must be > 0 and {option('warmup')} >= 0")
    if lm:
        return _bench_lm(url, model, concurrencies, prompt_tokens, max_tokens, duration, requests, warmup,
                         lm_export, lm_threads, out, progress, rates=rates, batch=batch, json_payload=json_payload,
                         onnx=onnx)
    given = [name for name, value in (("prompt_tokens", prompt_tokens), ("max_tokens", max_tokens),
                                      ("requests", requests), ("lm_export", lm_export), ("lm_threads", lm_threads))
             if value is not None]
    if given:
        raise YatDeployError(f"{option(given[0])} is for {option('lm', True)} (a language model's completions)")
    if model is None:
        raise YatDeployError(f"give the model's name ({option('model')})")
    from yatdeploy.loadgen import run_bench, write_outputs

    concurrencies = option_numbers("concurrencies", (1, 4, 16, 32) if concurrencies is None else concurrencies,
                                   allow_empty=True)
    rates = option_numbers("rates", rates, float, allow_empty=True)
    if not concurrencies and not rates:
        raise YatDeployError(f"nothing to run: give {option('concurrencies')} and/or {option('rates')}")
    if batch < 1:
        raise YatDeployError(f"{option('batch')} must be >= 1")
    onnx = Path(onnx) if onnx else None
    if onnx is not None and not onnx.is_file():
        raise YatDeployError(f"{option('onnx')} {onnx}: no such file")
    if json_payload and url.startswith("grpc://"):
        raise YatDeployError(f"{option('json_payload', True)} is for HTTP endpoints: gRPC sends raw tensors")
    result = run_bench(url, model, concurrencies=concurrencies, rates=rates, seconds=duration, warmup=warmup,
                       batch=batch, binary=not json_payload, max_inflight=max_inflight, onnx=onnx, progress=progress)
    if out is not None:
        result.written = write_outputs(result, Path(out))
    return result


def _bench_lm(url: str, model: str | None, concurrencies, prompt_tokens, max_tokens, duration: float,
              requests: int | None, warmup: float, lm_export, lm_threads: int | None, out, progress: Progress,
              **v2_only) -> LmBenchResult:
    """bench(lm=True): its options checked (those of v2 endpoints refused), then yatdeploy.loadgen_lm's run."""
    from yatdeploy.loadgen_lm import (
        DEFAULT_CONCURRENCIES,
        DEFAULT_MAX_TOKENS,
        DEFAULT_PROMPT_TOKENS,
        run_lm_bench,
        write_lm_outputs,
    )
    from yatdeploy.parsing import option_numbers
    from yatdeploy.serving.server import ServeSettings

    defaults = {"rates": (), "batch": 1, "json_payload": False, "onnx": None}
    given = [name for name, value in v2_only.items() if value not in (defaults[name], "")]
    if given:
        raise YatDeployError(f"{option(given[0])} is for v2 endpoints, not {option('lm', True)}")
    if url.startswith("grpc://"):
        raise YatDeployError(f"{option('lm', True)} drives an OpenAI-compatible HTTP server: give http://HOST:PORT")
    concurrencies = option_numbers("concurrencies", DEFAULT_CONCURRENCIES if concurrencies is None else concurrencies)
    prompt_tokens = option_numbers("prompt_tokens", DEFAULT_PROMPT_TOKENS if prompt_tokens is None else prompt_tokens)
    max_tokens = option_numbers("max_tokens", DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens)
    if requests is not None and (isinstance(requests, bool) or not isinstance(requests, int) or requests < 1):
        raise YatDeployError(f"{option('requests')} {requests}: must be a whole number of at least 1")
    export = Path(lm_export) if lm_export is not None else None
    if export is not None and not export.is_file():
        raise YatDeployError(f"{option('lm_export')} {export}: no such file", "give the served decoder export's .onnx")
    if lm_threads is not None and (export is None or isinstance(lm_threads, bool) or not isinstance(lm_threads, int)
                                   or lm_threads < 1):
        raise YatDeployError(f"{option('lm_threads')} {lm_threads}: the in-process floor's threads, at least 1, "
                             f"with {option('lm_export')}")
    threads = lm_threads or ServeSettings().intra_op_threads  # serve's default
    result = run_lm_bench(url, model, concurrencies=concurrencies, prompt_tokens=prompt_tokens,
                          max_tokens=max_tokens, seconds=duration, requests=requests, warmup=warmup, export=export,
                          threads=threads, progress=progress)
    if out is not None:
        result.written = write_lm_outputs(result, Path(out))
    return result


def fuse(model: str | Path | onnx.ModelProto, output: str | Path | None = None, *, report: str | Path | None = None,
         check: bool = True, seed: int = 0, progress: Progress = QUIET) -> tuple[onnx.ModelProto, FusionReport]:
    """`yatdeploy fuse`: the Yat products an exporter wrote as ordinary ops (jax2onnx, a plain torch.onnx.export)
    as one YatGemm node each, with the YatGemm function attached (yatdeploy.fusion, docs/fusion.md).

    `model` is an ONNX file or an onnx.ModelProto; the fused model is written to `output` when given (whole or not
    at all) and returned with its FusionReport (per pattern what was fused, what was left decomposed and why, the
    check), which `report` names a JSON file for. The fused model is checked against the unfused one on random
    inputs (`seed`) in plain ONNX Runtime and refused when they disagree beyond float rounding; `check=False`
    skips that. A model with nothing to fuse comes back unchanged."""
    import json

    import onnx

    from yatdeploy.fusion import fuse_model
    from yatdeploy.graph import load_onnx

    _check_seed(seed)
    target = files.check_output(output) if output is not None else None
    report_path = files.check_output(report) if report is not None else None
    if isinstance(model, onnx.ModelProto):
        source = model
    else:
        with progress.step(f"reading {model}"):
            source = load_onnx(model)
    with progress.step("fusing"):
        fused, fusion = fuse_model(source, check=check, seed=seed)
    if target is not None:
        files.write_atomically(target, fused.SerializeToString())
    if report_path is not None:
        files.write_atomically(report_path, (json.dumps(fusion.as_json(), indent=2) + "\n").encode())
    return fused, fusion


def doctor() -> dict:
    """What this installation can do, as `yatdeploy doctor --json` prints it: versions, the native builds (custom-op
    libraries, GPU kernels), GPUs, ONNX Runtime's providers and every backend's availability."""
    from yatdeploy.doctor import collect

    return collect()


def _check_seed(seed: int) -> None:
    """A seed numpy's and scikit-learn's generators take: 0 to 2**32 - 1."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise YatDeployError(f"{option('seed')} {seed}: must be a whole number from 0 to 4294967295")


def demo(out: str | Path | None = None, *, lm: bool = False, epochs: int = 20, steps: int = 1000, seed: int = 0,
         tensorrt: bool = False, progress: Progress = QUIET) -> DemoResult | LmDemoResult:
    """`yatdeploy demo`: train the bundled digits MLP for `epochs` (yatdeploy.demo), export it, write its
    repository entry, validate it on the held-out digits and compare test accuracy (DemoResult; `out` default
    ./yatdeploy-demo); `tensorrt`: also build an engine on the default engine backend and validate it. `lm`: the
    tiny character LM (yatdeploy.demo_lm) for `steps`, exported with dynamic batch and length, validated, and a
    prompt decoded greedily in PyTorch and ONNX Runtime; also exported with its KV cache into an ONNX Runtime GenAI
    folder (`out`/genai/, its characters as tokenizer.json) and the prompt decoded to the context with the cache and
    without, timed per token (LmDemoResult; `out` default ./yatdeploy-demo-lm). Every
    stage is this module's function."""
    _check_seed(seed)
    if epochs <= 0:
        raise YatDeployError(f"{option('epochs')} {epochs}: must be positive")
    if lm:
        if steps <= 0:
            raise YatDeployError(f"{option('steps')} {steps}: must be positive")
        if tensorrt:
            raise YatDeployError(f"{option('tensorrt', True)} is for the digits demo, not {option('lm', True)}")
        return _lm_demo(Path(out or "yatdeploy-demo-lm"), steps, seed, progress)
    return _digits_demo(Path(out or "yatdeploy-demo"), epochs, seed, tensorrt, progress)


def _digits_demo(out: Path, epochs: int, seed: int, tensorrt: bool, progress: Progress) -> DemoResult:
    from yatdeploy import demo as digits

    engine_backend = digits.engine_backend() if tensorrt else None  # said before training, not after
    trained = digits.train_and_save(out, epochs, seed, progress)
    progress.say(f"[2/4] exporting {trained.model_path}")
    loaded = load(trained.model_path)
    exported = export(loaded, (1, digits.DIGITS_FEATURES), out / "model.onnx", validate=False,
                      repository=out / "repository", name="model", progress=progress)  # for serve and compose
    engine_path = None
    if engine_backend is not None:
        engine_path = out / f"model{engine_backend.builder.suffix}"
        progress.say(f"[2/4] building the engine {engine_path} ({engine_backend.name})")
        min_batch, opt_batch, max_batch = digits.ENGINE_PROFILE
        build_engine(exported.path, engine_path, backend=engine_backend.name, min_batch=min_batch,
                     opt_batch=opt_batch, max_batch=max_batch, repository=out / "repository", name="model_trt",
                     progress=progress)
    progress.say("[3/4] validating against PyTorch")
    report = validate(exported.path, exported.reference, input_files=[trained.test_inputs_path], engine=engine_path,
                      report=out / "validation.json", progress=progress)
    progress.say("[4/4] measuring test accuracy")
    return digits.measure(trained, loaded, exported, report, engine_backend, engine_path)


def _lm_demo(out: Path, steps: int, seed: int, progress: Progress) -> LmDemoResult:
    from yatdeploy import demo_lm

    trained = demo_lm.train_and_save(out, steps, seed, progress)
    progress.say(f"[2/4] exporting {trained.model_path} (state_dict + --arch {demo_lm.ARCH})")
    loaded = load(trained.model_path, arch=demo_lm.ARCH)
    exported = export(loaded, [demo_lm.INPUT_SPEC], out / "lm.onnx", validate=False, repository=out / "repository",
                      name="lm", progress=progress)
    folder = out / demo_lm.GENAI_FOLDER
    progress.say(f"[2/4] exporting it with its KV cache to {folder}/ (an ONNX Runtime GenAI folder)")
    cached = export(loaded, path=folder / "model.onnx", kv_cache=True, tokenizer=demo_lm.write_tokenizer(folder),
                    validate=False, progress=progress)
    progress.say("[3/4] validating against PyTorch at several batch sizes and lengths")
    started = time.perf_counter()
    report = validate(exported.path, exported.reference, report=out / "validation.json", progress=progress)
    validate_seconds = time.perf_counter() - started
    return demo_lm.decode_prompt(trained, loaded, exported, cached, report, validate_seconds, progress)
