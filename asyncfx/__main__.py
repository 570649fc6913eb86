import sys

from asyncfx.app.cli import main

sys.exit(main())
