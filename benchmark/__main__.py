from ensemble_bench.cli import main

raise SystemExit(main())
