"""argparse types of the bench scripts: a bad value is the usual one-line usage error naming
its flag, before any bundle is built or model trained, not a traceback minutes in."""

from __future__ import annotations

import argparse
from pathlib import Path


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number >= 1, not {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"a number > 0, not {text!r}")
    return value


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of whole numbers >= 1 ("50,200")."""
    try:
        return [positive_int(part) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"comma-separated whole numbers >= 1, not {text!r}"
        ) from None


def positive_floats(text: str) -> list[float]:
    """A comma-separated list of numbers > 0 ("0.5,1,5")."""
    try:
        return [positive_float(part) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"comma-separated numbers > 0, not {text!r}") from None


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def devices(text: str) -> list[str]:
    """A comma-separated list of torch devices this host has ("cpu,cuda")."""
    import torch  # here, not at import: the scripts set up OpenMP before torch loads

    names = text.split(",")
    for name in names:
        try:
            ok = torch.device(name).type == "cpu" or torch.cuda.is_available()
        except RuntimeError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"{name!r} is not a device this host has")
    return names
