"""``bridge.sinkkit``: the driver kit, at the import path plugin authors use.

The kit lives in :mod:`bridge.sinks.kit` beside the plugin contract; this module is
that same module under its published name (``import bridge.sinkkit`` and ``from
bridge.sinkkit import tls_context`` keep working, with no warning: it is public API).
"""

import sys

from bridge.sinks import kit

sys.modules[__name__] = kit
