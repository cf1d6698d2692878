"""Hypothesis fuzzing of the dialect readers, the header rules and the config loader.

Each test runs a few hundred examples (seconds in `make test`). To search longer, scale
them: CARBON_PROXY_FUZZ_SCALE=20 .venv/bin/python -m pytest tests/fuzz
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SCALE = float(os.environ.get("CARBON_PROXY_FUZZ_SCALE", "1"))


def fuzz(max_examples: int) -> settings:
    return settings(max_examples=max(1, int(max_examples * SCALE)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
