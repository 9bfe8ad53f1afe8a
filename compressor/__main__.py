"""`python -m compressor ...` (and `torchrun -m compressor distill ...`) run the `compress` command."""
import sys

from .cli import main

sys.exit(main())
