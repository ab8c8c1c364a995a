"""`yatdeploy serve`: models over HTTP and gRPC, in the foreground (yatdeploy.api.serve)."""

from __future__ import annotations

import argparse

from yatdeploy.commands.common import EXIT_OK

NAME = "serve"
ALIASES = {("load_models", None): "--load-model", ("cors_origins", None): "--cors-origin",
           ("dynamic_batching", False): "--no-batching"}


def add_parser(subparsers, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from yatdeploy import backends
    from yatdeploy.packaging import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE_SIZE
    from yatdeploy.serving.repository import CONTROL_MODES, ModelSource
    from yatdeploy.serving.generation import DEFAULT_KV_CACHE_MB, DEFAULT_MAX_RUNNING
    from yatdeploy.serving.server import LOG_LEVELS

    serve = subparsers.add_parser(
        NAME, parents=[common], help="serve models over HTTP and gRPC (Open Inference Protocol, KServe v2)",
        description="Serve one .onnx file (under its file stem) or a Triton-style model repository folder "
                    "with FastAPI and uvicorn (HTTP) and grpcio (gRPC), speaking the Open Inference Protocol "
                    "(KServe v2) as Triton does: binary tensors, classification, statistics, model configuration "
                    "and repository control, with dynamic batching and Prometheus metrics on /metrics.",
    )
    serve.add_argument("path", metavar="MODEL_OR_REPOSITORY",
                       help="an .onnx file, a TensorRT .plan from build-engine, or a model repository folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    serve.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001, Triton's; 0: no gRPC)")
    serve.add_argument("--model-control-mode", choices=CONTROL_MODES, default="none",
                       help="none (default): serve every model of the repository, no loading or unloading; "
                            "explicit: serve what --load-model names, then load and unload on request "
                            "(POST /v2/repository/models/NAME/load|unload), as Triton's")
    serve.add_argument("--load-model", action="append", default=[], metavar="NAME",
                       help="with --model-control-mode explicit: a model to load at start-up (repeatable; * for all)")
    serve.add_argument("--strict-readiness", default="true", nargs="?", const="true", metavar="BOOL",
                       help="true (default, as Triton): /v2/health/ready (and gRPC ServerReady) is 200 only while "
                            "every model asked for is served; false: ready once the server serves what it could "
                            "load, a model that failed staying unavailable with its reason")
    serve.add_argument("--exit-on-error", default="false", nargs="?", const="true", metavar="BOOL",
                       help="true: exit (status 2, with the reasons) when a model asked for at start-up does not "
                            "load, as Triton does by default; false (default): serve the models that load and "
                            "report the others (exit 2 only when none loads)")
    serve.add_argument("--backend", help=f"one of {', '.join(backends.names())} (default: config.pbtxt, else the "
                                          "fastest ONNX Runtime backend that works)")
    serve.add_argument("--max-batch-size", type=int,
                       help=f"dynamic batching limit (default: config.pbtxt, else {DEFAULT_MAX_BATCH_SIZE})")
    serve.add_argument("--max-queue-delay-us", type=int,
                       help="longest wait for a fuller batch, in µs "
                            f"(default: config.pbtxt, else {ModelSource.max_queue_delay_us})")
    serve.add_argument("--max-queue-size", type=int,
                       help=f"queued requests per model and priority level before 503 (default: config.pbtxt, else "
                            f"{DEFAULT_MAX_QUEUE_SIZE})")
    serve.add_argument("--no-batching", action="store_true", help="run every request on its own")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="allow browsers on ORIGIN (e.g. http://localhost:3000, or *) to call the service "
                            "(CORS; repeatable; default: none)")
    serve.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body (default 64 MB)")
    serve.add_argument("--max-inflight-body-mb", type=float, default=256.0,
                       help="request bodies held at once, over HTTP and gRPC, read, decompressed or waiting for "
                            "their answer (default 256 MB); past it a request gets 503 (gRPC: UNAVAILABLE) at "
                            "once, as for a full queue; a lone request always goes on")
    serve.add_argument("--threads", type=int,
                       help="ONNX Runtime intra-op threads per model (default: all cores but one, which the event "
                            "loop keeps)")
    serve.add_argument("--kv-cache-mb", type=float, default=DEFAULT_KV_CACHE_MB,
                       help="a language model's KV cache at most, per model version (default "
                            f"{DEFAULT_KV_CACHE_MB} MB): past it prompts wait, then get 503")
    serve.add_argument("--max-sequences", type=int, default=DEFAULT_MAX_RUNNING,
                       help=f"the sequences a language model generates at once (default {DEFAULT_MAX_RUNNING}); "
                            "more wait their turn")
    serve.add_argument("--cache-config", metavar="local,size=BYTES",
                       help="a response cache of BYTES bytes (Triton's form), for the models whose config.pbtxt has "
                            "response_cache { enable: true }: a repeated request is answered from it without "
                            "running the model (default: no cache, whatever the models ask)")
    serve.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                       help="info (default) writes one JSON access-log line per inference request (time, id, "
                            "model, status, latency); warning keeps only problems; clients may change it "
                            "(POST /v2/logging, gRPC LogSettings: log_info, log_warning, log_error, "
                            "log_verbose_level, log_format)")
    serve.add_argument("--trace-config", action="append", default=[], metavar="[MODE,]SETTING=VALUE",
                       help="tracing, as Triton's flag (repeatable; default: off): level=TIMESTAMPS|TENSORS|OFF, "
                            "rate=N (one request in N), count=N (-1: no limit), file=PATH and log-frequency=N "
                            "(mode triton: the spans as JSON lines), mode=triton|opentelemetry, "
                            "opentelemetry,url=URL (the OTLP/HTTP collector, default http://localhost:4318/v1/traces); "
                            "clients may change the settings (/v2/trace/setting, gRPC TraceSetting)")
    serve.add_argument("--settings-file-dir", metavar="DIR",
                       help="let clients name a log file or a trace file (log_file, trace_file) inside DIR, by a "
                            "relative name (default: clients can't change either: naming any file would let them "
                            "have the server write where they choose)")
    return serve


def run(args: argparse.Namespace, progress) -> int:
    from yatdeploy import api

    api.serve(
        args.path, foreground=True, progress=progress, host=args.host, port=args.port, grpc_port=args.grpc_port,
        backend=args.backend, model_control_mode=args.model_control_mode, load_models=args.load_model,
        strict_readiness=args.strict_readiness, exit_on_error=args.exit_on_error,
        max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
        max_queue_size=args.max_queue_size, dynamic_batching=not args.no_batching, cors_origins=args.cors_origin,
        max_body_mb=args.max_body_mb, max_inflight_body_mb=args.max_inflight_body_mb, threads=args.threads,
        log_level=args.log_level, trace_config=args.trace_config, settings_file_dir=args.settings_file_dir,
        cache_config=args.cache_config, kv_cache_mb=args.kv_cache_mb, max_sequences=args.max_sequences,
    )
    return EXIT_OK
