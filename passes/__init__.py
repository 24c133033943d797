"""qcc's passes, one module each; importing a module registers its pass."""
