"""Tests of the HTTP services."""
