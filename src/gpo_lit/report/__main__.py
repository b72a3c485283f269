"""``python -m gpo_lit.report sweep_dir=…``: see :mod:`gpo_lit.report`."""

from gpo_lit.report.command import main

main()
