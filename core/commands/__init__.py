"""Sub-commands of ``tampu`` that live outside ``tampu.cli``; each module has
``register(subparsers)`` (adds its parser) and ``main(argv)`` (runs it on its own)."""
