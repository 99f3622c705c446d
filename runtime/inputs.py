"""What a user hands the runtime, checked at the door: an image file and a prompt."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ccra_export.core.chat_template import IMAGE_TOKEN
from ccra_export.core.errors import CCRAExportError
from ccra_export.core.image_preprocess import ImageReadError, open_rgb

__all__ = ["IMAGE_TOKEN", "InputError", "check_prompt", "check_text", "control_tokens", "load_image", "overflowing"]


class InputError(CCRAExportError):
    """An image or prompt given to `run` cannot be used."""


def load_image(path: str | Path) -> Image.Image:
    try:
        return open_rgb(path)
    except ImageReadError as exc:  # decompression bombs and unusable pixel types included
        raise InputError(exc.problem, field="image", value=path) from None
    except FileNotFoundError:
        raise InputError("no such file", field="image", value=path) from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"not a readable image ({exc})", field="image", value=path) from None


def check_prompt(prompt: str, control_tokens: Collection[str] = ()) -> None:
    """A question in words: not empty, and no ``<image>`` (the image is given beside the prompt)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("empty; ask something about the image", field="prompt")
    if IMAGE_TOKEN in prompt:
        raise InputError(f"contains {IMAGE_TOKEN}; the image is given beside the prompt, not in it", field="prompt")
    check_text(prompt, control_tokens)


def check_text(text: str, control_tokens: Collection[str] = (), field: str = "prompt") -> None:
    """User text is text: valid Unicode that encodes to UTF-8, and none of the tokenizer's control
    tokens (``</s>``, ``<s>``, ``<unk>``...). The template is encoded in one call, so a control token
    typed by a user would reach the language model and CCRA's text input as the real token: it is
    refused, as ``<image>`` is, rather than silently changed."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"not valid text ({exc.reason} at character {exc.start}); expected UTF-8", field=field
        ) from None
    typed = sorted(token for token in control_tokens if token and token in text)
    if typed:
        raise InputError(
            f"contains {', '.join(typed)}, a control token of the tokenizer; write it differently "
            "(prompts are text, not tokens)",
            field=field,
        )


def overflowing(prompt_tokens: int, context: int) -> str:
    """Which input to blame when a prompt and its new tokens do not fit the context: the prompt
    when it alone leaves no room for one new token, else the number of new tokens asked for."""
    return "prompt" if prompt_tokens >= context else "max_new_tokens"


def control_tokens(tokenizer: Any) -> frozenset[str]:
    """The contents of the tokenizer's special added tokens (``<s>``, ``</s>``, ``<image>``...)."""
    return frozenset(t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special)
