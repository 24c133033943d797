"""The user-facing error type, in a module of its own so that the command line can catch it before any
heavy import (onnx, onnxruntime) has run."""


class QccError(Exception):
    """A user-facing error: printed as one line by the CLI, exit code 2."""
