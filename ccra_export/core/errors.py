"""User-facing errors: one line saying what is wrong and what was expected, in domain words.

Errors speak their layer. Below the CLI an error names the input at fault by its domain name
(``field``: ``max_new_tokens``, ``bundle``, ``calibration_data``, the names of the Python API's
parameters), never by a command-line flag or a request field; a fix that is another step of the
tool is a structured ``Remedy``. Each front end renders them in its own words: the CLI as
``--max-new-tokens``/``ccra-export engine --bundle B --force``, the OpenAI server as ``max_tokens``,
``str(error)`` (the Python API) as the domain names. A traceback is a bug; a ``CCRAExportError``
is a message for the user.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

#: how a front end names a domain field (None: it has no name for it; the domain name is shown)
FieldNamer = Callable[[str], "str | None"]


@dataclass(frozen=True)
class Remedy:
    """A fix that is another step of the tool: ``step`` with ``options`` (domain names -> values,
    ``True`` for a switch), shown in parentheses after the message that leads to it ("...; build
    one on this GPU (`ccra-export engine --bundle B`)"). The CLI renders it as a command line;
    elsewhere it reads as words."""

    step: str
    options: tuple[tuple[str, object], ...] = ()
    complete: bool = True  #: False: the step needs its other inputs too (the CLI writes ``...`` for them)

    def words(self) -> str:
        given = ", ".join(name if value is True else f"{name}={value}" for name, value in self.options)
        return f"the {self.step} step" + (f" with {given}" if given else "")


def _domain_name(field: str) -> str | None:
    return field


class CCRAExportError(Exception):
    """Base class for errors the front ends report as one line (exit code 2 in the CLI).

    ``message``: what is wrong and what was expected; ``field``: the input at fault (a domain
    name), shown first with its ``value`` when one is given; ``remedy``: the tool step that fixes it;
    ``mentions``: other inputs the message names as ``{name}`` ("pass {force} to replace it"),
    written by each front end in its words (only these exact tokens are replaced, so any other
    brace in the message stays as it is).
    """

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        value: object = None,
        remedy: Remedy | None = None,
        mentions: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.value = value
        self.remedy = remedy
        self.mentions = mentions

    def render(self, name: FieldNamer = _domain_name, remedy: Callable[[Remedy], str] = Remedy.words) -> str:
        """The one line, with fields named by ``name`` and the remedy written by ``remedy``."""
        text = self.message
        for mentioned in self.mentions:
            text = text.replace("{" + mentioned + "}", name(mentioned) or mentioned)
        if self.remedy is not None:
            text = f"{text} ({remedy(self.remedy)})"
        if self.field is None:
            return text
        where = name(self.field) or self.field
        return f"{where}{'' if self.value is None else f' {self.value}'}: {text}"

    def __str__(self) -> str:
        return self.render()


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


def no_language_model(bundle: object) -> BundleError:
    """A bundle built without a language model, asked to generate text."""
    return BundleError(
        "holds no language model; rebuild it with one",
        field="bundle",
        value=bundle,
        remedy=Remedy("build", (("lm_precision", "int4"),), complete=False),
    )


class ParityError(CCRAExportError):
    """The built artifact does not compute what the PyTorch reference computes."""

    exit_code = 3
