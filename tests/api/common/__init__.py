"""Tests of the pieces shared by the HTTP services."""
