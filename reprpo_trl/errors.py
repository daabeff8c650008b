"""The two kinds of failure a user should read as one line rather than a traceback.

    InputError  bad input (a recipe key, a dataset row, a path): names the file/row/field and what to do; exit 2
    RunError    a run that cannot go on (a non-finite loss or gradient norm); says the step and the term; exit 1
"""


class InputError(ValueError):
    """Bad input from the user, named precisely; the command line prints it as one line and exits with 2."""


class RunError(RuntimeError):
    """Training stopped for a reason the user must act on; the command line prints it as one line, exit 1."""
