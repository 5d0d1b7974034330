"""qfv-brevitas."""
