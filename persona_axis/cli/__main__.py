import sys

from persona_axis.cli import main

sys.exit(main())
