"""Deterministic stand-ins for a tokenizer and a language model's output.

Token counts follow the usual rule of thumb for English BPE vocabularies (about four
UTF-8 bytes per token), so the same prompt always costs the same prompt tokens. Output
is a seeded walk over a small vocabulary: the same prompt and seed always produce the
same words, and every streamed chunk carries exactly one token.
"""

from __future__ import annotations

import zlib
from typing import Any, Iterable

import orjson

_WORDS = (
    "the of and to in is that for on with as it by at from this be are was an or have "
    "energy carbon power grid joule watt token model batch decode prefill stream request "
    "server proxy meter device idle static dynamic share work latency budget emissions "
    "intensity region cloud cluster node rack cooling fan clock memory bandwidth cache "
    "kernel tensor layer weight sample prompt answer result value signal window interval "
    "measure attribute report receipt header chunk event counter gauge histogram alert "
    "green clean wind solar hydro nuclear coal gas mix hour day night peak base load "
    "small large fast slow warm cold quiet busy steady bright calm clear exact fair "
    "river mountain forest ocean field garden city bridge road harbor island valley"
).split()

VOCABULARY_SIZE = len(_WORDS)
TOKEN_ID_BASE = 1000
"""Token ids are vocabulary index + this, so they never collide with special ids."""

# Token text, first position (no leading space) and later positions (leading space),
# plus the same pre-encoded as JSON strings for building stream chunks without dumps().
FIRST_TOKEN_TEXT: tuple[str, ...] = tuple(w.capitalize() for w in _WORDS)
TOKEN_TEXT: tuple[str, ...] = tuple(" " + w for w in _WORDS)
FIRST_TOKEN_JSON: tuple[bytes, ...] = tuple(orjson.dumps(t) for t in FIRST_TOKEN_TEXT)
TOKEN_JSON: tuple[bytes, ...] = tuple(orjson.dumps(t) for t in TOKEN_TEXT)

_MASK_64 = (1 << 64) - 1


def count_text_tokens(text: str) -> int:
    """About four UTF-8 bytes per token; an empty prompt still costs one (BOS) token."""
    return max(1, (len(text.encode("utf-8")) + 3) // 4)


def message_text(content: Any) -> tuple[str, int]:
    """Text of an OpenAI/Ollama message content, and how many images it carries."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    if isinstance(content, list):
        texts: list[str] = []
        images = 0
        for part in content:
            if isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif part.get("type") in ("image_url", "input_image", "image"):
                    images += 1
            elif isinstance(part, str):
                texts.append(part)
        return "\n".join(texts), images
    return str(content), 0


IMAGE_INPUT_TOKENS = 85
"""What one image in a chat message costs (OpenAI's low-detail figure)."""


def count_chat_tokens(messages: Iterable[Any]) -> tuple[int, str]:
    """Prompt tokens of a chat (template overhead included) and its flattened text."""
    tokens = 3  # the assistant turn header the template appends
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            raise ValueError("each message must be an object with 'role' and 'content'")
        text, images = message_text(message.get("content"))
        role = str(message.get("role", ""))
        tokens += 4 + count_text_tokens(text) + images * IMAGE_INPUT_TOKENS  # role + delimiters
        parts.append(f"{role}: {text}")
        # Ollama carries images as a separate list of base64 strings.
        if isinstance(message.get("images"), list):
            tokens += IMAGE_INPUT_TOKENS * len(message["images"])
    return tokens, "\n".join(parts)


def text_seed(text: str, seed: int) -> int:
    """A stable 64-bit seed from the prompt text (str hash() is salted per process)."""
    return (zlib.crc32(text.encode("utf-8")) * 0x9E3779B97F4A7C15 + seed) & _MASK_64


def natural_length(seed: int, lowest: int, highest: int) -> int:
    """How many tokens the 'model' wants to say before it stops on its own."""
    if highest <= lowest:
        return max(0, lowest)
    return lowest + (seed >> 17) % (highest - lowest + 1)


class WordStream:
    """A seeded linear congruential walk over the vocabulary: one index per token."""

    __slots__ = ("_state",)

    def __init__(self, seed: int) -> None:
        self._state = seed & _MASK_64

    def next_index(self) -> int:
        self._state = (self._state * 6364136223846793005 + 1442695040888963407) & _MASK_64
        return (self._state >> 33) % VOCABULARY_SIZE


def token_text(position: int, index: int) -> str:
    return FIRST_TOKEN_TEXT[index] if position == 0 else TOKEN_TEXT[index]


def token_json(position: int, index: int) -> bytes:
    return FIRST_TOKEN_JSON[index] if position == 0 else TOKEN_JSON[index]


def detokenize(indices: Iterable[int]) -> str:
    return "".join(token_text(position, index) for position, index in enumerate(indices))
