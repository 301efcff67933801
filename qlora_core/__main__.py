"""`python -m qlora_core ...` runs the `qlora` command (cli.py)."""
import sys

from .cli import main

sys.exit(main())
