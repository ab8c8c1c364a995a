"""Queue policy under load: 64 clients on a model whose run takes about 200 ms, two priority levels, 50 ms queue
timeouts (issue 25's goal).

Every client sends one request after another, half at priority 1 (high), half at priority 2 (low); a third of the
requests carry a 50 ms `timeout` (the model's policy REJECTs). Reported: how many requests expired, how many of
those were answered within their deadline + 5 ms — as the server answered them (its access log's latency_us, from
the request's arrival to its answer: the goal's figure) and as the clients saw them (64 Python threads of one
process on the same 2 cores: their own scheduling adds to it), how many the model ran (its execution count against the
successes: 0 expired requests run), and the latency of the successful high-priority requests (p99) against the
low-priority ones (p50).

    python benchmarks/bench_queue_policy.py [--clients 64] [--seconds 10] [--json FILE]

slow_repository() writes the model (an ONNX Loop of 256x256 MatMuls, as many as the request's value) for
tests/test_serving_queue_policy.py too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from served import access_lines, free_port, yatdeploy_serve  # the sibling module: the server process

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.conformance_models

from tests.conformance_models import slow_repository  # noqa: E402

TIMEOUT_US = 50_000
SLACK_S = 0.005  # the goal: an expired request answered within its deadline + 5 ms


BENCH_CONFIG = """max_batch_size: 1
dynamic_batching {
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy { timeout_action: REJECT allow_timeout_override: true max_queue_size: 1000 }
}"""


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the clients send (default 10)")
    parser.add_argument("--run-ms", type=float, default=200.0, help="the model's run (default 200 ms)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        repository = slow_repository(Path(folder), {"slow": BENCH_CONFIG})
        access = Path(folder) / "access.log"  # the server's access log: each request's latency as it answered
        server = yatdeploy_serve(repository, "--threads", "1", "--log-level", "info", port=port, log=access)
        url = f"127.0.0.1:{port}"
        try:
            def one(client, value: float, **options) -> float:
                tensor = httpclient.InferInput("x", [1, 1], "FP32")
                tensor.set_data_from_numpy(np.full((1, 1), value, np.float32))
                began = time.perf_counter()
                client.infer("slow", [tensor], **options)
                return time.perf_counter() - began

            with httpclient.InferenceServerClient(url, network_timeout=600) as client:
                one(client, 10)
                per_iteration = one(client, 400) / 400  # the same machine, this server: iterations for --run-ms
            iterations = max(1, round(args.run_ms / 1e3 / per_iteration))
            rows: list[tuple[int, bool, str, float]] = []  # priority, with a timeout, outcome, seconds
            lock, stop_at = threading.Lock(), time.perf_counter() + args.seconds

            def client_loop(index: int) -> None:
                priority = 1 if index % 2 == 0 else 2
                with httpclient.InferenceServerClient(url, network_timeout=600) as client:
                    sent = 0
                    while time.perf_counter() < stop_at:
                        timed = sent % 3 == index % 3
                        options = {"priority": priority, **({"timeout": TIMEOUT_US} if timed else {})}
                        began = time.perf_counter()
                        try:
                            seconds, outcome = one(client, iterations, **options), "ok"
                        except InferenceServerException as exc:
                            seconds = time.perf_counter() - began
                            outcome = "expired" if exc.message() == "Request timeout expired" else exc.message()
                        with lock:
                            rows.append((priority, timed, outcome, seconds))
                        sent += 1

            threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            stats = json.loads(urllib.request.urlopen(f"http://{url}/v2/models/slow/stats", timeout=30).read())
        finally:
            server.terminate()
            server.wait(timeout=60)
        served_expired = [line["latency_us"] / 1e6 for line in access_lines(access)
                          if line.get("error") == "Request timeout expired"]
    model = stats["model_stats"][0]
    ok = [r for r in rows if r[2] == "ok"]
    expired = [r for r in rows if r[2] == "expired"]
    other = [r for r in rows if r[2] not in ("ok", "expired")]
    in_time = [r for r in expired if r[3] <= TIMEOUT_US / 1e6 + SLACK_S]
    served_in_time = [s for s in served_expired if s <= TIMEOUT_US / 1e6 + SLACK_S]
    high = [r[3] for r in ok if r[0] == 1]
    low = [r[3] for r in ok if r[0] == 2]
    executed = int(model["execution_count"]) - 2  # the two calibration runs
    figures = {
        "requests": len(rows), "succeeded": len(ok), "expired": len(expired), "other_errors": len(other),
        "server_expired": len(served_expired),
        "server_expired_within_deadline_plus_5ms_pct":
            100.0 * len(served_in_time) / len(served_expired) if served_expired else None,
        "server_expired_latency_p50_ms": 1e3 * _percentile(served_expired, 0.5),
        "server_expired_latency_max_ms": 1e3 * max(served_expired, default=float("nan")),
        "client_expired_within_deadline_plus_5ms_pct": 100.0 * len(in_time) / len(expired) if expired else None,
        "client_expired_latency_p50_ms": 1e3 * _percentile([r[3] for r in expired], 0.5),
        "client_expired_latency_max_ms": 1e3 * max((r[3] for r in expired), default=float("nan")),
        "executed": executed, "executed_after_expiry": executed - len(ok),
        "high_p50_ms": 1e3 * _percentile(high, 0.5), "high_p99_ms": 1e3 * _percentile(high, 0.99),
        "low_p50_ms": 1e3 * _percentile(low, 0.5), "low_p99_ms": 1e3 * _percentile(low, 0.99),
        "run_ms": 1e3 * per_iteration * iterations, "iterations": iterations, "clients": args.clients,
    }
    for key, value in figures.items():
        print(f"{key:40s} {value:.2f}" if isinstance(value, float) else f"{key:40s} {value}")
    met = bool(served_expired) and len(served_in_time) == len(served_expired) == len(expired) and \
        figures["executed_after_expiry"] == 0 and figures["high_p99_ms"] <= figures["low_p50_ms"]
    print(f"goal (100 % of expired answered by the server within deadline + 5 ms, 0 run after expiry, high p99 <= "
          f"low p50): "
          f"{'met' if met else 'missed'}")
    if args.json:
        args.json.write_text(json.dumps({
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_after": os.getloadavg()},
            "python": platform.python_version(), "figures": figures, "goal_met": met,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
