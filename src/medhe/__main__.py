import sys

from medhe.cli import main

sys.exit(main())
