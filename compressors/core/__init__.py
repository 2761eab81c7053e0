"""The core every method builds on: contract, registry, budgets, storage, layouts, bases."""
