import sys

from pand.cli import main

sys.exit(main())
