"""The Ray Serve deployment graph and HTTP API."""
