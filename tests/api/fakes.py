"""Test doubles for the API's collaborators."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.schemas.jobs import TrainJobMessage


@dataclass
class RecordingJobQueue:
    """A JobQueue that records messages instead of sending them, or fails with `error` when set."""

    messages: list[TrainJobMessage] = field(default_factory=list)
    error: Exception | None = None

    def submit(self, msg: TrainJobMessage) -> str:
        """Record the message and return a made-up task id."""
        if self.error is not None:
            raise self.error
        self.messages.append(msg)
        return f"task-{len(self.messages)}"

    @property
    def job_ids(self) -> list[str]:
        """The job ids submitted so far, in order."""
        return [msg.job_id for msg in self.messages]
