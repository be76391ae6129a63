"""The snapshot key changes with every change to the code that changes what a fold
gives, one change at a time, and stays put for changes that do not (a comment, the
order of unrelated definitions), so a stale snapshot is never read."""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import incident
from incident.snapshots import Snapshot, code_key


class Add(incident.Command):
    aggregate_id: str
    n: int


class Added(incident.Event):
    n: int


RELEASE = """
import dataclasses
import enum
import functools
import typing
from decimal import Decimal

import msgspec

import incident

{setup}

agg = incident.Aggregate("keyed", initial={initial}, state_type={state_type})


@agg.execute(Add)
def add(state: typing.Any, command: Add) -> Added:
    return Added(n=command.n)


@agg.apply(Added)
def added(state: typing.Any, event: Added) -> typing.Any:
{body}
"""

Importer = Callable[..., types.ModuleType]


@pytest.fixture
def release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Importer:
    """Imports one release of the module ``keyed_release`` (a new directory each time,
    the same module name, as a deploy would), with this module's Add and Added."""
    releases = itertools.count()
    monkeypatch.syspath_prepend(str(tmp_path / "packages"))

    def imported(
        setup: str = "",
        body: str = "return state + event.n",
        initial: str = "0",
        state_type: str = "None",
    ) -> types.ModuleType:
        path = tmp_path / f"release{next(releases)}" / "keyed_release.py"
        path.parent.mkdir()
        source = RELEASE.format(
            setup=textwrap.dedent(setup),
            initial=initial,
            state_type=state_type,
            body=textwrap.indent(textwrap.dedent(body).strip(), "    "),
        )
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("keyed_release", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        module.Add, module.Added = Add, Added  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "keyed_release", module)
        spec.loader.exec_module(module)
        return module

    return imported


def key(module: types.ModuleType) -> str:
    return code_key(module.agg)


# (what changes, release arguments before, after): each changes what the fold gives
CHANGES: list[tuple[str, dict[str, str], dict[str, str]]] = [
    ("the initial state", {"initial": "0"}, {"initial": "5"}),
    (
        "a field of an initial Struct",
        {"setup": "class S(msgspec.Struct):\n    n: int = 0", "initial": "S(n=1)"},
        {"setup": "class S(msgspec.Struct):\n    n: int = 0", "initial": "S(n=2)"},
    ),
    ("the declared state type", {"state_type": "int"}, {"state_type": "float"}),
    ("a body", {"body": "return state + event.n"}, {"body": "return state - event.n"}),
    ("a helper", {"setup": "def h(x):\n    return x"}, {"setup": "def h(x):\n    return -x"}),
    ("a constant", {"setup": "RATE = 2"}, {"setup": "RATE = 3"}),
    ("a float constant's sign", {"setup": "RATE = 0.0"}, {"setup": "RATE = -0.0"}),
    ("a dict's order", {"setup": "R = {'a': 1, 'b': 2}"}, {"setup": "R = {'b': 2, 'a': 1}"}),
    ("a frozenset", {"setup": "R = frozenset({'a', 'b'})"}, {"setup": "R = frozenset({'a'})"}),
    (
        "an enum value",
        {"setup": "class K(enum.Enum):\n    A = 1"},
        {"setup": "class K(enum.Enum):\n    A = 2"},
    ),
    (
        "a functools.cache helper",
        {"setup": "@functools.cache\ndef h(x):\n    return x"},
        {"setup": "@functools.cache\ndef h(x):\n    return -x"},
    ),
    (
        "a partial's argument",
        {"setup": "def g(a, b):\n    return a * b\nh = functools.partial(g, 1)"},
        {"setup": "def g(a, b):\n    return a * b\nh = functools.partial(g, 2)"},
    ),
    (
        "a helper's default",
        {"setup": "def h(x, k=1):\n    return x * k"},
        {"setup": "def h(x, k=2):\n    return x * k"},
    ),
    (
        "a keyword-only default",
        {"setup": "def h(x, *, k=1):\n    return x * k"},
        {"setup": "def h(x, *, k=2):\n    return x * k"},
    ),
    (
        "a callable object's __call__",
        {"setup": "class R:\n    def __call__(self, x):\n        return x\nh = R()"},
        {"setup": "class R:\n    def __call__(self, x):\n        return -x\nh = R()"},
    ),
    (
        "a bound method's function",
        {"setup": "class R:\n    def f(self, x):\n        return x\nh = R().f"},
        {"setup": "class R:\n    def f(self, x):\n        return -x\nh = R().f"},
    ),
    (
        "a special method (__add__)",
        {"setup": "class M(int):\n    def __add__(self, o):\n        return int(self) + o\nh = M"},
        {"setup": "class M(int):\n    def __add__(self, o):\n        return int(self) - o\nh = M"},
    ),
    (
        "a staticmethod",
        {"setup": "class C:\n    @staticmethod\n    def f(x):\n        return x\nh = C.f"},
        {"setup": "class C:\n    @staticmethod\n    def f(x):\n        return -x\nh = C.f"},
    ),
    (
        "a property",
        {
            "setup": "class C:\n    @property\n    def k(self):\n        return 1\n"
            "h = lambda x: x * C().k"
        },
        {
            "setup": "class C:\n    @property\n    def k(self):\n        return 2\n"
            "h = lambda x: x * C().k"
        },
    ),
    (
        "a cached_property",
        {
            "setup": "class C:\n    @functools.cached_property\n    def k(self):\n"
            "        return 1\nh = lambda x: x * C().k"
        },
        {
            "setup": "class C:\n    @functools.cached_property\n    def k(self):\n"
            "        return 2\nh = lambda x: x * C().k"
        },
    ),
    (
        "a class attribute holding functions",
        {
            "setup": "def a(x):\n    return x\ndef b(x):\n    return -x\nclass T:\n"
            "    F = {'f': a}\nh = lambda x: T.F['f'](x)"
        },
        {
            "setup": "def a(x):\n    return x\ndef b(x):\n    return -x\nclass T:\n"
            "    F = {'f': b}\nh = lambda x: T.F['f'](x)"
        },
    ),
    (
        "a nested class",
        {"setup": "class T:\n    class I:\n        K = 1\nh = lambda x: x * T.I.K"},
        {"setup": "class T:\n    class I:\n        K = 2\nh = lambda x: x * T.I.K"},
    ),
    (
        "a base class's method",
        {
            "setup": "class B:\n    def f(self, x):\n        return x\nclass C(B):\n"
            "    pass\nh = lambda x: C().f(x)"
        },
        {
            "setup": "class B:\n    def f(self, x):\n        return -x\nclass C(B):\n"
            "    pass\nh = lambda x: C().f(x)"
        },
    ),
    (
        "a Struct constant's field",
        {"setup": "class C(msgspec.Struct):\n    k: int\nCONF = C(k=1)\nh = lambda x: x * CONF.k"},
        {"setup": "class C(msgspec.Struct):\n    k: int\nCONF = C(k=2)\nh = lambda x: x * CONF.k"},
    ),
    (
        "a dataclass constant's field",
        {
            "setup": "@dataclasses.dataclass\nclass C:\n    k: int\nCONF = C(k=1)\n"
            "h = lambda x: x * CONF.k"
        },
        {
            "setup": "@dataclasses.dataclass\nclass C:\n    k: int\nCONF = C(k=2)\n"
            "h = lambda x: x * CONF.k"
        },
    ),
    (
        "a closure's value",
        {"setup": "def make(k):\n    return lambda x: x * k\nh = make(1)"},
        {"setup": "def make(k):\n    return lambda x: x * k\nh = make(2)"},
    ),
    (
        "a date constant",
        {"setup": "import datetime\nSTART = datetime.date(2024, 1, 1)", "body": "return START.day"},
        {"setup": "import datetime\nSTART = datetime.date(2024, 1, 2)", "body": "return START.day"},
    ),
    (
        "a default of ... or None",
        {"setup": "def h(x, k=...):\n    return x if k is ... else -x"},
        {"setup": "def h(x, k=None):\n    return x if k is ... else -x"},
    ),
    (
        "a class in a set",
        {"setup": "class A:\n    K = 1\nR = frozenset({A})", "body": "return next(iter(R)).K"},
        {"setup": "class A:\n    K = 2\nR = frozenset({A})", "body": "return next(iter(R)).K"},
    ),
    (
        "a module in a tuple",
        {"setup": "import math, cmath\nR = (math,)", "body": "return R[0].sqrt(4)"},
        {"setup": "import math, cmath\nR = (cmath,)", "body": "return R[0].sqrt(4)"},
    ),
    (
        "a constant reached twice",
        {
            "setup": "class C(msgspec.Struct):\n    k: int\nCONF = C(k=1)\nSAME = CONF\n"
            "h = lambda x: x * CONF.k * SAME.k"
        },
        {
            "setup": "class C(msgspec.Struct):\n    k: int\nCONF = C(k=2)\nSAME = CONF\n"
            "h = lambda x: x * CONF.k * SAME.k"
        },
    ),
    (
        "an annotation that does not resolve",
        {"setup": "class P:\n    x: 'Nowhere'\n    K = 1", "body": "return state + P.K"},
        {"setup": "class P:\n    x: 'Elsewhere'\n    K = 1", "body": "return state + P.K"},
    ),
    (
        "a singledispatch implementation",
        {
            "setup": "@functools.singledispatch\ndef h(x):\n    return x\n"
            "@h.register\ndef _(x: int):\n    return x * 2"
        },
        {
            "setup": "@functools.singledispatch\ndef h(x):\n    return x\n"
            "@h.register\ndef _(x: int):\n    return x * 3"
        },
    ),
    (
        "a function attribute",
        {"setup": "def h(x):\n    return x * h.k\nh.k = 1"},
        {"setup": "def h(x):\n    return x * h.k\nh.k = 2"},
    ),
    (
        "a string used as a value and a docstring",
        {"setup": "def h(x):\n    'a'\n    return x * len('a')"},
        {"setup": "def h(x):\n    'a'\n    return x * len('ab')"},
    ),
    (
        "the object of a bound method",
        {
            "setup": "@dataclasses.dataclass\nclass P:\n    k: int\n    def f(self, x):\n"
            "        return x * self.k\nh = P(k=1).f"
        },
        {
            "setup": "@dataclasses.dataclass\nclass P:\n    k: int\n    def f(self, x):\n"
            "        return x * self.k\nh = P(k=2).f"
        },
    ),
    (
        "a compiled pattern",
        {"setup": "import re\nP = re.compile(r'\\d+')", "body": "return len(P.findall('a1'))"},
        {"setup": "import re\nP = re.compile(r'\\d')", "body": "return len(P.findall('a1'))"},
    ),
    (
        "an itemgetter",
        {"setup": "import operator\nh = operator.itemgetter(0)", "body": "return h([1, 2])"},
        {"setup": "import operator\nh = operator.itemgetter(1)", "body": "return h([1, 2])"},
    ),
    (
        "a Fraction",
        {"setup": "import fractions\nRATE = fractions.Fraction(1, 3)"},
        {"setup": "import fractions\nRATE = fractions.Fraction(1, 4)"},
    ),
    (
        "a range",
        {"setup": "R = range(3)", "body": "return len(R)"},
        {"setup": "R = range(4)", "body": "return len(R)"},
    ),
    (
        "a SimpleNamespace's attribute",
        {"setup": "import types\nCONF = types.SimpleNamespace(k=1)\nh = lambda x: x * CONF.k"},
        {"setup": "import types\nCONF = types.SimpleNamespace(k=2)\nh = lambda x: x * CONF.k"},
    ),
    (
        "a decimal context",
        {"setup": "import decimal\nCTX = decimal.Context(prec=4)", "body": "return CTX.prec"},
        {"setup": "import decimal\nCTX = decimal.Context(prec=6)", "body": "return CTX.prec"},
    ),
    (
        "a time zone",
        {
            "setup": "import datetime as dt\nTZ = dt.timezone(dt.timedelta(hours=2))",
            "body": "return TZ.utcoffset(None).seconds",
        },
        {
            "setup": "import datetime as dt\nTZ = dt.timezone(dt.timedelta(hours=3))",
            "body": "return TZ.utcoffset(None).seconds",
        },
    ),
    (
        "a method of an enum member's class",
        {
            "setup": "class E(enum.Enum):\n    A = 1\n    def twice(self):\n        return 2\n"
            "DEFAULT = E.A",
            "body": "return DEFAULT.twice()",
        },
        {
            "setup": "class E(enum.Enum):\n    A = 1\n    def twice(self):\n        return 3\n"
            "DEFAULT = E.A",
            "body": "return DEFAULT.twice()",
        },
    ),
    (
        "a method of an int subclass's constant",
        {
            "setup": "class Cents(int):\n    def __add__(self, other):\n        return 1\n"
            "FEE = Cents(5)",
            "body": "return FEE + state",
        },
        {
            "setup": "class Cents(int):\n    def __add__(self, other):\n        return 2\n"
            "FEE = Cents(5)",
            "body": "return FEE + state",
        },
    ),
    (
        "the object of a bound builtin method",
        {"setup": "RATES = {'a': 1}\nh = RATES.get", "body": "return h('a')"},
        {"setup": "RATES = {'a': 2}\nh = RATES.get", "body": "return h('a')"},
    ),
    (
        "a lambda in a comprehension",
        {"setup": "h = lambda x: sum([(lambda y: y)(i) for i in range(x)])"},
        {"setup": "h = lambda x: sum([(lambda y: -y)(i) for i in range(x)])"},
    ),
]

STATES: list[tuple[str, str, str]] = [
    # (what changes, setup before, after), the state being S()
    (
        "a Struct field's default",
        "class S(msgspec.Struct):\n    n: int = 1",
        "class S(msgspec.Struct):\n    n: int = 2",
    ),
    (
        "a Struct field's type",
        "class S(msgspec.Struct):\n    n: int = 1",
        "class S(msgspec.Struct):\n    n: float = 1",
    ),
    (
        "a Struct default that is a Struct",
        "class O(msgspec.Struct, frozen=True):\n    n: int = 0\n"
        "class S(msgspec.Struct):\n    o: O = O(n=1)",
        "class O(msgspec.Struct, frozen=True):\n    n: int = 0\n"
        "class S(msgspec.Struct):\n    o: O = O(n=2)",
    ),
    (
        "a Struct default factory",
        "class S(msgspec.Struct):\n    n: list[int] = msgspec.field(default_factory=lambda: [1])",
        "class S(msgspec.Struct):\n    n: list[int] = msgspec.field(default_factory=lambda: [2])",
    ),
    (
        "a dataclass default",
        "@dataclasses.dataclass\nclass S:\n    n: int = 1",
        "@dataclasses.dataclass\nclass S:\n    n: int = 2",
    ),
    (
        "a dataclass default factory",
        "@dataclasses.dataclass\nclass S:\n"
        "    n: list[int] = dataclasses.field(default_factory=lambda: [1])",
        "@dataclasses.dataclass\nclass S:\n"
        "    n: list[int] = dataclasses.field(default_factory=lambda: [2])",
    ),
    (
        "a __post_init__",
        "class S(msgspec.Struct):\n    n: int = 1\n    def __post_init__(self):\n"
        "        self.n += 1",
        "class S(msgspec.Struct):\n    n: int = 1\n    def __post_init__(self):\n"
        "        self.n += 2",
    ),
    (
        "a field's class",
        "class O(msgspec.Struct):\n    n: int = 0\nclass S(msgspec.Struct):\n"
        "    o: O | None = None",
        "class O(msgspec.Struct):\n    n: str = ''\nclass S(msgspec.Struct):\n"
        "    o: O | None = None",
    ),
    (
        "a generic field's class (Box[int])",
        "T = typing.TypeVar('T')\nclass Box(msgspec.Struct, typing.Generic[T]):\n    n: int = 0\n"
        "class S(msgspec.Struct):\n    b: Box[int] | None = None",
        "T = typing.TypeVar('T')\nclass Box(msgspec.Struct, typing.Generic[T]):\n    n: str = ''\n"
        "class S(msgspec.Struct):\n    b: Box[int] | None = None",
    ),
    (
        "a NewType's type",
        "U = typing.NewType('U', int)\nclass S(msgspec.Struct):\n    u: U = U(1)",
        "U = typing.NewType('U', str)\nclass S(msgspec.Struct):\n    u: U = U(1)",
    ),
    (
        "a Literal",
        "class S(msgspec.Struct):\n    k: typing.Literal[1, 2] = 1",
        "class S(msgspec.Struct):\n    k: typing.Literal[1, 3] = 1",
    ),
    (
        "an Annotated constraint",
        "class S(msgspec.Struct):\n    k: typing.Annotated[int, msgspec.Meta(ge=0)] = 1",
        "class S(msgspec.Struct):\n    k: typing.Annotated[int, msgspec.Meta(ge=1)] = 1",
    ),
    (
        "an enum member of the state",
        "class K(enum.Enum):\n    A = 'a'\nclass S(msgspec.Struct):\n    k: K = K.A",
        "class K(enum.Enum):\n    A = 'b'\nclass S(msgspec.Struct):\n    k: K = K.A",
    ),
]


@pytest.mark.parametrize(
    ("before", "after"),
    [pytest.param(before, after, id=what) for what, before, after in CHANGES]
    + [
        pytest.param(
            {"setup": before, "initial": "S()", "body": "return state"},
            {"setup": after, "initial": "S()", "body": "return state"},
            id=what,
        )
        for what, before, after in STATES
    ],
)
def test_a_change_that_changes_the_fold_changes_the_key(
    release: Importer, before: dict[str, str], after: dict[str, str]
) -> None:
    """One change at a time, to what the apply function reaches (the body uses ``h``,
    ``RATE``, ``R`` or ``K`` when the change defines them) or to the state: another
    key. The same source imported again (another directory): the same key."""
    for arguments in (before, after):
        arguments.setdefault("body", default_body(arguments.get("setup", "")))
    first = key(release(**before))
    assert key(release(**before)) == first
    assert key(release(**after)) != first


def default_body(setup: str) -> str:
    """An apply function that uses what ``setup`` defines, in an order-aware way."""
    uses = {
        r"^(def h\(|h = )": "h(event.n)",
        r"^RATE = ": "RATE",
        r"^R = \{'": "next(iter(R))",
        r"^R = frozenset": "len(R)",
        r"^class K\(": "K.A.value",
    }
    found = [use for pattern, use in uses.items() if re.search(pattern, setup, re.MULTILINE)]
    return "return state + " + " + ".join(found or ["event.n"])


KEEPS: list[tuple[str, dict[str, str], dict[str, str]]] = [
    (
        "a comment and blank lines",
        {"setup": "RATE = 1"},
        {"setup": "# a note\n\n\nRATE = 1  # and one here"},
    ),
    (
        "a docstring",
        {"setup": "def h(x):\n    'Doubles.'\n    return x * 2"},
        {"setup": "def h(x):\n    'Twice x, for the bonus.'\n    return x * 2"},
    ),
    (
        "the order of unrelated definitions",
        {"setup": "def u():\n    pass\ndef v():\n    pass"},
        {"setup": "def v():\n    pass\ndef u():\n    pass"},
    ),
    (
        "type hints on a helper",
        {"setup": "def h(x):\n    return x * 2"},
        {"setup": "def h(x: int) -> int:\n    return x * 2"},
    ),
    (
        "a decimal context's flags, set by the calculations it made",
        {"setup": "import decimal\nCTX = decimal.Context(prec=2)", "body": "return CTX.prec"},
        {
            "setup": "import decimal\nCTX = decimal.Context(prec=2)\n"
            "CTX.divide(decimal.Decimal(1), decimal.Decimal(3))",
            "body": "return CTX.prec",
        },
    ),
    ("an import nothing uses", {"setup": "RATE = 2"}, {"setup": "import json\nRATE = 2"}),
    (
        "a helper nothing calls",
        {"setup": "def u():\n    return 1"},
        {"setup": "def u():\n    return 2"},
    ),
    ("a constant nothing reads", {"setup": "UNUSED = 1"}, {"setup": "UNUSED = 2"}),
    (
        "a global named like an attribute the code reads (event.n)",
        {"setup": "n = 1"},
        {"setup": "n = 2"},
    ),
    (
        "the order of a set's items",
        {"setup": "R = {'a', 'b', 'c'}", "body": "return state + len(R)"},
        {"setup": "R = {'c', 'a', 'b'}", "body": "return state + len(R)"},
    ),
]


@pytest.mark.parametrize(
    ("before", "after"), [pytest.param(before, after, id=what) for what, before, after in KEEPS]
)
def test_a_change_that_leaves_the_fold_alone_keeps_the_key(
    release: Importer, before: dict[str, str], after: dict[str, str]
) -> None:
    """Snapshots stay usable across a change that cannot change a fold."""
    for arguments in (before, after):
        arguments.setdefault("body", default_body(arguments.get("setup", "")))
    assert key(release(**before)) == key(release(**after))


def write_package(root: Path, rate: str) -> None:
    """A package of the user's, ``keyed_rules.sub.rules``, with ``rate(x)``; forgotten by
    the import system, so the next import reads it afresh."""
    for name in [name for name in sys.modules if name.startswith("keyed_rules")]:
        del sys.modules[name]
    package = root / "keyed_rules" / "sub"
    package.mkdir(parents=True, exist_ok=True)
    (root / "keyed_rules" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "rules.py").write_text(f"def rate(x):\n    return {rate}\n")
    importlib.invalidate_caches()


@pytest.fixture
def rules_package(tmp_path: Path) -> Iterator[Callable[[str], None]]:
    root = tmp_path / "packages"
    yield lambda rate: write_package(root, rate)
    for name in [name for name in sys.modules if name.startswith("keyed_rules")]:
        del sys.modules[name]


@pytest.mark.parametrize(
    ("setup", "body"),
    [
        pytest.param(
            "import keyed_rules.sub.rules",
            "return state + keyed_rules.sub.rules.rate(event.n)",
            id="package.module.helper",
        ),
        pytest.param(
            "from keyed_rules.sub import rules",
            "return state + rules.rate(event.n)",
            id="module.helper",
        ),
        pytest.param(
            "",
            "from keyed_rules.sub.rules import rate\nreturn state + rate(event.n)",
            id="from module import helper, in the function",
        ),
        pytest.param(
            "",
            "import keyed_rules.sub.rules\nreturn state + keyed_rules.sub.rules.rate(event.n)",
            id="import package.module, in the function",
        ),
        pytest.param(
            "",
            "from keyed_rules.sub import rules\nreturn state + rules.rate(event.n)",
            id="from package import module, in the function",
        ),
    ],
)
def test_a_helper_in_another_module_of_yours_is_followed(
    release: Importer, rules_package: Callable[[str], None], setup: str, body: str
) -> None:
    """However the apply function reaches a helper in another of the user's modules (a
    dotted path, a module imported at the top or inside the function, even one not
    imported yet when the key is computed), a change to the helper changes the key."""
    rules_package("x")
    first = key(release(setup=setup, body=body))
    rules_package("x")
    assert key(release(setup=setup, body=body)) == first
    rules_package("x + 1")
    assert key(release(setup=setup, body=body)) != first


def test_a_relative_import_in_a_package_module_is_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rules_package: Callable[[str], None]
) -> None:
    """An apply function in a package's module that imports its helper relatively
    (``from .rules import rate`` inside the function), and another that imports a
    module already loaded (``from package import module``): the helper counts."""
    source = """
import incident
from keyed_rules.sub import rules  # loaded before the function's own import


class Added(incident.Event, tag="keyed.relative.Added"):
    n: int


agg = incident.Aggregate("relative", initial=0)


@agg.apply(Added)
def added(state: int, event: Added) -> int:
    from .rules import rate
    from keyed_rules.sub import rules
    return state + rate(event.n) + rules.rate(0)
"""
    monkeypatch.syspath_prepend(str(tmp_path / "packages"))
    keys = []
    for rate in ("x", "x", "x * 3"):
        rules_package(rate)
        (tmp_path / "packages" / "keyed_rules" / "sub" / "aggregate.py").write_text(source)
        module = importlib.import_module("keyed_rules.sub.aggregate")
        keys.append(code_key(module.agg))
    assert keys[0] == keys[1] != keys[2]


def test_an_import_that_fails_still_names_the_module(release: Importer) -> None:
    """An import the key cannot follow (it fails when the key is computed) keeps the
    name of what it imports in the key: another name, another key."""
    first = key(release(body="from keyed_nowhere import rate\nreturn state + rate(event.n)"))
    other = key(release(body="from keyed_elsewhere import rate\nreturn state + rate(event.n)"))
    assert first != other


def test_a_stale_snapshot_of_another_initial_state_is_not_read(
    store_url: str, release: Importer
) -> None:
    """A release that only changes the initial state (0 to 100) folds to another state;
    the snapshot the old release left is not read, on every store."""
    events, projections = incident.open_stores(store_url)
    try:
        old = release(initial="0")
        writer = incident.CommandHandler(
            events, projections, aggregates=[old.agg], snapshot_every=2
        )
        for _ in range(3):
            writer.dispatch(Add(aggregate_id="K", n=1))
        snapshot = projections.get(Snapshot, "keyed/K")
        assert snapshot is not None and (snapshot.version, snapshot.state) == (2, "2")

        new = release(initial="100")
        reader = incident.CommandHandler(
            events, projections, aggregates=[new.agg], snapshot_every=2, verify_snapshots=True
        )
        assert reader.state("keyed", "K") == new.agg.fold(events.get("K")) == 103
        assert reader.verify_snapshot("keyed", "K") is None  # none this code would read
    finally:
        events.close()


def test_a_stale_snapshot_after_a_cached_helper_changed_is_not_read(
    store_url: str, release: Importer
) -> None:
    """A helper under functools.cache was counted by its name only: a release changing
    its body read the old snapshot. Now the body counts, on every store."""
    events, projections = incident.open_stores(store_url)
    try:
        helper = "@functools.cache\ndef h(x):\n    return x * {}"
        body = "return state + h(event.n)"
        old = release(setup=helper.format(1), body=body)
        writer = incident.CommandHandler(
            events, projections, aggregates=[old.agg], snapshot_every=2
        )
        for _ in range(2):
            writer.dispatch(Add(aggregate_id="K", n=1))
        new = release(setup=helper.format(10), body=body)
        reader = incident.CommandHandler(
            events, projections, aggregates=[new.agg], snapshot_every=2
        )
        assert reader.state("keyed", "K") == new.agg.fold(events.get("K")) == 20
    finally:
        events.close()


EVERYTHING = """
import dataclasses, enum, functools, typing
import msgspec
import incident


class Scored(incident.Event, tag="keyed.Scored"):
    n: int


class Kind(enum.Enum):
    A = "a"


@dataclasses.dataclass(frozen=True)
class Settings:
    rate: int = 2
    kinds: frozenset[str] = frozenset({"x", "y", "z"})
    tags: list[str] = dataclasses.field(default_factory=lambda: ["t"])


class State(msgspec.Struct, frozen=True):
    total: int = 0
    kind: Kind = Kind.A
    seen: frozenset[str] = frozenset({"p", "q", "r"})
    settings: Settings = Settings()


SETTINGS = Settings()
TABLE = {"a": (1, 2), "b": {3, 4, 5}}
SCALERS = frozenset({len, abs, Settings})  # not plain: hashed in an order of its own


@functools.cache
def rate(x: int) -> int:
    return x * SETTINGS.rate + len(TABLE) + len(SCALERS)


class Scaler:
    def __call__(self, x: int) -> int:
        return x


scale = Scaler()


@functools.singledispatch
def weigh(x: object) -> int:
    'Any other thing weighs nothing.'
    return 0


@weigh.register
def _(x: int) -> int:
    return x


board = incident.Aggregate("everything", initial=State())


@board.apply
def scored(state: State, event: Scored) -> State:
    from json import dumps  # an import in the function
    import keyed_helper
    return msgspec.structs.replace(
        state, total=state.total + keyed_helper.bonus(rate(scale(weigh(event.n)))) + len(dumps(1))
    )
"""

PRINT_KEY = """
import sys
sys.path.insert(0, sys.argv[1])
import keyed_everything
from incident.snapshots import code_key
print(code_key(keyed_everything.board))
"""


def test_the_key_of_everything_it_follows_is_the_same_in_every_process(tmp_path: Path) -> None:
    """Dataclass instances and their generated methods, Structs, sets of strings, a
    cached helper, a singledispatch helper, a callable object and a module imported
    inside the apply function:
    processes with other hash seeds compute the same key."""
    (tmp_path / "keyed_everything.py").write_text(EVERYTHING)
    (tmp_path / "keyed_helper.py").write_text("def bonus(x):\n    return x + 1\n")
    keys = set()
    for seed in ("0", "1", "4242"):
        done = subprocess.run(
            [sys.executable, "-c", PRINT_KEY, str(tmp_path)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        )
        keys.add(done.stdout.strip())
    assert len(keys) == 1 and len(next(iter(keys))) == 16


def exec_aggregate(source: str, namespace: dict[str, Any]) -> incident.Aggregate[Any]:
    namespace.update(incident=incident, Added=Added)
    exec(textwrap.dedent(source), namespace)
    aggregate: incident.Aggregate[Any] = namespace["agg"]
    return aggregate


def test_code_run_in_a_notebook_cell_is_followed() -> None:
    """Code exec'd under a module name that is no module (a notebook's cell) is the
    user's: its helper counts."""
    source = """
    def h(x):
        return x * RATE
    agg = incident.Aggregate("cell", initial=0)
    @agg.apply(Added)
    def added(state, event):
        return state + h(event.n)
    """
    first = code_key(exec_aggregate(source, {"__name__": "notebook_cell", "RATE": 1}))
    assert code_key(exec_aggregate(source, {"__name__": "notebook_cell", "RATE": 1})) == first
    assert code_key(exec_aggregate(source, {"__name__": "notebook_cell", "RATE": 2})) != first


@pytest.mark.parametrize("name", [None, "another_cell"])
def test_a_helper_from_another_cell_or_exec_is_followed(name: str | None) -> None:
    """A helper defined by other exec'd code (another notebook cell, or code exec'd
    with no module name at all) is the user's: its body counts."""

    def helper(body: str) -> Any:
        cell: dict[str, Any] = {} if name is None else {"__name__": name}
        exec(f"def h(x):\n    return {body}\n", cell)
        return cell["h"]

    source = """
    agg = incident.Aggregate("cell", initial=0)
    @agg.apply(Added)
    def added(state, event):
        return state + h(event.n)
    """
    keys = [
        code_key(exec_aggregate(source, {"__name__": "notebook_cell", "h": helper(body)}))
        for body in ("x", "x", "-x")
    ]
    assert keys[0] == keys[1] != keys[2]


def test_a_closure_not_assigned_yet_then_assigned() -> None:
    """A closure cell still empty when the key is computed counts as empty; once it
    holds a value, the value counts."""
    aggregate = incident.Aggregate("cell", initial=0)

    @aggregate.apply(Added)
    def added(state: int, event: Added) -> int:
        return state + later

    empty = code_key(aggregate)
    later = 1
    assigned = code_key(aggregate)
    later = 2
    assert len({empty, assigned, code_key(aggregate)}) == 3


def test_library_code_counts_by_name() -> None:
    """A library function or class (the standard library's, here) counts by its name:
    using another one changes the key, the same one twice does not."""
    source = """
    import math, decimal
    agg = incident.Aggregate("lib", initial=0)
    @agg.apply(Added)
    def added(state, event):
        return state + int(math.{function}(event.n)) + int(decimal.{klass}(1)) + len(str(sorted))
    """
    keys = [
        code_key(exec_aggregate(source.format(function=function, klass=klass), {}))
        for function, klass in [("floor", "Decimal"), ("floor", "Decimal"), ("ceil", "Decimal")]
    ]
    assert keys[0] == keys[1] != keys[2]
