"""cxr-automl's built-in components (installed as ``cxr_automl_plugins``).

Each is registered through the same entry-point groups a third-party plugin would use; nothing here is
imported unless it is asked for by name.
"""
