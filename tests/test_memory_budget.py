"""`ccra-export doctor --bundle B`: the memory budget. The KV bytes per slot against the buffers the
runtime really allocates, the slot arithmetic against hand counts, the refusals through the CLI
(in a process where torch cannot import: a Jetson plans without PyTorch)."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from ccra_export.core.errors import ConfigError
from ccra_export.core.memory_budget import (
    CUDA_RUNTIME_BYTES,
    GIB,
    JETSON_MODULE_NAMES,
    MIB,
    Footprint,
    JetsonModule,
    KVLayout,
    MemoryBudgetError,
    RuntimeOverhead,
    context_that_fits,
    gib,
    jetson_module,
    plan,
    require_fit,
    slots_that_fit,
)
from ccra_export.runtime.language_model import LanguageModel
from ccra_export.workflows.doctor import bundle_footprint, kv_layout, memory_budget
from tests.torchless import run_cli


def allocated_per_slot(cache) -> tuple[int, set[str]]:
    """Bytes of the past_key_values buffers behind ``cache`` (numpy's count of the arrays ONNX Runtime
    holds), per sequence slot, and their dtypes."""
    owner = getattr(cache, "pool", cache)  # a slot of a KV pool, or a cache that owns its buffers
    arrays = [buffer.numpy() for buffer in owner._buffers]
    slots = getattr(owner, "slots", 1)
    assert all(a.shape[0] == slots for a in arrays)
    return sum(a.nbytes for a in arrays) // slots, {a.dtype.name for a in arrays}


def test_kv_bytes_per_slot_are_the_buffers_the_runtime_allocates(ccra_bundle):
    kv = kv_layout(ccra_bundle)
    lm = LanguageModel(ccra_bundle / "lm")
    assert kv.max_context == lm.context_length
    allocated, dtypes = allocated_per_slot(lm.new_cache())
    assert dtypes == {kv.dtype} and allocated == kv.slot_bytes(kv.max_context)
    assert memory_budget(ccra_bundle).slot_bytes == allocated
    shorter = kv.max_context // 4
    allocated, _ = allocated_per_slot(lm.new_cache(shorter))  # a served context below the bundle's
    assert allocated == kv.slot_bytes(shorter) == memory_budget(ccra_bundle, context=shorter).slot_bytes


@pytest.mark.parametrize(("elem_type", "itemsize"), [(onnx.TensorProto.FLOAT16, 2), (onnx.TensorProto.INT8, 1)])
def test_the_kv_type_is_the_decoder_graphs_not_an_assumption(ccra_bundle, tmp_path, elem_type, itemsize):
    """A decoder whose past_key_values are FP16 or INT8 (what the int8 KV option builds) is budgeted
    at that width: the type comes from the graph's input, whatever the bundle's precision says."""
    decoder = tmp_path / "lm" / "decoder"
    decoder.mkdir(parents=True)
    shutil.copy(ccra_bundle / "lm" / "decoder" / "genai_config.json", decoder)
    model = onnx.load(str(ccra_bundle / "lm" / "decoder" / "model.onnx"), load_external_data=False)
    for graph_input in model.graph.input:
        if graph_input.name.startswith("past_key_values."):
            graph_input.type.tensor_type.elem_type = elem_type
    onnx.save(model, str(decoder / "model.onnx"))
    fp32, narrow = kv_layout(ccra_bundle), kv_layout(tmp_path)
    assert (fp32.itemsize, narrow.itemsize) == (4, itemsize)
    assert narrow.slot_bytes(100) * 4 == fp32.slot_bytes(100) * itemsize


def test_the_footprint_counts_the_bundles_own_files(ccra_bundle):
    footprint = bundle_footprint(ccra_bundle, tower_cache_mib=3)
    decoder = ccra_bundle / "lm" / "decoder"
    on_disk = sum(p.stat().st_size for p in decoder.iterdir() if p.name.startswith("model.onnx"))
    assert footprint.decoder_bytes == on_disk
    assert footprint.embeddings_bytes == (ccra_bundle / "lm" / "embed.onnx").stat().st_size
    vision = sum(p.stat().st_size for p in ccra_bundle.glob("*.onnx*"))
    assert (footprint.vision_bytes, footprint.vision_kind) == (vision, "ONNX graphs")
    assert footprint.tower_cache_bytes == 3 * MIB and footprint.tower_image_bytes > 0  # a split bundle


def _made_up(fixed: int = 700 * MIB) -> tuple[Footprint, KVLayout]:
    footprint = Footprint(
        decoder_bytes=fixed - 300 * MIB,
        embeddings_bytes=100 * MIB,
        vision_bytes=100 * MIB,
        vision_kind="TensorRT engines",
        tower_cache_bytes=0,
        tower_image_bytes=0,
        overhead=RuntimeOverhead(100 * MIB, "made up"),
    )
    # a 7B-like decoder: 32 layers, 8 KV heads of 128, FP16: 128 KiB a token, 512 MiB at 4096
    return footprint, KVLayout(layers=32, kv_heads=8, head_size=128, dtype="float16", itemsize=2, max_context=4096)


def test_slots_that_fit_a_made_up_budget():
    footprint, kv = _made_up()
    slot = kv.slot_bytes(4096)
    assert kv.bytes_per_token == 32 * 2 * 8 * 128 * 2 == 128 * 1024 and slot == 512 * MIB
    assert slots_that_fit(10 * slot + slot - 1, slot) == 10
    assert slots_that_fit(slot - 1, slot) == 0 and slots_that_fit(-slot, slot) == 0
    module = JetsonModule("made-up", "A made-up module", memory_bytes=8 * GIB, system_bytes=GIB)
    left = 8 * GIB - GIB - CUDA_RUNTIME_BYTES - 700 * MIB  # 6.5 GiB - 700 MiB = 5956 MiB
    fit = plan(footprint, kv, parallel=2).fit(module)
    assert (fit.kv_budget_bytes, fit.slots) == (left, 5956 // 512)  # 11 slots of 4096 tokens
    assert fit.context_for_wanted == 4096  # two slots fit at the whole context
    assert context_that_fits(left, 16, kv) == left // (16 * 128 * 1024) == 2978
    assert plan(footprint, kv, context=1024).fit(module).slots == 5956 // 128


def test_a_budget_short_of_its_slots_says_how_much_is_missing():
    footprint, kv = _made_up()
    module = JetsonModule("made-up", "A made-up module", memory_bytes=8 * GIB, system_bytes=GIB)
    budget = plan(footprint, kv, parallel=12)  # 12 x 512 MiB > the 5956 MiB left
    with pytest.raises(MemoryBudgetError) as raised:
        require_fit(budget, module)
    missing = 700 * MIB + 12 * 512 * MIB - (8 * GIB - GIB - CUDA_RUNTIME_BYTES)
    assert missing == 188 * MIB
    assert f"{gib(missing)} missing" in str(raised.value)
    assert f"at a context of {5956 * MIB // (12 * 128 * 1024)} tokens 12 slots fit" in str(raised.value)
    assert require_fit(plan(footprint, kv, parallel=11), module).slots == 11
    with pytest.raises(ConfigError, match=r"expected 1\.\.4096"):
        plan(footprint, kv, context=4097)
    with pytest.raises(ConfigError, match="orin-nano-8gb, orin-nx-16gb, agx-orin-32gb, agx-orin-64gb"):
        jetson_module("orin-nano")


def _doctor(bundle, *args: str):
    return run_cli("doctor", "--bundle", str(bundle), *args, timeout=120)


def test_the_cli_prints_the_budget_and_refuses_bad_input_in_one_line(ccra_bundle):
    done = _doctor(ccra_bundle, "--device", "agx-orin-64gb", "--parallel", "3", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    (module,) = report["modules"]
    kv = kv_layout(ccra_bundle)
    assert report["slot_bytes"] == kv.slot_bytes(kv.max_context)
    assert module["slots"] == (module["available_bytes"] - report["fixed_bytes"]) // report["slot_bytes"]
    assert module["available_bytes"] == 64 * GIB - 3 * GIB - CUDA_RUNTIME_BYTES

    unknown = _doctor(ccra_bundle, "--device", "orin-nano")
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1, unknown.stderr
    assert "--device orin-nano: unknown Jetson module" in unknown.stderr
    assert all(name in unknown.stderr for name in JETSON_MODULE_NAMES)

    too_long = _doctor(ccra_bundle, "--context", str(kv.max_context + 1))
    assert too_long.returncode == 2 and len(too_long.stderr.strip().splitlines()) == 1, too_long.stderr
    assert f"--context {kv.max_context + 1}: expected 1..{kv.max_context} tokens" in too_long.stderr

    # a tower cache that takes the whole module: not one slot is left, and the line says how much is missing
    table = _doctor(ccra_bundle, "--tower-cache-mib", "7000", "--json")
    assert table.returncode == 0, table.stderr
    budget = json.loads(table.stdout)
    nano = next(m for m in budget["modules"] if m["module"]["name"] == "orin-nano-8gb")
    assert nano["slots"] == 0
    short = _doctor(ccra_bundle, "--tower-cache-mib", "7000", "--device", "orin-nano-8gb")
    assert short.returncode == 2 and len(short.stderr.strip().splitlines()) == 1, short.stderr
    assert "cannot hold one slot" in short.stderr
    assert f"{gib(budget['total_bytes'] - nano['available_bytes'])} missing" in short.stderr

    for args, fragment in (
        (("--parallel", "0"), "--parallel 0: expected at least 1 slot"),
        (("--bundle", str(ccra_bundle / "nowhere")), "not a directory"),
    ):
        refused = run_cli("doctor", *(args if args[0] == "--bundle" else ("--bundle", str(ccra_bundle), *args)))
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert fragment in refused.stderr
    alone = run_cli("doctor", "--device", "orin-nano-8gb")
    assert alone.returncode == 2 and "--device: a memory budget needs --bundle B" in alone.stderr
