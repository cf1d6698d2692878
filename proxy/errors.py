"""Errors the user sees: each names what is wrong and where."""

from __future__ import annotations


class ConfigError(Exception):
    """Invalid configuration. `key` is the dotted config key (or command-line flag)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason
