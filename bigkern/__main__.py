import sys

from bigkern.cli import main

sys.exit(main())
