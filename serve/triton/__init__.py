"""Triton Inference Server deployment (``ccra-export triton``): ``repository`` writes a model
repository for a bundle (``config`` its ``config.pbtxt`` files), and ``vision_model`` /
``vlm_model`` are the Python-backend models it installs (``tensors``: their tensor helpers)."""
