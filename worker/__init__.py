"""The Celery worker: the app (`celery_app`) and its thin tasks around the MUST engine."""
