"""Energy without hardware: a constant power, or energy per output token from model size.

The fallback where nothing can be measured (`--meter auto` without an NVIDIA driver, a
laptop, a managed endpoint). Every figure it produces is flagged method=estimated.

Two modes, exclusive because each already covers the other's energy:
- constant power: each device draws `power_watts` from start(); joules = watts x seconds.
  Right for a dedicated server whose draw is roughly flat (or to book a nameplate figure).
- per token (default): each finished request adds its modelled joules to the devices it
  ran on, through observe_work(). Energy appears when the work is reported, in one step.

Per-token model: EcoLogits' fit of GPU energy per output token, linear in the model's
active parameters and decaying exponentially with batch size, fitted on the ML.ENERGY
leaderboard (vLLM on NVIDIA H100 80GB):

    Wh per output token per GPU = alpha * exp(beta * batch_size) * P_active[billions] + gamma

Source: genai-impact/ecologits, ecologits/impacts/llm.py (GPU_ENERGY_ALPHA/BETA/GAMMA) and
docs/methodology/llm_inference.md (batch size fixed at 64). Caveat: that methodology page
prints a different fit (alpha 6.47e-6, beta -2.60e-3, gamma 1.04e-5), about 5x higher at
70B; we use the coefficients the library's code computes with, and cannot say which is
newer. At B=64 they give ~0.16 J/token at 8B and ~0.29 J/token at 70B per GPU. Like
EcoLogits, the energy is per GPU, so a tensor-parallel server's request adds it to each
of its devices. Prompt tokens are not in the fit (prefill is folded into it); set
`prompt_token_weight` to charge them as a fraction of an output token.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Callable, Mapping, Sequence

from proxy.errors import ConfigError
from proxy.meters.base import EnergySample, MeterError

log = logging.getLogger("carbon_proxy.meter")

ECOLOGITS_ALPHA_WH = 1.1665273170451914e-06
ECOLOGITS_BETA = -0.011205921025579175
ECOLOGITS_GAMMA_WH = 4.052928146734005e-05
ECOLOGITS_BATCH_SIZE = 64
JOULES_PER_WH = 3600.0
DEFAULT_ACTIVE_PARAMS_BILLIONS = 8.0
"""A common self-hosted size (Llama-3.1-8B class); configure your models instead."""

# "Llama-3.1-8B-Instruct", "qwen2.5:0.5b", "Mixtral-8x7B" (7: the expert size, nearer the
# active parameters than 56), "gemma-2-27b-it", "phi3:3.8b", "Llama-3-70B".
_SIZE_IN_NAME = re.compile(r"(?<![a-z0-9.])(?:\d+x)?(\d+(?:\.\d+)?)b(?![a-z0-9])")


def params_billions_from_name(model: str) -> float | None:
    """The parameter count a model name states (`8b`, `0.5B`, `70B`), in billions, or None."""
    sizes = [float(m) for m in _SIZE_IN_NAME.findall(model.rsplit("/", 1)[-1].casefold())]
    sizes = [size for size in sizes if 0 < size <= 10_000]
    return sizes[-1] if sizes else None


def ecologits_joules_per_output_token(active_params_billions: float, batch_size: float = ECOLOGITS_BATCH_SIZE) -> float:
    """Modelled GPU energy of one output token on one H100-class GPU."""
    wh = ECOLOGITS_ALPHA_WH * math.exp(ECOLOGITS_BETA * batch_size) * active_params_billions + ECOLOGITS_GAMMA_WH
    return wh * JOULES_PER_WH


class EstimateMeter:
    """Modelled cumulative joules per device; implements WorkAwareMeter."""

    kind = "estimate"
    method = "estimated"

    def __init__(
        self,
        devices: Sequence[str] = ("0",),
        *,
        power_watts: float | Mapping[str, float] | None = None,
        active_params_billions: Mapping[str, float] | None = None,
        default_active_params_billions: float = DEFAULT_ACTIVE_PARAMS_BILLIONS,
        params_b: float | None = None,
        batch_size: float = ECOLOGITS_BATCH_SIZE,
        prompt_token_weight: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`power_watts` selects constant-power mode (one number, or one per device).
        `active_params_billions` maps model names to active parameters (MoE: active, not total).
        `params_b` is the prior for a model neither configured nor sized in its name
        (`[meter.estimate] params_b`; `default_active_params_billions` is its older name)."""
        self._devices = [str(d) for d in devices]
        if not self._devices:
            raise ConfigError("meter.estimate.devices", "needs at least one device id")
        self._power_watts: dict[str, float] | None = None
        if power_watts is not None:
            if active_params_billions:
                raise ConfigError(
                    "meter.estimate.power_watts",
                    "constant power and per-token estimates are exclusive (each already includes the other's energy)",
                )
            self._power_watts = _per_device(power_watts, self._devices)
        if params_b is not None:
            _check_non_negative("meter.estimate.params_b", params_b)
            if params_b <= 0:
                raise ConfigError("meter.estimate.params_b", "must be above 0 (a model that does work costs energy)")
            default_active_params_billions = params_b
        _check_non_negative("meter.estimate.default_active_params_billions", default_active_params_billions)
        _check_non_negative("meter.estimate.batch_size", batch_size)
        _check_non_negative("meter.estimate.prompt_token_weight", prompt_token_weight)
        self._default_params = float(default_active_params_billions)
        self._batch_size = float(batch_size)
        self._prompt_weight = float(prompt_token_weight)
        self._params_by_model: dict[str, float] = {}
        for model, params in (active_params_billions or {}).items():
            _check_non_negative(f"meter.estimate.active_params_billions.{model}", params)
            self._params_by_model[model] = float(params)
            self._params_by_model.setdefault(_normalize(model), float(params))
        self._clock = clock
        self._started_at: float | None = None
        self._work_joules = dict.fromkeys(self._devices, 0.0)
        self._warned: set[str] = set()

    @property
    def mode(self) -> str:
        return "constant_power" if self._power_watts is not None else "per_token"

    def device_ids(self) -> Sequence[str]:
        return tuple(self._devices)

    def active_params_billions(self, model: str | None) -> float:
        """The size used for `model`: configured (exact name, then case-insensitive, then
        without org/ prefix), else the size its name states, else the prior `params_b`."""
        if model:
            for key in (model, _normalize(model)):
                if key in self._params_by_model:
                    return self._params_by_model[key]
            named = params_billions_from_name(model)
            if named is not None:
                return named
        return self._default_params

    def modelled_joules(self, device_count: int, prompt_tokens: int, output_tokens: int, model: str | None) -> float:
        """What observe_work() adds for one request over `device_count` devices (per-token
        mode; 0 in constant-power mode, where time, not work, makes the energy)."""
        if self._power_watts is not None:
            return 0.0
        tokens = max(0, output_tokens or 0) + self._prompt_weight * max(0, prompt_tokens or 0)
        return tokens * self.joules_per_output_token(model) * device_count

    def joules_per_output_token(self, model: str | None) -> float:
        return ecologits_joules_per_output_token(self.active_params_billions(model), self._batch_size)

    async def start(self) -> None:
        if self._started_at is None:
            self._started_at = self._clock()

    async def read(self) -> EnergySample:
        started_at = self._started_at
        if started_at is None:
            raise MeterError("estimate meter: read() before start() or after close()")
        now = self._clock()
        if self._power_watts is None:
            return EnergySample(timestamp_seconds=now, joules_by_device=dict(self._work_joules))
        elapsed = max(0.0, now - started_at)
        joules = {device: watts * elapsed for device, watts in self._power_watts.items()}
        return EnergySample(
            timestamp_seconds=now, joules_by_device=joules, power_watts_by_device=dict(self._power_watts)
        )

    async def close(self) -> None:
        self._started_at = None

    def observe_work(
        self, device_ids: Sequence[str], prompt_tokens: int, output_tokens: int, model: str | None
    ) -> None:
        """Add one request's modelled energy to each device it ran on (per-token mode).

        Called on the request path: it never raises for bad input, it logs instead.
        """
        if self._power_watts is not None:
            return  # constant power already counts this time
        tokens = max(0, output_tokens or 0) + self._prompt_weight * max(0, prompt_tokens or 0)
        if tokens <= 0:
            return
        if model and not self._knows(model):
            self._warn_once(
                f"model:{model}",
                "estimate meter: no size configured for model %r; using %g B active parameters (%s)",
                model,
                self.active_params_billions(model),
                "from its name" if params_billions_from_name(model) is not None else "the params_b prior",
            )
        joules = tokens * self.joules_per_output_token(model)
        for device in device_ids:
            if device in self._work_joules:
                self._work_joules[device] += joules
            else:
                self._warn_once(
                    f"device:{device}",
                    "estimate meter: work on device %r not counted: not one of this meter's devices (%s)",
                    device,
                    ", ".join(self._devices),
                )

    def _knows(self, model: str) -> bool:
        return model in self._params_by_model or _normalize(model) in self._params_by_model

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)


def _normalize(model: str) -> str:
    """"meta-llama/Llama-3.1-8B-Instruct" and "llama-3.1-8b-instruct" name the same model."""
    return model.rsplit("/", 1)[-1].strip().casefold()


def _per_device(power_watts: float | Mapping[str, float], devices: list[str]) -> dict[str, float]:
    if isinstance(power_watts, Mapping):
        missing = [d for d in devices if d not in power_watts]
        if missing:
            raise ConfigError("meter.estimate.power_watts", f"no power given for device(s) {', '.join(missing)}")
        result = {d: power_watts[d] for d in devices}
    else:
        result = dict.fromkeys(devices, power_watts)
    for device, watts in result.items():
        _check_non_negative(f"meter.estimate.power_watts.{device}", watts)
    return {d: float(w) for d, w in result.items()}


def _check_non_negative(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(key, f"must be a non-negative number, not {value!r}")
