"""Stage 1, settle: the inputs as the caller declared them, parsed and checked, then checked against the model.

The caller declares the inputs one of three ways (`ExportOptions`): the example tensors themselves (the Python
API; their names from the model's forward, their dynamic dims from `dynamic_axes`), input specs or their text
('ids:int64[batch=1,seq=32]', the CLI's `--input`), or a shape or its text ('1,784', `--input-shape`: one float
input in the export dtype, batch dynamic). An `ExportOptions` parses and checks what needs no model when it is
made (the CLI makes it from its flags before it loads the model); `settle_inputs` adds what the model decides: the
export dtype (the `Reference`, the model cast to it once) and forward's names. Every later stage reads the
`SettledInputs` it gives, and none parses or checks a declaration again.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
from torch import nn

from yatdeploy import dtypes, files
from yatdeploy.decoder import INPUT_IDS as DECODER_TOKENS
from yatdeploy.decoder import LOGITS_CHOICES
from yatdeploy.errors import InputSpecError, option
from yatdeploy.inputs import (
    BATCH_LABEL,
    INPUT_TYPES,
    Dim,
    InputSpec,
    check_specs,
    from_shape,
    parse_input,
    parse_int_ranges,
)
from yatdeploy.loading import LoadedModel
from yatdeploy.ops.onnx_function import FUNCTION_OPSET, SUPPORTED_OPSETS
from yatdeploy.parsing import option_numbers
from yatdeploy.progress import QUIET, Progress
from yatdeploy.reference import Reference

INPUT_NAME = "input"  # the one input of the shorthand, or of one example tensor
MAX_DIM = 1 << 20  # the largest size a dynamic dim is declared to take
OPSET = FUNCTION_OPSET

DynamicAxes = Union[Mapping[int, str], Sequence[Mapping[int, str]]]


@dataclass
class ExportOptions:
    """What the caller declares: the CLI's flag values or the API's arguments, texts included. Made, it is parsed
    and checked as far as it can be without the model (`input_shape`, `inputs` and `int_ranges` then hold the
    parsed values); `settle_inputs` does the rest."""

    input_shape: tuple[int, ...] | str = ()  # the shorthand: one float input in the export dtype, batch first; "1,784"
    dtype: str | None = None  # None: the dtype of the model's first floating parameter
    dynamic_batch: bool = True  # the shorthand's first dim is the dynamic batch
    inputs: tuple[InputSpec | str, ...] = ()  # every input (names, dtypes, dims, labels) or its text; over input_shape
    int_ranges: Mapping[str, tuple[int, int]] | Sequence[str] = field(default_factory=dict)  # or "NAME=LO:HI" texts
    opset: int = OPSET  # the ONNX opset, one of SUPPORTED_OPSETS
    examples: tuple[torch.Tensor, ...] = ()  # the example tensors themselves, positional; over inputs and input_shape
    dynamic_axes: DynamicAxes | None = None  # with examples: {dim: label} per input; default: dim 0 is "batch"
    kv_cache: bool = False  # a causal LM as a decoder with its KV cache (yatdeploy.decoder's contract)
    logits: str = "all"  # with kv_cache: every position's logits, or "last" only
    context_length: int | None = None  # with kv_cache: the longest past + seq; default the position table's rows

    def __post_init__(self) -> None:
        if self.opset not in SUPPORTED_OPSETS:
            raise InputSpecError(f"{option('opset')} {self.opset}: yatdeploy exports opsets "
                                 f"{SUPPORTED_OPSETS.start} to {SUPPORTED_OPSETS.stop - 1}")
        self._check_decoder_options()
        self.examples = tuple(self.examples)
        if self.kv_cache and not (self.examples or self.inputs or self.input_shape):
            self.inputs = (f"{DECODER_TOKENS}:int64[batch=2,seq=8]",)  # the decoder's inputs are the contract's
        if self.examples:
            pass  # their specs need the model's forward (settle_inputs)
        elif self.inputs:
            if not self.dynamic_batch:
                raise InputSpecError(f"{option('dynamic_batch', False)} is for {option('input_shape')}; with "
                                     f"{option('inputs')}, a dim without a label is fixed")
            self.inputs = tuple(_declared_specs(self.inputs))
        elif self.input_shape:
            self.input_shape = _shape(self.input_shape)
        else:
            raise InputSpecError(f"no inputs declared: give {option('input_shape')} or {option('inputs')}")
        self.int_ranges = (dict(self.int_ranges) if isinstance(self.int_ranges, Mapping)
                           else parse_int_ranges(self.int_ranges))
        if self.kv_cache:
            self._check_token_input()

    def _check_decoder_options(self) -> None:
        if not self.kv_cache:
            if self.logits != "all" or self.context_length is not None:
                given = option("logits") if self.logits != "all" else option("context_length")
                raise InputSpecError(f"{given} is for a decoder export: add {option('kv_cache', True)}")
            return
        if self.logits not in LOGITS_CHOICES:
            raise InputSpecError(f"{option('logits')} {self.logits!r}: one of {', '.join(LOGITS_CHOICES)}")
        if self.context_length is not None and not 1 <= self.context_length <= MAX_DIM:
            raise InputSpecError(f"{option('context_length')} {self.context_length}: from 1 to {MAX_DIM}")

    def _check_token_input(self) -> None:
        """A decoder's one declared input is its token ids [batch, seq] (the rest is the decoder contract's)."""
        if self.examples:
            shapes = [(str(t.dtype).removeprefix("torch."), t.dim()) for t in self.examples]
        elif self.inputs:
            shapes = [(s.dtype, len(s.dims)) for s in self.inputs]
        else:
            shapes = [("float", len(self.input_shape))]
        if len(shapes) != 1 or shapes[0][0] not in ("int64", "int32") or shapes[0][1] != 2:
            raise InputSpecError(f"{option('kv_cache', True)} exports a causal LM whose one input is its token ids, "
                                 "int64 [batch, seq]; declare it so (e.g. 'ids:int64[batch=1,seq=16]') or not at all")


@dataclass(frozen=True)
class SettledInputs:
    """The inputs of one export, settled: what every later stage reads, and nothing it has to parse or check."""

    output: Path  # the ONNX file to write, checked writable (files.check_output)
    reference: Reference  # the model in the export dtype (cast once), whose dtype is the export's
    specs: tuple[InputSpec, ...]  # every input, in order, float ones in the export dtype
    examples: tuple[torch.Tensor, ...] | None  # the caller's example tensors, in the specs' dtypes; None: draw them
    int_ranges: dict[str, tuple[int, int]]  # the caller's ranges of integer inputs' values
    opset: int
    declared_by: str  # the caller's options that declared the inputs, for an error saying what to check


def settle_inputs(loaded: LoadedModel, output: str | Path, options: ExportOptions,
                  progress: Progress = QUIET) -> SettledInputs:
    output = files.check_output(output)  # a folder or a path under a file is refused before any work
    reference = Reference.of(loaded, options.dtype)
    dtype = reference.dtype
    examples = options.examples or None
    if examples is not None:
        specs = _tensor_specs(reference.module, examples, options.dynamic_axes)
    elif options.inputs:
        specs = list(options.inputs)
    else:
        specs = [from_shape(options.input_shape, dtype, dynamic_batch=options.dynamic_batch, name=INPUT_NAME)]
    if options.dtype is not None:
        specs, examples = _in_export_dtype(specs, examples, dtype, progress)
    declared_by = (option("inputs") if examples is not None or options.inputs
                   else f"{option('input_shape')} and {option('dtype')}")
    return SettledInputs(output, reference, tuple(specs), examples, dict(options.int_ranges), options.opset,
                         declared_by)


def _shape(shape: Sequence[int] | str) -> tuple[int, ...]:
    if not isinstance(shape, str):
        return tuple(shape)
    return tuple(option_numbers("input_shape", shape, example="1,784", separators=",x"))


def _declared_specs(declared: Sequence[InputSpec | str]) -> list[InputSpec]:
    specs = check_specs([s if isinstance(s, InputSpec) else parse_input(s) for s in declared])
    for spec in specs:
        for dim in spec.dims:
            if dim.max is not None and dim.max > MAX_DIM:
                raise InputSpecError(f"input '{spec.name}': dim {dim}: a maximum above {MAX_DIM} is not "
                                     "exported (validation runs the model at its maximum)")
    return specs


def _forward_names(module: nn.Module, count: int) -> list[str]:
    """The ONNX names of `count` tensor inputs: `input` for one, else forward's parameter names."""
    if count == 1:
        return [INPUT_NAME]
    try:
        params = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return params[:count] if len(params) >= count else [f"input_{i}" for i in range(count)]


def _tensor_specs(module: nn.Module, tensors: Sequence[torch.Tensor], axes: DynamicAxes | None) -> list[InputSpec]:
    per_input = [axes] if isinstance(axes, Mapping) else list(axes) if axes is not None else None
    if per_input is not None and len(per_input) != len(tensors):
        raise InputSpecError(f"dynamic_axes has {len(per_input)} entries for {len(tensors)} example inputs")
    specs = []
    for index, (name, tensor) in enumerate(zip(_forward_names(module, len(tensors)), tensors)):
        try:
            dtype = dtypes.row(str(tensor.dtype).removeprefix("torch.")).name
        except KeyError:
            raise InputSpecError(f"example input {index} is {tensor.dtype}; yatdeploy exports "
                                 f"{', '.join(INPUT_TYPES)} inputs") from None
        labels = per_input[index] if per_input is not None else ({0: BATCH_LABEL} if tensor.dim() else {})
        bad = [d for d in labels if not -tensor.dim() <= d < tensor.dim()]
        if bad:
            raise InputSpecError(f"dynamic_axes for input {index}: dim {bad[0]} is not a dim of its shape "
                                 f"{tuple(tensor.shape)}")
        labels = {d % tensor.dim(): label for d, label in labels.items()}
        specs.append(InputSpec(name, dtype, tuple(Dim(int(s), labels.get(i)) for i, s in enumerate(tensor.shape))))
    return _declared_specs(specs)


def _in_export_dtype(specs: list[InputSpec], examples: tuple[torch.Tensor, ...] | None, dtype: str,
                     progress: Progress) -> tuple[list[InputSpec], tuple[torch.Tensor, ...] | None]:
    """The specs (and the caller's examples) with every float input in the export dtype: the model was cast to
    `dtype` (the caller's dtype option), so its layers take that dtype only ("mixed dtype" otherwise)."""
    out = []
    for spec in specs:
        if spec.dtype in dtypes.NAMES and spec.dtype != dtype:
            progress.say(f"  input '{spec.name}' declared {spec.dtype} is exported as {dtype} (the export dtype)")
            spec = dataclasses.replace(spec, dtype=dtype)
        out.append(spec)
    if examples is not None:
        examples = tuple(x.to(dtypes.by_name(new.dtype).torch) if new.dtype != old.dtype else x
                         for x, old, new in zip(examples, specs, out))
    return out, examples
