"""INT8 calibration: preprocessing equal to transformers, image folders, Q/DQ graphs, caches, drift."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnx
import pytest
import skimage.data
from click.testing import CliRunner
from PIL import Image

from ccra_export.calibration.images import CalibrationDataError, load_calibration_set
from ccra_export.calibration.layer_report import layer_taps, per_layer_drift
from ccra_export.calibration.quantize import METHODS, quantize_int8
from ccra_export.calibration.reader import ImageBatchReader, make_feeds
from ccra_export.calibration.text import TextEmbedder
from ccra_export.cli import main
from ccra_export.core.config import preset
from ccra_export.core.graph_scopes import CCRA_SCOPE, in_scope
from ccra_export.core.image_preprocess import ImageProcessorConfig, expand_to_square, preprocess
from ccra_export.core.parity import compare_output, thresholds_for
from ccra_export.export.onnx_export import export_model_proto, save_model
from ccra_export.model.vision_model import build_model, reference_outputs
from ccra_export.runtime.vision_backend import OrtBackend

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry", "camera", "retina")


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Real photos of mixed sizes (scikit-image's bundled data), as .jpg and .png."""
    folder = tmp_path_factory.mktemp("photos")
    for i, name in enumerate(PHOTOS):
        photo(name).save(folder / f"{i:02d}-{name}.{'png' if i % 3 == 0 else 'jpg'}")
    return folder


class TestPreprocessing:
    @pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "rocket"])
    @pytest.mark.parametrize("size", [336, 56])
    def test_equals_transformers_clip_image_processor(self, name, size):
        from transformers import CLIPImageProcessor

        hf = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        image = photo(name)
        want = hf(images=image, return_tensors="np")["pixel_values"][0]
        got = preprocess(image, ImageProcessorConfig.for_image_size(size, pad_to_square=False))
        assert got.dtype == want.dtype == np.float32
        np.testing.assert_array_equal(got, want)

    def test_llava_pad_to_square_then_processor(self):
        """LLaVA-1.5: expand2square with the mean colour, then CLIPImageProcessor."""
        from transformers import CLIPImageProcessor

        hf = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        image = photo("rocket")  # 640 x 427: padded top and bottom
        square = expand_to_square(image, tuple(int(x * 255) for x in hf.image_mean))
        assert square.size == (640, 640)
        assert square.getpixel((0, 0)) == (122, 116, 104) and square.getpixel((320, 320)) == image.getpixel(
            (320, 320 - (640 - 427) // 2)
        )
        want = hf(images=square, return_tensors="np")["pixel_values"][0]
        np.testing.assert_array_equal(preprocess(image, ImageProcessorConfig.for_image_size(336)), want)

    def test_reads_the_checkpoints_preprocessor_config(self, tmp_path):
        from transformers import CLIPImageProcessor

        hf = CLIPImageProcessor(size={"shortest_edge": 72}, crop_size={"height": 64, "width": 60}, image_mean=[0.5] * 3)
        hf.save_pretrained(tmp_path)
        config = ImageProcessorConfig.from_checkpoint(tmp_path, image_size=999, pad_to_square=False)
        assert (config.shortest_edge, config.crop_height, config.crop_width) == (72, 64, 60)
        image = photo("coffee")
        np.testing.assert_array_equal(
            preprocess(image, config), hf(images=image, return_tensors="np")["pixel_values"][0]
        )


class TestImageFolder:
    def test_split_and_mixed_sizes(self, photo_dir):
        data = load_calibration_set(photo_dir, holdout=2)
        assert len(data.calibration) == 6 and len(data.held_out) == 2 and not data.skipped
        sizes = {item.image.size for item in data.calibration}
        assert len(sizes) > 3  # genuinely mixed sizes, all preprocess to one shape
        feeds = make_feeds(data.calibration, ImageProcessorConfig.for_image_size(56), None)
        assert feeds["pixel_values"].shape == (6, 3, 56, 56)

    def test_corrupt_images_are_skipped_counted_and_warned(self, tmp_path, photo_dir):
        shutil.copytree(photo_dir, tmp_path / "d")
        (tmp_path / "d" / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
        good = next((tmp_path / "d").glob("*.png")).read_bytes()
        (tmp_path / "d" / "zz-truncated.png").write_bytes(good[: len(good) // 3])
        with pytest.warns(UserWarning, match="skipped, not a readable image"):
            data = load_calibration_set(tmp_path / "d")
        assert sorted(p.name for p, _ in data.skipped) == ["zz-broken.jpg", "zz-truncated.png"]
        assert len(data.calibration) + len(data.held_out) == len(PHOTOS)

    @pytest.mark.parametrize(
        ("setup", "message"),
        [
            (lambda d: None, "no such directory"),
            (lambda d: d.mkdir(), "no .jpg/.jpeg/.png images"),
            (
                lambda d: (d.mkdir(), (d / "a.jpg").write_bytes(b"x"), (d / "b.png").write_bytes(b"y")),
                "none of the 2 images could be read (first: a.jpg",
            ),
            (lambda d: (d.mkdir(), photo("cat").save(d / "only.jpg")), "INT8 needs at least 2"),
        ],
    )
    def test_unusable_folders(self, tmp_path, setup, message):
        folder = tmp_path / "calib"
        setup(folder)
        with pytest.warns(UserWarning) if "none of" in message else _no_warning():
            with pytest.raises(CalibrationDataError) as info:
                load_calibration_set(folder)
        assert message in str(info.value)

    def test_prompts_one_per_image(self, tmp_path, photo_dir):
        (tmp_path / "p.txt").write_text("\n".join(f"prompt {i}" for i in range(len(PHOTOS))) + "\n\n")
        data = load_calibration_set(photo_dir, prompts=tmp_path / "p.txt", holdout=1)
        assert data.held_out[0].prompt == f"prompt {len(PHOTOS) - 1}"
        (tmp_path / "p.txt").write_text("just one\n")
        with pytest.raises(CalibrationDataError, match="1 instructions for 8 images"):
            load_calibration_set(photo_dir, prompts=tmp_path / "p.txt")

    def test_batches_keep_one_shape(self, photo_dir):
        data = load_calibration_set(photo_dir, holdout=1)  # 7 images in batches of 3: 3, 3, 1 (+2 wrapped)
        embedder = TextEmbedder.seeded(96)
        seen = []
        reader = ImageBatchReader(data.calibration, ImageProcessorConfig.for_image_size(56), embedder, 3, seen.append)
        shapes = {tuple(f["text_embeds"].shape) + tuple(f["pixel_values"].shape) for f in reader}
        assert len(shapes) == 1 and seen == [3, 3, 1]


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, photo_dir):
    model = build_model(preset("tiny"), seed=4)
    work = tmp_path_factory.mktemp("int8")
    save_model(export_model_proto(model), work / "fp32.onnx", "never")
    data = load_calibration_set(photo_dir, holdout=2)
    processor, embedder = ImageProcessorConfig.for_image_size(56), TextEmbedder.seeded(96)
    return model, work, data, processor, embedder


@pytest.mark.parametrize("method", sorted(METHODS))
def test_quantized_graph_matches_pytorch_on_held_out_images(tiny, method):
    model, work, data, processor, embedder = tiny
    out, cache = work / f"{method}.onnx", work / f"{method}.json"
    reader = ImageBatchReader(data.calibration, processor, embedder, 2)
    summary = quantize_int8(work / "fp32.onnx", out, reader, method=method, ort_cache=cache)
    graph = onnx.load(str(out))
    producers = {o: n for n in graph.graph.node for o in n.output}
    matmuls = [n for n in graph.graph.node if n.op_type == "MatMul"]
    dequantized = {
        n.name
        for n in matmuls
        if producers.get(n.input[0]) is not None and producers[n.input[0]].op_type == "DequantizeLinear"
    }
    ccra = {n.name for n in matmuls if in_scope(n, CCRA_SCOPE)}
    assert summary.quantized_nodes > 0 and dequantized and not (dequantized & ccra)  # CCRA stays float
    for node in graph.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert producers[node.input[0]].op_type != "DequantizeLinear"
    from onnxruntime.quantization.calibrate import load_tensors_data

    ranges = [
        max(abs(float(np.max(t.range_value[0]))), abs(float(np.max(t.range_value[1]))))
        for t in load_tensors_data(cache).values()
    ]
    assert ranges and all(math.isfinite(v) and v > 0 for v in ranges)
    feeds = make_feeds(data.held_out, processor, embedder)
    got = OrtBackend(out).run(feeds)
    want = reference_outputs(model, feeds)
    for name in want:
        result = compare_output(name, got[name], want[name], thresholds_for("int8"))
        assert result.passed, (method, name, result.failures)
        assert result.cosine < 0.999999, "INT8 output identical to FP32: nothing was quantized"


def test_int8_ccra_flag_quantizes_the_ccra_module(tiny):
    _, work, data, processor, embedder = tiny
    reader = ImageBatchReader(data.calibration, processor, embedder, 4)
    quantize_int8(
        work / "fp32.onnx", work / "q.onnx", reader, method="minmax", ort_cache=work / "q.json", quantize_ccra=True
    )
    graph = onnx.load(str(work / "q.onnx"))
    producers = {o: n for n in graph.graph.node for o in n.output}
    assert any(
        n.op_type == "MatMul" and in_scope(n, CCRA_SCOPE) and producers[n.input[1]].op_type == "DequantizeLinear"
        for n in graph.graph.node
    )


def test_per_layer_drift_report(tiny):
    _, work, data, processor, embedder = tiny
    reader = ImageBatchReader(data.calibration, processor, embedder, 4)
    quantize_int8(work / "fp32.onnx", work / "d.onnx", reader, method="entropy", ort_cache=work / "d.json")
    taps = layer_taps(onnx.load(str(work / "fp32.onnx")))
    assert [label for label, _ in taps] == [
        "vision layer 1",
        "vision layer 2",
        "vision layer 3",
        "ccra module",
        "visual tokens",
    ]
    rows, first = per_layer_drift(work / "fp32.onnx", work / "d.onnx", make_feeds(data.held_out, processor, embedder))
    assert first is None and all(0.99 <= r.cosine < 1.0 for r in rows)


class TestCli:
    def test_build_and_check_int8(self, tmp_path, photo_dir):
        out = tmp_path / "b"
        result = CliRunner().invoke(
            main,
            [
                "build",
                "--model",
                "tiny",
                "--random-weights",
                "--precision",
                "int8",
                "--calib-data",
                str(photo_dir),
                "--holdout",
                "2",
                "-o",
                str(out),
            ],
        )
        assert result.exit_code == 0, result.output
        # no TensorRT implicit-INT8 cache: it would calibrate an FP32 graph the bundle does not ship
        assert sorted(p.name for p in out.iterdir()) == [  # CCRA: tower and head, each calibrated
            "ccra_head.calibration.json",
            "ccra_head.onnx",
            "manifest.json",
            "parity.json",
            "reference.npz",
            "vision_tower.calibration.json",
            "vision_tower.onnx",
        ]
        parity = json.loads((out / "parity.json").read_text())
        assert parity["inputs"]["kind"] == "held-out images" and len(parity["inputs"]["images"]) == 2
        labels = [row["label"] for row in parity["layers"]["rows"]]  # the drift report spans both graphs
        assert labels[0] == "vision layer 1" and labels[-3:] == ["tower features", "ccra module", "visual tokens"]
        manifest = json.loads((out / "manifest.json").read_text())
        record = manifest["calibration"]
        assert record["method"] == "entropy" and len(record["images_used"]) == 6
        assert not set(record["images_used"]) & {h["file"] for h in record["held_out"]}
        tower, head = record["parts"]  # format 3: each graph's counts and cache, in the graphs' order
        assert "tensorrt_cache" not in record and tower["ort_cache"] == "vision_tower.calibration.json"
        assert head["ort_cache"] == "ccra_head.calibration.json"  # the head calibrated too
        mode = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
        assert mode["vision_tower.calibration.json"] == mode["vision_tower.onnx"], mode  # ORT writes 0600 (mkstemp)
        assert mode["ccra_head.calibration.json"] == mode["ccra_head.onnx"], mode
        assert "INT8 drift per layer" in result.stdout
        # the held-out images' inputs and PyTorch outputs are recorded: moving the photos changes nothing
        (photo_dir / record["held_out"][0]["file"]).rename(tmp_path / "moved")
        try:
            recomputed = CliRunner().invoke(main, ["check", "--bundle", str(out)])  # a preset: PyTorch rebuilds it
            assert recomputed.exit_code == 0, recomputed.output
            assert "PyTorch on the recorded held-out inputs (2 samples)" in recomputed.stderr
            recorded = CliRunner().invoke(main, ["check", "--bundle", str(out), "--reference", "recorded"])
            assert recorded.exit_code == 0 and "recorded PyTorch outputs (2 samples)" in recorded.stderr
        finally:
            (tmp_path / "moved").rename(photo_dir / record["held_out"][0]["file"])

    @pytest.mark.parametrize(
        ("extra", "message"),
        [
            ([], "--precision int8 needs --calib-data DIR"),
            (["--calib-data", "/nonexistent/calib"], "--calib-data /nonexistent/calib: no such directory"),
            (["--lpwca", "fused", "--calib-data", "."], "--precision int8 with --lpwca fused"),
        ],
    )
    def test_bad_int8_input(self, tmp_path, extra, message):
        result = CliRunner().invoke(
            main,
            ["build", "--model", "tiny", "--random-weights", "--precision", "int8", *extra, "-o", str(tmp_path / "b")],
        )
        assert result.exit_code == 2 and message in result.stderr
        assert not (tmp_path / "b").exists()
