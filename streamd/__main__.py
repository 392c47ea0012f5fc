"""``python -m streamd`` entry point."""

from streamd.cli import main

raise SystemExit(main())
