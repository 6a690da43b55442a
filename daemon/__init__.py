"""The first import of every pyctr process loads pyctr.api, which prepares betterproto2 (see there)."""

import pyctr.api  # noqa: F401
