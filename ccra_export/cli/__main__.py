"""``python -m ccra_export.cli``."""

from ccra_export.cli.main import main

main()
