"""Running built bundles (``ccra_export.runtime``). Never imports torch: Jetson runtimes lack it."""
