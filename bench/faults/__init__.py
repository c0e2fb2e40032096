"""The fault bench: the real stack on loopback under crashes, outages and hostile clients."""
