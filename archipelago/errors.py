"""The base of every error a user can fix: the CLI prints its message on one line, exit status 2."""


class UserError(ValueError):
    """Bad input (config, file, corpus, checkpoint); the message names the problem."""
