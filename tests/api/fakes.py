"""Test doubles for the API's collaborators."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.schemas.jobs import TrainJobMessage
from services.schemas.predictions import PredictionMessage


@dataclass
class RecordingJobQueue:
    """A JobQueue that records messages instead of sending them, or fails with `error` when set."""

    messages: list[TrainJobMessage] = field(default_factory=list)
    predictions: list[PredictionMessage] = field(default_factory=list)
    error: Exception | None = None

    def submit(self, msg: TrainJobMessage) -> str:
        """Record the message and return a made-up task id."""
        if self.error is not None:
            raise self.error
        self.messages.append(msg)
        return f"task-{len(self.messages)}"

    def submit_prediction(self, msg: PredictionMessage) -> str:
        """Record a batch prediction message and return a made-up task id."""
        if self.error is not None:
            raise self.error
        self.predictions.append(msg)
        return f"predict-task-{len(self.predictions)}"

    @property
    def job_ids(self) -> list[str]:
        """The job ids submitted so far, in order."""
        return [msg.job_id for msg in self.messages]
