"""Parts of bench/fleet.py: the pods' apps, the registries as the fleet sees them, the agents,
the samplers of /proc and of the registries' own counters."""
