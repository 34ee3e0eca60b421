import sys

from fastmice.cli import main

sys.exit(main())
