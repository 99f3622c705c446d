"""Torch-free leaves every stage shares: errors, presets, the bundle's manifest and files, parity,
the ``ccra::LPWCA`` schema, image preprocessing, atomic writes, hashing, console output.

Nothing here imports another ``ccra_export`` package, torch or transformers (import-linter checks it).
"""
