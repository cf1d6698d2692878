"""What a device group costs before anything is learned: a prior from the device.

A restarted proxy reloads what it learned (state.py); a new one starts from this: idle
power and the board power limit per device, from NVML where the meter has it (the
enforced power limit) and otherwise from the device model (the upstream's
`device_model`, or the name NVML or DCGM labels give). Idle power stands in until
enough idle time was seen; the board limit sets the scale of the cost model's
saturation candidates (costmodel.py) until the group's own peak is seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from proxy.meters.base import DeviceFacts

# Idle and board power limit per device, watts: NVIDIA datasheets for the limit; idle as
# measured on idle servers with the driver loaded and persistence mode on (nvidia-smi).
DEVICE_TABLE: dict[str, tuple[float, float]] = {
    "H200": (75.0, 700.0),
    "H100": (70.0, 700.0),
    "H100 PCIE": (50.0, 350.0),
    "H20": (60.0, 400.0),
    "GH200": (90.0, 900.0),
    "B200": (120.0, 1000.0),
    "A100": (55.0, 400.0),
    "A100 PCIE": (40.0, 250.0),
    "A10G": (25.0, 300.0),
    "A10": (25.0, 150.0),
    "L40S": (35.0, 350.0),
    "L40": (35.0, 300.0),
    "L4": (16.0, 72.0),
    "T4": (10.0, 70.0),
    "V100": (40.0, 300.0),
    "MI300X": (140.0, 750.0),
    "MI250X": (90.0, 560.0),
}


@dataclass(frozen=True, slots=True)
class GroupPrior:
    """Whole-group figures (summed over its devices)."""

    idle_watts: float | None
    board_watts: float | None
    source: str


def lookup(name: str) -> tuple[float, float] | None:
    """A device model or NVML name ('NVIDIA H100 80GB HBM3', 'A100-SXM4-80GB') -> (idle, board)."""
    upper = name.upper().replace("-", " ")
    pcie = "PCIE" in upper
    best: tuple[int, tuple[float, float]] | None = None
    for model, figures in DEVICE_TABLE.items():
        base = model.replace(" PCIE", "")
        if base not in upper.split() and not any(token.startswith(base) for token in upper.split()):
            continue
        if model.endswith("PCIE") and not pcie:
            continue
        score = len(model) + (10 if model.endswith("PCIE") == pcie else 0)
        if best is None or score > best[0]:
            best = (score, figures)
    return best[1] if best is not None else None


def group_prior(
    device_model: str, devices: int, board_limits_watts: Sequence[float | None] = (), limits_source: str = "nvml"
) -> GroupPrior | None:
    """The group's prior from its device model, with the meter's board limits where known."""
    figures = lookup(device_model)
    limits = [w for w in board_limits_watts if w]
    if figures is None and not limits:
        return None
    idle = figures[0] * devices if figures is not None else None
    if len(limits) == devices:
        return GroupPrior(idle, sum(limits), limits_source)
    board = figures[1] * devices if figures is not None else None
    return GroupPrior(idle, board, f"table:{device_model}")


def prior_from_devices(device_model: str, facts: Sequence[DeviceFacts | None], meter: str = "nvml") -> GroupPrior | None:
    """The group's prior from what its meter says of its devices (`facts`, one per
    device: NVML's name and enforced power limit, or a DCGM page's modelName label and
    power limit series): the device model named there when every device names the same
    one the table knows, else the configured `device_model` (whose default, H100, may
    not be the hardware); the board limits where every device gave one."""
    names = {f.name for f in facts if f is not None and f.name}
    model = device_model
    if len(names) == 1:
        (name,) = names
        if lookup(name) is not None:
            model = name
    limits = [f.power_limit_watts if f is not None else None for f in facts]
    return group_prior(model, len(facts), limits, limits_source=meter)
