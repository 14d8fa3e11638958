from fedliver.cli import main

raise SystemExit(main())
