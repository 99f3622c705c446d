"""The demo CCRA-LLaVA: a small model trained on the shapes task (``core.shapes``), shipped as package data.

``checkpoint/`` is a standard checkpoint directory (``--model demo`` builds from it), written by
``python -m ccra_export.demo.train``; its ``README.md`` is the model card. ``examples/`` holds a few
task pictures with their questions, for the README's tour.
"""

from __future__ import annotations

from pathlib import Path

DEMO = "demo"  #: the ``--model`` name of the shipped checkpoint
CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"
EXAMPLES = Path(__file__).resolve().parent / "examples"
