from agentstore.cli import main

raise SystemExit(main())
