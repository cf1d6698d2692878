"""Live grid-intensity providers, each a background poller with the offline table as floor."""

from proxy.carbon.providers.carbonaware import CarbonAwareSdkProvider
from proxy.carbon.providers.electricitymaps import ElectricityMapsProvider
from proxy.carbon.providers.polling import IntensityPoint, PollingProvider, ProviderStatus
from proxy.carbon.providers.ukgrid import UkGridProvider
from proxy.carbon.providers.watttime import WattTimeProvider

__all__ = [
    "CarbonAwareSdkProvider",
    "ElectricityMapsProvider",
    "IntensityPoint",
    "PollingProvider",
    "ProviderStatus",
    "UkGridProvider",
    "WattTimeProvider",
]
