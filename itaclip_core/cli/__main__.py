import sys

from itaclip_core.cli import main

sys.exit(main())
