"""The ``cxr-automl`` command: ``app`` defines the commands; the other modules render what they print."""
