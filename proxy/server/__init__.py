"""The public-side HTTP/1.1 server (httptools): connection limits and timeouts against
hostile clients, and the request/response interface the proxy's handler uses."""
