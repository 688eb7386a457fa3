from bilevel.cli import main

raise SystemExit(main())
