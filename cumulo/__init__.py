"""Cumulo's command line and local-cloud tooling (toolchain builder, control-plane launcher)."""
