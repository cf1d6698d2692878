"""Where each upstream runs: its zone, its own grid intensity source and its PUE.

Per upstream, the first of these that is set gives the intensity:
  [upstreams.carbon] provider = ...   any provider [carbon] takes (live, sim, table)
  intensity = 40                      a constant (or a table zone as a string)
  zone = "SE"                         the offline table's value for that zone (flat)
  nothing                             the proxy's own [carbon] source
`zone` also names the place for tenant residency ([tenants.regions]); without it, the
zone of [upstreams.carbon] is used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from proxy.carbon.factory import build_intensity_provider
from proxy.carbon.intensity import ConstantIntensity, IntensityProvider
from proxy.carbon.table import TableIntensity
from proxy.errors import ConfigError

if TYPE_CHECKING:
    from proxy.config import UpstreamConfig


@dataclass(slots=True)
class Site:
    name: str
    zone: str | None
    """Upper-cased place label compared with tenant regions; None: no place configured."""
    intensity: IntensityProvider
    pue: float
    own_intensity: bool
    """True when the upstream has its own source (the router starts and closes it)."""


def _own_intensity(key: str, place: Mapping[str, Any], *, clock: Callable[[], float], environ: Mapping[str, str] | None) -> IntensityProvider | None:
    if "carbon" in place:
        try:
            return build_intensity_provider(place["carbon"], clock=clock, environ=environ)
        except ConfigError as exc:  # the factory names [carbon] keys; say which upstream's table
            raise ConfigError(f"{key}.{exc.key}", exc.reason) from None
    value = place.get("intensity")
    if isinstance(value, str):
        return TableIntensity(value, key=f"{key}.intensity")
    if value is not None:
        return ConstantIntensity(float(value))
    if "zone" in place:
        return TableIntensity(place["zone"], key=f"{key}.zone")
    return None


def build_sites(
    upstreams: tuple["UpstreamConfig", ...],
    *,
    default_intensity: IntensityProvider,
    default_pue: float,
    clock: Callable[[], float] = time.time,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Site]:
    sites: dict[str, Site] = {}
    places_by_devices: dict[tuple[str, ...], tuple[str, dict[str, Any]]] = {}
    for index, upstream in enumerate(upstreams):
        key = f"upstreams[{index}]"
        place = upstream.place
        # Energy is metered per device group: one group cannot be priced in two places.
        earlier = places_by_devices.setdefault(tuple(sorted(upstream.devices)), (upstream.name, place))
        if earlier[1] != place:
            devices = list(upstream.devices) or "all of the meter's devices"
            raise ConfigError(f"{key}.zone", f"runs on the same devices ({devices}) as {earlier[0]!r} but names another place; "
                                             "upstreams in different places need their own devices")
        own = _own_intensity(key, place, clock=clock, environ=environ)
        zone = place.get("zone")
        if zone is None and isinstance(place.get("carbon"), dict):
            zone = place["carbon"].get("zone") or place["carbon"].get("location")
        sites[upstream.name] = Site(
            name=upstream.name,
            zone=str(zone).upper() if zone else None,
            intensity=own if own is not None else default_intensity,
            pue=upstream.pue if upstream.pue is not None else default_pue,
            own_intensity=own is not None,
        )
    return sites
