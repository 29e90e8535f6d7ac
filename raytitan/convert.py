"""``python -m raytitan.convert``: checkpoints to and from Hugging Face and torch files (see
``raytitan.tools.convert``)."""

import sys

from raytitan.tools.convert import main

if __name__ == "__main__":
    sys.exit(main())
