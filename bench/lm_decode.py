"""Language-model decode: the in-place KV loop vs the copying loop it replaced vs Hugging Face, same
decoder, same run; a second turn's time to first token; the extraction's peak memory; llama.cpp.

    python bench/lm_decode.py                       # mid size (0.5B-class Llama), contexts 64, 600, 2000
    python bench/lm_decode.py --size small --contexts 64,600 --json out/lm.json

Per context: per-token decode latency over --steps tokens (median of --repeats runs, with min and
max), for (a) ours: past and present bound to one preallocated buffer (IOBinding), (b) the
previous loop (kept here as the reference): session.run with the whole cache fed back and a copy
one token longer received each step, (c) transformers' LlamaForCausalLM.generate (FP32, eager),
(d) llama.cpp through llama-cpp-python on the same weights as 4-bit GGUF, when it is installed.
(a) and (b) run the same INT4 decoder built by onnxruntime-genai's builder. For (d):
``pip install llama-cpp-python sentencepiece`` (it compiles llama.cpp: 8 minutes on 2 cores here)
and ``--llama-cpp-src DIR``, a llama.cpp tree such as the sdist's vendor/llama.cpp. Not a test: nothing
here asserts a speed; the target it reports is per-token latency at the longest context within
1.3x of the shortest.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
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

SIZES = {
    # hidden, intermediate, layers, heads, kv heads: a Qwen2-0.5B-like shape in Llama form
    "mid": (896, 4864, 24, 14, 2),
    # the same class with widths that are multiples of 256, as a 7B Llama's (4096, 11008) are: llama.cpp's
    # k-quants (256-wide super-blocks) and the builder's k-quant at 128-blocks apply as they would there
    "mid256": (1024, 2816, 24, 16, 2),
    "small": (256, 688, 4, 4, 2),
}
VOCAB = 32000
console = Console(highlight=False)


def make_checkpoint(directory: Path, size: str) -> Path:
    """A LLaVA checkpoint with random weights: tiny CLIP tower, CCRA, a Llama of ``size``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast

    from ccra_export.core.config import preset
    from ccra_export.model.checkpoint import save_ccra_weights
    from ccra_export.model.vision_model import build_model, hf_vision_config

    hidden, inter, layers, heads, kv = SIZES[size]
    tiny = preset("tiny")
    text = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
    )
    config = LlavaConfig(
        vision_config=hf_vision_config(tiny),
        text_config=text,
        image_token_index=VOCAB - 1,
        image_seq_length=tiny.num_patches,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).eval().save_pretrained(directory)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(["USER: what is in the picture? ASSISTANT: a cat on a mat."] * 50, trainer)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(VOCAB - 1 - tokenizer.get_vocab_size())])
    tokenizer.add_special_tokens(["<image>"])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(directory)
    sized = dataclasses.replace(
        tiny, lm_hidden_size=hidden, ccra=dataclasses.replace(tiny.ccra, text_hidden_size=hidden)
    )
    save_ccra_weights(build_model(sized, seed=1), directory)
    return directory


def old_extraction(checkpoint: Path, out: Path) -> None:
    """The extraction before the streaming rewrite: every tensor in one dict, then save_file."""
    import re

    from safetensors import safe_open
    from safetensors.numpy import save_file

    key = re.compile(r"^(?:model\.)?language_model\.(?:model\.)?(?P<rest>.+)$")
    tensors = {}
    for file in sorted(p for p in checkpoint.glob("*.safetensors") if p.name != "ccra.safetensors"):
        with safe_open(str(file), "np") as handle:
            for name in handle.keys():
                if (match := key.match(name)) is not None:
                    tensors[f"model.{match['rest']}"] = handle.get_tensor(name)
                elif name.endswith("lm_head.weight"):
                    tensors["lm_head.weight"] = handle.get_tensor(name)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))


def extraction_rss_mb(checkpoint: Path, work: Path, which: str) -> float:
    """Peak RSS (MB) of a fresh interpreter running one extraction, minus the bare interpreter's."""
    call = {
        "new": f"from ccra_export.export.lm_export import language_model_dir as f; f(Path({str(checkpoint)!r}), "
        f"Path({str(work / 'new')!r}))",
        "old": f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from lm_decode import old_extraction "
        f"as f; f(Path({str(checkpoint)!r}), Path({str(work / 'old')!r}))",
        "none": "import transformers, safetensors",
    }[which]
    code = (
        f"from pathlib import Path; import resource; {call}; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def copying_loop(lm, embeds: np.ndarray, steps: int) -> float:
    """The loop this release replaced: the whole cache goes in and a copy one longer comes out."""
    inputs, outputs = lm.names
    empty = np.zeros((1, lm.kv_heads, 0, lm.head_size), lm.kv_dtype)
    names = [o.name for o in lm.decoder.get_outputs()]
    past = {
        n % layer: empty for layer in range(lm.layers) for n in (inputs["past_key_names"], inputs["past_value_names"])
    }
    x, total = embeds, embeds.shape[1]
    start = None
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()  # time decode steps only
        feeds = {inputs["inputs_embeds"]: x, inputs["attention_mask"]: np.ones((1, total), np.int64), **past}
        result = dict(zip(names, lm.decoder.run(names, feeds), strict=True))
        token = int(np.argmax(result[outputs["logits"]][0, -1]))
        past = {
            inputs[kind] % layer: result[outputs[present] % layer]
            for layer in range(lm.layers)
            for kind, present in (("past_key_names", "present_key_names"), ("past_value_names", "present_value_names"))
        }
        x, total = lm.embed([token]), total + 1
    return (time.perf_counter() - start) / steps


def inplace_loop(lm, embeds: np.ndarray, steps: int) -> float:
    cache = lm.new_cache()
    logits = cache.step(embeds)
    start = time.perf_counter()
    for _ in range(steps):
        logits = cache.step(lm.embed([int(np.argmax(logits))]))
    return (time.perf_counter() - start) / steps


def hf_per_token(model, embeds, steps: int) -> float:
    import torch

    x = torch.from_numpy(embeds.astype(np.float32))
    mask = torch.ones(x.shape[:2], dtype=torch.long)
    kwargs = {"do_sample": False, "pad_token_id": 0, "attention_mask": mask}
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(inputs_embeds=x, max_new_tokens=1, **kwargs)
        one = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(inputs_embeds=x, max_new_tokens=steps + 1, **kwargs)
        many = time.perf_counter() - start
    return (many - one) / steps


def spread(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def _with_sentencepiece_vocab(hf_dir: Path, out: Path) -> Path:
    """The same weights with a SentencePiece vocabulary (trained here): llama.cpp's converter
    refuses BPE tokenizers whose pre-tokenizer hash it does not know, such as our random one.
    Only the vocabulary differs; decode speed does not depend on it."""
    import shutil

    import sentencepiece as spm

    ignored = shutil.ignore_patterns("tokenizer*", "special_tokens_map.json")
    shutil.copytree(hf_dir, out, ignore=ignored, dirs_exist_ok=True)  # a rerun in the same --work
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    lines = (" ".join("".join(rng.choice(letters, rng.integers(2, 8))) for _ in range(12)) for _ in range(2000))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model, vocab_size=300, model_type="bpe")
    (out / "tokenizer.model").write_bytes(model.getvalue())
    return out


def gguf_q4(hf_dir: Path, work: Path, source: Path, quantize: Path, kind: str = "Q4_0") -> Path | str:
    """The language model as GGUF ``kind`` (Q4_0, Q4_K_M, ...) by llama.cpp's own converter
    (``source``: a llama.cpp tree) and quantizer binary (``llama-quantize``), or why not."""
    f16, quantized_file = work / "model-f16.gguf", work / f"model-{kind.lower()}.gguf"
    if quantized_file.is_file():
        return quantized_file
    if not f16.is_file():
        gguf_dir = _with_sentencepiece_vocab(hf_dir, work / "hf-gguf")
        env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
        partial = f16.with_suffix(".part")  # an interrupted conversion never passes for a finished one
        command = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(gguf_dir), "--outfile", str(partial)]
        converted = subprocess.run([*command, "--outtype", "f16"], capture_output=True, text=True, env=env)
        if converted.returncode != 0:
            lines = [line for line in converted.stderr.splitlines() if line.strip()]
            return f"llama.cpp's converter refused the checkpoint: {lines[-1] if lines else 'no output'}"
        partial.replace(f16)
    partial = quantized_file.with_suffix(".part")
    quantized = subprocess.run([str(quantize), str(f16), str(partial), kind], capture_output=True, text=True)
    if quantized.returncode != 0:
        return f"llama-quantize {kind} failed: {quantized.stderr.strip().splitlines()[-1:]}"
    return partial.replace(quantized_file)


def llama_bench_per_token(
    hf_dir: Path,
    work: Path,
    contexts: list[int],
    steps: int,
    repeats: int,
    source: Path | None,
    binary: Path,
    threads: int,
    kind: str = "Q4_0",
) -> dict | str:
    """llama.cpp decode ms/token at each context depth, by its own ``llama-bench`` (tg ``steps``
    tokens after ``-d`` tokens of context, ``repeats`` samples) on the same weights as GGUF ``kind``."""
    if source is None or not (source / "convert_hf_to_gguf.py").is_file():
        return "no llama.cpp source tree for its HF -> GGUF converter (--llama-cpp-src DIR)"
    quantize = binary.parent / "llama-quantize"
    if not binary.is_file() or not quantize.is_file():
        return f"no llama-bench with llama-quantize beside it at {binary}"
    model = gguf_q4(hf_dir, work, source, quantize, kind)
    if isinstance(model, str):
        return model
    command = [str(binary), "-m", str(model), "-p", "0", "-n", str(steps), "-t", str(threads), "-r", str(repeats)]
    ran = subprocess.run([*command, "-d", ",".join(map(str, contexts)), "-o", "json"], capture_output=True, text=True)
    if ran.returncode != 0:
        return f"llama-bench failed: {ran.stderr.strip().splitlines()[-1:]}"
    figures = {}
    for entry in json.loads(ran.stdout):
        samples = [ns / 1e6 / entry["n_gen"] for ns in entry.get("samples_ns", [entry["avg_ns"]])]
        figures[int(entry["n_depth"])] = spread(samples)
    return figures


def llama_cpp_per_token(
    hf_dir: Path, work: Path, contexts: list[int], steps: int, repeats: int, source: Path | None
) -> dict | str:
    """llama.cpp decode ms/token on the same weights as 4-bit GGUF (Q4_0), or why it was left out.

    The HF -> GGUF conversion is llama.cpp's own convert_hf_to_gguf.py (``--llama-cpp-src``: a
    llama.cpp tree, e.g. the sdist's vendor/llama.cpp); the 4-bit quantization is
    llama_model_quantize through llama-cpp-python."""
    try:
        import ctypes

        import llama_cpp
    except ImportError:
        return "llama-cpp-python is not installed (pip install llama-cpp-python compiles llama.cpp)"
    if source is None or not (source / "convert_hf_to_gguf.py").is_file():
        return "no llama.cpp source tree for its HF -> GGUF converter (--llama-cpp-src DIR)"
    f16, q4 = work / "model-f16.gguf", work / "model-q4_0.gguf"
    gguf_dir = _with_sentencepiece_vocab(hf_dir, work / "hf-gguf")
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    converted = subprocess.run(
        [
            sys.executable,
            str(source / "convert_hf_to_gguf.py"),
            str(gguf_dir),
            "--outfile",
            str(f16),
            "--outtype",
            "f16",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if converted.returncode != 0:
        lines = [line for line in converted.stderr.splitlines() if line.strip()]
        return f"llama.cpp's converter refused the checkpoint: {lines[-1] if lines else 'no output'}"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(q4).encode(), ctypes.byref(params)) != 0:
        return "llama_model_quantize failed"
    model = llama_cpp.Llama(
        model_path=str(q4), n_ctx=max(contexts) + steps + 8, n_threads=os.cpu_count(), verbose=False
    )
    rng = np.random.default_rng(0)
    figures = {}
    for context in contexts:
        prompt = rng.integers(3, 200, context).tolist()
        times = []
        for _ in range(repeats):
            model.reset()
            model.eval(prompt)
            tokens = rng.integers(3, 200, steps).tolist()  # the token fed does not change a step's cost
            start = time.perf_counter()
            for token in tokens:
                model.eval([token])
            times.append((time.perf_counter() - start) / steps * 1e3)
        figures[context] = spread(times)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="mid")
    parser.add_argument("--contexts", default="64,600,2000")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path)
    parser.add_argument("--llama-cpp-src", type=Path, help="llama.cpp source tree (for its HF -> GGUF converter)")
    parser.add_argument(
        "--llama-bench",
        type=Path,
        help="llama.cpp's llama-bench binary (llama-quantize beside it): used instead of llama-cpp-python",
    )
    parser.add_argument("--skip-hf", action="store_true", help="leave Hugging Face generate out (it is slow at 2000)")
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    import torch
    from transformers import LlamaForCausalLM

    from ccra_export.export.lm_export import language_model_dir
    from ccra_export.runtime.language_model import LanguageModel, Sampling
    from ccra_export.runtime.vlm_pipeline import Pipeline

    torch.set_num_threads(args.threads)
    figures: dict = {"size": args.size, "shape": SIZES[args.size], "steps": args.steps, "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="ccra-lm-bench-") as scratch:
        work = Path(scratch)
        with console.status("Making a random checkpoint"):
            checkpoint = make_checkpoint(work / "ckpt", args.size)
        weights_mb = sum(p.stat().st_size for p in checkpoint.glob("model*.safetensors")) / 2**20
        with console.status("Extraction peak RSS: streaming vs all-in-memory"):
            base = extraction_rss_mb(checkpoint, work, "none")
            new = extraction_rss_mb(checkpoint, work, "new")
            old = extraction_rss_mb(checkpoint, work, "old")
        figures["extraction"] = {
            "weights_mb": weights_mb,
            "interpreter_mb": base,
            "streaming_mb": new,
            "in_memory_mb": old,
        }
        console.print(
            f"extraction peak RSS: streaming {new:.0f} MB, all tensors in memory {old:.0f} MB "
            f"(interpreter with transformers alone {base:.0f} MB; checkpoint weights {weights_mb:.0f} MB)"
        )
        bundle = work / "bundle"
        with console.status("Building the bundle (INT4 decoder, CPU)"):
            command = ["ccra-export", "build", "--model", str(checkpoint), "--precision", "fp32"]
            subprocess.run(
                [*command, "--lm-precision", "int4", "--lm-device", "cpu", "-o", str(bundle)],
                check=True,
                capture_output=True,
            )
        lm = LanguageModel(bundle / "lm", "cpu")
        hf_dir = language_model_dir(checkpoint, work / "hf")
        hf = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None
        table = Table(
            title=f"decode ms/token, {args.size} Llama {SIZES[args.size]}, median (min-max) of {args.repeats}"
        )
        for column in ("context", "ours (in place)", "copying loop", "HF generate", "copying / ours", "HF / ours"):
            table.add_column(column, justify="right")
        rows = []
        rng = np.random.default_rng(0)
        for context in contexts:
            embeds = lm.embed(rng.integers(0, VOCAB - 1, context))
            ours, copying, theirs = [], [], []
            with console.status(f"context {context}"):
                for _ in range(args.repeats):
                    ours.append(inplace_loop(lm, embeds, args.steps) * 1e3)
                    copying.append(copying_loop(lm, embeds, args.steps) * 1e3)
                for _ in range(0 if args.skip_hf else max(1, args.repeats // 2)):
                    theirs.append(hf_per_token(hf, embeds, args.steps) * 1e3)
            theirs = theirs or [float("nan")]
            row = {"context": context, "ours": spread(ours), "copying": spread(copying), "hf": spread(theirs)}
            ratio_copy = [c / o for c, o in zip(copying, ours, strict=True)]
            row["copying_over_ours"] = spread(ratio_copy)
            row["hf_over_ours"] = statistics.median(theirs) / statistics.median(ours)
            rows.append(row)
            fmt = lambda s: f"{s[1]:.2f} ({s[0]:.2f}-{s[2]:.2f})"  # noqa: E731
            table.add_row(
                str(context),
                fmt(row["ours"]),
                fmt(row["copying"]),
                fmt(row["hf"]),
                fmt(row["copying_over_ours"]),
                f"{row['hf_over_ours']:.2f}x",
            )
        console.print(table)
        growth = rows[-1]["ours"][1] / rows[0]["ours"][1]
        growth_copying = rows[-1]["copying"][1] / rows[0]["copying"][1]
        console.print(
            f"per-token latency at {contexts[-1]} vs {contexts[0]} tokens: ours {growth:.2f}x (target <= 1.3x), "
            f"copying loop {growth_copying:.2f}x"
        )
        figures["decode"] = rows
        figures["growth"] = {"ours": growth, "copying": growth_copying}
        # a second turn prefills only its own tokens
        from PIL import Image

        pipeline = Pipeline.from_bundle(bundle)
        image = Image.fromarray((rng.random((224, 300, 3)) * 255).astype(np.uint8))
        first, second = [], []
        for _ in range(args.repeats):
            chat = pipeline.chat()
            one = chat.ask("What is in the picture?", image, Sampling(max_new_tokens=16))
            two = chat.ask("And what colour is it?", None, Sampling(max_new_tokens=16))
            first.append(one.generation.prefill_s * 1e3)
            second.append(two.generation.prefill_s * 1e3)
        figures["turns"] = {
            "first_prefill_ms": spread(first),
            "second_prefill_ms": spread(second),
            "first_tokens": one.prompt_tokens,
            "second_tokens": two.prompt_tokens,
        }
        console.print(
            f"time to first token (prefill; vision excluded): turn 1 {statistics.median(first):.1f} ms for "
            f"{one.prompt_tokens} tokens, turn 2 {statistics.median(second):.1f} ms for {two.prompt_tokens} tokens "
            f"({statistics.median(first) / statistics.median(second):.1f}x less)"
        )
        if args.llama_bench is not None:
            llama = llama_bench_per_token(
                hf_dir, work, contexts, args.steps, args.repeats, args.llama_cpp_src, args.llama_bench, args.threads
            )
        else:
            llama = llama_cpp_per_token(hf_dir, work, contexts, args.steps, args.repeats, args.llama_cpp_src)
        figures["llama_cpp"] = llama
        if isinstance(llama, str):
            console.print(f"llama.cpp: left out: {llama}")
        else:
            for context, (low, median, high) in llama.items():
                ours_median = next(r["ours"][1] for r in rows if r["context"] == context)
                console.print(
                    f"llama.cpp Q4_0, context {context}: {median:.2f} ms/token ({low:.2f}-{high:.2f}); "
                    f"ours / llama.cpp: {ours_median / median:.2f}x"
                )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
