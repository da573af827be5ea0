"""Argument checks for the public API: one definition and one wording for each rule.

Each check returns the value converted to its plain Python type, so a caller writes
``sigma = checks.sigma(sigma)`` once and uses the result. ``bool`` is never accepted as a
number (``True`` as a noise level or a step count is always a mistake). Every failure is a
``ValueError`` that names the argument and shows the value it got.
"""

from __future__ import annotations

import math
import numbers
import warnings


def _number(name: str, value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def finite_real(name: str, value: object) -> float:
    """A finite real number (not NaN or inf)."""
    return _number(name, value, "a finite real number")


def nonnegative_real(name: str, value: object) -> float:
    """A finite real number >= 0."""
    result = _number(name, value, "a finite number >= 0")
    if result < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return result


def positive_real(name: str, value: object) -> float:
    """A finite real number > 0."""
    result = _number(name, value, "a finite number > 0")
    if not result > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return result


def sigma(value: object, name: str = "sigma") -> float:
    """A Flat-LoRA noise level: finite and >= 0 (0 means no noise)."""
    return nonnegative_real(name, value)


def probability(name: str, value: object, *, include_one: bool = False) -> float:
    """A probability in ``[0, 1)``, or ``[0, 1]`` with ``include_one``."""
    interval = "[0, 1]" if include_one else "[0, 1)"
    result = _number(name, value, f"a number in {interval}")
    if not (0.0 <= result <= 1.0 if include_one else 0.0 <= result < 1.0):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return result


def _integer(name: str, value: object, minimum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def positive_int(name: str, value: object) -> int:
    """An int >= 1."""
    return _integer(name, value, 1, "a positive int")


def nonnegative_int(name: str, value: object) -> int:
    """An int >= 0."""
    return _integer(name, value, 0, "an int >= 0")


def optional_positive_int(name: str, value: object) -> int | None:
    """None, or an int >= 1."""
    return None if value is None else positive_int(name, value)


def resumed_step(owner: str, saved: dict, current: dict) -> int:
    """The step to continue from when ``saved`` (a ``state_dict``) is loaded into a run whose own state is
    ``current``: every setting both record must agree, or the run is not the one that was saved."""
    for key in current.keys() - {"step"}:
        if key in saved and saved[key] != current[key]:
            raise ValueError(f"{owner} state was saved with {key}={saved[key]!r}, this run has {current[key]!r}")
    return nonnegative_int("step", saved["step"])


def renamed_argument(function: str, deprecated: dict, old: str, new: str, value: object, default: object) -> object:
    """The value of a keyword argument renamed from ``old`` to ``new`` (``value``, whose default is ``default``):
    ``deprecated`` holds the extra keywords a call passed; ``old`` still works for one release, with a
    ``DeprecationWarning``; both at once is an error."""
    unknown = deprecated.keys() - {old}
    if unknown:
        raise TypeError(f"{function}() got unexpected keyword arguments {sorted(unknown)}")
    if old not in deprecated:
        return value
    if value != default:
        raise TypeError(f"{function}() got both {old}= (deprecated) and {new}=: pass {new}= only")
    warnings.warn(f"{function}(..., {old}=) is deprecated: use {new}=", DeprecationWarning, stacklevel=3)
    return deprecated[old]
