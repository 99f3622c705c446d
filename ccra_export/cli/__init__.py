"""`ccra-export` command line: click only, one module per verb (``ccra_export.cli``)."""

from ccra_export.cli.main import main

__all__ = ["main"]
