"""The control plane's routers."""
