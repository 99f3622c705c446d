"""`build --split-vision`: the CLIP tower and CCRA's head as two graphs, and the tower-output cache.

References: PyTorch (each graph against the same stage of the reference model), the single-graph
bundle built from the same weights (end to end), and counts of the tower graph's own runs."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from ccra_export.cli import main
from ccra_export.core.manifest import read_manifest
from ccra_export.core.reference_record import load_reference
from ccra_export.core.vision_graphs import TOWER_FEATURES, part_records
from ccra_export.runtime.backends import bundle_backend
from ccra_export.runtime.language_model import Sampling
from ccra_export.runtime.split_vision import SplitVision
from ccra_export.runtime.tower_cache import TowerCache, image_key
from ccra_export.runtime.vision_backend import VisionBackend
from ccra_export.runtime.vlm_pipeline import Pipeline
from tests.conftest import TINY_FP32
from tests.test_generation import PROMPT

SECOND = "What colour is it?"


def cli(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


def preset_bundle(path, *extra: str):
    result = cli("build", "--model", "tiny", "--random-weights", "-o", str(path), *extra)
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="module")
def split_fp32(bundles):
    return bundles(*TINY_FP32)  # split is the default for CCRA


@pytest.fixture(scope="module")
def single_fp32(bundles):
    return bundles(*TINY_FP32, "--single-vision-graph")


@pytest.fixture(scope="module")
def split_lm_bundle(ccra_bundle):
    """The CCRA checkpoint's bundle: split is the default for CCRA (test_generation checks it against
    Hugging Face token for token)."""
    assert (ccra_bundle / "vision_tower.onnx").exists() and not (ccra_bundle / "vision.onnx").exists()
    return ccra_bundle


class Counting(VisionBackend):
    """A backend that counts its runs and the images it was given."""

    def __init__(self, inner: VisionBackend) -> None:
        self.inner, self.name, self.calls, self.images = inner, inner.name, 0, 0

    @property
    def description(self) -> str:
        return self.inner.description

    @property
    def input_dtypes(self):
        return self.inner.input_dtypes

    def _run(self, feeds):
        self.calls += 1
        self.images += len(next(iter(feeds.values())))
        return self.inner.run(feeds)


class TestBundle:
    def test_manifest_lists_both_graphs_and_parity_per_graph(self, split_fp32):
        manifest = read_manifest(split_fp32)
        parts = part_records(manifest)
        assert [p["name"] for p in parts] == ["vision_tower", "ccra_head"]
        assert {"vision_tower.onnx", "ccra_head.onnx"} <= set(manifest["files"]) and "vision.onnx" not in manifest[
            "files"
        ]
        tower, head = parts
        assert [i["name"] for i in tower["inputs"]] == ["pixel_values"]
        assert tower["outputs"][0]["name"] == TOWER_FEATURES
        assert tower["outputs"][0]["shape"] == ["batch", 3, 16, 64]  # L = 3 feature layers, N = 16, Dv = 64
        assert [i["name"] for i in head["inputs"]] == [TOWER_FEATURES, "text_embeds", "text_mask"]
        # the vision stage as a whole keeps the single graph's interface
        assert [i["name"] for i in manifest["graph"]["inputs"]] == ["pixel_values", "text_embeds", "text_mask"]
        report = json.loads((split_fp32 / "parity.json").read_text())
        assert report["passed"] and set(report["graphs"]) == {"vision_tower", "ccra_head"}
        for rows in report["graphs"].values():
            assert all(r["passed"] and r["cosine"] > 0.99999 and r["scaled_max_abs_err"] < 1e-4 for r in rows)

    @pytest.mark.slow  # both equal the recorded PyTorch outputs in the default run (manifest test, check)
    def test_tower_and_head_equal_the_single_graph(self, split_fp32, single_fp32):
        split, _ = bundle_backend(split_fp32, read_manifest(split_fp32), "ort")
        single, _ = bundle_backend(single_fp32, read_manifest(single_fp32), "ort")
        feeds, reference = load_reference(split_fp32 / "reference.npz")
        ours, theirs = split.run(feeds), single.run(feeds)
        for name in ("visual_tokens", "lpwca_attention"):
            np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(ours[name], reference[name], rtol=1e-4, atol=1e-5)

    def test_graphs_hold_only_their_stage(self, split_fp32):
        tower = onnx.load(str(split_fp32 / "vision_tower.onnx"))
        head = onnx.load(str(split_fp32 / "ccra_head.onnx"))
        tower_params = {t.name for t in tower.graph.initializer}
        head_params = {t.name for t in head.graph.initializer}
        assert not any("ccra" in n or "multi_modal_projector" in n for n in tower_params)
        assert not any("vision_tower" in n for n in head_params)

    @pytest.mark.slow  # the default run builds fused split bundles in test_cli and test_lpwca
    def test_fused_lpwca_lives_in_the_head(self, tmp_path):
        bundle = preset_bundle(tmp_path / "fused", "--precision", "fp32", "--split-vision", "--lpwca", "fused")
        ops = {
            name: {(n.domain, n.op_type) for n in onnx.load(str(bundle / f"{name}.onnx")).graph.node}
            for name in ("vision_tower", "ccra_head")
        }
        assert ("ccra", "LPWCA") in ops["ccra_head"] and ("ccra", "LPWCA") not in ops["vision_tower"]
        assert json.loads((bundle / "parity.json").read_text())["passed"]

    @pytest.mark.slow  # the default run's FP16 CCRA builds (test_cli, test_fp16_overflow) are split already
    def test_fp16_both_graphs_pass_and_the_cached_features_are_half(self, tmp_path):
        bundle = preset_bundle(tmp_path / "fp16", "--precision", "fp16", "--split-vision")
        report = json.loads((bundle / "parity.json").read_text())
        assert report["passed"] and all(r["cosine"] > 0.999 for rows in report["graphs"].values() for r in rows)
        tower = part_records(read_manifest(bundle))[0]
        assert tower["outputs"][0]["dtype"] == "float16"  # half the cache memory per image

    @pytest.mark.slow  # the default run's INT8 CLI test (test_calibration) builds a split INT8 bundle
    def test_int8_calibrates_both_graphs_and_drift_spans_them(self, tmp_path, cat):
        photos = tmp_path / "photos"
        photos.mkdir()
        for i in range(6):
            cat.rotate(15 * i).save(photos / f"{i}.jpg")
        out = tmp_path / "int8"
        result = cli(
            "build", "--model", "tiny", "--random-weights", "--precision", "int8", "--split-vision",
            "--calib-data", str(photos), "--holdout", "2", "-o", str(out),
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        manifest = read_manifest(out)
        tower, head = manifest["calibration"]["parts"]  # format 3: one record per graph, in order
        assert tower["part"] == "vision_tower" and tower["ort_cache"] == "vision_tower.calibration.json"
        assert head["part"] == "ccra_head" and head["ort_cache"] == "ccra_head.calibration.json"
        for name in ("vision_tower.onnx", "ccra_head.onnx"):
            assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out / name)).graph.node), name
        layers = json.loads((out / "parity.json").read_text())["layers"]["rows"]
        labels = [row["label"] for row in layers]
        assert labels[:3] == ["vision layer 1", "vision layer 2", "vision layer 3"]
        assert labels[3:] == ["tower features", "ccra module", "visual tokens"]
        # the last tap is the end-to-end output: its drift is what the parity table reports
        report = json.loads((out / "parity.json").read_text())
        tokens = next(o for o in report["outputs"] if o["name"] == "visual_tokens")
        assert layers[-1]["cosine"] == pytest.approx(
            # drift is against the FP32 graphs, parity against PyTorch: equal to FP32 precision
            tokens["cosine"],
            abs=1e-4,
        )

    def test_plain_variant_is_refused_in_one_line(self, tmp_path):
        result = cli(
            "build", "--model", "tiny", "--plain", "--random-weights", "--split-vision", "-o", str(tmp_path / "b")
        )
        assert result.exit_code == 2
        assert result.stderr.strip().splitlines()[-1].startswith("error: --split-vision: this model is the plain")
        assert not (tmp_path / "b").exists()

    def test_check_recomputes_each_graph_and_refuses_an_escaping_part(self, split_fp32, tmp_path):
        result = cli("check", "--bundle", str(split_fp32), "--reference", "pytorch")
        assert result.exit_code == 0, result.output
        assert "vision_tower: tower_features" in result.stdout and "ccra_head: visual_tokens" in result.stdout
        recorded = cli("check", "--bundle", str(split_fp32), "--reference", "recorded")
        assert recorded.exit_code == 0, recorded.output
        copy = tmp_path / "copy"
        shutil.copytree(split_fp32, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["graph"]["parts"][1]["file"] = "../ccra_head.onnx"
        (copy / "manifest.json").write_text(json.dumps(manifest))
        bad = cli("check", "--bundle", str(copy))
        assert bad.exit_code == 2 and "graph.parts[1].file" in bad.stderr and "Traceback" not in bad.output

    def test_engine_without_tensorrt_is_one_line_and_leaves_the_bundle(self, split_fp32):
        before = (split_fp32 / "manifest.json").read_bytes()
        result = cli("engine", "--bundle", str(split_fp32))
        assert result.exit_code != 0 and "TensorRT" in result.stderr and "Traceback" not in result.output
        assert (split_fp32 / "manifest.json").read_bytes() == before

    def test_each_engine_gets_its_graphs_profile(self, split_fp32):
        from ccra_export.engine.plan import bundle_profile

        manifest = read_manifest(split_fp32)
        tower, head = (bundle_profile(manifest, {"batch": {"max": 4}}, part) for part in part_records(manifest))
        assert tower.shapes == {"pixel_values": ((1, 3, 56, 56), (1, 3, 56, 56), (4, 3, 56, 56))}
        assert head.shapes[TOWER_FEATURES] == ((1, 3, 16, 64), (1, 3, 16, 64), (4, 3, 16, 64))
        assert head.shapes["text_embeds"][2] == (4, 512, 96)


class TestTowerCache:
    def test_lru_bounded_in_bytes(self):
        row = np.zeros((10, 10), np.float32)  # 400 bytes
        cache = TowerCache(1000)
        cache.put("a", row)
        cache.put("b", row)
        assert cache.get("a") is not None  # a is now the most recent
        cache.put("c", row)  # 1200 bytes > 1000: evicts b, the least recently used
        assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
        stats = cache.stats()
        assert (stats.hits, stats.misses, stats.entries, stats.bytes, stats.evictions) == (3, 1, 2, 800, 1)
        cache.put("huge", np.zeros(1000, np.float32))  # larger than the whole cache: not kept, nothing evicted
        assert cache.get("huge") is None and cache.stats().entries == 2

    def test_disabled_cache_never_holds(self):
        cache = TowerCache(0)
        cache.put("a", np.zeros(4, np.float32))
        assert cache.get("a") is None and cache.stats().bytes == 0

    def test_stored_values_are_private_copies(self):
        cache = TowerCache(1 << 10)
        value = np.ones(4, np.float32)
        cache.put("a", value)
        value[:] = 7
        held = cache.get("a")
        assert held.tolist() == [1, 1, 1, 1] and not held.flags.writeable

    def test_key_is_the_content(self):
        pixels = np.random.default_rng(0).standard_normal((3, 8, 8)).astype(np.float32)
        assert image_key(pixels) == image_key(pixels.copy())
        changed = pixels.copy()
        changed[1, 4, 4] += 1e-3
        assert image_key(changed) != image_key(pixels)
        assert image_key(pixels.astype(np.float16)) != image_key(pixels)

    def test_threads_share_it_safely(self):
        cache = TowerCache(64 * 16)
        value = np.zeros(4, np.float32)

        def work(offset: int) -> None:
            for i in range(500):
                cache.put(str((offset + i) % 40), value)
                cache.get(str(i % 40))

        threads = [threading.Thread(target=work, args=(k * 7,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        stats = cache.stats()
        assert stats.hits + stats.misses == 2000 and stats.bytes == 16 * stats.entries <= 64 * 16


class TestSplitVision:
    def _split(self, bundle, mib: float = 1.0):
        manifest = read_manifest(bundle)
        split, _ = bundle_backend(bundle, manifest, "ort", tower_cache=TowerCache.from_mib(mib))
        assert isinstance(split, SplitVision)
        split.tower = Counting(split.tower)
        return split

    def test_second_question_runs_only_the_head(self, split_fp32):
        split = self._split(split_fp32)
        feeds, _ = load_reference(split_fp32 / "reference.npz")
        first = split.run(feeds)
        rng = np.random.default_rng(1)
        other_text = {**feeds, "text_embeds": rng.standard_normal(feeds["text_embeds"].shape).astype(np.float32)}
        second = split.run(other_text)  # same images, another question
        assert split.tower.calls == 1 and split.cache.stats().hits == 2  # both images of the batch hit
        uncached = self._split(split_fp32, mib=0).run(other_text)
        np.testing.assert_array_equal(second["visual_tokens"], uncached["visual_tokens"])
        assert not np.allclose(second["visual_tokens"], first["visual_tokens"])  # CCRA reads the question

    def test_a_batch_sends_only_its_misses_through_the_tower(self, split_fp32):
        split = self._split(split_fp32)
        feeds, _ = load_reference(split_fp32 / "reference.npz")
        split.run({k: v[:1] for k, v in feeds.items()})
        assert split.tower.images == 1
        split.run(feeds)  # image 0 cached, image 1 new
        assert split.tower.images == 2 and split.tower.calls == 2

    def test_cache_memory_per_image_is_the_tower_output(self, split_fp32):
        split = self._split(split_fp32)
        feeds, _ = load_reference(split_fp32 / "reference.npz")
        split.run(feeds)
        stats = split.cache.stats()
        assert stats.entries == 2 and stats.bytes == 2 * 3 * 16 * 64 * 4  # L x N x Dv float32 per image


class TestRuntime:
    def test_generation_from_the_cache_equals_recomputing(self, split_lm_bundle, cat):
        cached, uncached = (
            Pipeline.from_bundle(split_lm_bundle),
            Pipeline.from_bundle(split_lm_bundle, tower_cache_mib=0),
        )
        sampling = Sampling(max_new_tokens=8, stop_ids=cached.lm.eos_ids)
        answers = [cached.generate(cat, prompt, sampling) for prompt in (PROMPT, SECOND)]
        assert answers == [uncached.generate(cat, prompt, sampling) for prompt in (PROMPT, SECOND)]
        stats = cached.tower_cache.stats()
        assert (stats.misses, stats.hits) == (1, 1)  # the second question reused the tower's output
        assert uncached.tower_cache.stats().misses == 2 and uncached.tower_cache.stats().hits == 0

    def test_single_graph_bundles_have_no_cache(self, fp32_bundle):
        from ccra_export.runtime.vision_backend import OrtBackend

        runner, _ = bundle_backend(fp32_bundle, read_manifest(fp32_bundle), "ort", tower_cache=TowerCache(1 << 20))
        assert isinstance(runner, OrtBackend)

    def test_run_interactive_independent_questions_hit_the_cache(self, split_lm_bundle, tmp_path, cat):
        cat.save(tmp_path / "cat.png")
        args = ["run", "--bundle", str(split_lm_bundle), "--image", str(tmp_path / "cat.png"), "--max-new-tokens", "5"]
        result = cli(*args, "-i", "--independent", input=f"{PROMPT}\n{SECOND}\n\n")
        assert result.exit_code == 0, result.output
        assert "(tower cache: 0 hits, 1 misses)" in result.stderr
        assert "(tower cache: 1 hits, 1 misses)" in result.stderr
        assert result.stderr.count("(16 visual)") == 2  # each question carries the image, conditioned on it
        pipeline = Pipeline.from_bundle(split_lm_bundle)
        sampling = Sampling(max_new_tokens=5, stop_ids=pipeline.lm.eos_ids)
        answers = [pipeline.generate(tmp_path / "cat.png", q, sampling) for q in (PROMPT, SECOND)]
        assert result.stdout == "".join(f"{a}\n" for a in answers)
        refused = cli(*args, "--prompt", PROMPT, "--independent")
        assert refused.exit_code == 2 and "--independent: applies to --interactive" in refused.stderr

    def test_server_metrics_count_hits_and_misses(self, split_lm_bundle, cat):
        import base64
        import io

        import httpx

        from ccra_export.serve.openai.api_server import ServerSettings
        from tests.servers import running

        buffer = io.BytesIO()
        cat.save(buffer, format="PNG")
        url = f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"
        pipeline = Pipeline.from_bundle(split_lm_bundle)
        with running(pipeline, ServerSettings(model_name="ccra")) as (base, _, _):
            before = _tower_metrics(base)  # the server's warm-up ran one image already
            for question in (PROMPT, SECOND):
                content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
                body = {"model": "ccra", "max_tokens": 2, "messages": [{"role": "user", "content": content}]}
                assert httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).status_code == 200
            after = _tower_metrics(base)
        delta = {name: after[name] - before.get(name, 0.0) for name in after}
        assert delta['ccra_tower_cache_lookups_total{result="hit"}'] == 1
        assert delta['ccra_tower_cache_lookups_total{result="miss"}'] == 1
        assert delta["ccra_tower_cache_images"] == 1 and delta["ccra_tower_cache_bytes"] == 3 * 16 * 64 * 4

    def test_bench_reports_the_second_question_and_the_cache(self, split_fp32):
        # the pipeline bench's question-2 rows: tests/test_bench_cli.py (its bundle is split by default)
        vision = cli("bench", "--bundle", str(split_fp32), "--vision-only", "--repeats", "2")
        assert vision.exit_code == 0, vision.output
        # 3 rounds (warm-up + 2) of a new image (the cache cleared: a miss), then 3 of the same one (hits)
        assert (
            "tower cache: 3 hits, 3 misses; 1 image held" in vision.stdout and "(0.01 MiB per image)" in vision.stdout
        )


def _tower_metrics(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    rows = [line.split() for line in text.splitlines() if line.startswith("ccra_tower")]
    return {name: float(value) for name, value in rows}


class TestReviewFixes:
    def test_layouts_that_disagree_are_refused_in_one_line(self, split_fp32, single_fp32):
        from ccra_export.core.manifest_schema import validate_manifest

        split = json.loads((split_fp32 / "manifest.json").read_text())
        target = {"tensorrt_version": "10.3", "gpu": "Orin", "compute_capability": "8.7", "plugin_sha256": None}
        settings = {"strongly_typed": True, "builder_flags": [], "profile": {}, "workspace_mib": 2048}

        def engine(*parts: str) -> dict:
            own = [{"part": p, "file": "reference.npz", **settings, "optimization_level": 3} for p in parts]
            return {**target, "parts": own}

        split["engine"] = {"file": "reference.npz", **target}  # format 2's one engine, in a format 3 manifest
        with pytest.raises(ValueError, match="engine"):
            validate_manifest(split)
        split["engine"] = engine("vision")
        with pytest.raises(ValueError, match=r"engine: built for one graph, but the bundle's graphs are"):
            validate_manifest(split)
        split["engine"] = engine("vision_tower", "vision_tower")
        with pytest.raises(ValueError, match="engine"):
            validate_manifest(split)
        split["engine"] = engine("vision_tower", "ccra_head")
        validate_manifest(split)  # the control: an engine per graph, in order
        plain = json.loads((split_fp32 / "manifest.json").read_text())
        plain["variant"] = "plain"
        with pytest.raises(ValueError, match="only a CCRA bundle splits"):
            validate_manifest(plain)

    def test_bench_batch_is_checked_against_each_engine(self, split_fp32):
        from ccra_export.core.errors import BundleError
        from ccra_export.workflows.bench import check_batch

        manifest = json.loads((split_fp32 / "manifest.json").read_text())
        manifest["engine"] = {
            "tensorrt_version": "10.3",
            "compute_capability": "8.7",
            "parts": [
                {"part": "vision_tower", "file": "t", "profile": {"pixel_values": [[1, 3, 56, 56]] * 3}},
                {
                    "part": "ccra_head",
                    "file": "h",
                    "profile": {"tower_features": [[1, 3, 16, 64], [1, 3, 16, 64], [2, 3, 16, 64]]},
                },
            ],
        }
        check_batch(manifest, 1)
        with pytest.raises(BundleError, match="above 1, the largest batch of its vision_tower engine"):
            check_batch(manifest, 2)
