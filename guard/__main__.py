"""`python -m guard` runs the command line."""

from guard.cli import main

raise SystemExit(main())
