import sys

from cmpq.cli import main

sys.exit(main())
