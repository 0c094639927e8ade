"""`python -m dbward` runs the command line."""

from dbward.cli.main import main

main()
