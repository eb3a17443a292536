"""``python -m foundation.export run_dir=RUN output=BUNDLE``, alone or under torchrun."""

from foundation.export.exporter import main
from foundation.process import exit_without_teardown

if __name__ == "__main__":
    exit_without_teardown(main())
