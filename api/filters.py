"""containerd's filter language: parse ``name==foo,labels."a.b"`` and match it against objects.

A *filter string* is an AND of selectors; several filter strings (repeated ``filters`` fields in a
request, several CLI arguments) are an OR. The empty string, and an empty list, match everything.

Grammar (the accepted language is exactly that of containerd's ``filters`` package)::

    filter     := "" | selector ("," selector)*
    selector   := fieldpath [operator value]
    fieldpath  := field ("." field)*
    field      := [A-Za-z0-9_]+ | dquoted
    operator   := "==" | "!=" | "~="
    value      := plain | dquoted | altquoted      (altquoted only after "~=")
    plain      := first  any character except white space and / | " . , = ! ~
                  then   letters, marks, numbers, punctuation, symbols; never ","
    dquoted    := '"' body '"'    a Go string literal: \\a \\b \\f \\n \\r \\t \\v \\\\ \\"
                                   \\xNN (one byte) \\NNN (octal byte) \\uNNNN \\UNNNNNNNN
    altquoted  := "/" body "/" | "|" body "|"    the same escapes, with \\/ or \\| in place of \\"

Lexical rules, inherited from containerd's scanner:

* White space (Go's ``unicode.IsSpace``) is skipped only before a field, an operator or a value.
  The look-ahead for ``,``, ``.`` and the end of input does not skip it, so ``a==b ,c``,
  ``a==b `` and ``a .b`` are errors while ``a == b, c`` is fine.
* An operator token is the longest run of ``= ! ~``: ``a===b`` is the operator ``===``.
* NUL, U+FFFD and lone surrogates (what Go sees as invalid UTF-8) are illegal anywhere.
* A ``\\`` inside quotes must start one of the escapes above, so a regex such as ``\\d`` must be
  written ``/\\\\d/`` or left unquoted (``~=\\d+``).

Semantics of one selector, given ``found = adaptor.field(fieldpath)`` (``None`` when absent):

* no operator: ``found is not None``
* ``==``: present and equal
* ``!=``: ``(found or "") != value`` -- true when absent unless the value is ``""``
* ``~=``: unanchored ``re.search`` on ``found or ""``; compiled once by ``parse`` with ``re.ASCII``
  (``\\d``, ``\\w``, ``\\s`` are ASCII-only, as in RE2), an invalid pattern is a parse error.

Errors are :class:`FilterParseError` (a ``ValueError``) worded as containerd words them, e.g.
``parse error: [name >|=|< foo]: unsupported operator "="``; positions count characters.
"""

from __future__ import annotations

import enum
import re
import string
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple, NoReturn, Protocol, runtime_checkable

__all__ = [
    "Adaptor",
    "DictAdaptor",
    "Filter",
    "FilterParseError",
    "FuncAdaptor",
    "Operator",
    "Selector",
    "adapt",
    "always",
    "parse",
    "parse_all",
    "quote",
    "unquote",
]


class FilterParseError(ValueError):
    """A filter string that does not parse; the daemon answers it with INVALID_ARGUMENT."""

    def __init__(self, expr: str, position: int, reason: str) -> None:
        self.expr = expr
        self.position = position
        self.reason = reason
        super().__init__(f"parse error: {_locate(expr, position)}: {reason}")

    def __reduce__(self) -> tuple[type[FilterParseError], tuple[str, int, str]]:
        return (type(self), (self.expr, self.position, self.reason))


def _locate(expr: str, position: int) -> str:
    # Same picture as containerd: the offending character between >| and |<.
    if position < len(expr):
        return f"[{expr[:position]} >|{expr[position]}|< {expr[position + 1 :]}]"
    return f"[{expr}]"


# --- matching -------------------------------------------------------------------------------


@runtime_checkable
class Adaptor(Protocol):
    """Exposes an object's fields to a filter: the value at a field path, or None if absent."""

    def field(self, path: tuple[str, ...]) -> str | None: ...


# The adaptors and the lexer's tokens are plain classes: every daemon start imports this module,
# and creating a dataclass costs ~0.5 ms of it each.
class FuncAdaptor:
    """An Adaptor backed by a function, like containerd's ``AdapterFunc``."""

    __slots__ = ("func",)

    def __init__(self, func: Callable[[tuple[str, ...]], str | None]) -> None:
        self.func = func

    def field(self, path: tuple[str, ...]) -> str | None:
        return self.func(path)


def adapt(func: Callable[[tuple[str, ...]], str | None]) -> Adaptor:
    """Wrap ``func(path) -> str | None`` as an Adaptor."""
    return FuncAdaptor(func)


class DictAdaptor:
    """Adapts nested mappings: ``("target", "digest")`` reads ``root["target"]["digest"]``.

    At every level the rest of the path joined with ``.`` is tried as one key first, which is how
    containerd looks labels up: ``labels.a.b`` and ``labels."a.b"`` both find the label ``"a.b"``.
    Only ``str`` leaves are values; a missing key, ``None`` or a mapping is absent. ``""`` is
    present, so where containerd's adaptor reports a field only when non-empty (image ``name``,
    container ``id``, plugin ``type``...) pass ``value or None``.
    """

    __slots__ = ("root",)

    def __init__(self, root: Mapping[str, object]) -> None:
        self.root = root

    def field(self, path: tuple[str, ...]) -> str | None:
        node: object = self.root
        for i, key in enumerate(path):
            if not isinstance(node, Mapping):
                return None
            joined = ".".join(path[i:])
            if i + 1 < len(path) and joined in node:
                node = node[joined]
                break
            node = node.get(key)
        return node if isinstance(node, str) else None


class Operator(enum.Enum):
    PRESENT = "?"
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


@dataclass(frozen=True, slots=True)
class Selector:
    """One ``fieldpath [op value]`` term; ``regex`` is set exactly when the operator is ``~=``."""

    fieldpath: tuple[str, ...]
    operator: Operator = Operator.PRESENT
    value: str = ""
    regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def match(self, adaptor: Adaptor) -> bool:
        found = adaptor.field(self.fieldpath)
        if self.operator is Operator.PRESENT:
            return found is not None
        if self.operator is Operator.EQUAL:
            return found == self.value
        # containerd compares an absent field as "", hence `!=""` is false for it.
        if self.operator is Operator.NOT_EQUAL:
            return (found or "") != self.value
        assert self.regex is not None
        return self.regex.search(found or "") is not None


@dataclass(frozen=True, slots=True)
class Filter:
    """An OR over ``alternatives``, each an AND of selectors; an empty AND matches everything."""

    alternatives: tuple[tuple[Selector, ...], ...]
    match_all: ClassVar[Filter]

    def match(self, adaptor: Adaptor) -> bool:
        return any(all(s.match(adaptor) for s in group) for group in self.alternatives)


always = Filter(((),))
Filter.match_all = always


# --- lexer ----------------------------------------------------------------------------------

_QUOTES = frozenset('"/|')
_SEPARATORS = frozenset(",.")
_OPERATOR_CHARS = frozenset("=!~")
_FIELD_CHARS = frozenset(string.ascii_letters + string.digits + "_")
_OCTAL = frozenset("01234567")
_HEX = frozenset(string.hexdigits)
# Go's unicode.IsSpace: ASCII/Latin-1 blanks plus the White_Space property (not Python's isspace,
# which also counts \x1c-\x1f).
_SPACES = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | frozenset(
    chr(c) for c in range(0x2000, 0x200B)
)
_SIMPLE_ESCAPES = frozenset("abfnrtv\\")
_HEX_ESCAPE_DIGITS = {"x": 2, "u": 4, "U": 8}


def _illegal(ch: str) -> str:
    """Why ``ch`` may not appear in a filter at all ('' if it may)."""
    if ch == "\0":
        return "unexpected null"
    # Go decodes U+FFFD and invalid UTF-8 alike as RuneError; a lone surrogate is our invalid UTF-8.
    if ch == "\ufffd" or "\ud800" <= ch <= "\udfff":
        return "rune error"
    return ""


def _is_value_char(ch: str) -> bool:
    # Go's IsLetter|IsDigit|IsNumber|IsGraphic|IsPunct minus IsSpace: categories L, M, N, P, S.
    return ch != "," and unicodedata.category(ch)[0] in "LMNPS" and not _illegal(ch)


class _Kind(enum.Enum):
    EOF = "EOF"
    QUOTED = "Quoted"
    VALUE = "Value"
    FIELD = "Field"
    SEPARATOR = "Separator"
    OPERATOR = "Operator"
    ILLEGAL = "Illegal"
    CHAR = "Char"  # any other single character; always a syntax error where it appears


class _Token(NamedTuple):
    kind: _Kind
    pos: int
    text: str
    error: str = ""


class _Lexer:
    """Cuts tokens on demand; the parser says when a value (not a field) may start."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.index = 0  # the next unread character

    def peek(self) -> str:
        """The next raw character, '' at the end; white space is *not* skipped."""
        return self.text[self.index] if self.index < len(self.text) else ""

    def scan(self, *, value: bool = False) -> _Token:
        text, start = self.text, self.index
        while start < len(text) and text[start] in _SPACES:
            start += 1
        if start == len(text):
            self.index = start
            return _Token(_Kind.EOF, start, "")
        ch = text[start]
        if reason := _illegal(ch):
            self.index = start + 1
            return _Token(_Kind.ILLEGAL, start, "", reason)
        if ch in _QUOTES:
            return self._quoted(start)
        end = start + 1
        # Order matters: quotes, separators and operator characters win over a value's first char.
        if ch in _SEPARATORS:
            kind = _Kind.SEPARATOR
        elif ch in _OPERATOR_CHARS:
            kind, end = _Kind.OPERATOR, self._run(end, _OPERATOR_CHARS.__contains__)
        elif value:
            kind, end = _Kind.VALUE, self._run(end, _is_value_char)
        elif ch in _FIELD_CHARS:
            kind, end = _Kind.FIELD, self._run(end, _FIELD_CHARS.__contains__)
        else:
            kind = _Kind.CHAR
        self.index = end
        return _Token(kind, start, text[start:end])

    def _run(self, i: int, accept: Callable[[str], bool]) -> int:
        while i < len(self.text) and accept(self.text[i]):
            i += 1
        return i

    def _quoted(self, start: int) -> _Token:
        """Find the closing delimiter, checking escapes on the way; the first problem is reported."""
        text, delim = self.text, self.text[start]
        error = ""
        i = start + 1
        while True:
            ch = text[i] if i < len(text) else ""
            if ch == delim:
                self.index = i + 1
                kind = _Kind.ILLEGAL if error else _Kind.QUOTED
                return _Token(kind, start, text[start : i + 1], error)
            if ch == "" or ch == "\n" or _illegal(ch):
                self.index = min(i + 1, len(text))
                reason = error or _illegal(ch) or "quoted literal not terminated"
                return _Token(_Kind.ILLEGAL, start, text[start : self.index], reason)
            i += 1
            if ch != "\\":
                continue
            esc = text[i] if i < len(text) else ""
            if esc and (esc in _SIMPLE_ESCAPES or esc == delim):
                i += 1
                continue
            if esc and esc in _OCTAL:
                digits, width = _OCTAL, 3
            elif esc and esc in _HEX_ESCAPE_DIGITS:
                digits, width = _HEX, _HEX_ESCAPE_DIGITS[esc]
                i += 1
            else:
                # The character after the backslash is not consumed: the loop looks at it again.
                # An illegal one reports itself there, as Go's scanner records it first.
                if not _illegal(esc):
                    error = error or "illegal escape sequence"
                continue
            end = self._run(i, digits.__contains__)
            if end - i < width and not _illegal(text[end] if end < len(text) else ""):
                error = error or "illegal numeric escape sequence"
            i = min(end, i + width)


def _tokenize(expr: str) -> list[_Token]:
    """The token stream of ``expr`` as containerd's scanner cuts it on its own (a test aid)."""
    lexer, value = _Lexer(expr), False
    tokens: list[_Token] = []
    while True:
        tok = lexer.scan(value=value)
        tokens.append(tok)
        if tok.kind is _Kind.EOF:
            return tokens
        # containerd's scanner expects a value after an operator until a value or a separator.
        if tok.kind is _Kind.OPERATOR:
            value = True
        elif tok.kind in (_Kind.VALUE, _Kind.SEPARATOR):
            value = False


# --- quoting --------------------------------------------------------------------------------

_QUOTE_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    "\\": "\\\\",
    '"': '\\"',
}
_UNQUOTE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}


def quote(value: str) -> str:
    """``value`` as a double-quoted Go string literal (like Go's ``strconv.Quote``).

    The result parses back to ``value`` as a field or a value. Characters U+DC80..U+DCFF stand for
    raw bytes (``surrogateescape``, as :func:`unquote` produces for ``\\xff``) and become ``\\xNN``;
    other lone surrogates have no Go equivalent and raise ValueError.
    """
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch in _QUOTE_ESCAPES:
            out.append(_QUOTE_ESCAPES[ch])
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"cannot quote lone surrogate U+{code:04X}")
        # U+FFFD is printable, but containerd's scanner rejects it raw.
        elif ch.isprintable() and ch != "\ufffd":
            out.append(ch)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def unquote(literal: str) -> str:
    """The text of a quoted literal delimited by ``"``, ``/`` or ``|`` (Go ``strconv.Unquote``).

    ``\\xNN`` and octal escapes are bytes: the result is decoded as UTF-8 with ``surrogateescape``,
    so bytes that are not UTF-8 survive as U+DC80..U+DCFF (Go keeps them as raw bytes). A ``\\u``
    escape naming a surrogate becomes U+FFFD, as Go encodes it.
    """

    def fail(pos: int) -> NoReturn:
        raise FilterParseError(literal, pos, "quote syntax error")

    if len(literal) < 2 or literal[0] not in _QUOTES or literal[-1] != literal[0]:
        fail(0)
    delim, end = literal[0], len(literal) - 1
    buf = bytearray()
    i = 1
    while i < end:
        ch = literal[i]
        if ch == delim or ch == "\n":
            fail(i)
        if ch != "\\":
            try:
                buf += ch.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                fail(i)
            i += 1
            continue
        esc = literal[i + 1] if i + 1 < end else ""
        if esc == "":
            fail(i)
        if esc in _UNQUOTE_ESCAPES:
            buf.append(_UNQUOTE_ESCAPES[esc])
            i += 2
        elif esc in "\"/|'":
            # Only the literal's own delimiter may be escaped.
            if esc != delim:
                fail(i)
            buf += esc.encode()
            i += 2
        elif esc in _OCTAL or esc in _HEX_ESCAPE_DIGITS:
            octal = esc in _OCTAL
            # An octal escape's first digit is `esc` itself; \x, \u and \U are followed by theirs.
            first = i + 1 if octal else i + 2
            width, alphabet = (3, _OCTAL) if octal else (_HEX_ESCAPE_DIGITS[esc], _HEX)
            digits = literal[first : first + width]
            if first + width > end or not set(digits) <= alphabet:
                fail(i)
            code = int(digits, 8 if octal else 16)
            if octal or esc == "x":
                if code > 0xFF:
                    fail(i)
                buf.append(code)
            elif code > 0x10FFFF:
                fail(i)
            else:
                buf += ("\ufffd" if 0xD800 <= code <= 0xDFFF else chr(code)).encode()
            i = first + width
        else:
            fail(i)
    return buf.decode("utf-8", "surrogateescape")


# --- parser ---------------------------------------------------------------------------------

_OPERATORS = {op.value: op for op in Operator if op is not Operator.PRESENT}


class _Parser:
    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.lexer = _Lexer(expr)

    def fail(self, pos: int, reason: str) -> NoReturn:
        raise FilterParseError(self.expr, pos, reason)

    def selectors(self) -> tuple[Selector, ...]:
        found = [self.selector()]
        while (ch := self.lexer.peek()) != "":
            if ch != ",":
                # containerd prints an illegal rune as U+FFFD.
                shown = "\ufffd" if _illegal(ch) else ch
                self.fail(self.lexer.index, f"unexpected input: {shown}")
            self.lexer.scan()
            found.append(self.selector())
        # Regexes are compiled only once the whole string parsed: containerd compiles them lazily,
        # so a syntax error later in the string is the one it reports.
        return tuple(
            Selector(sel.fieldpath, sel.operator, sel.value, self.compile(pos, sel.value))
            if sel.operator is Operator.MATCHES
            else sel
            for sel, pos in found
        )

    def selector(self) -> tuple[Selector, int]:
        """The selector, without its regex yet, and where its value starts."""
        path = self.fieldpath()
        if self.lexer.peek() in ("", ","):
            return Selector(path), self.lexer.index
        op = self.operator()
        tok = self.lexer.scan(value=True)
        return Selector(path, op, self.value(tok, alt_quotes=op is Operator.MATCHES)), tok.pos

    def fieldpath(self) -> tuple[str, ...]:
        path = [self.field()]
        while self.lexer.peek() == ".":
            self.lexer.scan()
            path.append(self.field())
        return tuple(path)

    def field(self) -> str:
        tok = self.lexer.scan()
        if tok.kind is _Kind.FIELD:
            return tok.text
        if tok.kind is _Kind.QUOTED:
            return self.unquote(tok, alt_quotes=False)
        self.fail(tok.pos, tok.error if tok.kind is _Kind.ILLEGAL else "expected field or quoted")

    def operator(self) -> Operator:
        tok = self.lexer.scan()
        if tok.kind is _Kind.OPERATOR:
            if tok.text not in _OPERATORS:
                self.fail(tok.pos, f"unsupported operator {quote(tok.text)}")
            return _OPERATORS[tok.text]
        if tok.kind is _Kind.ILLEGAL:
            self.fail(tok.pos, tok.error)
        self.fail(tok.pos, 'expected an operator ("=="|"!="|"~=")')

    def value(self, tok: _Token, *, alt_quotes: bool) -> str:
        if tok.kind in (_Kind.VALUE, _Kind.FIELD):
            return tok.text
        if tok.kind is _Kind.QUOTED:
            return self.unquote(tok, alt_quotes=alt_quotes)
        self.fail(tok.pos, tok.error if tok.kind is _Kind.ILLEGAL else "expected value or quoted")

    def unquote(self, tok: _Token, *, alt_quotes: bool) -> str:
        if not alt_quotes and tok.text[0] != '"':
            self.fail(tok.pos, "invalid quote encountered")
        try:
            return unquote(tok.text)
        except FilterParseError as e:
            self.fail(tok.pos, f"unquoting failed: {e.reason}")

    def compile(self, pos: int, pattern: str) -> re.Pattern[str]:
        # Go's regexp refuses invalid UTF-8, which \xNN escapes can produce.
        if any("\ud800" <= ch <= "\udfff" for ch in pattern):
            self.fail(pos, "invalid regular expression: invalid UTF-8")
        try:
            return re.compile(pattern, re.ASCII)
        # Huge repeat counts overflow, deep nesting recurses, and under `-W error` the
        # FutureWarning for RE2-isms like [[:alpha:]] is raised.
        except (re.error, OverflowError, RecursionError, Warning) as e:
            self.fail(pos, f"invalid regular expression: {e}")


def parse(expr: str) -> Filter:
    """Parse one filter string: selectors joined by ``,`` must all match; ``""`` matches all."""
    if expr == "":
        return always
    return Filter((_Parser(expr).selectors(),))


def parse_all(exprs: Sequence[str]) -> Filter:
    """Parse several filter strings, any of which may match; no strings at all matches all."""
    # A str is a Sequence[str] too; parsing it character by character would be silently wrong.
    if isinstance(exprs, str):
        raise TypeError("parse_all takes a sequence of filter strings, not one string")
    if not exprs:
        return always
    return Filter(tuple(group for expr in exprs for group in parse(expr).alternatives))
