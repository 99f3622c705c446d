"""Model configuration and presets.

Plain dataclasses with no torch import, so the runtime (which must not need torch on a Jetson)
can read a bundle's manifest and rebuild the configuration. Every size in the CCRA module comes
from here; nothing in the model or the exporter hard-codes the llava-1.5-7b numbers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ccra_export.core.errors import ConfigError

# Upper bounds on the sizes a configuration may claim. Each is far above any published model
# (LLaVA-1.5-13B: 40 text layers of width 5120, vocabulary 32064; Llama-3.1-405B: 126 layers of
# width 16384, vocabulary 128256, 131072 positions), so a value past one is a corrupt or hostile
# config.json, refused in one line before anything is allocated for it (a num_hidden_layers of
# 10**6 would otherwise build layers for minutes).
MAX_LAYERS = 1024  #: vision or text num_hidden_layers, CCRA feature layers
MAX_HIDDEN = 65536  #: hidden_size, head_dim, CCRA attn_dim / text_hidden_size
MAX_INTERMEDIATE = 4 * MAX_HIDDEN  #: MLP intermediate_size
MAX_HEADS = 1024  #: num_attention_heads, num_key_value_heads
MAX_VOCAB = 10**7  #: vocab_size (and so image_token_index)
MAX_IMAGE_SIZE = 8192  #: vision image_size and patch_size, in pixels
MAX_CHANNELS = 16  #: vision num_channels
MAX_POSITIONS = 1 << 22  #: text max_position_embeddings (rotary tables are sized by it)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def check_int(value: Any, where: str, name: str, low: int, high: int) -> int:
    """``value`` if it is an integer in ``low..high``; else a one-line ConfigError naming ``where`` and ``name``.

    JSON gives floats, strings and booleans as readily as integers; each is refused here, where
    it enters, rather than failing in whatever reads it later."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: {name} must be an integer, got {_shown(value)}")
    if not low <= value <= high:
        raise ConfigError(f"{where}: {name} {value} is outside the supported range {low}..{high}")
    return value


def check_float(value: Any, where: str, name: str, *, positive: bool = False) -> float:
    """``value`` as a finite float (``positive``: also > 0); else a one-line ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}: {name} must be a finite number, got {_shown(value)}")
    if positive and value <= 0:
        raise ConfigError(f"{where}: {name} must be positive, got {value}")
    return float(value)


#: The reconstruction of CCRA, registered through the same factory interface as a user's module.
DEFAULT_CCRA_MODULE = "ccra_export.model.ccra_module:reconstruction"
_MODULE_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def check_module_path(value: Any, where: str = "", *, field: str | None = None) -> str:
    """``package.module:Factory`` (dotted names only), else one line saying what was expected, after
    ``where`` (a file's entry) or naming ``field`` (the input that gave it)."""
    if not isinstance(value, str) or not _MODULE_PATH.match(value):
        message = f"expected package.module:Factory, got {_shown(value)}"
        raise ConfigError(f"{where}: {message}" if where else message, field=field)
    return value


@dataclass(frozen=True)
class VisionTowerConfig:
    """CLIP ViT sizes (the fields of Hugging Face's ``CLIPVisionConfig`` that matter here)."""

    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    num_channels: int = 3

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self, where: str) -> None:
        check_int(self.image_size, where, "vision image_size", 1, MAX_IMAGE_SIZE)
        check_int(self.patch_size, where, "vision patch_size", 1, MAX_IMAGE_SIZE)
        check_int(self.hidden_size, where, "vision hidden_size", 1, MAX_HIDDEN)
        check_int(self.intermediate_size, where, "vision intermediate_size", 1, MAX_INTERMEDIATE)
        check_int(self.num_layers, where, "vision num_hidden_layers", 1, MAX_LAYERS)
        check_int(self.num_heads, where, "vision num_attention_heads", 1, MAX_HEADS)
        check_int(self.num_channels, where, "vision num_channels", 1, MAX_CHANNELS)
        check_float(self.layer_norm_eps, where, "vision layer_norm_eps", positive=True)
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"{where}: image_size {self.image_size} must be a positive multiple of patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"{where}: vision hidden_size {self.hidden_size} must be divisible by "
                f"num_attention_heads {self.num_heads}"
            )
        if self.num_layers < 1:
            raise ConfigError(f"{where}: vision num_hidden_layers must be >= 1, got {self.num_layers}")


@dataclass(frozen=True)
class CCRAConfig:
    """Sizes of the CCRA module (see shared/CCRA.md).

    ``feature_layers`` index Hugging Face's ``hidden_states`` tuple, whose entry 0 is the
    embedding output and entry i the output of encoder layer i.
    """

    feature_layers: tuple[int, ...]
    text_hidden_size: int
    attn_dim: int = 256
    num_heads: int = 8
    layer_scale_init: float = 1e-2
    layer_norm_eps: float = 1e-5
    #: which implementation: ``package.module:Factory`` (docs/ccra.md, "Bring your own CCRA"); None is the
    #: reconstruction (``DEFAULT_CCRA_MODULE``). The four sizes above are the reconstruction's.
    module: str | None = None
    #: the module's own settings (JSON), handed to its factory as ``spec.options``
    options: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def module_path(self) -> str:
        return self.module or DEFAULT_CCRA_MODULE

    @property
    def is_plugin(self) -> bool:
        return self.module is not None and self.module != DEFAULT_CCRA_MODULE

    @property
    def num_layers(self) -> int:
        return len(self.feature_layers)

    @property
    def head_dim(self) -> int:
        return self.attn_dim // self.num_heads

    def validate(self, vision: VisionTowerConfig, where: str) -> None:
        if not isinstance(self.feature_layers, tuple | list) or len(self.feature_layers) > MAX_LAYERS:
            raise ConfigError(f"{where}: CCRA feature_layers must be a list of at most {MAX_LAYERS} layer indices")
        for layer in self.feature_layers:
            check_int(layer, where, "CCRA feature_layers entry", -MAX_LAYERS, MAX_LAYERS)
        check_int(self.text_hidden_size, where, "CCRA text_hidden_size", 1, MAX_HIDDEN)
        check_int(self.attn_dim, where, "CCRA attn_dim", 1, MAX_HIDDEN)
        check_int(self.num_heads, where, "CCRA num_heads", 1, MAX_HEADS)
        check_float(self.layer_scale_init, where, "CCRA layer_scale_init")
        check_float(self.layer_norm_eps, where, "CCRA layer_norm_eps", positive=True)
        if not self.feature_layers:
            raise ConfigError(f"{where}: CCRA feature_layers is empty; expected e.g. 1..{vision.num_layers - 1}")
        bad = [i for i in self.feature_layers if not 1 <= i <= vision.num_layers]
        if bad:
            raise ConfigError(
                f"{where}: CCRA feature_layers {bad} out of range; the vision tower has layers 1..{vision.num_layers}"
            )
        if len(set(self.feature_layers)) != len(self.feature_layers):
            raise ConfigError(f"{where}: CCRA feature_layers has duplicates: {list(self.feature_layers)}")
        if self.module is not None:
            check_module_path(self.module, f"{where}: CCRA module")
        if not isinstance(self.options, dict):
            raise ConfigError(f"{where}: CCRA options must be a JSON object, got {_shown(self.options)}")
        if self.attn_dim <= 0 or self.num_heads <= 0 or self.attn_dim % self.num_heads:
            raise ConfigError(
                f"{where}: CCRA attn_dim {self.attn_dim} must be a positive multiple of num_heads {self.num_heads}"
            )


@dataclass(frozen=True)
class ModelConfig:
    """The exported graph: CLIP tower, optional CCRA module, LLaVA-1.5 ``mlp2x_gelu`` projector.

    ``ccra is None`` is the plain LLaVA-1.5 variant: features are ``hidden_states[vision_feature_layer]``
    with CLS dropped, exactly as ``LlavaForConditionalGeneration`` selects them.
    """

    name: str
    vision: VisionTowerConfig
    lm_hidden_size: int
    ccra: CCRAConfig | None = None
    vision_feature_layer: int = -2
    projector_act: str = "gelu"
    projector_bias: bool = True
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def variant(self) -> str:
        return "plain" if self.ccra is None else "ccra"

    @property
    def num_patches(self) -> int:
        return self.vision.num_patches

    @property
    def text_hidden_size(self) -> int:
        return self.ccra.text_hidden_size if self.ccra else self.lm_hidden_size

    @property
    def tower_layers_needed(self) -> int:
        """How many encoder layers the graph must run; later layers are dropped from the export."""
        if self.ccra is not None:
            return max(self.ccra.feature_layers)
        layer = self.vision_feature_layer
        return layer if layer >= 0 else self.vision.num_layers + 1 + layer

    def validate(self, where: str = "model config") -> ModelConfig:
        self.vision.validate(where)
        check_int(self.lm_hidden_size, where, "language model hidden_size", 1, MAX_HIDDEN)
        if self.ccra is not None:
            self.ccra.validate(self.vision, where)
        elif not 1 <= self.tower_layers_needed <= self.vision.num_layers:
            raise ConfigError(
                f"{where}: vision_feature_layer {self.vision_feature_layer} is outside the "
                f"{self.vision.num_layers}-layer vision tower"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("extra")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        try:
            ccra = data.get("ccra")
            return cls(
                name=data["name"],
                vision=VisionTowerConfig(**data["vision"]),
                lm_hidden_size=int(data["lm_hidden_size"]),
                ccra=None
                if ccra is None
                else CCRAConfig(
                    **{**ccra, "feature_layers": tuple(ccra["feature_layers"]), "options": ccra.get("options") or {}}
                ),
                vision_feature_layer=int(data.get("vision_feature_layer", -2)),
                projector_act=data.get("projector_act", "gelu"),
                projector_bias=bool(data.get("projector_bias", True)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"model config is malformed ({type(exc).__name__}: {exc})") from None

    def with_ccra(self, ccra: CCRAConfig | None) -> ModelConfig:
        return dataclasses.replace(self, ccra=ccra)


def _tiny() -> ModelConfig:
    vision = VisionTowerConfig(
        image_size=56, patch_size=14, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4
    )
    ccra = CCRAConfig(feature_layers=(1, 2, 3), text_hidden_size=96, attn_dim=32, num_heads=4)
    return ModelConfig(name="tiny", vision=vision, lm_hidden_size=96, ccra=ccra)


def _llava_15_7b() -> ModelConfig:
    # CLIP ViT-L/14 at 336 px, Vicuna-7B width; CCRA reads layers 1..23 (LLaVA's feature layer is -2).
    vision = VisionTowerConfig(
        image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16
    )
    ccra = CCRAConfig(feature_layers=tuple(range(1, 24)), text_hidden_size=4096, attn_dim=256, num_heads=8)
    return ModelConfig(name="llava-1.5-7b", vision=vision, lm_hidden_size=4096, ccra=ccra)


PRESETS = {"tiny": _tiny, "llava-1.5-7b": _llava_15_7b}


def preset(name: str, *, plain: bool = False) -> ModelConfig:
    """A named configuration; ``plain=True`` drops the CCRA module (LLaVA-1.5 projector only)."""
    try:
        config = PRESETS[name]()
    except KeyError:
        raise ConfigError(
            f"unknown preset {name!r}; expected one of {', '.join(PRESETS)} or a checkpoint directory", field="model"
        ) from None
    return (config.with_ccra(None) if plain else config).validate(f"preset {name!r}")
