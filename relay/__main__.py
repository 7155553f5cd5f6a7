import sys

from relay.daemon import main

sys.exit(main())
