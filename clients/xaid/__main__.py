"""`python -m xaid`: the `xaid` command."""

from xaid.cli import main

raise SystemExit(main())
