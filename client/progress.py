"""How `must` shows jobs: a live progress bar while one runs, and plain-text summaries."""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import Any, Self, TextIO

from tqdm import tqdm

from services.schemas.jobs import AdaptationPublic, EvaluationReport, MetricsPage, Outcome

# The label-free metric the bar shows: the share of images whose pseudo-label clears the threshold.
CONFIDENT = "confident_fraction"


def format_seconds(seconds: float | None) -> str:
    """`1:02:03` for 3723 s; `?` when unknown."""
    if seconds is None:
        return "?"
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def progress_text(job: AdaptationPublic) -> str:
    """`500/2000 steps (25%), 210.5 img/s, ETA 0:23:45`, as far as the job has got."""
    progress = job.progress
    if not progress.total_steps:
        return "-"
    parts = [f"{progress.step}/{progress.total_steps} steps ({progress.step / progress.total_steps:.0%})"]
    if progress.images_per_sec is not None:
        parts.append(f"{progress.images_per_sec:.1f} img/s")
    if progress.eta_seconds is not None and job.status == "running":
        parts.append(f"ETA {format_seconds(progress.eta_seconds)}")
    return ", ".join(parts)


def _metrics_text(metrics: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(metrics.items())
    )


def describe_job(job: AdaptationPublic) -> str:
    """A few aligned lines: id, status, progress, latest metrics, images, artifact, error."""
    status = job.status.value + (f" ({job.phase.value})" if job.phase and job.status == "running" else "")
    if job.cancel_requested and job.status == "running":
        status += ", cancel requested"
    lines = [("id", job.id), ("status", status), ("progress", progress_text(job))]
    if job.latest_metrics:
        lines.append(("metrics", _metrics_text(job.latest_metrics)))
    if job.images_used or job.images_skipped:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(job.skipped_reasons.items()))
        skipped = f", {job.images_skipped} skipped" + (f" ({reasons})" if reasons else "")
        lines.append(("images", f"{job.images_used} used{skipped if job.images_skipped else ''}"))
    if job.artifact:
        lines.append(("artifact", job.artifact.uri))
    if job.outcome:
        lines += _outcome_lines(job.outcome)
    elif job.served:
        lines.append(("serves", job.served))
    if job.phases:
        lines.append(("phases", phases_text(job)))
    if job.error:
        lines.append(("error", f"{job.error.type}: {job.error.message}"))
    text = "\n".join(f"{name:<9} {value}" for name, value in lines)
    if job.evaluation:
        text += "\n\n" + evaluation_table(job.evaluation)
    return text


def phases_text(job: AdaptationPublic) -> str:
    """`queued 0:00:02, listing 0:00:00, ..., training 0:03:10 (now)`: each phase and how long it took."""
    parts = []
    for span in job.phases:
        if span.ended_at is None:
            parts.append(f"{span.phase.value} (now, since {span.started_at:%H:%M:%S})")
        elif span.phase == "done":
            parts.append("done")
        else:
            parts.append(
                f"{span.phase.value} {format_seconds((span.ended_at - span.started_at).total_seconds())}"
            )
    return ", ".join(parts)


# Above this many classes the eval table shows the mean and worst recall instead of one column each.
MAX_RECALL_COLUMNS = 8


def table(rows: list[list[str]]) -> str:
    """Left-aligned columns two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def evaluation_table(report: EvaluationReport) -> str:
    """The eval-set scores: one row per candidate, top-1 (%) and recall per class (or mean and worst)."""
    names = report.class_names
    per_class = len(names) <= MAX_RECALL_COLUMNS
    header = ["CANDIDATE", "TOP-1 %"] + (names if per_class else ["MEAN RECALL", "WORST CLASS"])
    rows = [header]
    for name, score in report.candidates.items():
        label = f"served ({report.served})" if name == "served" else name
        recall = score.per_class_recall
        if per_class:
            cells = [f"{recall[c]:.2f}" if c in recall else "-" for c in names]
        else:
            worst = min(recall, key=lambda c: recall[c]) if recall else None
            mean = sum(recall.values()) / len(recall) if recall else float("nan")
            cells = [f"{mean:.2f}", f"{worst} {recall[worst]:.2f}" if worst else "-"]
        rows.append([label, f"{score.top1:.1f}", *cells])
    title = f"eval set: {report.images} labelled images (only reported; it never chooses what is served)"
    return title + "\n" + table(rows)


def metrics_table(page: MetricsPage, max_columns: int = 8) -> str:
    """The metric history as a table: step, then the last row's scalar metrics (up to `max_columns`)."""
    if not page.items:
        return "no metrics yet"
    last = page.items[-1].values
    keys = sorted(k for k, v in last.items() if isinstance(v, int | float) and not isinstance(v, bool))
    keys = keys[:max_columns]
    rows = [["STEP", *[k.upper() for k in keys]]]
    for point in page.items:
        values = [point.values.get(k) for k in keys]
        rows.append([str(point.step), *[f"{v:.4g}" if isinstance(v, int | float) else "-" for v in values]])
    return table(rows)


def _outcome_lines(outcome: Outcome) -> list[tuple[str, str]]:
    """What the job serves and why, each candidate's guard margin, and the fitted views."""
    lines = [("serves", outcome.served), ("why", outcome.reason)]
    scores = ", ".join(f"{c.name} {c.margin:+.3f}" for c in outcome.candidates)
    lines.append(("guard", f"margin over zero-shot: {scores}"))
    views = outcome.views
    if views:
        flip = "flip" if views.get("hflip") else "no flip"
        agreement = views.get("agreement")
        agreed = f", zero-shot agreement {agreement:.2f}" if isinstance(agreement, float) else ""
        crop, policy = views.get("crop_min"), views.get("rand_augment")
        lines.append(("views", f"crop >= {crop}, {policy}, {flip}{agreed}"))
    if outcome.method != "must":
        lines.append(("method", outcome.method))
    if outcome.warm_start is not None:
        used = "used" if outcome.warm_start.get("used") else "not used"
        lines.append(("warm start", f"instant head {used}: {outcome.warm_start.get('reason', '')}"))
    return lines


def job_row(job: AdaptationPublic) -> tuple[str, str, str, str, str]:
    """One line of `must list`."""
    phase = job.phase.value if job.phase and job.status == "running" else "-"
    progress = job.progress
    steps = f"{progress.step}/{progress.total_steps}" if progress.total_steps else "-"
    created = job.created_at.strftime("%Y-%m-%d %H:%M:%S")
    return job.id, job.status.value, phase, steps, created


class JobProgressBar:
    """Each polled job on stderr: phase, step/total, images/s, ETA and the confident share.

    On a terminal, a tqdm bar showing the service's rate and ETA only (tqdm's own would be a second,
    different pair); otherwise (a pipe, a CI log) a plain line at most every `interval` seconds, and
    whenever the phase or status changes, so logs get neither carriage returns nor a flood.
    """

    def __init__(self, *, enabled: bool = True, stream: TextIO | None = None, interval: float = 10.0) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.interval = interval
        self._bar: tqdm[Any] | None = None
        self._last: tuple[float, str] | None = None  # when the last plain line was printed, its state

    def __enter__(self) -> Self:
        if self.enabled and self.stream.isatty():
            self._bar = tqdm(
                total=None,
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
                desc="queued",
                bar_format=BAR_FORMAT,
            )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.close()

    def update(self, job: AdaptationPublic) -> None:
        """Show where `job` is now (the service measures rate and ETA; the bar only displays them)."""
        if not self.enabled:
            return
        state = job.phase.value if job.phase and job.status == "running" else job.status.value
        if self._bar is None:
            self._plain_line(job, state)
            return
        bar = self._bar
        progress = job.progress
        if progress.total_steps and bar.total != progress.total_steps:
            bar.reset(total=progress.total_steps)
        bar.n = progress.step
        bar.set_description(state)
        bar.set_postfix_str(", ".join(_rate_eta_confident(job)), refresh=False)
        bar.refresh()

    def _plain_line(self, job: AdaptationPublic, state: str) -> None:
        now = time.monotonic()
        changed = self._last is None or self._last[1] != state
        if not changed and self._last is not None and now - self._last[0] < self.interval:
            return
        progress = job.progress
        steps = f"{progress.step}/{progress.total_steps} steps" if progress.total_steps else ""
        if progress.total_steps:
            steps += f" ({progress.step / progress.total_steps:.0%})"
        parts = [part for part in (steps, *_rate_eta_confident(job)) if part]
        print(f"{state}: {', '.join(parts)}" if parts else state, file=self.stream, flush=True)
        self._last = (now, state)


# tqdm's bar without its own rate and ETA: the postfix carries the service's.
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


def _rate_eta_confident(job: AdaptationPublic) -> list[str]:
    """The service's images/s and ETA, and the share of confident pseudo-labels."""
    progress = job.progress
    parts = []
    if progress.images_per_sec is not None:
        parts.append(f"{progress.images_per_sec:.1f} img/s")
    if progress.eta_seconds is not None and job.status == "running":
        parts.append(f"ETA {format_seconds(progress.eta_seconds)}")
    confident = (job.latest_metrics or {}).get(CONFIDENT)
    if isinstance(confident, int | float):
        parts.append(f"confident {confident:.0%}")
    return parts


class CountProgress:
    """Progress of a count (files uploaded): a tqdm bar on a terminal, else a plain line every
    `interval` seconds and at the end, each with one rate and one ETA."""

    def __init__(
        self, total: int, what: str, *, stream: TextIO | None = None, interval: float = 10.0
    ) -> None:
        self.total, self.what, self.interval = total, what, interval
        self.stream = stream or sys.stderr
        self.done = 0
        self._lock = threading.Lock()  # upload threads report at once
        self._start = self._printed = time.monotonic()
        self._bar = (
            tqdm(total=total, unit=what, desc="upload", file=self.stream) if self.stream.isatty() else None
        )

    def update(self, count: int = 1) -> None:
        """Count `count` more done."""
        with self._lock:
            self.done += count
            if self._bar is not None:
                self._bar.update(count)
                return
            now = time.monotonic()
            if now - self._printed >= self.interval or self.done == self.total:
                self._printed = now
                print(self.line(now - self._start), file=self.stream, flush=True)

    def line(self, elapsed: float) -> str:
        """`upload: 120/500 files (24%), 35.1 files/s, ETA 0:00:11`."""
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        share = self.done / self.total if self.total else 1.0
        return (
            f"upload: {self.done}/{self.total} {self.what}s ({share:.0%}), {rate:.1f} {self.what}s/s, "
            f"ETA {format_seconds(eta)}"
        )

    def close(self) -> None:
        """Close the bar (a terminal's)."""
        if self._bar is not None:
            self._bar.close()
