"""The lexer of the AIP-160 filter subset (agentstore.query.filter): tokens and bare values."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final

MAX_FILTER_LENGTH: Final = 4096


class FilterError(ValueError):
    """A filter the grammar rejects. ``message`` names the offending ``token``."""

    def __init__(self, message: str, token: str, position: int) -> None:
        super().__init__(f"{message} at position {position}")
        self.message = message
        self.token = token
        self.position = position

    def __reduce__(self) -> tuple[type[FilterError], tuple[str, str, int]]:
        # The default pickles only the formatted text, which __init__ cannot take back.
        return (type(self), (self.message, self.token, self.position))


# --- lexing -----------------------------------------------------------------------------


class TokenKind(enum.Enum):
    LPAREN = "("
    RPAREN = ")"
    STRING = "string"
    WORD = "word"
    COMPARATOR = "comparator"
    EOF = "end of filter"


@dataclass(frozen=True, slots=True)
class Token:
    kind: TokenKind
    # Decoded content for STRING; the exact source slice for everything else.
    text: str
    source: str
    pos: int


KEYWORDS: Final = frozenset({"AND", "OR", "NOT"})
# Characters that end a bare word; everything else (including '.', '-', ',') belongs to it.
_WORD_STOP: Final = frozenset("()\"'=<>!:\\")
_ESCAPABLE: Final = frozenset("\\\"'")


def show(token: str) -> str:
    """Quote a token for an error message, keeping control characters visible."""
    if len(token) > 40:
        token = token[:40] + "..."
    return "'" + "".join(c if c.isprintable() else repr(c)[1:-1] for c in token) + "'"


def describe(tok: Token) -> str:
    if tok.kind is TokenKind.EOF:
        return "end of filter"
    return show(tok.source)


def check_raw_text(text: str) -> None:
    if len(text) > MAX_FILTER_LENGTH:
        excess = text[MAX_FILTER_LENGTH : MAX_FILTER_LENGTH + 20]
        raise FilterError(
            f"filter is longer than {MAX_FILTER_LENGTH} characters; excess starts with {show(excess)}",
            excess,
            MAX_FILTER_LENGTH,
        )
    nul = text.find("\x00")
    if nul >= 0:
        # PostgreSQL text cannot hold NUL, so a value containing one could never match.
        raise FilterError(f"NUL character {show(chr(0))} is not allowed", "\x00", nul)
    for i, c in enumerate(text):
        # Lone surrogates cannot be encoded as UTF-8 and would fail later inside the driver.
        if "\ud800" <= c <= "\udfff":
            raise FilterError(f"invalid character {show(c)}", c, i)


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    n = len(text)
    i = 0
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c == "(":
            tokens.append(Token(TokenKind.LPAREN, c, c, i))
            i += 1
        elif c == ")":
            tokens.append(Token(TokenKind.RPAREN, c, c, i))
            i += 1
        elif c in "\"'":
            tok = _lex_string(text, i)
            tokens.append(tok)
            i += len(tok.source)
        elif c in "<>":
            op = text[i : i + 2] if text.startswith("=", i + 1) else c
            tokens.append(Token(TokenKind.COMPARATOR, op, op, i))
            i += len(op)
        elif c == "!":
            if not text.startswith("=", i + 1):
                raise FilterError(f"unexpected {show(c)}; did you mean '!='?", c, i)
            tokens.append(Token(TokenKind.COMPARATOR, "!=", "!=", i))
            i += 2
        elif c in "=:":
            tokens.append(Token(TokenKind.COMPARATOR, c, c, i))
            i += 1
        elif c == "\\":
            raise FilterError(f"unexpected {show(c)} outside a string", c, i)
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in _WORD_STOP:
                j += 1
            word = text[i:j]
            tokens.append(Token(TokenKind.WORD, word, word, i))
            i = j
    tokens.append(Token(TokenKind.EOF, "", "", n))
    return tokens


def _lex_string(text: str, start: int) -> Token:
    quote = text[start]
    chars: list[str] = []
    j = start + 1
    n = len(text)
    while True:
        if j >= n:
            rest = text[start:]
            raise FilterError(f"unterminated string {show(rest)}", rest, start)
        c = text[j]
        if c == quote:
            j += 1
            break
        if c == "\\":
            if j + 1 >= n:
                rest = text[start:]
                raise FilterError(f"unterminated string {show(rest)}", rest, start)
            escaped = text[j + 1]
            if escaped not in _ESCAPABLE:
                seq = text[j : j + 2]
                raise FilterError(f"invalid escape sequence {show(seq)}", seq, j)
            chars.append(escaped)
            j += 2
            continue
        chars.append(c)
        j += 1
    return Token(TokenKind.STRING, "".join(chars), text[start:j], start)


# --- values -----------------------------------------------------------------------------


class ValueKind(enum.Enum):
    STRING = "string"  # quoted
    WORD = "word"  # bare, not a number or literal
    NUMBER = "number"
    TRUE = "true"
    FALSE = "false"
    NULL = "null"


@dataclass(frozen=True, slots=True)
class Value:
    kind: ValueKind
    text: str
    token: Token


NUMBER_RE: Final = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?", re.ASCII)
_LITERALS: Final = {"true": ValueKind.TRUE, "false": ValueKind.FALSE, "null": ValueKind.NULL}


def classify(tok: Token) -> Value:
    if tok.kind is TokenKind.STRING:
        return Value(ValueKind.STRING, tok.text, tok)
    if tok.text in _LITERALS:
        return Value(_LITERALS[tok.text], tok.text, tok)
    if NUMBER_RE.fullmatch(tok.text):
        return Value(ValueKind.NUMBER, tok.text, tok)
    return Value(ValueKind.WORD, tok.text, tok)
