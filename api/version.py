"""The version of pyctr's programs (the Version service, ``pyctrd --version``, ``pyctr version``)."""

VERSION = "0.1.0"
REVISION = "pyctr"
