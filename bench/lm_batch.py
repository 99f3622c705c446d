"""Decoder weight formats vs decode speed: one token (batch 1) and batched steps, against llama.cpp.

    python bench/lm_batch.py                    # mid size (0.5B-class Llama): k_quant_mixed:32, rtn:32, rtn:128
    python bench/lm_batch.py --variants rtn:128 --batches 1,4 --llama-bench .../llama-bench \\
        --llama-cpp-src .../llama.cpp           # with llama.cpp's llama-bench and llama-batched-bench

Per decoder variant (``recipe:block size``, the builder's --lm-quant and --lm-block-size), the
decoder alone is built (no bundle: seconds), then a KVPool of B slots, each holding --context tokens,
steps B tokens in one decoder call: median ms per step over --steps steps, in --repeats rounds that
time every variant and batch in turn (a noisy neighbour hits all of them). Reported: ms per token at
batch 1, tokens/s at each batch and its ratio to batch 1 (median and range over the rounds), and
what the format costs: the build's teacher-forced next-token KL against Hugging Face FP32 (mean, p99;
on a random model a measure of the rounding, not of answers).

The peer is llama.cpp on the same weights and threads, converted by its own converter and quantized
by llama-quantize to each of --llama-quants: ``llama-bench`` for one stream at the same depth, and
``llama-batched-bench`` (beside it) for B parallel sequences decoding together (its S_TG tokens/s).
Not a test: nothing here asserts a speed; bench/serve.py measures the same through the server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from lm_decode import SIZES, gguf_q4, llama_bench_per_token, make_checkpoint, spread  # noqa: E402

console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def build_variant(hf_dir: Path, out: Path, recipe: str, block_size: int) -> Path:
    """An INT4 CPU decoder and its embedding model in ``out`` (a bundle's ``lm`` folder: what
    LanguageModel opens, and where the parity writes its reference beside)."""
    from ccra_export.export.lm_export import DecoderOptions, LMQuant
    from ccra_export.workflows.language_model import write_language_model

    if not (out / "decoder" / "genai_config.json").is_file():
        quant = LMQuant(recipe=recipe, block_size=block_size)
        write_language_model(hf_dir, out, "int4", "cpu", quant, DecoderOptions())
    return out


def step_ms(lm, batch: int, context: int, steps: int, rng: np.random.Generator) -> float:
    """Median ms of one decoder call feeding one token to each of ``batch`` slots of ``context`` tokens."""
    from ccra_export.runtime.language_model import KVPool

    pool = KVPool(lm, batch, context + steps + 8)
    caches = [pool.acquire() for _ in range(batch)]
    for cache in caches:
        cache.step(lm.embed(rng.integers(3, 300, context)))
    times = []
    for step in range(steps + 3):
        embeds = lm.embed(rng.integers(3, 300, batch)).reshape(batch, 1, -1)
        start = time.perf_counter()
        pool.step(caches, embeds)
        if step >= 3:  # the first calls of a new shape warm ONNX Runtime's buffers
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def batched_tokens_per_s(
    model: Path, binary: Path, batches: list[int], context: int, steps: int, repeats: int, threads: int
) -> dict | str:
    """llama.cpp's tokens/s for B parallel sequences, each ``context`` tokens deep, decoding
    ``steps`` tokens together: ``llama-batched-bench``'s S_TG, ``repeats`` runs per B."""
    if not binary.is_file():
        return f"no {binary.name} at {binary.parent}"
    tokens_per_s: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(repeats):
        sizes = ["-npp", str(context), "-ntg", str(steps), "-npl", ",".join(map(str, batches))]
        command = [str(binary), "-m", str(model), "-t", str(threads), "-c", str(max(batches) * (context + steps) + 64)]
        ran = subprocess.run([*command, *sizes, "--output-format", "jsonl"], capture_output=True, text=True)
        if ran.returncode != 0:
            return f"llama-batched-bench failed: {ran.stderr.strip().splitlines()[-1:]}"
        for line in ran.stdout.splitlines():
            if line.startswith("{") and '"speed_tg"' in line:
                row = json.loads(line)
                tokens_per_s[int(row["pl"])].append(float(row["speed_tg"]))
    return {b: spread(v) for b, v in tokens_per_s.items() if v}


def llama_peer(args: argparse.Namespace, hf_dir: Path, work: Path, kind: str, batches: list[int]) -> dict | str:
    """llama.cpp on the same weights as GGUF ``kind``: ms/token at batch 1 (llama-bench, as
    bench/lm_decode.py runs it) and batched tokens/s (llama-batched-bench beside it), or why not."""
    per_token = llama_bench_per_token(
        hf_dir, work, [args.context], args.steps, args.repeats, args.llama_cpp_src, args.llama_bench, args.threads, kind
    )
    if isinstance(per_token, str):
        return per_token
    model = gguf_q4(hf_dir, work, args.llama_cpp_src, args.llama_bench.parent / "llama-quantize", kind)  # made above
    assert not isinstance(model, str)
    binary = args.llama_bench.parent / "llama-batched-bench"
    batched = batched_tokens_per_s(model, binary, batches, args.context, args.steps, args.repeats, args.threads)
    peer = {"ms_per_token": per_token[args.context], "file_mb": model.stat().st_size / 1e6}
    if isinstance(batched, str):
        return {**peer, "tokens_per_s": {}, "why": batched}
    return {**peer, "tokens_per_s": batched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="mid")
    parser.add_argument("--variants", default="k_quant_mixed:32,rtn:32,rtn:128", help="recipe:block size, ...")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--context", type=int, default=64, help="tokens each sequence holds when timing starts")
    parser.add_argument("--steps", type=int, default=24, help="decode steps timed per batch and round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="llama.cpp's -t (ONNX Runtime: its default, one per core)"
    )
    parser.add_argument("--llama-cpp-src", type=Path, help="llama.cpp source tree (for its HF -> GGUF converter)")
    parser.add_argument("--llama-bench", type=Path, help="llama.cpp's llama-bench (llama-quantize beside it)")
    parser.add_argument("--llama-quants", default="Q4_0,Q4_K_M", help="llama-quantize types for the peer")
    parser.add_argument("--work", type=Path, help="keep the checkpoint and decoders here (default: a temporary one)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1 or args.context < 1:
        parser.error("--steps, --repeats and --context must be at least 1")
    batches = sorted({int(b) for b in args.batches.split(",")} | {1})
    from ccra_export.core.errors import ConfigError
    from ccra_export.export.lm_export import LMQuant

    variants = []
    for spec in args.variants.split(","):
        recipe, _, block = spec.partition(":")
        try:
            quant = LMQuant(recipe=recipe, block_size=int(block or 32))
        except (ValueError, ConfigError) as error:
            parser.error(f"--variants {spec!r}: expected recipe:block size, e.g. k_quant_mixed:32 ({error})")
        variants.append((quant.recipe, quant.block_size))

    from ccra_export.export.lm_export import language_model_dir
    from ccra_export.runtime.language_model import LanguageModel
    from ccra_export.workflows.language_model import parity

    with tempfile.TemporaryDirectory(prefix="ccra-lm-batch-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = work / f"checkpoint-{args.size}"
        if not (checkpoint / "config.json").is_file():
            with console.status(f"Writing the {args.size} random checkpoint"):
                make_checkpoint(checkpoint, args.size)
        hf_dir = work / f"hf-{args.size}"
        if not (hf_dir / "model.safetensors").is_file():
            language_model_dir(checkpoint, hf_dir)
        models, quality = {}, {}
        for recipe, block in variants:
            name = f"{recipe}:{block}"
            with console.status(f"Building the {name} decoder"):
                try:
                    out = build_variant(hf_dir, work / f"{args.size}-{recipe}-b{block}" / "lm", recipe, block)
                except ConfigError as error:  # a k-quant block size this model's widths cannot take
                    parser.error(f"--variants {name}: {error}")
            with console.status(f"{name}: next-token figures against Hugging Face FP32"):
                quality[name] = parity(hf_dir, out, "int4")["next_token"]
            decoder = out / "decoder"
            models[name] = (LanguageModel(out, "cpu"), sum(p.stat().st_size for p in decoder.rglob("*") if p.is_file()))
        rng = np.random.default_rng(0)
        samples: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batches} for name in models}
        for round_ in range(args.repeats):
            for name, (lm, _) in models.items():
                for batch in batches:
                    with console.status(f"round {round_ + 1}/{args.repeats}: {name}, batch {batch}"):
                        samples[name][batch].append(step_ms(lm, batch, args.context, args.steps, rng))

        rows: dict[str, dict] = {}
        for name, per_batch in samples.items():
            ones = per_batch[1]
            rows[name] = {
                "decoder_mb": models[name][1] / 1e6,
                "kl_mean": quality[name]["kl_mean"],
                "kl_p99": quality[name]["kl_p99"],
                "ms_per_token": spread(ones),
                "tokens_per_s": {b: spread([1e3 * b / ms for ms in per_batch[b]]) for b in batches},
                "x_batch_1": {
                    b: spread([o * b / ms for o, ms in zip(ones, per_batch[b], strict=True)]) for b in batches
                },
            }
        peers: dict[str, dict | str] = {}
        if args.llama_bench is not None:
            for kind in [k for k in args.llama_quants.split(",") if k]:
                with console.status(f"llama.cpp {kind}"):
                    peers[kind] = llama_peer(args, hf_dir, work, kind, batches)

    fmt = lambda s: f"{s[1]:.2f} ({s[0]:.2f}-{s[2]:.2f})"  # noqa: E731
    table = Table(
        title=f"{args.size} Llama {SIZES[args.size]}, llama.cpp -t {args.threads} (ONNX Runtime: one thread per core), "
        f"{args.context} tokens of context: "
        f"median (min-max) of {args.repeats} rounds",
        title_justify="left",
    )
    for column in (
        "decoder",
        "MB",
        "KL mean / p99",
        "ms/token (batch 1)",
        *(f"tok/s x{b} (x batch 1)" for b in batches[1:]),
    ):
        table.add_column(column, justify="left" if column == "decoder" else "right")
    for name, row in rows.items():
        cells = [f"{row['tokens_per_s'][b][1]:.0f} ({fmt(row['x_batch_1'][b])})" for b in batches[1:]]
        kl = f"{row['kl_mean']:.1e} / {row['kl_p99']:.1e}"
        table.add_row(f"ours {name}", f"{row['decoder_mb']:.0f}", kl, fmt(row["ms_per_token"]), *cells)
    for kind, peer in peers.items():
        if isinstance(peer, str):
            table.add_row(f"llama.cpp {kind}", "", "", peer, *[""] * (len(batches) - 1))
            continue
        single = peer["tokens_per_s"].get(1)
        cells = []
        for b in batches[1:]:
            figure = peer["tokens_per_s"].get(b)
            if figure is None:
                cells.append(peer.get("why", ""))
                continue
            cells.append(f"{figure[1]:.0f}" + ("" if single is None else f" (x{figure[1] / single[1]:.2f})"))
        table.add_row(f"llama.cpp {kind}", f"{peer.get('file_mb', 0):.0f}", "", fmt(peer["ms_per_token"]), *cells)
    console.print(table)
    console.print(
        "llama.cpp: ms/token by llama-bench; tokens/s and their ratio by llama-batched-bench (its 1 sequence: x1)."
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"size": args.size, "context": args.context, "threads": args.threads, "rows": rows, "peers": peers}
        args.json.write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
