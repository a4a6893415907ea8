import sys

from benchmarks.paper import main

sys.exit(main())
