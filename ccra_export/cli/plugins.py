"""`ccra-export plugins build`."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ccra_export.cli.output import reports_errors, stderr, stdout
from ccra_export.core.console import Steps
from ccra_export.workflows.plugins import build_native


@click.group()
def plugins() -> None:
    """Build the native LPWCA libraries: TensorRT plugin, CUDA kernels, CPU kernel.

    \b
    On a Jetson (JetPack 6: TensorRT headers in /usr/include/aarch64-linux-gnu):
      ccra-export plugins build --cuda-arch 87
    """


@plugins.command("build")
@click.option(
    "--build-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("build/plugins"),
    show_default=True,
    help="CMake build directory.",
)
@click.option(
    "--tensorrt-root",
    type=click.Path(path_type=Path, file_okay=False),
    help="TensorRT installation (holds include/NvInferRuntime.h). Default: $TensorRT_ROOT, then the "
    "system paths (JetPack, deb packages).",
)
@click.option(
    "--cuda-arch",
    help="CUDA architectures, e.g. 87 (Orin), 110 (Thor), 'native'. Default: from the CUDA toolkit found: on a "
    "Jetson its own (87 with CUDA 12, 110 with CUDA 13), elsewhere 80,86,87,89,90 (+110 with CUDA >= 13).",
)
@click.option("--jobs", "-j", type=click.IntRange(1), help="Parallel compile jobs (default: all cores).")
@reports_errors
def plugins_build(build_dir: Path, tensorrt_root: Path | None, cuda_arch: str | None, jobs: int | None) -> None:
    """Configure and build with the root CMakeLists.txt, run the C++ tests, list the libraries."""
    built = build_native(
        build_dir, tensorrt_root=tensorrt_root, cuda_architectures=cuda_arch, jobs=jobs, steps=Steps(stderr)
    )
    table = Table(title="Built libraries", title_justify="left")
    for column in ("library", "path", "sha256"):
        table.add_column(column)
    for library in built:
        table.add_row(library.label, str(library.path), library.sha256[:16])
    stdout.print(table)
    stdout.print("Record the plugin in a bundle with `ccra-export build --lpwca fused --plugin-library PATH`.")
