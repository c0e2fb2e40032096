"""The inference service: serves adapted and zero-shot CLIP classifiers over HTTP."""

from api.inference.runtime import prefer_huge_pages, prefer_passive_openmp

# Here, because they only take effect if they run before torch is imported (uvicorn imports
# this package before api.inference.main, which imports torch).
prefer_passive_openmp()
prefer_huge_pages()
