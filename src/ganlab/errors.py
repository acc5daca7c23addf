"""Errors that end a run with a one-line reason and their own exit code (printed without a stack trace).

| exit code | error | what happened |
|---|---|---|
| 2 | :class:`UserError` | bad input or a missing resource, refused before anything was trained or lost |
| 3 | :class:`Interrupted` | SIGTERM or SIGUSR2 (preemption): a checkpoint at the current generator step was written |
| 4 | :class:`Diverged` | a loss became non-finite (or exploded): no checkpoint holds the broken state |
"""


class RunStopped(Exception):
    """Base of the errors that stop a run with a one-line reason; ``exit_code`` is what ``train.py`` exits with."""

    exit_code = 1
    label = "error"


class UserError(RunStopped):
    """Bad input or a missing resource: the message says what is wrong and what to do."""

    exit_code = 2


class DataUnavailable(UserError):
    """A data set is not on disk and could not be downloaded."""


class Interrupted(RunStopped):
    """A signal asked the run to stop; the checkpoint of the step it arrived at was written."""

    exit_code = 3
    label = "interrupted"

    def __init__(self, message: str, signum: int, step: int) -> None:
        super().__init__(message)
        self.signum, self.step = signum, step


class Diverged(RunStopped):
    """Training produced a non-finite (or exploding) loss."""

    exit_code = 4
    label = "diverged"

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step
