"""`python -m harness`: what `make bench` runs."""

from harness import main

raise SystemExit(main())
