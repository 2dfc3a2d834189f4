"""User-facing errors: printed as one line by the CLI, exit status 2, no traceback."""


class UserError(Exception):
    """Bad input (config, data, paths). The message names the file/record/key and what to do."""

    exit_code = 2
