import sys

from hashflex.sim.cli import main

sys.exit(main())
