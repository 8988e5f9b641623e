"""The one exception type for mistakes a user can make (bad file, bad flag, bad data).

Library code raises it with a message that names what is wrong and where; the scripts'
`main()` turns it into one line on stderr and exit code 2 (runner/cli.py, exit_for).
"""


class UserInputError(ValueError):
    """A problem with the user's input, reported as one line without a traceback."""


class CheckpointError(UserInputError):
    """A checkpoint that is missing, unreadable, unsafe, or not a DLRM."""


class DataError(UserInputError):
    """Criteo data that is missing, malformed, or does not fit the model."""


class StopRun(Exception):
    """A failure that makes every later result of the run suspect (the mask engine disagrees
    with the stock sparsifier): not one item's error row while the sweep goes on, but the end
    of the run, as one line on stderr and exit code 2. Finished rows are kept."""
