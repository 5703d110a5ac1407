"""Bad input from the user, as the engine and the data set readers raise it; their command
lines turn it into one line and exit code 2."""


class UsageError(ValueError):
    """Bad input from the user (unknown name, bad value, missing or corrupt file).

    The message is one line that names the value and, where there is a fixed set,
    the choices.
    """


def unknown_choice(what: str, value: object, choices) -> UsageError:
    """The standard message for a name that is not one of a fixed set."""
    return UsageError(f"unknown {what} {value!r}; choose one of: {', '.join(sorted(choices))}")
