from deathstar.worker.start import cli_main

raise SystemExit(cli_main())
