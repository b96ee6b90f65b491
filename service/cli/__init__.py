"""The ``loraswap`` command: ``main`` builds the parser and runs a subcommand; ``command`` says what one is."""
