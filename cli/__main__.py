"""``python -m normscope.cli``: the ``normscope`` console script (e.g. under ``torchrun -m``)."""

from normscope.cli.entry import main

main()
