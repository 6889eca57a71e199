"""``python -m macefield_server``: the same as ``macefield-serve``."""

from .cli.serve import main

if __name__ == "__main__":
    main()
