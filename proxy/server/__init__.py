"""The public-side HTTP server: connection limits and timeouts against hostile clients."""
