"""Distributed engines for ``oxigaf batch``. Each imports its framework only inside its own module."""
