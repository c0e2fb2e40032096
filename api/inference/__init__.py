"""The inference service: serves adapted and zero-shot CLIP classifiers over HTTP."""

from api.inference.runtime import prefer_passive_openmp

# Here, because it only takes effect if it runs before torch is imported (uvicorn imports
# this package before api.inference.main, which imports torch).
prefer_passive_openmp()
