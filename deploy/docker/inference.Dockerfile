# The inference service: loads adapted classifiers (cached) and serves /predict, on a GPU if there is one.
# Same base as the worker: the torch and torchvision that pyproject.toml pins.
FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TMPDIR=/var/cache/must \
    HF_HOME=/var/cache/must/hub
WORKDIR /app

COPY pyproject.toml README.md ./
# The project itself, with the bounds pyproject.toml sets (there is no lock file to pin from).
# hadolint ignore=DL3013
RUN pip install ".[ml,core,api]" \
    && groupadd --gid 10001 must \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin must \
    && mkdir -p /var/cache/must/hub \
    && chown -R must:must /var/cache/must

COPY services/ services/
COPY api/ api/
COPY worker/ worker/

USER 10001:10001
# Downloaded classifier artifacts and zero-shot weights; a volume in compose.
VOLUME ["/var/cache/must"]
EXPOSE 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8001/healthz', timeout=4)"]
CMD ["python", "-m", "api.inference.serve", "--host", "0.0.0.0", "--port", "8001", "--proxy-headers"]
