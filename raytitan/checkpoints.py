"""``python -m raytitan.checkpoints list|inspect|verify``: a run's checkpoints (see
``raytitan.tools.checkpoints``)."""

import sys

from raytitan.tools.checkpoints import main

if __name__ == "__main__":
    sys.exit(main())
