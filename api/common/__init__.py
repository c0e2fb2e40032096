"""Pieces shared by the HTTP services: error mapping and health probes."""
