"""Building bundles with a language model from the test checkpoints (through the CLI, as users do)."""

from __future__ import annotations

from click.testing import CliRunner

from ccra_export.cli import main


def build(bundle, checkpoint, lm_precision, *extra):
    result = CliRunner().invoke(
        main,
        [
            "build",
            "--model",
            str(checkpoint),
            "--precision",
            "fp32",
            "--lm-precision",
            lm_precision,
            "-o",
            str(bundle),
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    return bundle


def build_demo(bundle, precision, lm_precision, *extra):
    """The shipped demo model (``--model demo``) with a language model."""
    args = ["build", "--model", "demo", "--precision", precision, "--lm-precision", lm_precision, "-o", str(bundle)]
    result = CliRunner().invoke(main, [*args, *extra])
    assert result.exit_code == 0, result.output
    return bundle
