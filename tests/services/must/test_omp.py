"""`must-adapt` sets a passive OpenMP wait policy before torch loads, as the worker does."""

from __future__ import annotations

import os
import subprocess
import sys


def test_the_cli_module_sets_a_passive_wait_policy_before_torch_is_imported() -> None:
    code = (
        "import os, sys\n"
        "import services.must._omp\n"
        "assert 'torch' not in sys.modules\n"
        "import services.must.cli\n"
        "print(os.environ['OMP_WAIT_POLICY'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "PASSIVE"


def test_an_explicit_policy_is_kept() -> None:
    env = os.environ | {"OMP_WAIT_POLICY": "ACTIVE"}
    code = "import os, services.must._omp; print(os.environ['OMP_WAIT_POLICY'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)

    assert done.stdout.strip() == "ACTIVE"
