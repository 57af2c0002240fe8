"""`python -m localtune.cli`: the same as the `localtune` command."""
from . import main

main()
