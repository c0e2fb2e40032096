"""Imported first by the command-line entry points: idle OpenMP threads sleep instead of spinning.

With the default (active) wait policy, torch's idle OpenMP threads spin between parallel regions
and take the cores the image decoding and augmentation threads beside training need; the worker
sets the same in `worker.celery_app`. Only effective before torch is imported, hence its own module.
https://www.openmp.org/spec-html/5.0/openmpse55.html
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
