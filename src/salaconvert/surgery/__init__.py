"""Model surgery: which teachers we can convert, and how their attention is replaced."""
from salaconvert.surgery.registry import ArchSpec, ConversionError, get_arch, register_arch, resolve_arch

__all__ = ["ArchSpec", "ConversionError", "get_arch", "register_arch", "resolve_arch"]
