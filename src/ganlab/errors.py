"""Errors that carry a one-line reason for the user (printed without a stack trace by ``train.py``)."""


class UserError(Exception):
    """Bad input or a missing resource: the message says what is wrong and what to do."""


class DataUnavailable(UserError):
    """A data set is not on disk and could not be downloaded."""
