"""Raw-format readers: one module per raw dataset format, and the registry of them."""
