"""The shared core loads without torch, web or queue code (the API image has no torch)."""

from __future__ import annotations

import subprocess
import sys

CORE_MODULES = [
    "services.config",
    "services.errors",
    "services.db.models",
    "services.db.session",
    "services.db.migrate",
    "services.jobs.repository",
    "services.storage.object_store",
]
FORBIDDEN = ["torch", "open_clip", "timm", "fastapi", "celery", "api", "worker", "services.must"]


def test_core_imports_no_torch_web_or_queue() -> None:
    code = (
        "import sys\n"
        f"for name in {CORE_MODULES!r}: __import__(name)\n"
        f"print(','.join(sorted(m for m in {FORBIDDEN!r} if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
