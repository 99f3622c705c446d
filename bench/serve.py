"""`ccra-export serve` under load, with continuous batching: N concurrent streaming clients, against
the pipeline called directly (no HTTP) and against llama.cpp's server (`llama-server -np N -cb`)
on the same weights, in the same run.

    python bench/serve.py                                  # mid-size bundle (0.5B-class, INT4), 1, 4, 8 clients
    python bench/serve.py --sizes small --clients 1,4 --requests 8
    python bench/serve.py --bundle B --checkpoint C --llama-server PATH/llama-server --llama-cpp-src DIR

Per round (``--repeats`` times): aggregate decode tokens/s (completion tokens of the round over its
wall time), TTFT p50/p95, end-to-end p50/p95, errors (must be 0), the server's RSS. Reported: each
round's median and range, and the ratio of N clients' tokens/s to 1 client's (per repeat, median
and range): decoding is memory-bound, so with batching N clients should get close to N times the
tokens/s (target here: 4 clients >= 2.5x). The peer row runs llama.cpp's own server on the same
weights as GGUF Q4_0 (converted with llama.cpp's convert_hf_to_gguf.py, quantized with its
llama-quantize; build both from a llama.cpp tree, e.g. llama-cpp-python's sdist's vendor/llama.cpp:
``cmake -B build -DLLAMA_CURL=OFF && cmake --build build --target llama-server llama-quantize``), with
``-np`` = the largest client count, ``-cb``, the same threads, prompts of the same token count and
the same number of new tokens (``ignore_eos``). Not a test: nothing here asserts a speed.
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
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from lm_decode import gguf_q4, make_checkpoint

console = Console(highlight=False)
SERVE = ["ccra-export", "serve", "--max-queue", "64"]
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
    completion = prompt_tokens = 0
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
                prompt_tokens = chunk["usage"]["prompt_tokens"]
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "e2e": end - start, "tokens": completion, "prompt": prompt_tokens}


def llama_request(url: str, index: int, tokens: int, prompt_tokens: int) -> dict:
    """One streamed llama-server /completion of ``tokens`` new tokens after ``prompt_tokens``
    random token ids (no prompt cache reuse between requests: each prefills its whole prompt)."""
    rng = np.random.default_rng(index)
    body = {
        "prompt": rng.integers(3, 290, prompt_tokens).tolist(),
        "n_predict": tokens,
        "ignore_eos": True,
        "cache_prompt": False,
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    first = None
    completion = 0
    with httpx.stream("POST", f"{url}/completion", json=body, timeout=300) as response:
        if response.status_code != 200:
            return {"error": response.status_code}
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("content"):
                first = time.perf_counter()
            if chunk.get("stop"):
                completion = chunk.get("timings", {}).get("predicted_n", chunk.get("tokens_predicted", 0))
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "e2e": end - start, "tokens": completion, "prompt": prompt_tokens}


def round_of(request: Callable[[int], dict], clients: int, requests: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            outcome = request(index)
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


def server_log():
    """A file for a server's stderr (its access log: a pipe nobody reads would fill and stall it)."""
    return tempfile.NamedTemporaryFile("w+", prefix="ccra-serve-bench-", suffix=".log", delete=False)


def start_server(command: list[str]) -> tuple[subprocess.Popen, str]:
    """``command --port P`` on a free loopback port, its stderr to a file: (the process, its URL)."""
    port = free_port()
    log = server_log()
    server = subprocess.Popen([*command, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=log, text=True)
    server.log = log.name  # type: ignore[attr-defined]
    return server, f"http://127.0.0.1:{port}"


def wait_healthy(url: str, process: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            log = Path(getattr(process, "log", ""))
            raise SystemExit(f"server exited: {log.read_text()[-2000:] if log.is_file() else ''}")
        time.sleep(0.5)
    raise SystemExit(f"{url} not healthy after {seconds} s")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def rounds_for(
    label: str, request: Callable[[int], dict], pid: int, clients: list[int], requests: int, repeats: int
) -> list[dict]:
    """Every client count ``repeats`` times, interleaved (1, 4, 8, 1, 4, 8, ...): a slow patch of
    the machine spreads over every count instead of biasing one."""
    request(0)  # warm: the first request of a process pays for allocations
    runs: dict[int, list[dict]] = {n: [] for n in clients}
    for _ in range(repeats):
        for n in clients:
            before = rss_mb(pid)
            figures = round_of(request, n, max(requests, n))
            figures.update(rss_before_mb=before, rss_after_mb=rss_mb(pid), server=label)
            runs[n].append(figures)
    return [run for n in clients for run in runs[n]]


def summarize(label: str, runs: list[dict], clients: list[int]) -> dict:
    """Median and range per client count, and the tokens/s ratio of each count to 1 client's
    (repeat by repeat)."""
    table = Table(title=f"{label}: streamed, tokens/s aggregated over the round")
    for column in ("clients", "tokens/s (range)", "x 1 client (range)", "TTFT p50/p95 ms", "e2e p50 ms", "errors"):
        table.add_column(column, justify="right")
    summary: dict = {}
    ones = [r["tokens_per_s"] for r in runs if r["clients"] == 1]
    for n in clients:
        mine = [r for r in runs if r["clients"] == n]
        rates = [r["tokens_per_s"] for r in mine]
        ratios = [a / b for a, b in zip(rates, ones, strict=False)] if ones else []
        entry = {
            "tokens_per_s": statistics.median(rates),
            "tokens_per_s_range": [min(rates), max(rates)],
            "ratio_to_1": statistics.median(ratios) if ratios else None,
            "ratio_range": [min(ratios), max(ratios)] if ratios else None,
            "ttft_p50": statistics.median(r["ttft_p50"] for r in mine),
            "ttft_p95": statistics.median(r["ttft_p95"] for r in mine),
            "e2e_p50": statistics.median(r["e2e_p50"] for r in mine),
            "errors": sum(r["errors"] for r in mine),
        }
        summary[n] = entry
        table.add_row(
            str(n),
            f"{entry['tokens_per_s']:.1f} ({min(rates):.1f}-{max(rates):.1f})",
            f"{entry['ratio_to_1']:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "-",
            f"{entry['ttft_p50'] * 1e3:.0f} / {entry['ttft_p95'] * 1e3:.0f}",
            f"{entry['e2e_p50'] * 1e3:.0f}",
            str(entry["errors"]),
        )
    console.print(table)
    return summary


def bench_ours(bundle: Path, clients: list[int], args: argparse.Namespace) -> tuple[dict, int]:
    """Our server's rounds; also the prompt's token count (the peer's prompts match it)."""
    command = [*SERVE, "--bundle", str(bundle), "--parallel", str(args.parallel or max(clients))]
    server, url = start_server(command)
    try:
        wait_healthy(url, server)
        prompt = one_request(url, 0, 1).get("prompt", 0)
        runs = rounds_for(
            "ours", lambda i: one_request(url, i, args.tokens), server.pid, clients, args.requests, args.repeats
        )
        summary = summarize(f"ccra-export serve --parallel {args.parallel or max(clients)}", runs, clients)
        if not args.skip_direct:
            reference = direct_reference(bundle, min(4, args.requests), args.tokens)
            console.print(f"direct pipeline, one request at a time: {reference['tokens_per_s']:.1f} tokens/s")
            summary["direct_tokens_per_s"] = reference["tokens_per_s"]
        return {"runs": runs, "summary": summary}, prompt
    finally:
        stop(server)


def llama_flags(slots: int, context: int) -> list[str]:
    """llama-server's parallel slots with continuous batching, on every core, loopback only."""
    threads = str(os.cpu_count())
    return ["--host", "127.0.0.1", "-np", str(slots), "-cb", "-c", str(context), "-t", threads, "--no-webui"]


def bench_llama(hf_dir: Path, work: Path, prompt: int, clients: list[int], args: argparse.Namespace) -> dict | str:
    """llama-server on the same weights, ``-np`` = the largest client count, ``-cb``."""
    server_bin = args.llama_server
    if server_bin is None or not server_bin.is_file():
        return "no llama-server binary (--llama-server PATH)"
    if args.llama_cpp_src is None or not (args.llama_cpp_src / "convert_hf_to_gguf.py").is_file():
        return "no llama.cpp source tree for its HF -> GGUF converter (--llama-cpp-src DIR)"
    quantize = server_bin.parent / "llama-quantize"
    if not quantize.is_file():
        return f"no llama-quantize next to {server_bin}"
    model = gguf_q4(hf_dir, work, args.llama_cpp_src, quantize)
    if isinstance(model, str):
        return model
    slots = args.parallel or max(clients)
    context = (prompt + args.tokens + 16) * slots
    server, url = start_server([str(server_bin), "-m", str(model), *llama_flags(slots, context)])
    try:
        wait_healthy(url, server)
        request = lambda i: llama_request(url, i, args.tokens, prompt)  # noqa: E731
        runs = rounds_for("llama.cpp", request, server.pid, clients, args.requests, args.repeats)
        return {"runs": runs, "summary": summarize(f"llama-server -np {slots} -cb (Q4_0)", runs, clients)}
    finally:
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="mid", help="checkpoint sizes (bench/lm_decode.py), when no --bundle")
    parser.add_argument("--bundle", type=Path, help="an existing bundle (with --checkpoint for the peer's weights)")
    parser.add_argument("--checkpoint", type=Path, help="the LLaVA checkpoint --bundle was built from")
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--parallel", type=int, help="serve --parallel (default: the largest client count)")
    parser.add_argument("--requests", type=int, default=16, help="requests per round (at least the clients)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-direct", action="store_true", help="leave out the in-process reference row")
    parser.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary (llama-quantize beside it)")
    parser.add_argument("--llama-cpp-src", type=Path, help="llama.cpp source tree (for its HF -> GGUF converter)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="ccra-serve-bench-") as scratch:
        if args.bundle:
            targets = [("bundle", args.bundle, args.checkpoint)]
        else:
            targets = []
            for size in args.sizes.split(","):
                work = Path(scratch) / size
                with console.status(f"Building the {size} bundle"):
                    checkpoint = make_checkpoint(work / "ckpt", size)
                    bundle = work / "bundle"
                    command = ["ccra-export", "build", "--model", str(checkpoint), "--precision", "fp32"]
                    subprocess.run(
                        [*command, "--lm-precision", "int4", "-o", str(bundle)],
                        check=True,
                        capture_output=True,
                        env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    )
                targets.append((size, bundle, checkpoint))
        for label, bundle, checkpoint in targets:
            ours, prompt = bench_ours(bundle, clients, args)
            entry = {"ours": ours, "prompt_tokens": prompt}
            if checkpoint is not None and (args.llama_server or args.llama_cpp_src):
                from ccra_export.export.lm_export import language_model_dir

                work = Path(scratch) / f"{label}-llama"
                work.mkdir(parents=True, exist_ok=True)
                peer = bench_llama(language_model_dir(checkpoint, work / "hf"), work, prompt, clients, args)
                entry["llama_cpp"] = peer
                if isinstance(peer, str):
                    console.print(f"llama.cpp: left out: {peer}")
                else:
                    for n in clients:
                        ratio = ours["summary"][n]["tokens_per_s"] / peer["summary"][n]["tokens_per_s"]
                        console.print(f"{n} clients: ours / llama.cpp tokens/s = {ratio:.2f}x")
                        entry.setdefault("ours_over_llama", {})[n] = ratio
            figures[label] = entry
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
