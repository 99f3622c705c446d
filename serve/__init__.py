"""What a deployed device exposes (``ccra_export.serve``): an OpenAI-compatible chat server.

The ``[serve]`` extra (FastAPI, uvicorn, prometheus-client). No torch: it runs on the target.
"""
