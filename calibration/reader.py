"""Batches of preprocessed calibration inputs for ONNX Runtime's calibrator, with a progress hook."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ccra_export.calibration.images import CalibrationImage
from ccra_export.calibration.text import TextEmbedder
from ccra_export.core.image_preprocess import ImageProcessorConfig, preprocess


def make_feeds(
    items: Sequence[CalibrationImage],
    processor: ImageProcessorConfig,
    embedder: TextEmbedder | None,
    text_len: int | None = None,
) -> dict[str, np.ndarray]:
    """Graph inputs for a batch of images (and their prompts, for the CCRA variant)."""
    feeds = {"pixel_values": np.stack([preprocess(item.image, processor) for item in items])}
    if embedder is not None:
        feeds["text_embeds"], feeds["text_mask"] = embedder.embed([item.prompt for item in items], text_len)
    return feeds


class ImageBatchReader:
    """Preprocesses lazily, one batch per ``get_next``, so calibration memory stays one batch.

    An ``onnxruntime.quantization.CalibrationDataReader`` by its protocol (``get_next``, iteration,
    ``__len__``, ``set_range``: ORT's class checks no more than ``get_next``), not by inheritance, so
    importing this module does not need ONNX Runtime.

    Every batch has the same shape, as ONNX Runtime's histogram calibrators stack them: prompts
    are padded to the longest one in the set (padding is masked out), and a partial last batch
    is completed with the first images again.
    """

    def __init__(
        self,
        items: Sequence[CalibrationImage],
        processor: ImageProcessorConfig,
        embedder: TextEmbedder | None,
        batch_size: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.items = list(items)
        self.processor = processor
        self.embedder = embedder
        self.batch_size = max(1, min(batch_size, len(self.items)))
        self.on_batch = on_batch
        self._starts = list(range(0, len(self.items), self.batch_size))
        self._text_len = max((embedder.token_count(i.prompt) for i in self.items), default=1) if embedder else None
        self._next = 0
        self._end = len(self._starts)

    def __len__(self) -> int:
        return len(self._starts)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, len(self._starts))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        start = self._starts[self._next]
        self._next += 1
        batch = self.items[start : start + self.batch_size]
        fresh = len(batch)
        batch = batch + self.items[: self.batch_size - fresh]  # wrap around: same shape as the others
        feeds = make_feeds(batch, self.processor, self.embedder, self._text_len)
        if self.on_batch is not None:
            self.on_batch(fresh)
        return feeds

    def __iter__(self) -> ImageBatchReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        feeds = self.get_next()
        if feeds is None:
            raise StopIteration
        return feeds


class MappedReader:
    """A calibration reader whose batches pass through ``transform``: one graph of a split bundle
    reads its own inputs (the tower only the pixels; CCRA's head the FP32 tower's output).

    The same ``CalibrationDataReader`` protocol as ``ImageBatchReader``, which it wraps."""

    def __init__(
        self, reader: ImageBatchReader, transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    ) -> None:
        self.reader, self.transform = reader, transform
        self.batch_size = reader.batch_size

    def __len__(self) -> int:
        return len(self.reader)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.reader.set_range(start_index, end_index)

    def get_next(self) -> dict[str, np.ndarray] | None:
        feeds = self.reader.get_next()
        return None if feeds is None else self.transform(feeds)

    def __iter__(self) -> MappedReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        feeds = self.get_next()
        if feeds is None:
            raise StopIteration
        return feeds
