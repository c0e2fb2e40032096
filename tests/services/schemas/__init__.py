"""Tests of the boundary schemas."""
