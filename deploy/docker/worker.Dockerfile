# A training worker: Celery consuming the `gpu` queue, one process per GPU, running the MUST engine.
# The base image's torch and torchvision are the releases pyproject.toml pins (2.14.1 / 0.29.1),
# so pip keeps them instead of downloading another build.
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
COPY worker/ worker/

USER 10001:10001
# Job work folders (image cache, local checkpoints) and downloaded weights; a volume in compose.
VOLUME ["/var/cache/must"]
EXPOSE 9808
# The metrics endpoint is served by the process that runs jobs, so it answers once the pool is up.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9808/metrics', timeout=4)"]
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "gpu", "--concurrency", "1", "--loglevel", "INFO"]
