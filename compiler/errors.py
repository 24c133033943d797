"""The user-facing error type, in a module of its own so that the command line can catch it before any
heavy import (onnx, onnxruntime) has run."""


class QccError(Exception):
    """A user-facing error: printed as one line by the CLI, exit code 2."""


class PassFailure(Exception):
    """An unexpected exception inside a pass (a bug in qcc, not a user mistake), with the pass's name and the
    passes that ran before it, so that a report can be reproduced with ``--passes``."""

    def __init__(self, pass_name: str, before: str, cause: BaseException):
        self.pass_name, self.before, self.cause = pass_name, before, cause
        first = str(cause).splitlines()[0] if str(cause) else ""
        super().__init__(f"pass '{pass_name}' failed ({type(cause).__name__}: {first}); "
                         f"passes before it: {before or 'none'}")
