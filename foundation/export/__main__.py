"""``python -m foundation.export run_dir=RUN output=BUNDLE``, alone or under torchrun."""

import sys

from foundation.export.exporter import main

if __name__ == "__main__":
    sys.exit(main())
