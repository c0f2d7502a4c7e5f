"""One module per resource: its SQL constants, row → proto conversion and servicer."""
