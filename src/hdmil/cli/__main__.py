import sys

from hdmil.cli import main

sys.exit(main())
