"""Search filters evaluated in this process, over a snapshot's in-memory columns.

A filter is the SQL predicate users write (standard SQL, double-quoted identifiers; see
:func:`caselens.indexes.collection.lance_filter`). :func:`parse` reads the part of SQL that
filters use -- comparisons (``= <> != < <= > >=``) of a column with a literal, ``[NOT] IN``,
``IS [NOT] NULL``, ``[NOT] LIKE``/``ILIKE``, ``[NOT] BETWEEN``, ``AND``/``OR``/``NOT`` and
parentheses -- into a small tree; :func:`evaluate` computes it over one block of rows with SQL's
three-valued logic, the way Lance (DataFusion) computes it: NaN sorts above every number
(``x > 1`` holds for it) and equals no literal, -0.0 equals 0.0, strings compare byte by byte, ``x IN (..., NULL)`` is unknown rather than false for the other values, a number
compared with a string or a fractional literal with an integer column is an error. Anything
else (functions, arithmetic, casts, a column compared with a column, a column of another type,
an unknown column) raises :class:`Unsupported`, and the caller hands the predicate to the Lance
scan, which reads all of SQL and reports errors in its own words: the evaluator never answers
differently from the scan, it only declines.

Evaluation gives two boolean masks, *true* and *false* (a row in neither is unknown), so that
``NOT`` and ``OR`` of unknowns come out as in SQL; a row is selected when its predicate is true.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class Unsupported(ValueError):
    """The predicate uses SQL that :func:`evaluate` does not compute (the Lance scan does)."""


# ------------------------------------------------------------------ the tree
@dataclass(frozen=True)
class Column:
    name: str
    quoted: bool  # written in double quotes or backticks: the name is exact


@dataclass(frozen=True)
class Literal:
    value: Any  # str, int, float, bool or None (NULL)


@dataclass(frozen=True)
class Compare:
    column: Column
    op: str  # = <> < <= > >=
    value: Literal


@dataclass(frozen=True)
class InList:
    column: Column
    values: tuple[Literal, ...]
    negated: bool


@dataclass(frozen=True)
class IsNull:
    column: Column
    negated: bool


@dataclass(frozen=True)
class Like:
    column: Column
    pattern: str
    negated: bool
    ignore_case: bool


@dataclass(frozen=True)
class Const:
    value: bool


@dataclass(frozen=True)
class Not:
    part: "Node"


@dataclass(frozen=True)
class And:
    parts: tuple["Node", ...]


@dataclass(frozen=True)
class Or:
    parts: tuple["Node", ...]


Node = Union[Compare, InList, IsNull, Like, Const, Not, And, Or]
FLIP = {"=": "=", "<>": "<>", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


# ------------------------------------------------------------------- parsing
_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>'(?:[^']|'')*')
  | (?P<qid>"(?:[^"]|"")*")
  | (?P<bid>`(?:[^`]|``)*`)
  | (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><>|!=|<=|>=|=|<|>|\(|\)|,|-|\+)
""", re.VERBOSE)
KEYWORDS = frozenset(("and", "or", "not", "in", "is", "null", "like", "ilike", "between", "true", "false"))


def _tokens(text: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise Unsupported(f"cannot read {text[pos:pos + 10]!r}")
        pos = m.end()
        kind = m.lastgroup
        tok = m.group()
        if kind == "ws":
            continue
        if kind == "str":
            out.append(("lit", tok[1:-1].replace("''", "'")))
        elif kind == "qid":
            out.append(("col", Column(tok[1:-1].replace('""', '"'), True)))
        elif kind == "bid":
            out.append(("col", Column(tok[1:-1].replace("``", "`"), True)))
        elif kind == "num":
            if any(c in tok for c in ".eE"):
                out.append(("lit", float(tok)))
            else:
                out.append(("lit", int(tok)))
        elif kind == "word":
            low = tok.lower()
            if low in KEYWORDS:
                out.append(("kw", low))
            else:
                out.append(("col", Column(tok, False)))
        else:
            out.append(("op", "<>" if tok == "!=" else tok))
    return out


class _Parser:
    def __init__(self, text: str):
        self.toks = _tokens(text)
        self.i = 0

    def peek(self, offset: int = 0) -> tuple[str, Any]:
        j = self.i + offset
        return self.toks[j] if j < len(self.toks) else ("end", None)

    def take(self) -> tuple[str, Any]:
        tok = self.peek()
        self.i += 1
        return tok

    def accept(self, kind: str, value: Any = None) -> bool:
        k, v = self.peek()
        if k == kind and (value is None or v == value):
            self.i += 1
            return True
        return False

    def expect(self, kind: str, value: Any = None) -> Any:
        k, v = self.take()
        if k != kind or (value is not None and v != value):
            raise Unsupported(f"expected {value or kind}, found {v!r}")
        return v

    def parse(self) -> Node:
        node = self.disjunction()
        if self.peek()[0] != "end":
            raise Unsupported(f"unexpected {self.peek()[1]!r}")
        return node

    def disjunction(self) -> Node:
        parts = [self.conjunction()]
        while self.accept("kw", "or"):
            parts.append(self.conjunction())
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def conjunction(self) -> Node:
        parts = [self.negation()]
        while self.accept("kw", "and"):
            parts.append(self.negation())
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def negation(self) -> Node:
        if self.accept("kw", "not"):
            return Not(self.negation())
        return self.predicate()

    def literal(self) -> Literal:
        sign = None
        if self.peek() == ("op", "-"):  # (Lance has no unary plus)
            sign = self.take()[1]
        kind, value = self.take()
        if kind == "kw" and value in ("null", "true", "false") and sign is None:
            return Literal({"null": None, "true": True, "false": False}[value])
        if kind != "lit" or (sign is not None and isinstance(value, str)):
            raise Unsupported(f"expected a literal, found {value!r}")
        return Literal(-value if sign == "-" else value)

    def predicate(self) -> Node:
        kind, value = self.peek()
        if kind == "op" and value == "(":
            self.take()
            node = self.disjunction()
            self.expect("op", ")")
            return node
        if kind == "kw" and value in ("true", "false") and self._ends_predicate(1):
            self.take()
            return Const(value == "true")
        if kind == "col":
            self.take()
            return self.tail(value)
        left = self.literal()  # a literal first: "5 < x"
        op = self.take()
        if op[0] != "op" or op[1] not in FLIP:
            raise Unsupported("a literal must be compared with a column")
        column = self.expect("col")
        return Compare(column, FLIP[op[1]], left)

    def _ends_predicate(self, offset: int) -> bool:
        kind, value = self.peek(offset)
        return kind == "end" or (kind == "kw" and value in ("and", "or")) or (kind, value) == ("op", ")")

    def tail(self, column: Column) -> Node:
        kind, value = self.peek()
        if kind == "op" and value in FLIP:
            self.take()
            if self.peek()[0] == "col":
                raise Unsupported("a column compared with a column")
            return Compare(column, value, self.literal())
        if self.accept("kw", "is"):
            negated = self.accept("kw", "not")
            self.expect("kw", "null")
            return IsNull(column, negated)
        negated = self.accept("kw", "not")
        if self.accept("kw", "in"):
            self.expect("op", "(")
            values = [self.literal()]
            while self.accept("op", ","):
                values.append(self.literal())
            self.expect("op", ")")
            return InList(column, tuple(values), negated)
        for word in ("like", "ilike"):
            if self.accept("kw", word):
                pattern = self.literal().value
                if not isinstance(pattern, str):
                    raise Unsupported("LIKE takes a string pattern")
                if self.peek() == ("col", Column("escape", False)) or str(self.peek()[1]).lower() == "escape":
                    raise Unsupported("LIKE ... ESCAPE")
                return Like(column, pattern, negated, word == "ilike")
        if self.accept("kw", "between"):
            low = self.literal()
            self.expect("kw", "and")
            high = self.literal()
            node = And((Compare(column, ">=", low), Compare(column, "<=", high)))
            return Not(node) if negated else node
        if not negated and self._ends_predicate(0):  # a boolean column on its own
            return Compare(column, "=", Literal(True))
        raise Unsupported(f"cannot read the condition on {column.name!r}")


def parse(predicate: str) -> Node:
    """The tree of ``predicate`` (:class:`Unsupported` for SQL outside what :func:`evaluate` computes)."""
    return _Parser(predicate).parse()


def conjuncts(node: Node) -> tuple[Node, ...]:
    """The parts of a top-level ``AND`` (the node itself otherwise): a row is selected when each is
    true, so each can be evaluated, and kept, on its own."""
    return node.parts if isinstance(node, And) else (node,)


def columns_of(node: Node) -> set[str]:
    """Names of the columns ``node`` reads, as written."""
    if isinstance(node, (And, Or)):
        return set().union(*(columns_of(p) for p in node.parts))
    if isinstance(node, Not):
        return columns_of(node.part)
    if isinstance(node, Const):
        return set()
    return {node.column.name}


# ---------------------------------------------------------------- evaluation
class Block(Protocol):
    """Rows to evaluate a predicate over: their number and their columns."""

    num_rows: int

    def filter_column(self, name: str) -> "FilterColumn | None":
        """The column ``name`` prepared for filtering, None when there is no such column."""


# (true, false) row masks; neither: unknown. The false mask is computed only when asked for (NOT
# needs it; a term of a top-level AND does not), so it comes as a function.
Masks = tuple[np.ndarray, Callable[[], np.ndarray]]


_CMP: dict[str, Callable[[Any, Any], Any]] = {"=": np.equal, "<>": np.not_equal, "<": np.less, "<=": np.less_equal,
                                              ">": np.greater, ">=": np.greater_equal}
LOOKUP_ABOVE = 256  # dictionaries longer than this are searched for = and IN through a lookup, not compared
_PC_CMP = {"=": pc.equal, "<>": pc.not_equal, "<": pc.less, "<=": pc.less_equal, ">": pc.greater,
           ">=": pc.greater_equal}


class FilterColumn:
    """One column of a block, in the form filters read it.

    Numbers: a numpy array and the valid rows. Strings: dictionary codes (one slot past the
    dictionary for nulls) and the dictionary, or the Arrow array itself for columns with many
    distinct values. Booleans: values and valid rows.
    """

    def __init__(self, array: pa.Array):
        kind = array.type
        n = len(array)
        self.n = n
        self.valid = None if array.null_count == 0 else \
            np.asarray(pc.is_valid(array).to_numpy(zero_copy_only=False), bool)
        self.codes: np.ndarray | None = None
        self.dictionary: pa.Array | None = None
        self.strings: pa.Array | None = None
        self.values: np.ndarray | None = None
        self.nan: np.ndarray | None = None  # float columns holding NaN: where
        self._codes_of: list[dict[str, int] | None] = [None]
        if pa.types.is_dictionary(kind) and (pa.types.is_string(kind.value_type) or
                                             pa.types.is_large_string(kind.value_type)):
            self.kind = "string"
            codes = array.indices.fill_null(0).to_numpy(zero_copy_only=False)
            dictionary = array.dictionary
            self.dictionary = dictionary
            null_code = len(dictionary)
            self.codes = np.where(self.valid, codes, null_code).astype(np.int32) if self.valid is not None \
                else codes.astype(np.int32, copy=False)
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            self.kind = "string"
            self.strings = array
        elif pa.types.is_floating(kind):
            self.kind = "float"
            values = array.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
            if self.valid is not None:
                values = np.where(self.valid, values, 0.0)
            self.values = values
            nan = np.isnan(values)
            if nan.any():
                self.nan = nan
        elif pa.types.is_integer(kind):
            self.kind = "int"
            values = array.to_numpy(zero_copy_only=False) if self.valid is None else \
                array.fill_null(0).to_numpy(zero_copy_only=False)
            self.values = values.astype(np.int64, copy=False) if not pa.types.is_uint64(kind) else values
        elif pa.types.is_boolean(kind):
            self.kind = "bool"
            self.values = np.asarray(array.fill_null(False).to_numpy(zero_copy_only=False), bool)
        else:
            raise Unsupported(f"columns of type {kind} are read by the Lance scan")

    def subset(self, positions: np.ndarray) -> "FilterColumn":
        """This column at ``positions`` only (for evaluating a filter over a few rows)."""
        part = object.__new__(FilterColumn)
        part.__dict__.update(self.__dict__)
        part.n = len(positions)
        take = (lambda a: None if a is None else a[positions])
        part.valid, part.codes, part.values, part.nan = take(self.valid), take(self.codes), take(self.values), \
            take(self.nan)
        if self.strings is not None:
            part.strings = self.strings.take(pa.array(positions))
        return part

    # --- helpers
    def _code_of(self, value: str) -> int | None:
        """The dictionary code of ``value`` (None: not in the dictionary); the lookup is made once."""
        if self._codes_of[0] is None:  # (a list: shared with subsets of this column)
            self._codes_of[0] = {v: i for i, v in enumerate(self.dictionary.to_pylist())}
        return self._codes_of[0].get(value)

    def _masks(self, true: np.ndarray) -> Masks:
        """(true, false) from a comparison that holds for ``true`` among the valid rows."""
        valid = self.valid
        if valid is None:
            return true, lambda: ~true
        return true & valid, lambda: ~true & valid

    def _dict_masks(self, true_d: np.ndarray) -> Masks:
        """(true, false) of rows from a boolean per dictionary entry (nulls: neither)."""
        codes, valid = self.codes, self.valid
        hits = np.flatnonzero(true_d)
        misses = len(true_d) - len(hits)
        if len(hits) == 0:
            true = np.zeros(self.n, bool)
        elif len(hits) == 1:  # one value (=): one comparison of the codes
            true = codes == hits[0]
        elif misses == 0:
            true = np.ones(self.n, bool) if valid is None else valid.copy()
        elif misses == 1:  # all but one value (<>)
            true = codes != np.flatnonzero(~true_d)[0]
            if valid is not None:
                true &= valid
        else:
            table = np.zeros(len(true_d) + 1, bool)
            table[:-1] = true_d
            true = table[codes]
        return true, (lambda: ~true) if valid is None else (lambda: ~true & valid)

    def _string_masks(self, result: pa.Array) -> Masks:
        """(true, false) from a boolean Arrow array over the strings (null: unknown)."""
        true = np.asarray(result.fill_null(False).to_numpy(zero_copy_only=False), bool)
        return self._masks(true)

    def _number(self, literal: Literal) -> Any:
        value = literal.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Unsupported("a number column compared with a non-number")
        if self.kind == "int":
            if isinstance(value, float) or not -2**63 <= value < 2**63:
                raise Unsupported("an integer column compared with a fraction")
            return value
        if isinstance(value, int) and abs(value) > 2**53:
            raise Unsupported("an integer literal beyond float precision")
        return float(value)

    # --- the predicates
    def compare(self, op: str, literal: Literal) -> Masks:
        if literal.value is None:
            raise Unsupported("a comparison with NULL")
        if self.kind == "string":
            if not isinstance(literal.value, str):
                raise Unsupported("a string column compared with a non-string")
            if self.codes is not None and op in ("=", "<>") and len(self.dictionary) > LOOKUP_ABOVE:
                true_d = np.zeros(len(self.dictionary), bool)  # (many values: look the one up)
                code = self._code_of(literal.value)
                if code is not None:
                    true_d[code] = True
                return self._dict_masks(true_d if op == "=" else ~true_d)
            if self.codes is not None:
                return self._dict_masks(np.asarray(_PC_CMP[op](self.dictionary, literal.value)
                                                   .to_numpy(zero_copy_only=False), bool))
            return self._string_masks(_PC_CMP[op](self.strings, literal.value))
        if self.kind == "bool":
            if not isinstance(literal.value, bool):
                raise Unsupported("a boolean column compared with a non-boolean")
            return self._masks(_CMP[op](self.values, literal.value))
        value = self._number(literal)
        true = _CMP[op](self.values, value)
        if self.nan is not None and op in (">", ">="):  # NaN sorts above every number (Arrow)
            true |= self.nan
        return self._masks(true)

    def isin(self, literals: tuple[Literal, ...], negated: bool) -> Masks:
        has_null = any(v.value is None for v in literals)
        present = [v for v in literals if v.value is not None]
        if self.kind == "string":
            if not all(isinstance(v.value, str) for v in present):
                raise Unsupported("a string column compared with a non-string")
            values = pa.array([v.value for v in present], pa.string())
            if self.codes is not None and len(self.dictionary) > LOOKUP_ABOVE:
                member = np.zeros(len(self.dictionary), bool)
                member[[c for c in map(self._code_of, (v.value for v in present)) if c is not None]] = True
                true, _ = self._dict_masks(member)
            elif self.codes is not None:
                member = np.asarray(pc.is_in(self.dictionary, value_set=values).to_numpy(zero_copy_only=False), bool)
                true, _ = self._dict_masks(member)
            elif len(present) <= 8:
                true = np.zeros(self.n, bool)
                for v in present:
                    true |= np.asarray(pc.equal(self.strings, v.value).fill_null(False)
                                       .to_numpy(zero_copy_only=False), bool)
            else:
                true = np.asarray(pc.is_in(self.strings, value_set=values).fill_null(False)
                                  .to_numpy(zero_copy_only=False), bool)
        elif self.kind == "bool":
            if not all(isinstance(v.value, bool) for v in present):
                raise Unsupported("a boolean column compared with a non-boolean")
            true = np.isin(self.values, [v.value for v in present])
        else:
            numbers = [self._number(v) for v in present]
            true = np.isin(self.values, np.asarray(numbers)) if numbers else np.zeros(self.n, bool)
        if self.valid is not None:
            true &= self.valid
        # x IN (a, NULL): true where x is a, unknown elsewhere; NOT IN swaps true and false
        valid = self.valid
        if has_null:
            false: Callable[[], np.ndarray] = lambda: np.zeros(self.n, bool)  # noqa: E731
        else:
            false = (lambda: ~true) if valid is None else (lambda: ~true & valid)
        return (false(), lambda: true) if negated else (true, false)

    def isnull(self, negated: bool) -> Masks:
        null = np.zeros(self.n, bool) if self.valid is None else ~self.valid
        return (~null, lambda: null) if negated else (null, lambda: ~null)

    def like(self, pattern: str, negated: bool, ignore_case: bool) -> Masks:
        if self.kind != "string":
            raise Unsupported("LIKE on a column that is not a string")
        if self.codes is not None:
            member = pc.match_like(self.dictionary, pattern, ignore_case=ignore_case)
            true, false = self._dict_masks(np.asarray(member.to_numpy(zero_copy_only=False), bool))
        else:
            true, false = self._string_masks(pc.match_like(self.strings, pattern, ignore_case=ignore_case))
        return (false(), lambda: true) if negated else (true, false)


def evaluate(node: Node, block: Block) -> Masks:
    """(true mask, function giving the false mask) of ``node`` over the rows of ``block``
    (:class:`Unsupported` when a column is missing or of a type filters do not read here)."""
    if isinstance(node, (And, Or)):
        parts = [evaluate(part, block) for part in node.parts]
        true = parts[0][0]
        for t, _ in parts[1:]:
            true = (true & t) if isinstance(node, And) else (true | t)

        def false() -> np.ndarray:
            out = parts[0][1]()
            for _, f in parts[1:]:
                out = (out | f()) if isinstance(node, And) else (out & f())
            return out
        return true, false
    if isinstance(node, Not):
        true, false = evaluate(node.part, block)
        return false(), lambda: true
    if isinstance(node, Const):
        ones = np.ones(block.num_rows, bool)
        return (ones, lambda: ~ones) if node.value else (~ones, lambda: ones)
    column = block.filter_column(node.column.name) if node.column.quoted else \
        _unquoted(block, node.column.name)
    if column is None:
        raise Unsupported(f"no column {node.column.name!r} here")
    if isinstance(node, Compare):
        return column.compare(node.op, node.value)
    if isinstance(node, InList):
        return column.isin(node.values, node.negated)
    if isinstance(node, IsNull):
        return column.isnull(node.negated)
    if isinstance(node, Like):
        return column.like(node.pattern, node.negated, node.ignore_case)
    raise Unsupported(f"cannot evaluate {type(node).__name__}")


def _unquoted(block: Block, name: str) -> FilterColumn | None:
    column = block.filter_column(name)
    if column is None and name != name.lower():  # Lance reads unquoted names case-insensitively
        column = block.filter_column(name.lower())
    return column
