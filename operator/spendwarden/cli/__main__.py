"""`python -m spendwarden.cli`: what the image's entry point and the tests start."""
import sys

from . import main

sys.exit(main())
