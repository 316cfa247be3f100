"""Let Triton 3.6's interpreter (TRITON_INTERPRET=1, how CI runs the kernels) work with NumPy ≥ 2.4.

The interpreter holds every scalar as a 1-element array and converts it with `int(array)`, which
NumPy 2.4 turned into an error; so `for i in range(0, n)` over a runtime `n` fails in any kernel.
`fix_interpreter_index()` makes `__index__` read the single element. It only touches the
interpreter, is idempotent, and is a no-op when Triton is absent or already fine. Every module
with Triton kernels calls it at import.
"""
from __future__ import annotations


def fix_interpreter_index() -> None:
    try:
        import triton.runtime.interpreter as interp
    except Exception:  # triton missing or built without the interpreter
        return
    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_salaconvert_patched", False):
        return

    def _patch_lang_tensor(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _patch_lang_tensor._salaconvert_patched = True
    interp._patch_lang_tensor = _patch_lang_tensor
