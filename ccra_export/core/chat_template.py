"""LLaVA-1.5's conversation template (vicuna_v1, as llava-hf's chat template writes it).

One place for the runtime, the PyTorch reference and the demo's training, so the text a model
was trained on is the text every path feeds it::

    USER: <image>\\n{question 1} ASSISTANT: {answer 1}</s>USER: {question 2} ASSISTANT: ...
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"  #: the first turn, which carries the image
FOLLOW_UP = "USER: {prompt} ASSISTANT:"  #: every later turn, after the previous answer and </s>
EOS_TOKEN = "</s>"
