import sys

from asyncfx.cli import main

sys.exit(main())
