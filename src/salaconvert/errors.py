"""Errors that come from the user's input: the CLI prints them as one line and exits with code 2."""


class InputError(ValueError):
    """Bad input (a path, a model, a ratio, a plan): the message names the problem in one line."""
