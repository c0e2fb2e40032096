"""Tests of the control-plane API."""
