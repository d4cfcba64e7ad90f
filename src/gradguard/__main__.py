"""``python -m gradguard`` runs the command-line interface."""

from gradguard.cli import main

raise SystemExit(main())
