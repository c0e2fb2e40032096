"""Pydantic models at the platform's boundaries: HTTP requests and responses, queue messages."""
