"""Run the CLI in a fresh interpreter where ``import torch`` fails: what a Jetson without PyTorch sees."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

_WITHOUT_TORCH = "import sys; sys.modules['torch'] = None; from ccra_export.cli import main; main()"
_WITH_TORCH = "from ccra_export.cli import main; main()"


def run_cli(*args: str, block_torch: bool = True, **kwargs: Any) -> subprocess.CompletedProcess:
    """``ccra-export ARGS`` in a subprocess; text mode unless ``text=False`` is passed."""
    code = _WITHOUT_TORCH if block_torch else _WITH_TORCH
    kwargs.setdefault("text", True)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, **kwargs)
