import sys

from itaclip_core.explore.notebook_files import main

sys.exit(main())
