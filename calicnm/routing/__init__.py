"""Routes between hosts: BGP (the pure BIRD configuration and the BIRD
daemon), encapsulated pools (VXLAN, IPIP), the agent hooks that keep both
equal to the datastore, and the route reflector."""
