"""`yatdeploy export`: a PyTorch model to ONNX, validated (yatdeploy.api.export)."""

from __future__ import annotations

import argparse
import sys

from yatdeploy import dtypes
from yatdeploy.commands.common import (
    EXIT_OK,
    MODEL_ALIASES,
    add_model_source_args,
    add_tolerance_args,
    print_report,
    tolerance,
)

NAME = "export"
TORCH = True
ALIASES = {**MODEL_ALIASES, ("path", None): "--output"}


def add_parser(subparsers, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from yatdeploy.packaging import DEFAULT_MAX_BATCH_SIZE, DEFAULT_OP_LIBRARY_ROOT
    from yatdeploy.spec import FUNCTION_OPSET as OPSET

    export = subparsers.add_parser(
        NAME, parents=[common], help="export a Yat model (PyTorch or Flax NNX) to ONNX and validate it",
        description="Export MODEL (torch.save'd module, state_dict with --arch, TorchScript, or .pt2) to ONNX, "
                    "then validate the result against PyTorch. A Flax NNX model (--arch building an nnx.Module, "
                    "MODEL its checkpoint) is exported through jax2onnx, fused and validated against JAX.",
    )
    export.add_argument("model", metavar="MODEL", nargs="?",
                        help="the PyTorch model file; or, with --arch building a Flax NNX model, its checkpoint (an "
                             "orbax folder, a msgpack of nnx.state(model).to_pure_dict()), left out for the model as "
                             "built (docs/jax.md)")
    export.add_argument("-o", "--output", metavar="FILE", help="the ONNX file to write (default: MODEL with .onnx)")
    declared = export.add_mutually_exclusive_group()
    declared.add_argument(
        "--input-shape", metavar="B,D1,...",
        help="shape of the example input, batch first, e.g. 1,784; the batch stays dynamic (one float input)",
    )
    declared.add_argument(
        "--input", action="append", dest="inputs_spec", metavar="NAME:DTYPE[DIM,...]",
        help="one model input, in order (repeatable): DTYPE is a float type, int32, int64 or bool; a dim is a "
             "fixed size or LABEL=SIZE, dynamic with that example size and shared by every dim of the label, "
             "or LABEL=SIZE:MAX, at most MAX (recorded, validated at MAX, refused past it when served), "
             "e.g. 'ids:int64[batch=1,seq=32]', 'ids:int64[batch=1,seq=16:1024]'",
    )
    export.add_argument(
        "--dtype", choices=dtypes.NAMES,
        help="export in this dtype (casts the model); default: the model's parameter dtype",
    )
    export.add_argument(
        "--kv-cache", action="store_true",
        help="export a causal LM (token ids in, logits out) as a decoder that takes and gives its KV cache: inputs "
             "input_ids, attention_mask, position_ids (with learned positions), past_key_values.N.key/value; outputs "
             "logits, present.N.key/value (Optimum's and ONNX Runtime GenAI's names). --input is then optional. "
             "The ONNX file's folder is also an ONNX Runtime GenAI model folder (genai_config.json beside it)",
    )
    export.add_argument("--logits", choices=("all", "last"), default="all",
                        help="with --kv-cache: every position's logits (default) or only the last one's")
    export.add_argument("--context-length", type=int, metavar="N",
                        help="with --kv-cache: the longest sequence (default: the position table's rows, else 2048)")
    export.add_argument(
        "--tokenizer", metavar="FILE|bytes",
        help="with --kv-cache: the tokenizer ONNX Runtime GenAI's folder gets (copied beside the ONNX file): a Hugging "
             "Face tokenizer.json (BPE or Unigram; a tokenizer_config.json beside it gives the bos/eos/pad tokens), "
             "or 'bytes' (token id = UTF-8 byte value, for byte-level models of 256 tokens or more)",
    )
    export.add_argument(
        "--genai-ops", choices=("library", "function"), default="library",
        help="with --kv-cache: how ONNX Runtime GenAI runs YatGemm: 'library' (default) copies the custom-op library "
             "and its OpenBLAS beside the ONNX file and names it in genai_config.json's session_options; 'function' "
             "copies nothing, and YatGemm runs as the model's ONNX function",
    )
    export.add_argument("--static-batch", action="store_true", help="fix the batch dimension to the example's")
    export.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset, 18 to 22 (default {OPSET})")
    export.add_argument("--no-validate", action="store_true", help="skip the validation after export")
    export.add_argument(
        "--repository", metavar="DIR",
        help="also write DIR/<name>/1/model.onnx and a config.pbtxt for Triton or `yatdeploy serve`",
    )
    export.add_argument("--name", help="model name in the repository (default: the output file's stem)")
    export.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                        help=f"max_batch_size in config.pbtxt (default {DEFAULT_MAX_BATCH_SIZE})")
    export.add_argument(
        "--op-library-root", metavar="DIR", default=DEFAULT_OP_LIBRARY_ROOT,
        help="with --repository: the absolute path the repository will have where Triton runs. The custom-op "
             "library and the OpenBLAS it links are copied beside config.pbtxt, whose op_library_filename is "
             f"written as DIR/<name>/libyatdeploy_ort.so (default {DEFAULT_OP_LIBRARY_ROOT}, Triton's convention: "
             "-v REPO:/models ... --model-repository=/models; /mnt/models under KServe; the repository's own "
             "absolute path, e.g. \"$(realpath REPO)\", for a Triton on this machine). docs/triton.md",
    )
    add_model_source_args(export)
    add_tolerance_args(export)
    return export


def run(args: argparse.Namespace, progress) -> int:
    from yatdeploy import api

    # The flags as given: the API checks the declaration and the outputs before it loads the model.
    result = api.export(
        args.model, args.inputs_spec or args.input_shape, args.output, dynamic_axes={} if args.static_batch else None,
        kv_cache=args.kv_cache, logits=args.logits, context_length=args.context_length,
        tokenizer=args.tokenizer, genai_ops=args.genai_ops,
        dtype=args.dtype, opset=args.opset, validate=not args.no_validate, int_ranges=args.int_range,
        arch=args.arch, trust_pickle=args.trust_pickle, state_key=args.state_key, tolerance=tolerance(args),
        input_files=args.inputs, seed=args.seed, report=args.report,
        repository=args.repository, name=args.name, max_batch_size=args.max_batch_size,
        op_library_root=args.op_library_root, progress=progress,
    )
    kinds = ", ".join(f"{count} {kind}" for kind, count in result.yat_gemm_kinds.items() if count)
    print(f"wrote {result.path}: {result.yat_gemm_nodes} YatGemm node(s) ({kinds or 'none'}), {result.dtype}, "
          f"outputs {', '.join(result.output_names)} ({result.seconds:.1f} s)")
    if result.decoder is not None:
        layout = result.decoder
        print(f"decoder with a KV cache: {layout.layers} attention layer(s), {layout.heads} heads of {layout.head_dim}, vocabulary "
              f"{layout.vocab_size}, context {layout.context_length}, logits {layout.logits}")
    for note in result.notes:
        print(f"note: {note}")
    if result.repository_entry is not None:
        print(f"wrote model repository entry {result.repository_entry}")
    if result.report is None:
        return EXIT_OK
    status = print_report(result.report, args)
    if status != EXIT_OK:
        print(f"\n{result.path} was written but does not match PyTorch", file=sys.stderr)
    return status
