"""The platform's HTTP services: the control plane (`api.control`) and the inference service."""
