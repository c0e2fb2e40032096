#!/bin/sh
# One-shot start-up step of a deployment (the compose `migrate` service): wait until the job
# database accepts connections, then bring its schema to the newest migration.
set -eu
cd "$(dirname "$0")/.."

python - <<'PY'
import os
import sys
import time

from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from services.config import get_settings

url = get_settings().database.url
deadline = time.monotonic() + float(os.environ.get("PRESTART_WAIT_SECONDS", "60"))
while True:
    try:
        with create_engine(url).connect() as connection:
            connection.execute(text("SELECT 1"))
        break
    except OperationalError as exc:
        if time.monotonic() > deadline:
            sys.exit(f"prestart: the database never answered: {exc}")
        print("prestart: waiting for the database ...", file=sys.stderr)
        time.sleep(1)
PY

alembic -c alembic.ini upgrade head
echo "prestart: database at the newest migration"
