"""The argument checks on their own, and the choices the command line offers against those Python accepts."""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path

import pytest
from conftest import TinyNet

from lightning_advsel import AdversarialSelectionModule, AttackConfig, AutoAttackConfig
from lightning_advsel.callbacks import AdaptivePUp, MinimumPerturbation
from lightning_advsel.checks import check_choice, check_fraction, check_int, check_linf_eps, check_number, check_path
from lightning_advsel.data import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule, MNISTDataModule


@pytest.mark.parametrize("value", [0, -0.1, 1.01, math.nan, math.inf, "0.5", True, None])
def test_check_fraction_refuses_values_outside_the_unit_interval(value):
    with pytest.raises(ValueError, match=r"`p_up` must be"):
        check_fraction("p_up", value)


def test_check_fraction_accepts_one_and_small_values():
    assert check_fraction("p_up", 1) == 1.0
    assert check_fraction("p_up", 1e-3) == 1e-3


@pytest.mark.parametrize("value", [0, -3, 2.0, "4", True, None])
def test_check_int_refuses_non_integers_and_values_below_the_minimum(value):
    with pytest.raises(ValueError, match=rf"^`steps` must be an integer >= 1, got {value!r}$"):
        check_int("steps", value, 1)


def test_check_int_returns_the_value_and_takes_none_only_when_optional():
    assert check_int("num_workers", 0, 0) == 0
    assert check_int("train_size", None, 1, optional=True) is None
    with pytest.raises(ValueError, match=r"^`train_size` must be an integer >= 1 or None, got 0$"):
        check_int("train_size", 0, 1, optional=True)


@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf, -math.inf, "0.1", False, None])
def test_check_number_refuses_non_finite_non_numbers_and_values_below_the_minimum(value):
    with pytest.raises(ValueError, match=rf"^`eps` must be a finite number >= 0 \(pixel units\), got {value!r}$"):
        check_number("eps", value, 0, unit="pixel units")


def test_check_number_strict_refuses_the_bound_itself():
    assert check_number("eps", 0, 0) == 0.0 and isinstance(check_number("eps", 1, 0), float)
    with pytest.raises(ValueError, match=r"^`max_eps` must be a finite number > 0, got 0$"):
        check_number("max_eps", 0, 0, strict=True)


def test_check_choice_lists_the_choices_of_a_tuple_or_a_dict():
    assert check_choice("norm", "l2", ("linf", "l2")) == "l2"
    with pytest.raises(ValueError, match=r"^`norm` must be one of \('linf', 'l2'\), got 'l1'$"):
        check_choice("norm", "l1", ("linf", "l2"))
    with pytest.raises(ValueError, match=r"^`recipe` must be one of \('ds', 'robust'\), got 3$"):
        check_choice("recipe", 3, {"ds": 1, "robust": 2})


def test_check_path_takes_strings_and_path_likes_and_says_what_the_path_is_for():
    assert check_path("data_dir", Path("data"), "a folder path") == "data"
    assert check_path("cache_dir", None, "a folder path", optional=True) is None
    with pytest.raises(ValueError, match=r"^`data_dir` must be a folder path, got ''$"):
        check_path("data_dir", "", "a folder path")
    with pytest.raises(ValueError, match=r"^`cache_dir` must be a folder path or None, got 3$"):
        check_path("cache_dir", 3, "a folder path", optional=True)


def test_check_linf_eps_refuses_only_linf_radii_above_the_pixel_range():
    check_linf_eps("eps", 1.0, "linf")
    check_linf_eps("eps", 3.0, "l2")
    with pytest.raises(ValueError, match=r"^`eps` must be <= 1 for the linf norm: pixels lie in \[0, 1\], got 1.5$"):
        check_linf_eps("eps", 1.5, "linf")


# Every constructor with a Literal-typed choice, with the arguments it needs besides the choice.
CHOOSERS = [
    (AdversarialSelectionModule.__init__, lambda **kw: AdversarialSelectionModule(TinyNet(), **kw)),
    (AttackConfig, AttackConfig),
    (AutoAttackConfig, lambda **kw: AutoAttackConfig(eps=0.1, **kw)),
    (DigitsDataModule.__init__, DigitsDataModule),
    (MNISTDataModule.__init__, MNISTDataModule),
    (CIFAR10DataModule.__init__, CIFAR10DataModule),
    (ImageFolderDataModule.__init__, ImageFolderDataModule),
    (AdaptivePUp.__init__, AdaptivePUp),
    (MinimumPerturbation.__init__, MinimumPerturbation),
]


def literal_choices(hint: object) -> tuple | None:
    """The values a ``Literal[...]`` (or ``Literal[...] | None``) hint allows, else ``None``."""
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        literals = [m for m in members if typing.get_origin(m) is typing.Literal]
        if len(literals) == 1 and set(members) == {literals[0], type(None)}:
            return (*typing.get_args(literals[0]), None)
    return None


@pytest.mark.parametrize("typed,build", CHOOSERS, ids=lambda c: getattr(c, "__qualname__", ""))
def test_python_check_accepts_exactly_the_choices_the_command_line_offers(typed, build):
    hints = {name: literal_choices(hint) for name, hint in typing.get_type_hints(typed).items()}
    choices = {name: values for name, values in hints.items() if values is not None}
    assert choices, f"{typed.__qualname__} has no Literal-typed argument"
    for name, values in choices.items():
        # The message lists what the Python check accepts: it must be the Literal's values, in order.
        with pytest.raises(ValueError, match=rf"^`{name}` must be one of {re_tuple(values)}, got 'bogus'$"):
            build(**{name: "bogus"})


def re_tuple(values: tuple) -> str:
    return "\\(" + ", ".join(repr(v) for v in values) + "\\)"
