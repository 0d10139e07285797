"""The one exception type for bad input: the CLI prints it as a single line and exits non-zero."""


class ConfigError(ValueError):
    """A problem with the user's configuration or data, reported before any weights load.

    The message names the problem and its fix in one line; several problems are joined with '; '.
    """

    @classmethod
    def collect(cls, problems: list[str]) -> None:
        """Raise once listing every problem, or return if there are none."""
        if problems:
            raise cls("; ".join(problems))


def first_line(error: Exception) -> str:
    """The first line of an upstream error, to quote inside a one-line message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
