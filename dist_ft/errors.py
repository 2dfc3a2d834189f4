"""User-facing errors: printed as one line by the CLI, exit status 2, no traceback."""


class UserError(Exception):
    """Bad input (config, data, paths). The message names the file/record/key and what to do."""

    exit_code = 2


class Preempted(Exception):
    """A preemption signal arrived before training started: nothing to save, exit 75 so the job is
    requeued."""


PREEMPTED_MARK = "preempted: "  # prefix of a failure report that makes waiting ranks exit 75 too
