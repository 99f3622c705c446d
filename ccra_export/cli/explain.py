"""`ccra-export explain`."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from ccra_export.cli import options as o
from ccra_export.cli.output import reports_errors, stdout
from ccra_export.workflows.explain import OUTPUTS
from ccra_export.workflows.explain import explain as explain_workflow


@click.command()
@o.options(
    o.LM_BUNDLE,
    o.IMAGE,
    o.opt("prompt", "--prompt", required=True, help="The question: CCRA's attention depends on it."),
    o.opt(
        "out",
        "--out",
        required=True,
        type=click.Path(path_type=Path, file_okay=False),
        help="Directory for the pictures and the map; must be new or empty (or replaced, with --force).",
    ),
    o.opt("top_k", "--top-k", default=5, show_default=True, type=click.IntRange(1, 64), help="Patches to outline."),
    o.opt("force", "--force", is_flag=True, help="Replace an existing --out directory (once the new one is complete)."),
    o.run_backend("auto", "ort", "trt"),
)
@reports_errors
def explain(bundle: Path, image: Path, prompt: str, out: Path, top_k: int, force: bool, backend: str) -> None:
    """Draw CCRA's LPWCA attention for PROMPT about IMAGE: the photo with the map over it, the map per
    ViT layer, each layer's share, and the map itself (attention.npy, attention.json).

    The map is CCRA's joint softmax over the layers and patches it reads; patches are mapped back
    through the centre crop and LLaVA's pad-to-square onto the photo's own pixels. Needs the
    [explain] extra (matplotlib). The plain LLaVA-1.5 variant has no such map.
    """
    result = explain_workflow(bundle, image, prompt, out, top_k=top_k, backend=backend, force=force)
    summary = result.summary
    shares = summary["layer_shares"]
    busiest = max(range(len(shares)), key=shares.__getitem__)
    stdout.print(
        escape(
            f"{result.out}: {', '.join(OUTPUTS)}\n"
            f"grid {summary['grid'][0]}x{summary['grid'][1]} over {len(shares)} layers; entropy "
            f"{summary['entropy_normalised']:.3f} of uniform; layer {summary['layers'][busiest]} holds "
            f"{shares[busiest]:.1%}; top patch {summary['top_patches'][0]['box']} (image pixels)"
        )
    )
