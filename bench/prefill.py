"""Time to first token with the LM head pruned to the last position vs on every position: the same
checkpoint's decoder built both ways by the model builder, timed in the same run.

    python bench/prefill.py                       # mid size (0.5B-class Llama, INT4), a 600-token prompt
    python bench/prefill.py --size small --tokens 64 --repeats 1 --json out/prefill.json
    python bench/prefill.py --bundles OLD NEW     # two bundles already built (without / with the pruning)

A prompt's prefill computes, without the pruning, the vocabulary logits of every prompt position
(600 x 32000 at the mid size) and copies them to the host, though only the last is used. Per round,
each decoder prefills the same --tokens-token prompt into a fresh KV cache (what `run` and `serve`
do before the first token; the vision graph excluded), the order of the two alternating between
rounds. Reported: each one's median (min-max) and the per-round ratio every-position / last-position
with its spread, how far the two decoders' first-token logits are apart (the same weights: they
must agree), and ONNX Runtime's profiler's kernel time per prefill with the LM head's share (a
share moves less than wall time on a busy machine). Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
console = Console(highlight=False, width=120)
VARIANTS = ("every position", "last position")


def build_language_model(checkpoint: Path, out: Path, precision: str, prune: bool) -> Path:
    """The decoder and embedding model alone (``out/lm``), as `build --lm-precision` makes them."""
    from ccra_export.export.lm_export import DecoderOptions, language_model_dir
    from ccra_export.workflows.language_model import write_language_model

    hf_dir = out.parent / "lm-hf"
    if not (hf_dir / "config.json").exists():
        language_model_dir(checkpoint, hf_dir)
    write_language_model(hf_dir, out / "lm", precision, "cpu", None, DecoderOptions(prune_lm_head=prune))
    return out


def prefill_s(lm, prompt: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Seconds from a fresh cache to the first token's logits (wall clock, and this process's CPU
    time over all its threads: what other processes' load moves less), and those logits."""
    cache = lm.new_cache()
    start, cpu = time.perf_counter(), time.process_time()
    logits = cache.step(prompt)
    return time.perf_counter() - start, time.process_time() - cpu, logits


def profiled_ms(lm, bundle: Path, prompt: np.ndarray, runs: int, work: Path) -> tuple[float, float]:
    """ONNX Runtime's own kernel times for the prefill, per run in ms: all nodes, and the LM head's
    (``/lm_head/*``). A share of kernel time moves less than wall time on a busy machine."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling, options.log_severity_level = True, 3
    options.profile_file_prefix = str(work / "profile")
    from ccra_export.core.genai_config import GENAI_CONFIG, read_genai_config

    decoder = bundle / "lm" / "decoder"
    filename = read_genai_config(decoder / GENAI_CONFIG)["decoder"]["filename"]
    session = ort.InferenceSession(str(decoder / filename), options, providers=["CPUExecutionProvider"])
    inputs, _ = lm.names
    empty = np.zeros((1, lm.kv_heads, 0, lm.head_size), lm.kv_dtype)
    feeds = {inputs["inputs_embeds"]: prompt, inputs["attention_mask"]: np.ones((1, prompt.shape[1]), np.int64)}
    feeds |= {inputs[k] % n: empty for n in range(lm.layers) for k in ("past_key_names", "past_value_names")}
    for _ in range(runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    first = min((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    kernels = [  # the first run is a warm-up
        e
        for e in events
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > first["ts"] + first["dur"]
    ]
    head = sum(e["dur"] for e in kernels if e["name"].startswith("/lm_head/"))
    return sum(e["dur"] for e in kernels) / (runs - 1) / 1e3, head / (runs - 1) / 1e3


def spread(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def main() -> None:
    from lm_decode import SIZES, VOCAB, make_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="mid")
    parser.add_argument("--precision", choices=["int4", "int8", "fp32"], default="int4")
    parser.add_argument("--tokens", type=int, default=600, help="prompt tokens")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bundles", type=Path, nargs=2, metavar=("EVERY", "LAST"), help="reuse two built bundles")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from ccra_export.runtime.language_model import LanguageModel

    figures: dict = {"tokens": args.tokens, "repeats": args.repeats, "threads": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="ccra-prefill-bench-") as scratch:
        if args.bundles:
            bundles = list(args.bundles)
            figures["bundles"] = [str(b) for b in bundles]
        else:
            work = Path(scratch)
            figures |= {"size": args.size, "shape": SIZES[args.size], "precision": args.precision}
            with console.status("Making a random checkpoint"):
                checkpoint = make_checkpoint(work / "ckpt", args.size)
            bundles = []
            for variant, prune in zip(VARIANTS, (False, True), strict=True):
                with console.status(f"Building the {args.precision} decoder, LM head on the {variant}"):
                    bundles.append(build_language_model(checkpoint, work / f"prune-{prune}", args.precision, prune))
        models = [LanguageModel(bundle / "lm", "cpu") for bundle in bundles]
        pruned = [lm._last_position_only() for lm in models]
        if pruned != [False, True]:
            raise SystemExit(f"expected a decoder without then with the pruned LM head, got pruned={pruned}")
        prompt = models[0].embed(np.random.default_rng(0).integers(3, VOCAB - 1, args.tokens))
        for lm in models:  # warm-up: first-run allocations
            prefill_s(lm, prompt)
        times: list[list[float]] = [[], []]
        cpu_times: list[list[float]] = [[], []]
        with console.status(f"{args.repeats} rounds of a {args.tokens}-token prefill"):
            for round_ in range(args.repeats):
                order = (0, 1) if round_ % 2 == 0 else (1, 0)
                for index in order:
                    seconds, cpu, logits = prefill_s(models[index], prompt)
                    times[index].append(seconds * 1e3)
                    cpu_times[index].append(cpu * 1e3)
                    if round_ == 0:
                        figures.setdefault("first_logits", {})[VARIANTS[index]] = logits
        with console.status("ONNX Runtime's profiler: kernel time of each prefill"):
            profiles = [profiled_ms(lm, b, prompt, 4, Path(scratch)) for lm, b in zip(models, bundles, strict=True)]
    first = figures.pop("first_logits")
    gap = float(np.abs(first[VARIANTS[0]] - first[VARIANTS[1]]).max())
    ratios = [a / b for a, b in zip(times[0], times[1], strict=True)]
    cpu_ratios = [a / b for a, b in zip(cpu_times[0], cpu_times[1], strict=True)]
    vocab = len(first[VARIANTS[0]])
    figures |= {
        "ttft_ms": {variant: spread(t) for variant, t in zip(VARIANTS, times, strict=True)},
        "ratio_every_over_last": spread(ratios),
        "cpu_ms": {variant: spread(t) for variant, t in zip(VARIANTS, cpu_times, strict=True)},
        "cpu_ratio_every_over_last": spread(cpu_ratios),
        "first_logits_max_abs_diff": gap,
        "logits_bytes": {VARIANTS[0]: args.tokens * vocab * 4, VARIANTS[1]: vocab * 4},
        "kernel_ms": {v: {"all": all_, "lm_head": head} for v, (all_, head) in zip(VARIANTS, profiles, strict=True)},
    }
    table = Table(title=f"time to first token, {args.tokens}-token prompt: median (min-max) of {args.repeats}, ms")
    for column in ("LM head on", "TTFT ms", "CPU ms", "logits", "kernel ms (profiler)", "of which LM head"):
        table.add_column(column, justify="right")
    for variant, t, c, (kernels, head) in zip(VARIANTS, times, cpu_times, profiles, strict=True):
        table.add_row(
            variant,
            "{1:.0f} ({0:.0f}-{2:.0f})".format(*spread(t)),
            "{1:.0f} ({0:.0f}-{2:.0f})".format(*spread(c)),
            f"{figures['logits_bytes'][variant] / 2**20:.2f} MiB",
            f"{kernels:.0f}",
            f"{head:.1f} ({100 * head / kernels:.1f}%)",
        )
    console.print(table)
    console.print(
        "every position / last position, per round: wall {1:.2f}x ({0:.2f}-{2:.2f}), ".format(*spread(ratios))
        + "CPU {1:.2f}x ({0:.2f}-{2:.2f}); ".format(*spread(cpu_ratios))
        + f"first-token logits max |difference| {gap:.2e}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
