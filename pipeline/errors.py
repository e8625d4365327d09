"""User-facing errors: each says what went wrong and what to change.

Stages raise these before expensive work; the CLI prints them without a traceback and exits with
status 2, so a bad config never looks like a crash and never leaves a half-written output.
"""

from __future__ import annotations


class PipelineError(Exception):
    """An error the user can fix; ``fix`` says how."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}\n  fix: {fix}")
        self.problem = problem
        self.fix = fix


class ConfigError(PipelineError):
    """A configuration value is missing, unknown or out of range."""


class DataError(PipelineError):
    """An instruction set cannot be loaded or does not have the expected shape."""


class IntegrityError(PipelineError):
    """A downloaded file does not match its pinned sha256."""


class SelectionError(PipelineError):
    """No candidate direction survives the selection filters; ``table`` holds every candidate's scores."""

    def __init__(self, problem: str, fix: str, table=None) -> None:
        super().__init__(problem, fix)
        self.table = table


class ForwardStopped(Exception):
    """Raised by ``residual_recorder(..., until=site)`` (``pipeline.hooks``) once that site is recorded: the rest
    of the forward pass is not needed. ``Runner.read_passes`` ends the pass there; nothing else sees it."""
