"""Conversations the server still holds, found again by the request that continues them.

A chat client resends the whole history each turn. The key of a conversation is a hash of the
image and of every message so far, the server's own answers included; a request whose history up
to its last user message hashes to a held key continues that conversation (KV cache and all), so
it prefills only its new question. A held conversation is suspended: its cached tokens are copied
out of the server's KV pool and its slot goes back (holding a slot each would cost a whole context
per conversation, 2 GiB for a 7B FP16 decoder at 4096 tokens, and every batched step would span
the idle rows). The store is bounded in the bytes of those tokens (on a GPU, of a slot's rows in
device memory); the least recently used go first, closed.

A conversation the server no longer holds is replayed from the history. For that to reach the
state the held one had, the server's own answers are fed as the tokens it generated, not as their
text re-tokenised (an answer that ends in half a character decodes to U+FFFD, whose tokens are
others): the store keeps those ids, keyed by the text the server returned (bounded in count).
"""

from __future__ import annotations

import array
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from ccra_export.runtime.conversation import Conversation


def history_key(image_digest: str, turns: list[tuple[str, str]]) -> str:
    """Key of a conversation after ``turns`` = [(question, answer), ...] about one image."""
    text = json.dumps([image_digest, turns], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class ConversationStore:
    def __init__(self, max_bytes: int = 2 << 30, max_answers: int = 4096) -> None:
        self.max_bytes = max_bytes
        self.max_answers = max_answers
        self._held: OrderedDict[str, Conversation] = OrderedDict()
        self._answers: OrderedDict[bytes, array.array] = OrderedDict()  # answer text's hash -> generated ids
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def remember_answer(self, text: str, ids: Sequence[int]) -> None:
        """The tokens the model generated for an answer the server returned as ``text`` (the
        least recently used of ``max_answers`` are forgotten)."""
        if self.max_answers <= 0:
            return
        key = _text_key(text)
        with self._lock:
            self._answers[key] = array.array("l", ids)
            self._answers.move_to_end(key)
            while len(self._answers) > self.max_answers:
                self._answers.popitem(last=False)

    def answer_ids(self, text: str) -> list[int] | None:
        """The generated tokens of an answer the server returned as ``text``, or None."""
        key = _text_key(text)
        with self._lock:
            found = self._answers.get(key)
            if found is None:
                return None
            self._answers.move_to_end(key)
            return found.tolist()

    def take(self, key: str) -> Conversation | None:
        """The conversation held under ``key``, removed (it is about to change), or None."""
        with self._lock:
            found = self._held.pop(key, None)
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
            return found

    def put(self, key: str, conversation: Conversation) -> None:
        """Hold ``conversation`` (closing the least recently used ones over the byte budget; one
        that alone exceeds it, or whose context is full, is closed at once)."""
        if conversation.held_bytes > self.max_bytes or conversation.tokens_used >= conversation.cache.capacity:
            conversation.close()
            return
        dropped: list[Conversation] = []
        with self._lock:
            replaced = self._held.pop(key, None)
            if replaced is not None and replaced is not conversation:
                dropped.append(replaced)
            self._held[key] = conversation
            while self._held and sum(c.held_bytes for c in self._held.values()) > self.max_bytes:
                dropped.append(self._held.popitem(last=False)[1])
        for old in dropped:
            old.close()

    def clear(self) -> None:
        """Close every held conversation."""
        with self._lock:
            held = list(self._held.values())
            self._held.clear()
        for conversation in held:
            conversation.close()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            held_bytes = sum(c.held_bytes for c in self._held.values())
            return {"held": len(self._held), "bytes": held_bytes, "hits": self.hits, "misses": self.misses}
