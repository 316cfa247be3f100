"""Parsing of the list options `eval` and `bench` share: `--lengths 1K,2K,4096`, `--depths 0,0.5,1`."""
import re

from salaconvert.errors import InputError

_SUFFIX = {"": 1, "k": 1024, "m": 1024 * 1024}


def parse_lengths(text: str, option: str = "--lengths") -> list[int]:
    """'1K,2k,512' -> [1024, 2048, 512]; K and M are powers of two, as context lengths are."""
    lengths = []
    for part in _parts(text, option):
        m = re.fullmatch(r"(\d+)([kKmM]?)", part)
        if not m or int(m.group(1)) == 0:
            raise InputError(f"{option}: {part!r} is not a positive token count (e.g. 512, 1K, 32K)")
        lengths.append(int(m.group(1)) * _SUFFIX[m.group(2).lower()])
    return sorted(set(lengths))


def parse_floats(text: str, option: str, low: float = 0.0, high: float = 1.0) -> list[float]:
    values = []
    for part in _parts(text, option):
        try:
            v = float(part.rstrip("%")) / (100 if part.endswith("%") else 1)
        except ValueError:
            raise InputError(f"{option}: {part!r} is not a number") from None
        if not low <= v <= high:
            raise InputError(f"{option}: {part} is outside [{low:g}, {high:g}]")
        values.append(v)
    return sorted(set(values))


def parse_names(text: str, option: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    names = list(dict.fromkeys(_parts(text, option)))
    bad = [n for n in names if allowed is not None and n not in allowed]
    if bad:
        raise InputError(f"{option}: unknown {', '.join(bad)}; choose from {','.join(allowed)}")
    return names


def _parts(text: str, option: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise InputError(f"{option}: empty list")
    return parts
