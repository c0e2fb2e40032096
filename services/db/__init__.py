"""The job database: declarative base, engine/session factories, models and migrations."""
