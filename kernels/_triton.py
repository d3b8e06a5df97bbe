"""Triton when it is installed; otherwise a stand-in that lets the kernel files import.

Each kernel file holds its Triton kernels beside the plain-torch reference they are tested against. On a
machine without Triton (for example a macOS install of torch), the references must still import, so the
kernel files take `triton` and `tl` from here: with Triton missing, `triton.jit` leaves a function
undecorated and `tl.constexpr(v)` keeps v in `.value` as Triton's does, and `AVAILABLE` is False, so `kernels.use_triton` is
False and no kernel is ever launched.
"""

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:
    AVAILABLE = False

    class _TritonStandIn:
        """Just enough of `triton` and `triton.language` for the kernel files to be imported."""

        @staticmethod
        def jit(fn=None, **_options):
            return fn if fn is not None else (lambda f: f)

        class constexpr:
            def __init__(self, value=None):
                self.value = value

    triton = tl = _TritonStandIn()

__all__ = ["AVAILABLE", "triton", "tl"]
