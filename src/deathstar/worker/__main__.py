from deathstar.worker.process import cli_main

raise SystemExit(cli_main())
