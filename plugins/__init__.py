"""tampu\x27s built-in plugins: each folder is one plugin, registered through an entry point."""
