"""API keys for intensity providers: read from an environment variable or a file, never shown.

A Secret's repr and str are masked so it cannot leak through logging, an exception
message or a debug dump of a provider; only `reveal()` gives the value, at the one
place it goes on the wire.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from proxy.errors import ConfigError


class Secret:
    __slots__ = ("_value", "_path")

    def __init__(self, value: str, *, path: str | None = None) -> None:
        self._value = value
        self._path = path

    def reveal(self) -> str:
        return self._value

    def reload(self) -> bool:
        """Re-read a file-backed secret (a rotated key); True when the value changed."""
        if self._path is None:
            return False
        try:
            value = _read_file(self._path)
        except OSError:
            return False
        changed = bool(value) and value != self._value
        if changed:
            self._value = value
        return changed

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self) -> object:
        raise TypeError("a Secret cannot be pickled")


def _read_file(path: str) -> str:
    return Path(path).expanduser().read_text(encoding="utf-8").strip()


def load_secret(
    *,
    env_key: str,
    env_name: str | None,
    file_key: str,
    file_path: str | None,
    what: str,
    environ: Mapping[str, str] | None = None,
    required: bool = True,
) -> Secret | None:
    """The secret from `file_path` if given, else from the environment variable `env_name`.

    `env_key` / `file_key` are the dotted config keys named in errors. Errors say which
    variable or file is missing, never the value.
    """
    environ = os.environ if environ is None else environ
    if file_path:
        try:
            value = _read_file(file_path)
        except OSError as exc:
            raise ConfigError(file_key, f"cannot read {what} from {file_path}: {exc.strerror or type(exc).__name__}") from None
        if not value:
            raise ConfigError(file_key, f"{file_path} is empty; it should hold the {what}")
        return Secret(value, path=file_path)
    if env_name:
        value = environ.get(env_name, "").strip()
        if value:
            return Secret(value)
        if required:
            raise ConfigError(env_key, f"environment variable {env_name} is not set; it should hold the {what}")
    elif required:
        raise ConfigError(env_key, f"name the environment variable (or set {file_key}) that holds the {what}")
    return None
