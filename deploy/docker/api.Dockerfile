# The control API (and the one-shot `migrate` step): FastAPI, SQLAlchemy, Alembic, the Celery
# client. No torch: the API queues jobs by task name and never loads the engine.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# Dependencies first, from pyproject.toml alone, so a code change does not reinstall them.
COPY pyproject.toml README.md ./
# The project itself, with the bounds pyproject.toml sets (there is no lock file to pin from).
# hadolint ignore=DL3013
RUN pip install ".[core,api]" \
    && groupadd --gid 10001 must \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin must

COPY alembic.ini ./
COPY deploy/prestart.sh deploy/prestart.sh
COPY services/ services/
COPY api/ api/
COPY worker/ worker/

USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["uvicorn", "api.control.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
