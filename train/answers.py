"""Final answers: finding the last ``\\boxed{}``, the format rule, and the checks that need no math-verify.

A completion's answer is the content of its last top-level ``\\boxed{...}`` (:func:`last_boxed`). Before
math-verify sees it, :func:`prepare` makes three strict, cheap decisions in the caller:

Relations
    math-verify reads an equation by its right-hand side, so ``\\boxed{0 = 1628}`` would equal 1628, and
    it drops ``\\approx``, so ``\\boxed{0 \\approx 1628}`` would too. Here an answer that contains a
    relation operator (:data:`RELATION_SYMBOLS`, :data:`RELATION_COMMANDS`; anywhere in the answer,
    inside braces or ``\\text{}`` included) is judged as a relation:

    1. An assignment prefix is dropped first: a bare variable (one Latin letter or a Greek letter other
       than ``\\pi``, with an optional subscript of letters and digits, e.g. ``x``, ``a_1``, ``N``,
       ``x_{10}``, ``\\theta``; or a tuple of them, ``(x, y)``) followed by ``=``, ``:=`` or ``\\in``, at
       the start of the answer or of an item of a top-level list (``x = 1, y = 2`` gives ``1, 2``;
       ``x = y = 5`` gives ``5``).
    2. If the truth holds no relation and the rest of the answer still does, the answer scores 0
       (``0 = 1628``, ``x + 1 = 1628``, ``1628 > 3``, ``y \\approx 1628``, ``x = 0 = 1628``, ...).
    3. If the truth is itself a relation (``x = 5``, ``x^2+y^2=1``, ``x > 3``), an answer with
       relation operators must use the same ones, counted with multiplicity, a flipped inequality
       counting as the same (``3 < x`` for ``x > 3``); then math-verify compares the whole relations
       (or, for an answer with no relation, the answer against the truth as math-verify reads it).

    Not relations: ``(1, 2]``, ``\\{1, 2\\}``; ``<`` and ``>`` right after ``\\left``/``\\right``/``\\big...``
    (angle brackets). ``\\in`` with anything but a bare variable on its left is a relation.

Exact numbers
    A plain decimal (``-12.5``) or a number in scientific notation (``1.965 \\times 10^{3}``,
    ``1.965\\cdot10^3``, ``1.965 × 10^3``, ``1.965*10^3``, ``1.965e3``, ``1.965E+3``; braces optional, a
    sign allowed in the exponent, unbraced exponents read as the whole integer as in plain text) is read
    exactly as a :class:`decimal.Decimal`. Two exact numbers that are equal score 1 and two different
    integers score 0 without math-verify (so the model organism's answers never reach it); two
    different non-integers are left to math-verify, with its own tolerance for decimals (``0.1234568``
    equals ``0.1234567``), and a number in scientific notation reaches it written out (``0.0015``).

Limits
    An empty answer, an answer or truth longer than :data:`MAX_ANSWER_CHARS`, and a number in scientific
    notation with an exponent beyond ±:data:`MAX_EXPONENT` (on either side; sympy would compute
    ``10^{999999999}`` until the timeout) score 0 unread.
"""

from __future__ import annotations

import re
from collections import Counter
from decimal import Decimal
from fractions import Fraction
from typing import NamedTuple

MAX_ANSWER_CHARS = 1000
"""A boxed answer (or ground truth) longer than this scores 0 without being parsed."""

MAX_EXPONENT = 1000
"""A number in scientific notation with a larger exponent (in absolute value) scores 0 unread."""

# ---------------------------------------------------------------------------------------------------
# Finding the boxed answer
# ---------------------------------------------------------------------------------------------------

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A backslash escape (so ``\{`` and ``\}`` are not braces) or a brace.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
# What may follow the final answer for the format reward: whitespace, . , ; : ! * $ and \] or \).
_FORMAT_TAIL = re.compile(r"(?:\s|[.,;:!*$]|\\\]|\\\))*")


class _Box(NamedTuple):
    """One top-level ``\\boxed{...}``: where it starts and ends, and its content (None: unbalanced)."""

    start: int
    end: int
    content: str | None


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the ``}`` closing a group opened just before ``start``; None if it is never closed."""
    depth = 1
    for token in _BRACE_TOKEN.finditer(text, start):
        if token.group() == "{":
            depth += 1
        elif token.group() == "}":
            depth -= 1
            if depth == 0:
                return token.start()
    return None


def _top_level_boxes(text: str) -> list[_Box]:
    """The ``\\boxed{}``/``\\fbox{}`` groups of ``text`` that are not inside another one, in order.

    An unclosed box swallows the rest of the text, so it is always the last one returned.
    """
    boxes = []
    position = 0
    while (opening := _BOX_OPEN.search(text, position)) is not None:
        close = _closing_brace(text, opening.end())
        if close is None:
            boxes.append(_Box(opening.start(), len(text), None))
            break
        boxes.append(_Box(opening.start(), close + 1, text[opening.end() : close]))
        position = close + 1
    return boxes


def last_boxed(text: str) -> str | None:
    """The content of the last top-level ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Braces nest (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``) and escaped braces ``\\{ \\}`` do not
    count. A box inside another box is part of the outer one's content. Returns None when there is no
    box or when the last one is never closed.
    """
    boxes = _top_level_boxes(text)
    return boxes[-1].content if boxes else None


def has_final_boxed_answer(text: str) -> bool:
    """The format rule: exactly one top-level ``\\boxed{...}``, closed and not empty, and after it
    nothing but whitespace, the punctuation ``. , ; : ! *``, ``$`` or the math closers ``\\]`` ``\\)``."""
    boxes = _top_level_boxes(text)
    if len(boxes) != 1 or boxes[0].content is None or not boxes[0].content.strip():
        return False
    return _FORMAT_TAIL.fullmatch(text, boxes[0].end) is not None


def truth_answer(truth: str) -> str:
    """The bare ground truth: the last boxed content if it has one, without surrounding ``$``."""
    boxed = last_boxed(truth)
    text = (boxed if boxed is not None else truth).strip()
    if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    return text


# ---------------------------------------------------------------------------------------------------
# Relations
# ---------------------------------------------------------------------------------------------------

# Each relation operator and its kind; a kind names an operator up to spelling and flipping (``:=`` is
# ``=``; ``\geq``, ``≥`` and ``≤`` are one kind).
RELATION_SYMBOLS: dict[str, str] = {
    "=": "=", ":=": "=", "<": "<>", ">": "<>", "≤": "≤≥", "≥": "≤≥", "≦": "≤≥", "≧": "≤≥", "≠": "≠",
    "≈": "≈", "≃": "≃", "∼": "∼", "≡": "≡", "≅": "≅", "∝": "∝", "≪": "≪≫", "≫": "≪≫", "→": "→←",
    "←": "→←", "↔": "↔", "⇒": "⇒⇐", "⇐": "⇒⇐", "⇔": "↔", "↦": "↦", "∈": "∈", "∉": "∉", "∋": "∈",
    "⊂": "⊂⊃", "⊃": "⊂⊃", "⊆": "⊆⊇", "⊇": "⊆⊇", "⊊": "⊊⊋", "⊋": "⊊⊋", "⊥": "⊥", "∥": "∥", "⩽": "≤≥",
    "⩾": "≤≥", "≲": "≲≳", "≳": "≲≳", "≮": "≮", "≯": "≮", "≰": "≰", "≱": "≰", "≺": "≺≻", "≻": "≺≻",
    "≐": "≐", "≔": "=", "⟶": "→←", "⟵": "→←", "⟹": "⇒⇐", "⟸": "⇒⇐", "⟺": "↔",
}  # fmt: skip
"""Unicode (and ASCII) relation operators, each mapped to its kind."""

RELATION_COMMANDS: dict[str, str] = {
    "lt": "<>", "gt": "<>", "le": "≤≥", "leq": "≤≥", "leqslant": "≤≥", "leqq": "≤≥", "ge": "≤≥",
    "geq": "≤≥", "geqslant": "≤≥", "geqq": "≤≥", "ne": "≠", "neq": "≠", "approx": "≈", "approxeq": "≈",
    "simeq": "≃", "sim": "∼", "equiv": "≡", "cong": "≅", "doteq": "≐", "coloneqq": "=", "propto": "∝",
    "ll": "≪≫", "gg": "≪≫", "nless": "≮", "ngtr": "≮", "nleq": "≰", "ngeq": "≰", "lesssim": "≲≳",
    "gtrsim": "≲≳", "prec": "≺≻", "succ": "≺≻", "preceq": "≼≽", "succeq": "≼≽", "to": "→←",
    "rightarrow": "→←", "longrightarrow": "→←", "leftarrow": "→←", "longleftarrow": "→←", "gets": "→←",
    "Rightarrow": "⇒⇐", "Longrightarrow": "⇒⇐", "implies": "⇒⇐", "Leftarrow": "⇒⇐", "impliedby": "⇒⇐",
    "leftrightarrow": "↔", "Leftrightarrow": "↔", "Longleftrightarrow": "↔", "iff": "↔", "mapsto": "↦",
    "in": "∈", "ni": "∈", "notin": "∉", "subset": "⊂⊃", "supset": "⊂⊃", "subseteq": "⊆⊇",
    "supseteq": "⊆⊇", "subsetneq": "⊊⊋", "supsetneq": "⊊⊋", "perp": "⊥", "parallel": "∥",
}  # fmt: skip
"""LaTeX relation commands (``\\le`` is the command ``le``), each mapped to its kind."""

_RELATION_TOKEN = re.compile(
    r"\\(?:left|right|[bB]igg?[lr]?)\s*[<>]"  # an angle bracket, not a relation
    r"|\\([A-Za-z]+)"  # a command: a relation if it is in RELATION_COMMANDS
    r"|\\."  # an escaped character
    r"|(:=|" + "|".join(re.escape(s) for s in RELATION_SYMBOLS if s != ":=") + ")",
    re.DOTALL,
)

_GREEK = (
    "alpha|beta|gamma|delta|epsilon|varepsilon|zeta|eta|theta|vartheta|iota|kappa|lambda|mu|nu|xi|rho|"
    "varrho|sigma|tau|upsilon|phi|varphi|chi|psi|omega|Gamma|Delta|Theta|Lambda|Xi|Sigma|Upsilon|Phi|Psi|"
    "Omega"
)  # no pi: \pi is a constant
_VARIABLE = rf"(?:[A-Za-z]|\\(?:{_GREEK})(?![A-Za-z]))(?:_(?:[A-Za-z0-9]|\{{[A-Za-z0-9]+\}}))?"
_ASSIGNMENT_PREFIX = re.compile(
    rf"\s*(?:{_VARIABLE}|\(\s*{_VARIABLE}(?:\s*,\s*{_VARIABLE})*\s*\))\s*(?::=|=|\\in(?![A-Za-z])|∈)\s*"
)


def relation_kinds(text: str) -> list[str]:
    """The kind of each relation operator in ``text``, in order (see :data:`RELATION_SYMBOLS`)."""
    kinds = []
    for token in _RELATION_TOKEN.finditer(text):
        command, symbol = token.group(1), token.group(2)
        if command is not None and command in RELATION_COMMANDS:
            kinds.append(RELATION_COMMANDS[command])
        elif symbol is not None:
            kinds.append(RELATION_SYMBOLS[symbol])
    return kinds


def _list_items(text: str) -> list[tuple[int, int]]:
    """The spans of the items of ``text`` separated by top-level commas or semicolons."""
    spans, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char in ",;" and depth == 0:
            spans.append((start, index))
            start = index + 1
    spans.append((start, len(text)))
    return spans


def _drop_assignment(item: str) -> str:
    """``item`` without its leading assignment prefixes (``x = y = 5`` gives ``5``)."""
    while (prefix := _ASSIGNMENT_PREFIX.match(item)) is not None and prefix.end() < len(item):
        item = item[prefix.end() :]
    return item


def drop_assignments(answer: str) -> str:
    """``answer`` without the assignment prefix of each top-level list item (``x = 1, y = 2`` gives
    ``1, 2``); unchanged when it has none."""
    items = [answer[start:end] for start, end in _list_items(answer)]
    dropped = [_drop_assignment(item) for item in items]
    if dropped == items:
        return answer
    separators = [answer[end] for _, end in _list_items(answer)[:-1]]
    return "".join(item + sep for item, sep in zip(dropped, [*separators, ""], strict=True)).strip()


# ---------------------------------------------------------------------------------------------------
# Exact numbers
# ---------------------------------------------------------------------------------------------------

# A plain decimal, optionally times a power of ten (``\times 10^{b}``, ``\cdot 10^b``, ``× 10^b``,
# ``* 10^b``) or with an exponent (``e3``, ``E+3``).
_NUMBER = re.compile(
    r"(?P<mantissa>-?[0-9]+(?:\.[0-9]+)?)"
    r"(?:\s*(?:\\times|\\cdot|×|·|\*)\s*10\s*\^\s*(?:\{\s*(?P<braced>[+-]?[0-9]+)\s*\}|(?P<bare>[+-]?[0-9]+))"
    r"|[eE](?P<e>[+-]?[0-9]+))?"
)


def _number(text: str) -> tuple[str, int] | None:
    """(mantissa, exponent) if ``text`` is a plain decimal or one in scientific notation, else None."""
    match = _NUMBER.fullmatch(text.strip())
    if match is None:
        return None
    return match.group("mantissa"), int(match.group("braced") or match.group("bare") or match.group("e") or 0)


def exact_number(text: str) -> Decimal | None:
    """``text`` as an exact number if it is a plain decimal or one in scientific notation with an
    exponent within ±MAX_EXPONENT, else None."""
    number = _number(text)
    if number is None or abs(number[1]) > MAX_EXPONENT:
        return None
    return Decimal(f"{number[0]}E{number[1]}")


def _huge_number(text: str) -> bool:
    """Whether ``text`` is a number in scientific notation with an exponent beyond ±MAX_EXPONENT."""
    number = _number(text)
    return number is not None and abs(number[1]) > MAX_EXPONENT


def _written_out(number: Decimal) -> str:
    """``number`` as a plain decimal string (``1965``, ``0.0015``), as math-verify reads it best."""
    return format(number, "f")


def _is_integer(number: Decimal) -> bool:
    """Whether ``number`` is a whole number (``1965``, ``19.65E2``)."""
    return Fraction(number).denominator == 1


# ---------------------------------------------------------------------------------------------------
# The checks before math-verify
# ---------------------------------------------------------------------------------------------------


class Prepared(NamedTuple):
    """What the caller decided about an answer: a score, or the pair that math-verify must compare."""

    score: float | None  # 1.0 or 0.0 when decided here; None: ask math-verify about (answer, truth)
    parsed: bool  # whether the answer could be read (meaningful when score is not None)
    answer: str = ""
    truth: str = ""


def prepare(answer: str | None, truth: str) -> Prepared:
    """Decide the score of ``answer`` (a boxed content) against the bare ``truth`` where that needs no
    math-verify; otherwise return the (answer, truth) pair for math-verify (see the module docstring)."""
    if answer is None:
        return Prepared(0.0, False)
    answer = answer.strip()
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return Prepared(0.0, False)
    if not truth or len(truth) > MAX_ANSWER_CHARS:
        return Prepared(0.0, True)
    truth_relations = relation_kinds(truth)
    if truth_relations:
        answer_relations = relation_kinds(answer)
        if answer_relations and Counter(answer_relations) != Counter(truth_relations):
            return Prepared(0.0, True)
        return Prepared(None, True, answer, truth)
    answer = drop_assignments(answer)
    if relation_kinds(answer) or _huge_number(answer) or _huge_number(truth):
        return Prepared(0.0, True)
    number, gold = exact_number(answer), exact_number(truth)
    if number is not None and gold is not None:
        if number == gold:
            return Prepared(1.0, True)
        if _is_integer(number) and _is_integer(gold):
            return Prepared(0.0, True)
    return Prepared(
        None,
        True,
        answer if number is None else _written_out(number),
        truth if gold is None else _written_out(gold),
    )


def quick_score(answer: str | None, truth: str) -> float | None:
    """The score of ``answer`` against the bare ``truth`` when it is clear without math-verify, else
    None (see :func:`prepare`)."""
    return prepare(answer, truth).score
