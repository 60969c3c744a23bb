"""`python -m megatron_camopd.config SPEC [key=value ...]`: the validate command without the full CLI."""

import sys

from megatron_camopd.config.validate import validate_main

if __name__ == "__main__":
    sys.exit(validate_main())
