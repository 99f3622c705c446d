"""Conversations the server still holds, found again by the request that continues them.

A chat client resends the whole history each turn. The key of a conversation is a hash of the
image and of every message so far, the server's own answers included; a request whose history up
to its last user message hashes to a held key continues that conversation (KV cache and all), so
it prefills only its new question. Bounded in bytes, since each held conversation keeps a KV cache
of the whole context (2 GiB for a 7B FP16 decoder at 4096 tokens): the least recently used go first.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any

from ccra_export.runtime.conversation import Conversation


def history_key(image_digest: str, turns: list[tuple[str, str]]) -> str:
    """Key of a conversation after ``turns`` = [(question, answer), ...] about one image."""
    text = json.dumps([image_digest, turns], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class ConversationStore:
    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.max_bytes = max_bytes
        self._held: OrderedDict[str, Conversation] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

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
        """Hold ``conversation`` (dropping the least recently used ones over the byte budget; one
        that alone exceeds it is not held)."""
        if conversation.cache.nbytes > self.max_bytes:
            return
        with self._lock:
            self._held[key] = conversation
            self._held.move_to_end(key)
            while self._held and sum(c.cache.nbytes for c in self._held.values()) > self.max_bytes:
                self._held.popitem(last=False)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            held_bytes = sum(c.cache.nbytes for c in self._held.values())
            return {"held": len(self._held), "bytes": held_bytes, "hits": self.hits, "misses": self.misses}
