"""The plugin layer: the component interfaces, the entry-point registry, compatibility checks and
the helpers a plugin author uses (weight loading, target checks, contract test suites)."""
