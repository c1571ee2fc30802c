"""``python -m bridge`` is the same as the ``aleno-bridge`` console script."""

from bridge.cli.main import main

raise SystemExit(main())
