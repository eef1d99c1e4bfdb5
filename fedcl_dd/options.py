"""Declared options: what a method or a parameterization accepts, with its type, default and range.

Each objective and parameterization lists its options once (:class:`Option`); the command
line flags, the federated run configuration keys and the continual buffers' arguments are
all derived from those declarations (:mod:`fedcl_dd.registry`), so a new option is one line
in one place.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Option", "OptionError", "parse_declared"]


class OptionError(ValueError):
    """An option value of the wrong type, outside its range, or not declared by the method."""


@dataclass(frozen=True)
class Option:
    """One keyword argument of an objective or parameterization.

    ``default=None`` means the value is resolved by the method itself (e.g. from the images
    per class, as MTT's settings are, or "not set", as ``noise_multiplier`` when ``epsilon``
    is given). ``low``/``high`` bound numbers (inclusive, or exclusive where ``open_low``).
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    open_low: bool = False

    @property
    def flag(self) -> str:
        """The command-line flag, e.g. ``--real-per-class``."""
        return "--" + self.key

    @property
    def key(self) -> str:
        """The hyphenated key of flat configurations (Flower's run config), e.g. ``real-per-class``."""
        return self.name.replace("_", "-")

    @property
    def flat_unset(self) -> Any:
        """How a flat configuration (which cannot hold None) says "unset": the type's zero, or
        -1 where zero is a valid value (e.g. MTT's ``max_start_epoch``)."""
        zero = self.type()
        if (
            self.type in (int, float)
            and self.low is not None
            and self.low <= 0
            and not (self.low == 0 and self.open_low)
        ):
            return self.type(-1)
        return zero

    @property
    def flat_default(self) -> Any:
        """The default in a flat configuration: :attr:`flat_unset` where the default is None."""
        return self.flat_unset if self.default is None else self.default

    def from_flat(self, value: Any) -> Any:
        """A flat configuration's value, :attr:`flat_unset` meaning "unset" where the default is None."""
        if self.default is None:
            try:
                if self.type(value) == self.flat_unset:
                    return None
            except (TypeError, ValueError):
                pass  # parse() names the problem
        return self.parse(value)

    def parse(self, value: Any) -> Any:
        """``value`` converted to the declared type and checked; :class:`OptionError` names the fix."""
        if value is None:
            return None
        try:
            if self.type is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out: Any = value.lower() in ("true", "1")
            elif self.type is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            else:
                out = self.type(value)
        except (TypeError, ValueError):
            raise OptionError(
                f"{self.key} must be of type {self.type.__name__}, got {value!r}"
            ) from None
        if self.choices is not None and out not in self.choices:
            raise OptionError(f"{self.key}={out!r} is not one of {list(self.choices)}")
        if self.type in (int, float):
            if not math.isfinite(out):
                raise OptionError(f"{self.key} must be finite, got {out}")
            below = self.low is not None and (out <= self.low if self.open_low else out < self.low)
            above = self.high is not None and out > self.high
            if below or above:
                lo = "(" if self.open_low else "["
                raise OptionError(f"{self.key}={out} is outside {lo}{self.low}, {self.high}]")
        return out

    def add_to(
        self, parser: argparse.ArgumentParser | argparse._ArgumentGroup, owners: str
    ) -> None:
        """Add this option as a flag (default None: the method's own default) to ``parser``."""
        text = f"{owners}: {self.help}" + (
            "" if self.default is None else f" (default {self.default})"
        )
        if self.type is bool:
            parser.add_argument(
                self.flag, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            parser.add_argument(
                self.flag,
                type=self._parse_arg,
                default=None,
                help=text,
                metavar=self.type.__name__.upper(),
            )

    def _parse_arg(self, text: str) -> Any:
        # argparse shows an ArgumentTypeError's own message (a ValueError only as "invalid value").
        try:
            return self.parse(text)
        except OptionError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None


def parse_declared(
    owner: str, declared: tuple[Option, ...], values: dict[str, Any]
) -> dict[str, Any]:
    """``values`` parsed against ``declared``; a name not declared by ``owner`` is an :class:`OptionError`.

    ``None`` values are dropped (they mean "the declared default").
    """
    known = {o.name: o for o in declared}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise OptionError(
            f"{owner} has no option {', '.join(unknown)}; its options are {sorted(known) or 'none'}"
        )
    return {k: known[k].parse(v) for k, v in values.items() if v is not None}
