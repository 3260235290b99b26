"""Command-line interface: `ipadapter <command>`."""
