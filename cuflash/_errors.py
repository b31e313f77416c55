"""Exceptions raised by cuflash beyond the built-in ValueError/TypeError of input checks."""


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run here (the message says why)."""


class KernelError(RuntimeError):
    """Base class of GPU kernel failures; ``kernel`` names the CUDA entry point."""

    def __init__(self, kernel, message, log=""):
        self.kernel = kernel
        self.log = log
        text = f"{kernel}: {message}"
        if log:
            text += "\n" + log
        super().__init__(text)


class KernelCompileError(KernelError):
    """NVRTC refused a kernel; ``log`` holds the compiler's log."""


class KernelLaunchError(KernelError):
    """The CUDA driver refused or failed a kernel launch."""


# Users meet these as cuflash.X (that is where they are exported), and tracebacks and help() should
# say so rather than name this private module.
for _cls in (BackendUnavailableError, KernelError, KernelCompileError, KernelLaunchError):
    _cls.__module__ = "cuflash"
del _cls
