"""What a deployment exposes (``ccra_export.serve``), two products and what they share.

- ``openai/``: the OpenAI-compatible chat server a device runs (``ccra-export serve``): router
  (``api_server``), serving logic (``serving_chat``), request and response models (``protocol``),
  held conversations, metrics, ``image_url`` parts. The ``[serve]`` extra (FastAPI, uvicorn,
  prometheus-client).
- ``triton/``: the Triton model-repository writer (``ccra-export triton``) and the Python-backend
  models it installs. The ``[triton]`` extra (tritonclient).
- ``images``: the one bounded image decoder both use.

No torch: both run on the target.
"""
