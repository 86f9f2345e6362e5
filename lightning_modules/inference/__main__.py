import sys

from lightning_modules.inference.cli import main

sys.exit(main())
