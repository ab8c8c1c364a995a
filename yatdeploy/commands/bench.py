"""`yatdeploy bench`: load-test an Open Inference Protocol endpoint, or with --lm a language model's streamed
completions (yatdeploy.api.bench)."""

from __future__ import annotations

import argparse
import json
import sys

from yatdeploy.commands.common import EXIT_OK, EXIT_REQUESTS_FAILED

NAME = "bench"
ALIASES = {("concurrencies", None): "--concurrency", ("rates", None): "--rate"}


def add_parser(subparsers, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    bench = subparsers.add_parser(
        NAME, parents=[common], help="load-test an Open Inference Protocol endpoint (ours or Triton's), or an LM's "
                                     "streamed completions (--lm)",
        description="Closed loop over a list of concurrencies (and/or open loop at fixed request rates) against "
                    "any KServe v2 endpoint. Reports throughput, p50/p90/p95/p99 latency and errors per step; "
                    "writes bench.csv (perf_analyzer's columns), bench.html (plots) and bench.json to --out. "
                    "With --lm: streamed /v1/completions of an OpenAI-compatible server at each concurrency, "
                    "prompt and output lengths mixed; reports TTFT and TPOT p50/p99, output tokens/s and errors, "
                    "and with --lm-export the same requests stepped in-process (yatdeploy's loop, ORT GenAI); "
                    "writes bench.html and bench.json.",
    )
    bench.add_argument("url", metavar="URL", help="the server: http://HOST:PORT (e.g. http://127.0.0.1:8000) or "
                                                  "grpc://HOST:PORT (e.g. grpc://127.0.0.1:8001)")
    bench.add_argument("--model", help="the model's name (required but with --lm: default the first of /v1/models)")
    bench.add_argument("--concurrency", help="closed-loop concurrencies (default 1,4,16,32; --lm 1,8,32)")
    bench.add_argument("--rate", default="", help="open-loop request rates per second, e.g. 200,800 (default none)")
    bench.add_argument("--duration", type=float, default=5.0, help="measured seconds per step (default 5)")
    bench.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each step (default 1)")
    bench.add_argument("--batch", type=int, default=1, help="batch size of every request (default 1)")
    bench.add_argument("--json-payload", action="store_true",
                       help="HTTP: send JSON tensors instead of binary ones (gRPC always sends raw tensors)")
    bench.add_argument("--max-inflight", type=int, default=256, help="open-loop connection limit (default 256)")
    bench.add_argument("--onnx", metavar="FILE", help="the model's .onnx: also time it in-process, for the overhead")
    lm = bench.add_argument_group("language models (--lm)")
    lm.add_argument("--lm", action="store_true",
                    help="URL is an OpenAI-compatible server: stream /v1/completions (token-id prompts, ignore_eos, "
                         "temperature 0) and measure time to first token, time per output token and tokens/s")
    lm.add_argument("--prompt-tokens", metavar="N,N", help="prompt lengths of the mix (default 16,64,128)")
    lm.add_argument("--max-tokens", metavar="N,N", help="output lengths of the mix, each with every prompt length (default 16,64,128)")
    lm.add_argument("--requests", type=int, metavar="N", help="measured requests per step instead of --duration")
    lm.add_argument("--lm-export", metavar="FILE", help="the served decoder export's .onnx: also step the same "
                                                        "requests in-process (yatdeploy's loop and ORT GenAI)")
    lm.add_argument("--lm-threads", type=int, metavar="N", help="the in-process floor's intra-op threads: the server's (default: "
                                                   "serve's default, all cores but one)")
    bench.add_argument("--json", action="store_true", help="print the report's JSON instead of the table")
    bench.add_argument("--out", default="yatdeploy-bench", metavar="DIR", help="output folder (default ./yatdeploy-bench)")
    return bench


def run(args: argparse.Namespace, progress) -> int:
    from yatdeploy import api

    result = api.bench(args.url, args.model, concurrencies=args.concurrency, rates=args.rate,
                       duration=args.duration, warmup=args.warmup, batch=args.batch, json_payload=args.json_payload,
                       max_inflight=args.max_inflight, onnx=args.onnx, lm=args.lm, prompt_tokens=args.prompt_tokens,
                       max_tokens=args.max_tokens, requests=args.requests, lm_export=args.lm_export,
                       lm_threads=args.lm_threads, out=args.out, progress=progress)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    elif args.lm:
        from yatdeploy.loadgen_lm import format_lm_steps

        print(format_lm_steps(result))
    else:
        from yatdeploy.loadgen import format_steps

        print(format_steps(result.steps))
        if result.in_process_p50_us is not None:
            print(f"\nin-process ONNX Runtime p50 {result.in_process_p50_us / 1e3:.3f} ms; server overhead at the "
                  f"lowest concurrency {result.server_overhead_p50_us / 1e3:.3f} ms")
    if not args.json:
        print(f"\nwritten: {', '.join(str(p) for p in result.written)}")
    errors = sum(s.errors for s in result.steps)
    if errors:
        first = next(s.first_error for s in result.steps if s.first_error)
        print(f"{errors} request(s) failed; first: {first}", file=sys.stderr)
    return EXIT_OK if errors == 0 else EXIT_REQUESTS_FAILED
