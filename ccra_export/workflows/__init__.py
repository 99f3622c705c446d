"""What each verb does (``ccra_export.workflows``): build, check, engine, bench, doctor, plugins.

Orchestration of the stages; no flag parsing (``cli``) and no printing beyond ``core.console.Steps``.
"""
