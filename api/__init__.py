"""pyctr.api: containerd's wire contract (generated messages in ``_pb``) and the leaf libraries.

Importing it installs the stand-in for ``betterproto2._version`` (see ``bp2version``) before
anything loads betterproto2; every other pyctr package imports this one first.
"""

from pyctr.api import bp2version as _bp2version

_bp2version.install()
