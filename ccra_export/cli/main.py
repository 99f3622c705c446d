"""`ccra-export`: the command group; each verb lives in its own module."""

from __future__ import annotations

from typing import Any

import click

from ccra_export import __version__
from ccra_export.cli.bench import bench
from ccra_export.cli.build import build
from ccra_export.cli.check import check
from ccra_export.cli.doctor import doctor
from ccra_export.cli.engine import engine
from ccra_export.cli.evaluate import eval_command
from ccra_export.cli.explain import explain
from ccra_export.cli.output import terminate_like_interrupt
from ccra_export.cli.plugins import plugins
from ccra_export.cli.run import run
from ccra_export.cli.serve import serve
from ccra_export.cli.triton import triton


class _Cli(click.Group):
    """The command group, run with SIGTERM/SIGHUP on Ctrl-C's path: ``kill``, ``timeout``,
    systemd and ``docker stop`` get the same cleanup as Ctrl-C (no staging or scratch directory,
    no model-builder process left behind) and exit 128 + the signal number (SIGTERM: 143)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        with terminate_like_interrupt():
            return super().main(*args, **kwargs)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ccra-export")
def main() -> None:
    """Export CCRA (and plain LLaVA-1.5) vision-language models to ONNX / TensorRT, with parity proof.

    A build traces the CLIP vision tower + CCRA module + LLaVA projector from PyTorch to ONNX
    (FP32, FP16 or calibrated INT8), runs the result on the selected backend and compares it with
    PyTorch on the same inputs; with --lm-precision it adds the quantized language model. The
    bundle directory it writes holds the graphs, manifest.json and parity.json.

    \b
    Quick start (no GPU needed): the shipped demo model, from picture to answer
      ccra-export build --model demo --precision fp16 --lm-precision int4 --output out/demo
      ccra-export run --bundle out/demo --image ccra_export/demo/examples/shapes_7_00003.png \\
          --prompt "What color is the circle?"
    \b
    From your own LLaVA checkpoint to text:
      ccra-export build --model CKPT --lm-precision int4 --output out/vlm
      ccra-export run --bundle out/vlm --image photo.jpg --prompt "What is in the picture?"
    """


for verb in (build, check, eval_command, engine, run, explain, serve, triton, bench, doctor, plugins):
    main.add_command(verb)

if __name__ == "__main__":
    main()
