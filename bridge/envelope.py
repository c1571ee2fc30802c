"""``bridge.envelope``: the CloudEvents envelope, at its published import path.

The envelope lives in :mod:`bridge.core.envelope`; this module is that same module
under the name code written against earlier versions imports.
"""

import sys

from bridge.core import envelope

sys.modules[__name__] = envelope
