"""`python -m agentstore.benchmark` = `agentstore bench`."""

from agentstore.benchmark import main

raise SystemExit(main())
