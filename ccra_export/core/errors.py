"""User-facing errors: each carries one line that names the file or flag and what was expected.

The CLI prints ``str(error)`` and exits non-zero; a traceback is a bug, an ``CCRAExportError``
is a message for the user.
"""

from __future__ import annotations


class CCRAExportError(Exception):
    """Base class for errors the CLI reports as one line (exit code 2)."""

    exit_code = 2


class ConfigError(CCRAExportError):
    """A model configuration (preset, checkpoint config, CCRA config) is inconsistent."""


class CheckpointError(CCRAExportError):
    """A checkpoint directory is missing, corrupt, or not in the expected layout."""


class BundleError(CCRAExportError):
    """An output or input bundle directory cannot be used as asked."""


class BackendUnavailableError(CCRAExportError):
    """The requested backend (TensorRT, a CUDA provider) is not installed or has no device."""


class MissingDependencyError(CCRAExportError):
    """An optional part of ccra-export (an extra of the package) is not installed."""


class ParityError(CCRAExportError):
    """The built artifact does not compute what the PyTorch reference computes."""

    exit_code = 3
