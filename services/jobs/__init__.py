"""Adaptation job lifecycle: the state machine and the database repository."""
