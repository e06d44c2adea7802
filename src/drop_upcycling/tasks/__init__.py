"""lm-eval task YAMLs shipped with the package (an include path for ``TaskManager``)."""
