"""The raw Ali-CCP format: its contract (`aliccp.format`) and a seeded generator of it (`aliccp.synth`)."""
