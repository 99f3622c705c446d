"""The OpenAI-compatible Chat Completions server (``ccra-export serve``), split as vLLM splits its
entrypoint: ``api_server`` (the app, its routes and middleware), ``serving_chat`` (a request from
parsed messages to streamed text, on the one generation thread), ``protocol`` (request and
response models, errors)."""
