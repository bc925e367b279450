"""`python -m sidecar`: the same command as the `sidecar` console script."""

from sidecar.cli import main

raise SystemExit(main())
