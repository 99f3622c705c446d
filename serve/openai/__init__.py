"""The OpenAI-compatible Chat Completions server (``ccra-export serve``), split as vLLM splits its
entrypoint: ``api_server`` (the router, the API-key dependency, error handlers, middleware and
``create_app`` assembling them), ``serving_chat`` (``OpenAIServingChat``: admission, the one
generation thread, a request from parsed messages to streamed text and response models),
``protocol`` (request and response models, errors)."""
