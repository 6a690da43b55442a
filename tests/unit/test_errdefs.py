from __future__ import annotations

import pytest

from pyctr.api import errdefs, identifiers, namespaces


@pytest.mark.parametrize(
    ("cls", "code", "suffix"),
    [
        (errdefs.NotFound, 5, "not found"),
        (errdefs.AlreadyExists, 6, "already exists"),
        (errdefs.InvalidArgument, 3, "invalid argument"),
        (errdefs.FailedPrecondition, 9, "failed precondition"),
        (errdefs.Unavailable, 14, "unavailable"),
        (errdefs.NotImplementedErr, 12, "not implemented"),
        (errdefs.ResourceExhausted, 8, "resource exhausted"),
        (errdefs.OutOfRange, 11, "out of range"),
    ],
)
def test_category_round_trip(cls: type[errdefs.ContainerdError], code: int, suffix: str) -> None:
    exc = cls('content "sha256:abc"')
    assert errdefs.to_status(exc) == (code, f'content "sha256:abc": {suffix}')
    back = errdefs.from_status(*errdefs.to_status(exc))
    assert type(back) is cls
    assert str(back) == str(exc)


def test_suffix_is_not_doubled() -> None:
    assert str(errdefs.NotFound("x: not found")) == "x: not found"
    assert str(errdefs.NotFound()) == "not found"


def test_plain_exceptions_are_unknown_not_guessed() -> None:
    # An OSError is not mapped blanket-wise: its category is unknown unless code says otherwise.
    assert errdefs.to_status(FileNotFoundError(2, "No such file")) == (2, "[Errno 2] No such file")
    assert errdefs.to_status(RuntimeError()) == (2, "RuntimeError")
    unknown = errdefs.from_status(13, "boom")
    assert isinstance(unknown, errdefs.Unknown) and str(unknown) == "boom"


def test_identifiers() -> None:
    for good in ["a", "default", "k8s.io", "moby", "a-b_c.d", "A1"]:
        assert identifiers.validate(good) == good
    for bad in ["", "-a", "a-", "a..b", "a b", "bad!", "x" * 77, "ü"]:
        with pytest.raises(errdefs.InvalidArgument):
            identifiers.validate(bad)


def test_namespace_required_messages() -> None:
    token = namespaces.current.set("")
    try:
        with pytest.raises(errdefs.FailedPrecondition, match="namespace is required: failed precondition"):
            namespaces.required()
        namespaces.current.set("bad!")
        with pytest.raises(
            errdefs.InvalidArgument, match=r'^namespace validation: identifier "bad!" must match'
        ):
            namespaces.required()
        namespaces.current.set("moby")
        assert namespaces.required() == "moby"
    finally:
        namespaces.current.reset(token)
