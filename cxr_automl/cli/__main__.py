"""``python -m cxr_automl.cli``: the same command as the ``cxr-automl`` script."""

from cxr_automl.cli.app import main

if __name__ == "__main__":
    main()
