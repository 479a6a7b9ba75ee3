"""canaryd's development kit: the local control plane (devstack), the demo and the benchmarks.

Not shipped: absent from the wheel and the image. Imports canaryd; canaryd never imports it
(``canaryd.cli`` offers its commands only when it is importable, i.e. in a checkout).
"""

from __future__ import annotations

from canaryd.errors import CanarydError


class DevstackError(CanarydError):
    """The local control plane could not be started or stopped."""
