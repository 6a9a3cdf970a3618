"""The user-error types: a mistake in the input or in the order of the steps, which a command prints as one line
(`commands.main`). Each is also the built-in type it replaced, so `except ValueError` still catches an
`OptionError`."""


class UserError(Exception):
    """A mistake in the input or in the order of the steps, its message naming what and what to do: a command prints it
    as one line, `error: ...`, with exit status 2 (commands.main); anything else is a bug and keeps its traceback."""


class OptionError(UserError, ValueError):
    """A parameter outside its choices (PROFILE, PRESET, JUDGE_ENGINE, RUN_NAME among several runs, ...)."""


class MissingError(UserError, FileNotFoundError):
    """A file the user gives, or an earlier step's output, is not there (the message names the step that makes it)."""
