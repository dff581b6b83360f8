"""One error tree for pgbridge.

User-facing errors carry an exit code and a message that says what to do; the CLI prints them
without a traceback. Third-party exceptions are translated into these at the adapter boundary.
"""

from __future__ import annotations


class PgbridgeError(Exception):
    """Root of every error pgbridge raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class SpecError(PgbridgeError):
    """The spec file is missing, unreadable or invalid."""

    exit_code = 2


class UsageError(PgbridgeError):
    """A command was called in a way that cannot work (unknown user, missing --yes, ...)."""

    exit_code = 2


class HostError(PgbridgeError):
    """The host cannot run the deployment: a missing binary, a port in use, wrong ownership."""

    exit_code = 3


class MissingBinaryError(HostError):
    """A program pgbridge composes is not installed."""

    def __init__(self, program: str, package: str, *, path: str | None = None) -> None:
        where = f" (looked for {path})" if path else ""
        super().__init__(
            f"required program '{program}' is not installed{where}",
            hint=f"install it with: apt-get install -y {package}",
        )
        self.program = program
        self.package = package


class PortInUseError(HostError):
    """A port the deployment needs is already bound by another process."""


class SecretsError(PgbridgeError):
    """The secrets store cannot be opened (wrong or missing master key, damaged file)."""

    exit_code = 4


class DeploymentError(PgbridgeError):
    """A deployment operation failed (start, bootstrap, reconcile)."""

    exit_code = 5


class CommandFailed(DeploymentError):
    """A program pgbridge ran exited non-zero; `returncode` lets callers tell its failures apart."""

    def __init__(self, message: str, returncode: int, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.returncode = returncode


class NotFoundError(PgbridgeError):
    """The deployment (or an object in it) does not exist."""

    exit_code = 6


class CheckFailed(PgbridgeError):
    """`pgbridge check` found at least one failing check."""

    exit_code = 7


class TransientError(PgbridgeError):
    """A temporary failure that is worth retrying (server starting, DCS not ready)."""

    exit_code = 75
