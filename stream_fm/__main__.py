from stream_fm.cli import main

raise SystemExit(main())
