"""Run the tether command: ``python -m tether``."""

from tether.cli.main import main

raise SystemExit(main())
