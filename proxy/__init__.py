"""carbon-proxy: measure, attribute and report the energy and CO2e of each model request."""

__version__ = "0.1.0"
