"""`python -m rlhf_cli` and the `rlhf` console script: see rlhf_cli/cli/app.py."""

from rlhf_cli.cli.app import main

if __name__ == "__main__":
    main()
