"""The filter language: containerd's own cases (filters/filter_test.go, scanner_test.go) plus properties."""

from __future__ import annotations

import pickle
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyctr.api.filters import (
    Adaptor,
    DictAdaptor,
    Filter,
    FilterParseError,
    Operator,
    Selector,
    _tokenize,
    adapt,
    always,
    parse,
    parse_all,
    quote,
    unquote,
)

# --- containerd's filter_test.go corpus -----------------------------------------------------------

# (name, other, labels) as in upstream; its adaptor reports name/other only when non-empty.
CORPUS: list[tuple[str, str, dict[str, str]]] = [
    ("foo", "", {"foo": "true"}),
    ("bar", "", {}),
    ("foo", "", {"foo": "present", "more complex label": "present"}),
    ("bar", "", {"bar": "true"}),
    ("fooer", "", {'more complex label with \\ and "': "present"}),
    ("fooer", "", {'more complex label with \\ and ".post': "present"}),
    ("baz", "too complex, yo", {}),
    ("bazo", "abc", {}),
    ("compound", "", {"foo": "omg_asdf.asdf-qwer"}),
]
ALL = list(range(len(CORPUS)))


def corpus_adaptor(index: int) -> Adaptor:
    name, other, labels = CORPUS[index]
    return DictAdaptor({"name": name or None, "other": other or None, "labels": labels})


def matching(f: Filter) -> list[int]:
    return [i for i in ALL if f.match(corpus_adaptor(i))]


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("", ALL),
        ("name", ALL),
        ("labels.foo", [0, 2, 8]),
        ("labels.foo,name", [0, 2, 8]),
        ("labels.foo==true", [0]),
        ("labels.foo==omg_asdf.asdf-qwer", [8]),
        ("name==bar", [1, 3]),
        ("name!=bar", [0, 2, 4, 5, 6, 7, 8]),
        ("name==bar,labels.bar", [3]),
        ('other=="too complex, yo"', [6]),
        ("other~=[abc]+,name!=foo", [6, 7]),
        ("other~=/[abc]+/,name!=foo", [6, 7]),
        ("other~=/[abc]{1,2}/,name!=foo", [6, 7]),
        ('other~=/[abc]{0,1}"\\//,name!=foo', []),
        ("name==bar,labels.bar==true", [3]),
        ("name==bar,labels.bar==wrong", []),
        ('name==foo,labels."more complex label"', [2]),
        ('labels."more complex label with \\\\ and \\""==present', [4]),
        ('labels."more complex label with \\\\ and \\"".post==present', [5]),
    ],
)
def test_upstream_filter_cases(expr: str, expected: list[int]) -> None:
    assert matching(parse(expr)) == expected


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        (
            "labels.|foo|==omg_asdf.asdf-qwer",
            "parse error: [labels. >|||< foo|==omg_asdf.asdf-qwer]: invalid quote encountered",
        ),
        (
            'labels.?"more complex label with \\\\ and \\"".post==present',
            'parse error: [labels. >|?|< "more complex label with \\\\ and \\"".post==present]: '
            "expected field or quoted",
        ),
        ("name==foo,", "parse error: [name==foo,]: expected field or quoted"),
        ("labels.", "parse error: [labels.]: expected field or quoted"),
        ("image~=,id?=?fbaq", "parse error: [image~= >|,|< id?=?fbaq]: expected value or quoted"),
        ("labels.ns/key==value", "parse error: [labels.ns >|/|< key==value]: quoted literal not terminated"),
        ("labels.key==/value", "parse error: [labels.key== >|/|< value]: quoted literal not terminated"),
    ],
)
def test_upstream_filter_errors(expr: str, message: str) -> None:
    # Upstream prefixes "filters: "; the rest of the message is the same.
    with pytest.raises(FilterParseError) as info:
        parse(expr)
    assert str(info.value) == message


# --- containerd's scanner_test.go cases -----------------------------------------------------------

# (pos, kind, text[, error]); positions count characters where Go counts bytes (only "Cowsay" differs).
SCANNER_CASES: dict[str, tuple[str, list[tuple[object, ...]]]] = {
    "Field": ("name", [(0, "Field", "name"), (4, "EOF", "")]),
    "SelectorsWithOperators": (
        "name==value,foo!=bar",
        [
            (0, "Field", "name"),
            (4, "Operator", "=="),
            (6, "Value", "value"),
            (11, "Separator", ","),
            (12, "Field", "foo"),
            (15, "Operator", "!="),
            (17, "Value", "bar"),
            (20, "EOF", ""),
        ],
    ),
    "SelectorsWithFieldPaths": (
        "name==value,labels.foo=value,other.bar~=match",
        [
            (0, "Field", "name"),
            (4, "Operator", "=="),
            (6, "Value", "value"),
            (11, "Separator", ","),
            (12, "Field", "labels"),
            (18, "Separator", "."),
            (19, "Field", "foo"),
            (22, "Operator", "="),
            (23, "Value", "value"),
            (28, "Separator", ","),
            (29, "Field", "other"),
            (34, "Separator", "."),
            (35, "Field", "bar"),
            (38, "Operator", "~="),
            (40, "Value", "match"),
            (45, "EOF", ""),
        ],
    ),
    "RegexpValue": (
        "name~=[abc]+,foo=test",
        [
            (0, "Field", "name"),
            (4, "Operator", "~="),
            (6, "Value", "[abc]+"),
            (12, "Separator", ","),
            (13, "Field", "foo"),
            (16, "Operator", "="),
            (17, "Value", "test"),
            (21, "EOF", ""),
        ],
    ),
    "RegexpEscapedValue": (
        "name~=[abc]\\+,foo=test",
        [
            (0, "Field", "name"),
            (4, "Operator", "~="),
            (6, "Value", "[abc]\\+"),
            (13, "Separator", ","),
            (14, "Field", "foo"),
            (17, "Operator", "="),
            (18, "Value", "test"),
            (22, "EOF", ""),
        ],
    ),
    "RegexpQuotedValue": (
        "name~=/[abc]{0,2}/,foo=test",
        [
            (0, "Field", "name"),
            (4, "Operator", "~="),
            (6, "Quoted", "/[abc]{0,2}/"),
            (18, "Separator", ","),
            (19, "Field", "foo"),
            (22, "Operator", "="),
            (23, "Value", "test"),
            (27, "EOF", ""),
        ],
    ),
    "Cowsay": (
        "name~=牛,labels.moo=true",
        [
            (0, "Field", "name"),
            (4, "Operator", "~="),
            (6, "Value", "牛"),
            (7, "Separator", ","),
            (8, "Field", "labels"),
            (14, "Separator", "."),
            (15, "Field", "moo"),
            (18, "Operator", "="),
            (19, "Value", "true"),
            (23, "EOF", ""),
        ],
    ),
    "CowsayRegexpQuoted": (
        "name~=|牛|,labels.moo=true",
        [
            (0, "Field", "name"),
            (4, "Operator", "~="),
            (6, "Quoted", "|牛|"),
            (9, "Separator", ","),
            (10, "Field", "labels"),
            (16, "Separator", "."),
            (17, "Field", "moo"),
            (20, "Operator", "="),
            (21, "Value", "true"),
            (25, "EOF", ""),
        ],
    ),
    "Escapes": (
        'name~="asdf\\n\\tfooo"',
        [(0, "Field", "name"), (4, "Operator", "~="), (6, "Quoted", '"asdf\\n\\tfooo"'), (20, "EOF", "")],
    ),
    "NullInput": (
        "foo\x00bar",
        [(0, "Field", "foo"), (3, "Illegal", "", "unexpected null"), (4, "Field", "bar"), (7, "EOF", "")],
    ),
    "SpacesChomped": (
        "foo = bar    ",
        [(0, "Field", "foo"), (4, "Operator", "="), (6, "Value", "bar"), (13, "EOF", "")],
    ),
    "ValuesPunctuated": (
        "compound.labels==punctuated_value.foo-bar",
        [
            (0, "Field", "compound"),
            (8, "Separator", "."),
            (9, "Field", "labels"),
            (15, "Operator", "=="),
            (17, "Value", "punctuated_value.foo-bar"),
            (41, "EOF", ""),
        ],
    ),
    "PartialInput": ("interrupted=", [(0, "Field", "interrupted"), (11, "Operator", "="), (12, "EOF", "")]),
    "DoubleValue": (
        "doublevalue=value value",
        [
            (0, "Field", "doublevalue"),
            (11, "Operator", "="),
            (12, "Value", "value"),
            (18, "Field", "value"),
            (23, "EOF", ""),
        ],
    ),
    "LeadingWithQuoted": (
        '"leading quote".postquote==value',
        [
            (0, "Quoted", '"leading quote"'),
            (15, "Separator", "."),
            (16, "Field", "postquote"),
            (25, "Operator", "=="),
            (27, "Value", "value"),
            (32, "EOF", ""),
        ],
    ),
    "MissingValue": (
        "input==,id!=ff",
        [
            (0, "Field", "input"),
            (5, "Operator", "=="),
            (7, "Separator", ","),
            (8, "Field", "id"),
            (10, "Operator", "!="),
            (12, "Value", "ff"),
            (14, "EOF", ""),
        ],
    ),
    "QuotedRegexp": (
        "input~=/foo\\/bar/,id!=ff",
        [
            (0, "Field", "input"),
            (5, "Operator", "~="),
            (7, "Quoted", "/foo\\/bar/"),
            (17, "Separator", ","),
            (18, "Field", "id"),
            (20, "Operator", "!="),
            (22, "Value", "ff"),
            (24, "EOF", ""),
        ],
    ),
    "QuotedRegexpAlt": (
        "input~=|foo/bar|,id!=ff",
        [
            (0, "Field", "input"),
            (5, "Operator", "~="),
            (7, "Quoted", "|foo/bar|"),
            (16, "Separator", ","),
            (17, "Field", "id"),
            (19, "Operator", "!="),
            (21, "Value", "ff"),
            (23, "EOF", ""),
        ],
    ),
    "IllegalQuoted": (
        "labels.containerd.io/key==value",
        [
            (0, "Field", "labels"),
            (6, "Separator", "."),
            (7, "Field", "containerd"),
            (17, "Separator", "."),
            (18, "Field", "io"),
            (20, "Illegal", "/key==value", "quoted literal not terminated"),
            (31, "EOF", ""),
        ],
    ),
    "IllegalQuotedWithNewLine": (
        'labels."containerd.io\nkey"==value',
        [
            (0, "Field", "labels"),
            (6, "Separator", "."),
            (7, "Illegal", '"containerd.io\n', "quoted literal not terminated"),
            (22, "Field", "key"),
            (25, "Illegal", '"==value', "quoted literal not terminated"),
            (33, "EOF", ""),
        ],
    ),
    "IllegalEscapeSequence": (
        'labels."\\g"',
        [
            (0, "Field", "labels"),
            (6, "Separator", "."),
            (7, "Illegal", '"\\g"', "illegal escape sequence"),
            (11, "EOF", ""),
        ],
    ),
    "IllegalNumericEscapeSequence": (
        'labels."\\xaz"',
        [
            (0, "Field", "labels"),
            (6, "Separator", "."),
            (7, "Illegal", '"\\xaz"', "illegal numeric escape sequence"),
            (13, "EOF", ""),
        ],
    ),
}


@pytest.mark.parametrize("name", list(SCANNER_CASES))
def test_upstream_scanner_cases(name: str) -> None:
    expr, expected = SCANNER_CASES[name]
    got = [
        (t.pos, t.kind.value, t.text, t.error) if t.error else (t.pos, t.kind.value, t.text)
        for t in _tokenize(expr)
    ]
    assert got == expected


# --- the examples of containerd-api.md §4 ---------------------------------------------------------


def test_doc_examples() -> None:
    busybox = DictAdaptor({"name": "docker.io/library/busybox:latest", "image": "docker.io/library/busybox"})
    assert parse("name==docker.io/library/busybox:latest").match(busybox)
    assert parse("image~=busybox").match(busybox)
    assert not parse("image~=^busybox").match(busybox)

    exit_event = DictAdaptor({"namespace": "default", "topic": "/tasks/exit"})
    assert parse('topic=="/tasks/exit"').match(exit_event)
    assert parse('namespace==default,topic~="^/tasks/"').match(exit_event)
    assert not parse('namespace==other,topic~="^/tasks/"').match(exit_event)

    plugin = DictAdaptor({"type": "io.containerd.snapshotter.v1", "id": "overlayfs"})
    assert parse("type==io.containerd.snapshotter.v1, id==overlayfs").match(plugin)
    assert not parse("type==io.containerd.snapshotter.v1, id==native").match(plugin)


def test_empty_filters_match_everything() -> None:
    nothing = DictAdaptor({})
    assert parse("") is always
    assert parse_all([]) is always
    assert Filter.match_all is always
    assert always.match(nothing)
    assert parse_all([""]).match(nothing)  # ListStatuses(filters=[""])
    assert parse_all(["name==x", ""]).match(nothing)


def test_comma_is_and_list_is_or() -> None:
    a = DictAdaptor({"id": "a", "labels": {"role": "db"}})
    b = DictAdaptor({"id": "b", "labels": {"role": "web"}})
    both = parse("labels.role,id==a")
    assert [both.match(x) for x in (a, b)] == [True, False]
    either = parse_all(["id==a", "labels.role==web"])
    assert [either.match(x) for x in (a, b)] == [True, True]
    assert not parse_all(["id==c", "labels.role==cache"]).match(a)
    with pytest.raises(TypeError):
        parse_all("id==a")


def test_quoted_label_keys() -> None:
    image = DictAdaptor({"labels": {"io.x.y": "v", "with space": "w"}, "target": {"digest": "sha256:ab"}})
    assert parse('labels."io.x.y"==v').match(image)
    # containerd joins the rest of the path, so the unquoted spelling finds the dotted key as well.
    assert parse("labels.io.x.y==v").match(image)
    assert parse('labels."with space"').match(image)
    assert parse('"labels"."io.x.y"~=^v$').match(image)
    assert parse("target.digest==sha256:ab").match(image)
    assert not parse("labels").match(image)  # a map is not a value
    assert not parse('labels."io.x"').match(image)


def test_regex_delimiters() -> None:
    obj = DictAdaptor({"ref": "a/b|c", "name": "x.y"})
    assert parse("ref~=/a\\/b/").match(obj)
    assert parse("ref~=|b\\|c|").match(obj)
    assert parse("ref~=|a/b|").match(obj)
    assert parse("ref~=/b|c/").match(obj)
    assert parse('ref~="^a/b\\\\|c$"').match(obj)  # \\| in the literal is \| in the pattern
    assert parse("name~=/x\\\\.y/").match(obj)
    assert not parse("name~=/x\\\\.z/").match(obj)
    assert parse("name~=x\\.y").match(obj)  # unquoted values keep their backslashes
    for alt in ("name==/x.y/", "name!=|x.y|"):
        with pytest.raises(FilterParseError, match="invalid quote encountered"):
            parse(alt)
    # Only the delimiter, \\ and the Go escapes may follow a backslash inside quotes.
    with pytest.raises(FilterParseError, match="illegal escape sequence"):
        parse("name~=/\\d/")


def test_regex_is_unanchored_search_and_compiled_once() -> None:
    sel = parse("name~=o+b").alternatives[0][0]
    assert sel.operator is Operator.MATCHES and sel.regex is not None
    assert sel.regex.pattern == "o+b"
    assert parse("name~=o+b").match(DictAdaptor({"name": "foobar"}))
    # An absent field is matched as "".
    assert parse("name~=^$").match(DictAdaptor({}))
    assert not parse('name~="."').match(DictAdaptor({}))
    # \d is ASCII-only, as in RE2.
    assert not parse("n~=\\d").match(DictAdaptor({"n": "٣"}))


def test_operators_on_absent_fields() -> None:
    empty = DictAdaptor({"blank": ""})
    assert not parse("id").match(empty)
    assert not parse("id==x").match(empty)
    assert parse("id!=x").match(empty)
    # containerd compares an absent field as "": `!=""` needs the field present and non-empty.
    assert not parse('id!=""').match(empty)
    assert parse("blank").match(empty)
    assert parse('blank==""').match(empty)
    assert not parse('blank!=""').match(empty)


@pytest.mark.parametrize(
    ("literal", "text"),
    [
        ('"plain"', "plain"),
        ('""', ""),
        ('"a\\nb\\tc"', "a\nb\tc"),
        ('"\\a\\b\\f\\r\\v"', "\a\b\f\r\v"),
        ('"back\\\\slash \\"quoted\\""', 'back\\slash "quoted"'),
        ('"\\x41\\101\\u00e9\\U0001F600"', "AAé😀"),
        ('"\\xc3\\xa9"', "é"),  # bytes that form UTF-8 decode to text
        ('"\\xff"', "\udcff"),  # a stray byte survives as a surrogate escape
        ('"\\ud800"', "\ufffd"),  # Go encodes a surrogate code point as U+FFFD
        ('"牛 raw"', "牛 raw"),
        ("/a\\/b/", "a/b"),
        ("|a\\|b|", "a|b"),
        ("|a/b\\\\|", "a/b\\"),
    ],
)
def test_unquote(literal: str, text: str) -> None:
    assert unquote(literal) == text


@pytest.mark.parametrize(
    "literal",
    ['"', "'a'", '"a', "/a|", '"a\nb"', '"\\q"', '"\\/"', '/\\"/', '"\\400"', '"\\U00110000"', '"\\x4"'],
)
def test_unquote_rejects(literal: str) -> None:
    with pytest.raises(FilterParseError, match="quote syntax error"):
        unquote(literal)


def test_quote_examples() -> None:
    assert quote("") == '""'
    assert quote('a "b" \\c') == '"a \\"b\\" \\\\c"'
    assert quote("\n\x00\x7f\u00ad\ufffd\U000e0001") == '"\\n\\x00\\x7f\\u00ad\\ufffd\\U000e0001"'
    assert quote("\udcff") == '"\\xff"'
    with pytest.raises(ValueError):
        quote("\ud800")


def test_escapes_in_filters() -> None:
    obj = DictAdaptor({"labels": {"k\ty": 'v "1"\n'}})
    assert parse('labels."k\\ty"=="v \\"1\\"\\n"').match(obj)
    assert parse('labels."k\\x09y"=="v \\x221\\042\\u000a"').match(obj)


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ('name=="abc', 'parse error: [name== >|"|< abc]: quoted literal not terminated'),
        ('labels."a', 'parse error: [labels. >|"|< a]: quoted literal not terminated'),
        ('name=="a\\', 'parse error: [name== >|"|< a\\]: illegal escape sequence'),
        ('name=="\\x', 'parse error: [name== >|"|< \\x]: illegal numeric escape sequence'),
        ('name=="\\g\n', 'parse error: [name== >|"|< \\g\n]: illegal escape sequence'),
        ("name=foo", 'parse error: [name >|=|< foo]: unsupported operator "="'),
        ("name=~foo", 'parse error: [name >|=|< ~foo]: unsupported operator "=~"'),
        ("name===foo", 'parse error: [name >|=|< ==foo]: unsupported operator "==="'),
        ("name== =foo", "parse error: [name==  >|=|< foo]: expected value or quoted"),
        ("name==!foo", 'parse error: [name >|=|< =!foo]: unsupported operator "==!"'),
        ("name==.foo", "parse error: [name== >|.|< foo]: expected value or quoted"),
        ("name==", "parse error: [name==]: expected value or quoted"),
        ("name-x==a", 'parse error: [name >|-|< x==a]: expected an operator ("=="|"!="|"~=")'),
        ("name?", 'parse error: [name >|?|< ]: expected an operator ("=="|"!="|"~=")'),
        ("==foo", "parse error: [ >|=|< =foo]: expected field or quoted"),
        (".foo", "parse error: [ >|.|< foo]: expected field or quoted"),
        ("labels..foo", "parse error: [labels. >|.|< foo]: expected field or quoted"),
        (",name", "parse error: [ >|,|< name]: expected field or quoted"),
        ("a,,b", "parse error: [a, >|,|< b]: expected field or quoted"),
        ("name==foo,", "parse error: [name==foo,]: expected field or quoted"),
        ("name==foo ", "parse error: [name==foo >| |< ]: unexpected input:  "),
        ("name==foo ,id", "parse error: [name==foo >| |< ,id]: unexpected input:  "),
        ('name=="foo"x', 'parse error: [name=="foo" >|x|< ]: unexpected input: x'),
        ("name ", 'parse error: [name ]: expected an operator ("=="|"!="|"~=")'),
        ("labels .x", 'parse error: [labels  >|.|< x]: expected an operator ("=="|"!="|"~=")'),
        ("名==x", "parse error: [ >|名|< ==x]: expected field or quoted"),
        ("name\x00", "parse error: [name >|\x00|< ]: unexpected null"),
        ("name==a\ufffd", "parse error: [name==a >|\ufffd|< ]: unexpected input: \ufffd"),
        ("name==\ud800", "parse error: [name== >|\ud800|< ]: rune error"),
        ('name=="\\777"', 'parse error: [name== >|"|< \\777"]: unquoting failed: quote syntax error'),
        ("name~=[a", "parse error: [name~= >|[|< a]: invalid regular expression: unterminated character set"),
        ("name~=a{99999999999}", "parse error: [name~= >|a|< {99999999999}]: invalid regular expression"),
        ('name~="\\xff"', 'parse error: [name~= >|"|< \\xff"]: invalid regular expression: invalid UTF-8'),
    ],
)
def test_parse_errors(expr: str, message: str) -> None:
    with pytest.raises(FilterParseError) as info:
        parse(expr)
    assert str(info.value).startswith(message)
    assert isinstance(info.value, ValueError)
    with pytest.raises(FilterParseError):
        parse_all(["", expr])


def test_parse_error_fields_and_pickle() -> None:
    with pytest.raises(FilterParseError) as info:
        parse("name==foo,")
    err = info.value
    assert (err.expr, err.position, err.reason) == ("name==foo,", 10, "expected field or quoted")
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


def test_whitespace_before_tokens_is_skipped() -> None:
    obj = DictAdaptor({"a": "1", "labels": {"b": "2"}})
    assert parse(" a == 1,\tlabels. b ==\n2").match(obj)
    assert parse("a ==1, labels.b").match(obj)


def test_plain_values_take_punctuation() -> None:
    sel = parse("a==x=y!z~w/v|u\"t'.s:r").alternatives[0][0]
    assert sel.value == "x=y!z~w/v|u\"t'.s:r"
    assert parse("a==\x01b").alternatives[0][0].value == "\x01b"  # any first character is kept


def test_adaptors() -> None:
    seen: list[tuple[str, ...]] = []

    def field(path: tuple[str, ...]) -> str | None:
        seen.append(path)
        return "v" if path == ("x", "y") else None

    f = parse('x."y"==v')
    assert f.match(adapt(field))
    assert seen == [("x", "y")]
    assert isinstance(adapt(field), Adaptor)
    nested = DictAdaptor({"a": {"b": {"c": "deep"}}, "s": "str", "n": None})
    assert nested.field(("a", "b", "c")) == "deep"
    assert nested.field(("a", "b")) is None
    assert nested.field(("s", "x")) is None
    assert nested.field(("n",)) is None
    assert nested.field(()) is None


def test_selector_equality_ignores_compiled_regex() -> None:
    assert parse("a~=x") == parse("a~=x")
    assert parse("a==x").alternatives == ((Selector(("a",), Operator.EQUAL, "x"),),)


# --- properties ----------------------------------------------------------------------------------

FIELDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCXYZ0123456789_", min_size=1, max_size=12)
# Text that leans on the characters the scanner cares about, plus anything else Unicode has.
TRICKY = st.sampled_from(list('ab_.,=!~"/|\\ \t\n\x00\x01é牛\ufffd\ud800\udcff$^[]()*+{}x0u7'))
FILTER_TEXT = st.text(TRICKY, max_size=30) | st.text(max_size=30)
ESCAPE_PRONE = st.sampled_from(list('"\\/|\n\x00\ufffd\udc80\udcffé牛 ,='))
VALUES = st.text(max_size=20) | st.text(ESCAPE_PRONE, max_size=10)


@settings(max_examples=150, deadline=None)
@given(FIELDS, VALUES, VALUES)
def test_equality_matches_exactly_that_value(name: str, value: str, other: str) -> None:
    f = parse(f"{name}=={quote(value)}")
    assert f.match(DictAdaptor({name: value}))
    assert f.match(DictAdaptor({name: other})) == (other == value)
    assert not f.match(DictAdaptor({}))
    # A quoted field works the same, whatever its characters.
    assert parse(f"{quote(value)}=={quote(other)}").match(DictAdaptor({value: other}))


@settings(max_examples=200, deadline=None)
@given(VALUES)
def test_quote_unquote_round_trip(value: str) -> None:
    literal = quote(value)
    assert unquote(literal) == value
    assert [t.kind.value for t in _tokenize(literal)] == ["Quoted", "EOF"]


@settings(max_examples=300, deadline=None)
@given(FILTER_TEXT)
def test_parse_fails_only_with_filter_parse_error(expr: str) -> None:
    try:
        f = parse(expr)
    except FilterParseError as e:
        assert str(e).startswith("parse error: [")
        return
    f.match(DictAdaptor({"a": "b"}))


@settings(max_examples=150, deadline=None)
@given(FIELDS, VALUES, VALUES)
def test_not_equal_negates_equal_when_present(name: str, value: str, actual: str) -> None:
    obj = DictAdaptor({name: actual})
    assert parse(f"{name}!={quote(value)}").match(obj) == (not parse(f"{name}=={quote(value)}").match(obj))


@settings(max_examples=100, deadline=None)
@given(FIELDS, st.text(st.characters(exclude_categories=["Cs"]), max_size=15))
def test_escaped_regex_finds_the_value(name: str, value: str) -> None:
    f = parse(f"{name}~={quote(re.escape(value))}")
    assert f.match(DictAdaptor({name: f"<{value}>"}))
