"""The inference service: serves adapted and zero-shot CLIP classifiers over HTTP."""
