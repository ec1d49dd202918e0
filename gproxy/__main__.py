import sys

from gproxy.cli import main

sys.exit(main())
