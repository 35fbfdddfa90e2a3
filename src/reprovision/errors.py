"""The errors a stage ends on with one line instead of a traceback (core/stage.py `main()`): those a user
can fix, exit status 2, and SIGTERM, which unwinds like Ctrl-C, exit status 130. ConfigError stays with
the params it checks (config.py).

They live here, beneath every package, so that `main()` catches them without importing the data or the
MLflow code that raises them: check-params imports neither, fetch-data no MLflow (their deps in dvc.yaml).
"""


class DataError(RuntimeError):
    """A missing, corrupt or malformed data file, or unusable data: the message names it and the fix."""


class TrackingError(RuntimeError):
    """The tracking store can't be used: refused before training starts, or lost during a run."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process was (like Ctrl-C's KeyboardInterrupt), so that clean-up runs."""
