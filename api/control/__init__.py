"""The control-plane API: submit, list, inspect and cancel adaptation jobs."""
