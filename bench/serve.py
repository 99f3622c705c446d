"""`ccra-export serve` under load: N concurrent streaming clients, against the pipeline called
directly (no HTTP) on the same requests in the same run.

    python bench/serve.py                          # tiny and mid-size bundles, 1, 4 and 16 clients
    python bench/serve.py --sizes small --clients 1,4 --requests 8

Per round: p50/p95 time to first token and end-to-end latency, tokens/s over the round, errors
(must be 0), the server's RSS before and after (must not grow across rounds). The reference row
is the pipeline in-process, one request at a time: the server's latency at 1 client over it is
the cost of HTTP, JSON, base64 and the queue. The server is a real `ccra-export serve` process on
a free loopback port, stopped at the end. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from lm_decode import make_checkpoint

console = Console(highlight=False)
QUESTIONS = ("What is in the picture?", "Describe the image.", "What colour is the sky?", "Is there a person?")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def photo_url(seed: int) -> str:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray((rng.random((240, 320, 3)) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def one_request(url: str, index: int, tokens: int) -> dict:
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": QUESTIONS[index % len(QUESTIONS)]},
                    {"type": "image_url", "image_url": {"url": photo_url(index % 4)}},
                ],
            }
        ],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    completion = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
        if response.status_code != 200:
            return {"error": response.status_code}
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                completion = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "e2e": end - start, "tokens": completion}


def round_of(url: str, clients: int, requests: int, tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            outcome = one_request(url, index, tokens)
            with lock:
                results.append(outcome)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    pct = lambda values, q: float(np.percentile(values, q)) if values else float("nan")  # noqa: E731
    return {
        "clients": clients,
        "requests": requests,
        "errors": len(results) - len(ok) + (requests - len(results)),
        "ttft_p50": pct([r["ttft"] for r in ok], 50),
        "ttft_p95": pct([r["ttft"] for r in ok], 95),
        "e2e_p50": pct([r["e2e"] for r in ok], 50),
        "e2e_p95": pct([r["e2e"] for r in ok], 95),
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
    }


def direct_reference(bundle: Path, requests: int, tokens: int) -> dict:
    """The same requests through the pipeline in this process: no HTTP, no queue."""
    from ccra_export.runtime.language_model import Sampling
    from ccra_export.runtime.vlm_pipeline import Pipeline

    pipeline = Pipeline.from_bundle(bundle)
    e2e, produced = [], 0
    for index in range(requests):
        data = base64.b64decode(photo_url(index % 4).split(",", 1)[1])
        image = Image.open(io.BytesIO(data)).convert("RGB")
        start = time.perf_counter()
        _, generation, _ = pipeline.generate_tokens(
            image, QUESTIONS[index % len(QUESTIONS)], Sampling(max_new_tokens=tokens, stop_ids=pipeline.lm.eos_ids)
        )
        e2e.append(time.perf_counter() - start)
        produced += len(generation.tokens)
    return {"e2e_p50": statistics.median(e2e), "e2e_all": e2e, "tokens_per_s": produced / sum(e2e)}


def bench_bundle(bundle: Path, label: str, clients: list[int], requests: int, tokens: int, rounds: list) -> None:
    port = free_port()
    server = subprocess.Popen(
        ["ccra-export", "serve", "--bundle", str(bundle), "--port", str(port), "--max-queue", "64"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"server exited: {server.stderr.read()}")
            time.sleep(0.5)
        reference = direct_reference(bundle, max(4, requests // 4), tokens)
        table = Table(title=f"{label}: {tokens} tokens per request, streamed")
        for column in (
            "clients",
            "requests",
            "TTFT p50/p95 ms",
            "e2e p50/p95 ms",
            "tokens/s",
            "errors",
            "RSS MB before -> after",
        ):
            table.add_column(column, justify="right")
        table.add_row(
            "direct",
            str(len(reference["e2e_all"])),
            "",
            f"{reference['e2e_p50'] * 1e3:.0f}",
            f"{reference['tokens_per_s']:.1f}",
            "",
            "",
        )
        for n in clients:
            before = rss_mb(server.pid)
            figures = round_of(url, n, requests, tokens)
            figures.update({"bundle": label, "rss_before_mb": before, "rss_after_mb": rss_mb(server.pid)})
            figures["e2e_p50_over_direct"] = figures["e2e_p50"] / reference["e2e_p50"]
            rounds.append(figures)
            table.add_row(
                str(n),
                str(requests),
                f"{figures['ttft_p50'] * 1e3:.0f} / {figures['ttft_p95'] * 1e3:.0f}",
                f"{figures['e2e_p50'] * 1e3:.0f} / {figures['e2e_p95'] * 1e3:.0f}",
                f"{figures['tokens_per_s']:.1f}",
                str(figures["errors"]),
                f"{figures['rss_before_mb']:.0f} -> {figures['rss_after_mb']:.0f}",
            )
        console.print(table)
        one = next((r for r in rounds if r["bundle"] == label and r["clients"] == 1), None)
        if one is not None:
            console.print(f"{label}: server e2e p50 at 1 client / direct pipeline: {one['e2e_p50_over_direct']:.2f}x")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,mid", help="checkpoint sizes (bench/lm_decode.py)")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=32, help="requests per round")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ccra-serve-bench-") as scratch:
        for size in args.sizes.split(","):
            work = Path(scratch) / size
            with console.status(f"Building the {size} bundle"):
                checkpoint = make_checkpoint(work / "ckpt", size)
                bundle = work / "bundle"
                subprocess.run(
                    [
                        "ccra-export",
                        "build",
                        "--model",
                        str(checkpoint),
                        "--precision",
                        "fp32",
                        "--lm-precision",
                        "int4",
                        "-o",
                        str(bundle),
                    ],
                    check=True,
                    capture_output=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            bench_bundle(bundle, size, clients, args.requests, args.tokens, rounds)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rounds, indent=2))


if __name__ == "__main__":
    main()
